"""Shared plumbing of the block-wise language-model steps (``rtn``, ``gptq``, ``awq``, ``smoothquant``,
``sparsegpt``, ``wanda``): layer selection inside the decoder blocks, calibration batches, reporting.

Memory: ``max_memory`` (any calibrated step) keeps the decoder blocks on disk, memory-mapped, when
the model's weights exceed the budget; only the block being compressed is loaded
(:mod:`nnsqueeze.llm.offload`); results are identical to the in-memory run.

Selection: the default targets are every Linear (and transformers' ``Conv1D``) inside the decoder
blocks found by :func:`nnsqueeze.llm.sequential.find_blocks`; a selected layer outside them (``lm_head``,
embeddings projections) is skipped with a reason in the report and stays float.
"""

from __future__ import annotations

import math
import re
from typing import Any, Callable, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from torch import nn

from ..data import take
from ..errors import DataError, RecipeError, TargetError
from ..llm.offload import parse_bytes
from ..llm.packed import PackedLinear
from ..llm.sequential import find_blocks, get_weight, is_linear, run_sequential, set_weight
from ..ops.rtn import smaller_group
from ..quant.args import QuantArgs
from .base import Step, StepConfig
from .prune import MASK, Prune, ensure_mask



def check_full_range(cfg):
    """The one rule of ``full_range`` on a weight-grid config: symmetric grids only."""
    if cfg.full_range and not cfg.symmetric:
        raise ValueError("full_range: true applies to symmetric grids (an asymmetric grid already uses every "
                         "code); set symmetric: true or drop full_range")
    return cfg

class LLMStepConfig(StepConfig):
    samples: int = Field(128, ge=1, description="calibration sequences: batches of calib_data are taken "
                         "until at least this many")
    max_memory: int | str | None = Field(None, description="weight-memory budget (bytes or '300MB', '1.5GiB'): "
                                         "above it, decoder blocks wait on disk (memory-mapped) and one is loaded")
    offload_dir: str | None = Field(None, description="where the block files go (a temporary directory inside; "
                                    "default: the system temp dir)")

    @field_validator("max_memory")
    @classmethod
    def _budget(cls, v: int | str | None) -> int | None:
        if v is None:
            return None
        n = parse_bytes(v)
        if n <= 0:
            raise ValueError(f"max_memory must be positive, got {v!r}")
        return n


class QuantScheme(StepConfig):
    """The weight grid (``rtn`` needs nothing else: no calibration data)."""

    bits: int = Field(4, ge=2, le=8)
    group_size: int | None = Field(128, description="input channels per scale; null or -1: one per row")
    symmetric: bool = True
    scale_dtype: Literal["fp32", "fp16", "bf16", "fp16-exact"] = Field(
        "fp32", description="scales are values of this type and codes are chosen against them, so a format "
        "storing fp16 scales (gptq, gguf: nnsqueeze.export.hf_formats) holds the model exactly; fp16-exact: "
        "fp16 scales with few enough significant bits that every dequantized weight is an fp16 value too, so "
        "loaders that dequantize in fp16 (gptqmodel) compute the same weights (nnsqueeze.ops.rtn.storable_scale)")
    full_range: bool = Field(False, description="symmetric only: scale absmax / (2**(bits-1) - 0.5) with codes in "
                             "[-2**(bits-1), 2**(bits-1) - 1] (llm-compressor's grid, a finer step) instead of "
                             "absmax / (2**(bits-1) - 1) (ONNX Runtime's); see nnsqueeze.ops.rtn")
    uneven_groups: Literal["short", "smaller"] = Field(
        "short", description="a layer whose inputs group_size does not divide (SmolLM2's 576 at 128): short keeps "
        "a shorter last group; smaller gives that layer the largest power of two >= 16 below group_size that "
        "divides its inputs (64 at 576), for formats without short groups (compressed-tensors, vLLM). The CLI's "
        "--format compressed-tensors picks smaller unless the recipe sets this; every layer changed is reported")

    def group_for(self, columns: int) -> int | None:
        """The group size of a layer with ``columns`` inputs (see ``uneven_groups``); a RecipeError if
        ``smaller`` finds no power of two >= 16 dividing them."""
        g = self.group_size
        if g is None or columns % g == 0 or self.uneven_groups == "short":
            return g
        fit = smaller_group(columns, g)
        if fit is None:
            raise RecipeError("uneven_groups", f"no power of two >= 16 up to group_size {g} divides {columns} inputs",
                              fix="use group_size: null (one scale per row), or uneven_groups: short")
        return fit

    @field_validator("group_size")
    @classmethod
    def _group(cls, v: int | None) -> int | None:
        if v is None or v == -1:
            return None
        if v < 1:
            raise ValueError(f"group_size must be >= 1, -1 or null, got {v}")
        return v

    @model_validator(mode="after")
    def _full_range(self):
        return check_full_range(self)

    def args(self) -> QuantArgs:
        """The grid as :class:`~nnsqueeze.quant.args.QuantArgs` (with ``clip`` where the step has one)."""
        clip = getattr(self, "clip", None)
        search = {} if clip is None else {"clip": "mse", "clip_grid": clip.grid, "clip_min": clip.min_ratio}
        return QuantArgs(bits=self.bits, symmetric=self.symmetric, scale_dtype=self.scale_dtype,
                         granularity=f"group({self.group_size})" if self.group_size else "channel",
                         full_range=self.full_range, **search)


def note_groups(ctx: Any, step: str, c: QuantScheme, layers: list[tuple[str, nn.Module]]) -> None:
    """Report the layers ``uneven_groups: smaller`` gives a smaller group (one line per input width),
    before any calibration: a width that no group fits raises here, not halfway through the run."""
    by: dict[tuple[int, int | None], list[str]] = {}
    for n, m in layers:
        k = get_weight(m).shape[1]
        g = c.group_for(k)
        if g != c.group_size:
            by.setdefault((k, g), []).append(n)
    for (k, g), names in sorted(by.items()):
        more = f", {names[1]}, ..." if len(names) > 2 else (f", {names[1]}" if len(names) == 2 else "")
        ctx.fallback(step, f"uneven_groups: smaller: group_size {c.group_size} does not divide {k} inputs, so "
                     f"{len(names)} layers ({names[0]}{more}) use group_size {g}")


class ClipConfig(BaseModel):
    """``clip: {method: mse, grid: 20, min_ratio: 0.5}`` (rtn, gptq): per group, the clip ratio of the
    range (``grid`` values from 1.0 down to ``min_ratio``) with the least quantization error."""

    model_config = ConfigDict(extra="forbid")
    method: Literal["mse"] = "mse"
    grid: int = Field(20, ge=2, le=1000, description="ratios tried per group, 1.0 included")
    min_ratio: float = Field(0.5, gt=0.0, lt=1.0, description="smallest fraction of the range tried")
    weighted: bool | None = Field(None, description="weight each column's error by the Hessian diagonal "
                                  "(gptq; default true there); rtn has no data: plain MSE")


class QuantFields(QuantScheme, LLMStepConfig):
    """The grid plus ``samples``: the calibrated quantizers (``gptq``, ``awq``)."""


class SparsityFields(LLMStepConfig):
    sparsity: float = Field(0.5, ge=0.0, lt=1.0, description="unstructured: fraction of zeros per layer")
    pattern: str = Field("unstructured", description="'unstructured' or 'N:M' (N nonzeros of every M, e.g. '2:4')")

    @field_validator("pattern")
    @classmethod
    def _pattern(cls, v: str) -> str:
        if v == "unstructured":
            return v
        m = re.fullmatch(r"(\d+):(\d+)", v)
        if not m or not 0 < int(m.group(1)) < int(m.group(2)):
            raise ValueError(f"pattern must be 'unstructured' or 'N:M' with 0 < N < M (e.g. '2:4'), got {v!r}")
        return v

    def prune_nm(self) -> tuple[int, int]:
        """``(pruned per group, group size)``: '2:4' keeps 2 of 4, so prunes 2; (0, 0) if unstructured."""
        if self.pattern == "unstructured":
            return 0, 0
        n, m = map(int, self.pattern.split(":"))
        return m - n, m


def relative_error(w: torch.Tensor, w_hat: torch.Tensor, hessian: torch.Tensor) -> float:
    """``||X (W - W_hat)^T|| / ||X W^T||`` on the calibration tokens, from ``H = 2/n X^T X``."""
    return relative_errors(w, [w_hat], hessian)[0]


def relative_errors(w: torch.Tensor, w_hats: list[torch.Tensor], hessian: torch.Tensor,
                    known: list[float] = ()) -> list[float]:
    """:func:`relative_error` of each of ``w_hats``, the denominator computed once; ``known``: numerators
    ``tr((W - W_hat) H (W - W_hat)^T)`` already known (e.g. GPTQ's ``quad_error``), their errors first.

    The (out, in) @ (in, in) products run in float32 (half the time of float64 on a CPU; these are
    report figures, rounded to 6 digits), the sums in float64."""
    h = hessian.float()
    w32 = w.float()
    d = torch.cat([w32] + [w32 - x.float() for x in w_hats])   # ((1 + k) out, in): one product for all
    quads = ((d @ h) * d).sum(1, dtype=torch.float64).reshape(1 + len(w_hats), -1).sum(1).tolist()
    den = quads[0]
    return [math.sqrt(max(q, 0.0) / den) if den > 0 else 0.0 for q in list(known) + quads[1:]]


class LLMStep(Step):
    default_targets = ["Linear", "Conv1D"]

    def block_layers(self, model: nn.Module, ctx: Any) -> list[tuple[str, nn.Module]]:
        """Selected Linear-like layers inside the decoder blocks; the others are skipped (reported)."""
        prefix, blocks = find_blocks(model)
        supported = tuple({type(m) for m in model.modules() if is_linear(m)}) or (nn.Linear,)
        sel = self.select(model, ctx, supported=supported)
        inside, keep = re.compile(rf"{re.escape(prefix)}\.\d+\..+"), []
        for name, mod in sel.layers:
            if isinstance(mod, PackedLinear):
                ctx.skip(self.registered_name, name, "already packed by an earlier step (codes are final)")
            elif inside.fullmatch(name):
                keep.append((name, mod))
            else:
                ctx.skip(self.registered_name, name, "outside the decoder blocks: kept in float")
        if not keep and any(isinstance(m, PackedLinear) for m in blocks.modules()):
            raise TargetError(f"{self.where}.targets", "every selected layer is already packed by an earlier step",
                              fix="quantize once: give the earlier step pack: false, or drop this step")
        if not keep:
            raise TargetError(f"{self.where}.targets", f"no selected layer is inside the decoder blocks ({prefix}.*)",
                              fix=f"target Linear layers under {prefix}")
        return keep

    def calibrate(self, model: nn.Module, ctx: Any, layers: list[tuple[str, nn.Module]],
                  make_stats: Callable, apply: Callable, **kw: Any) -> dict[str, Any]:
        """Run :func:`run_sequential` on the calibration data; per-layer figures go to the report."""
        if ctx.calib_data is None:
            raise DataError(f"{self.where}", "needs calibration data",
                            fix="pass calib_data=... (batches of token ids or dicts with input_ids)")
        batches = take(ctx.calib_data, self.config.samples)

        def apply_and_report(name, mod, stats):
            fields = apply(name, mod, stats) or {}
            ctx.report.layer(name, **fields)
            return fields

        rep = run_sequential(model, batches, [n for n, _ in layers], make_stats, apply_and_report,
                             device=ctx.device, max_memory=self.config.max_memory,
                             offload_dir=self.config.offload_dir,
                             on_note=lambda msg: ctx.fallback(self.registered_name, msg), **kw)
        figures = rep.as_dict()
        try:
            ctx.report.step(**figures)
        except RuntimeError:  # called outside a recipe run (no current step)
            pass
        ctx.log.info("%s: %d blocks, %d tokens, peak RSS %.0f MiB%s", self.registered_name, rep.blocks,
                     rep.tokens, rep.peak_rss_mib, " (blocks offloaded to disk)" if rep.offloaded else "")
        return figures


@torch.no_grad()
def set_masked(mod, w: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Write ``w`` with ``keep`` intersected with any existing mask; returns the final (out, in) mask."""
    conv1d = type(mod).__name__ == "Conv1D"
    old = ensure_mask(mod)
    old_oi = old.T if conv1d else old
    final = keep.to(old.device) & old_oi
    old.copy_(final.T if conv1d else final)
    set_weight(mod, w * final.to(w.dtype))
    return final


class PruneStep(LLMStep):
    def record(self):
        return {"layers": self.layers_, "mask": MASK, "mask_dtype": "bool", "pattern": self.config.pattern}

    @classmethod
    def rebuild(cls, model, config, record: dict[str, Any]):
        return Prune.rebuild(model, config, record)  # registers the bool weight_mask buffers
