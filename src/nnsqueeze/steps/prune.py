"""Step ``prune``: unstructured magnitude pruning, one-shot or gradual (Zhu & Gupta cubic schedule).

Recipe::

    steps:
      - prune: {method: magnitude, sparsity: 0.6, scope: global, schedule: gradual,
                begin: 0.0, end: 0.8}        # fractions of the following fine-tuning steps
      - finetune: {epochs: 3, lr: 1.0e-3}

Python::

    >>> import torch
    >>> from torch import nn
    >>> from nnsqueeze.context import Context
    >>> from nnsqueeze.steps.prune import Prune
    >>> ctx = Context(progress=False); ctx.report.begin_step("prune", {})
    >>> model = Prune(Prune.Config(sparsity=0.5)).run(nn.Sequential(nn.Linear(4, 4)), ctx)
    >>> int((model[0].weight == 0).sum()), model[0].weight_mask.dtype
    (8, torch.bool)

What it leaves on the model
- each pruned module gets a **bool** buffer ``weight_mask`` shaped like ``weight`` (``True`` = keep).
  Bool, not float: one byte per weight, no rounding questions, and ``weight * mask`` still works.
  It is a persistent buffer, so it is in ``state_dict()`` and survives save/load.
- the pruned entries of ``weight`` are set to real zeros, so export and quantization see them.
- biases are never touched. Pruning never revives a weight: a new mask is always a subset of an
  existing ``weight_mask``.

Default targets: ``Linear``, ``Conv1d``, ``Conv2d``. ``scope: layer`` (default) prunes every layer to
exactly ``round(sparsity * numel)`` zeros; ``scope: global`` ranks all selected weights together and
reaches exactly ``round(sparsity * total)`` zeros overall (layers end up at different sparsities).
``layer`` is the default because ``global`` can empty small layers at high sparsity.

Gradual schedule contract (for the runner and training steps)
- the step's ``requires_training`` property is True; the runner must reject a recipe without a
  later step whose ``trains`` is True (``pipeline.make_steps`` does).
- ``run`` registers all-``True`` masks and appends a :class:`GradualPruning` callback to
  ``ctx.callbacks``. A training step calls ``on_train_begin(model, total)``, then
  ``on_step_end(model, step, total)`` after every optimizer step (``step`` = 0 .. total-1), then
  ``on_train_end(model)``, always with the *unwrapped* model. Sparsity rises along the cubic curve
  with ``t = step + 1`` completed steps and is exactly the target after ``on_train_end``; the
  callback then sets ``done`` and ignores later calls (so a second fine-tune does not re-run it).
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import torch
from pydantic import Field, field_validator
from torch import nn

from ..errors import ModelError
from ..ops.sparsity import cubic_sparsity, global_magnitude_masks, magnitude_mask
from ..registry import STEPS
from .base import Step, StepConfig, recorded_module

MASK = "weight_mask"
# nn.modules.conv._ConvNd covers Conv1d/2d/3d and the transposed convs; all have a dense ``weight``.
SUPPORTED: tuple[type, ...] = (nn.Linear, nn.modules.conv._ConvNd)


class PruneConfig(StepConfig):
    method: Literal["magnitude"] = "magnitude"
    sparsity: float = Field(ge=0.0, lt=1.0, description="fraction of weights set to zero")
    scope: Literal["layer", "global"] = "layer"
    schedule: Literal["oneshot", "gradual"] = "oneshot"
    initial_sparsity: float = Field(0.0, ge=0.0, lt=1.0, description="gradual: sparsity at `begin`")
    begin: float = Field(0.0, ge=0.0, lt=1.0, description="gradual: start, fraction of the training steps")
    end: float = Field(0.8, gt=0.0, le=1.0, description="gradual: target reached, fraction of the training steps")
    frequency: int | None = Field(None, ge=1, description="gradual: optimizer steps between mask updates; "
                                  "default: about 20 updates between begin and end")

    @field_validator("initial_sparsity")
    @classmethod
    def _initial_below_final(cls, v: float, info: Any) -> float:
        s = info.data.get("sparsity")
        if s is not None and v > s:
            raise ValueError(f"initial_sparsity {v} is above sparsity {s}")
        return v

    @field_validator("end")
    @classmethod
    def _end_after_begin(cls, v: float, info: Any) -> float:
        b = info.data.get("begin")
        if b is not None and v <= b:
            raise ValueError(f"end {v} must be after begin {b}")
        return v


# ---- mask helpers, used by this step and by every training step -------------------------------------

def masked_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of every module carrying a ``weight_mask`` buffer."""
    return [(n, m) for n, m in model.named_modules() if isinstance(getattr(m, MASK, None), torch.Tensor)]


@torch.no_grad()
def apply_masks(model: nn.Module) -> int:
    """Zero the pruned weights again (``weight *= weight_mask``). Returns the number of modules."""
    mods = masked_modules(model)
    for _, m in mods:
        m.weight.mul_(getattr(m, MASK).to(m.weight.dtype))
    return len(mods)


@torch.no_grad()
def mask_grads(model: nn.Module) -> None:
    """Zero the gradients of pruned weights (so clipping and optimizer statistics ignore them)."""
    for _, m in masked_modules(model):
        if m.weight.grad is not None:
            m.weight.grad.mul_(getattr(m, MASK).to(m.weight.grad.dtype))


def ensure_mask(module: nn.Module) -> torch.Tensor:
    """The module's ``weight_mask``, registering an all-True one if missing."""
    mask = getattr(module, MASK, None)
    if not isinstance(mask, torch.Tensor):
        module.register_buffer(MASK, torch.ones_like(module.weight, dtype=torch.bool))
        mask = getattr(module, MASK)
    return mask


@torch.no_grad()
def prune_to(modules: list[nn.Module], sparsity: float, scope: str) -> None:
    """Shrink the masks of ``modules`` to ``sparsity`` by |weight| and zero the pruned weights."""
    weights = [m.weight for m in modules]
    olds = [ensure_mask(m) for m in modules]
    if scope == "global":
        news = global_magnitude_masks(weights, sparsity, olds)
    else:
        news = [magnitude_mask(w, sparsity, o) for w, o in zip(weights, olds)]
    for m, old, new in zip(modules, olds, news):
        old.copy_(new)
        m.weight.mul_(new.to(m.weight.dtype))


def _sparsities(named: list[tuple[str, nn.Module]]) -> tuple[dict[str, float], float]:
    per, zeros, total = {}, 0, 0
    for name, m in named:
        mask = getattr(m, MASK)
        z = mask.numel() - int(mask.sum())
        per[name] = z / mask.numel()
        zeros, total = zeros + z, total + mask.numel()
    return per, zeros / max(1, total)


def _report(ctx: Any, figures: dict, named: list[tuple[str, nn.Module]], target: float) -> float:
    """Per-layer and overall sparsity into the report; a note for layers pruned away entirely."""
    per, achieved = _sparsities(named)
    for name, s in per.items():
        ctx.report.layer(name, sparsity=round(s, 6))
        if s >= 0.999:
            ctx.fallback("prune", f"{name} is {100 * s:.1f}% pruned (use scope: layer or ignore it "
                         "to keep it alive)")
    figures.update(target_sparsity=target, sparsity=round(achieved, 6))
    return achieved


class GradualPruning:
    """TrainCallback raising sparsity along the cubic schedule during the next training step."""

    def __init__(self, layers: list[str], config: PruneConfig, ctx: Any = None, figures: dict | None = None):
        self.layers, self.config = list(layers), config
        self.ctx, self.figures = ctx, figures if figures is not None else {}
        self.done = False
        self.current_: float = 0.0  # sparsity the masks are at now
        self.updates_: int = 0      # mask updates so far
        # Resolved in on_train_begin from the number of training steps.
        self.total_, self.begin_, self.end_, self.frequency_ = 0, 0, 1, config.frequency or 1

    def _modules(self, model: nn.Module) -> list[nn.Module]:
        try:
            return [model.get_submodule(n) for n in self.layers]
        except AttributeError as e:
            raise ModelError("prune (gradual)", f"the training model lost a pruned layer: {e}",
                             fix="do not replace layers between a gradual prune and its fine-tuning") from None

    def _to(self, model: nn.Module, s: float) -> None:
        if s > self.current_:
            prune_to(self._modules(model), s, self.config.scope)
            self.current_, self.updates_ = s, self.updates_ + 1

    def on_train_begin(self, model: nn.Module, total: int) -> None:
        if self.done:
            return
        c = self.config
        self.total_ = max(1, int(total))
        self.begin_ = int(round(c.begin * self.total_))
        self.end_ = max(self.begin_ + 1, min(self.total_, int(round(c.end * self.total_))))
        self.frequency_ = c.frequency or max(1, (self.end_ - self.begin_) // 20)
        self._to(model, self.sparsity_at(0))

    def sparsity_at(self, t: int) -> float:
        """Target sparsity after ``t`` completed optimizer steps."""
        c = self.config
        return cubic_sparsity(t, final=c.sparsity, initial=c.initial_sparsity, begin=self.begin_,
                              end=self.end_, frequency=self.frequency_)

    def on_step_end(self, model: nn.Module, step: int, total: int) -> None:
        if not self.done:
            self._to(model, self.sparsity_at(step + 1))

    def on_train_end(self, model: nn.Module) -> None:
        if self.done:
            return
        self._to(model, self.config.sparsity)  # a no-op unless training stopped before `end`
        self.done = True
        named = list(zip(self.layers, self._modules(model)))
        self.figures.update(mask_updates=self.updates_, frequency=self.frequency_)
        if self.ctx is not None:
            achieved = _report(self.ctx, self.figures, named, self.config.sparsity)
            self.ctx.log.info("prune: gradual schedule done, sparsity %.4f after %d mask updates",
                              achieved, self.updates_)


@STEPS.register("prune")
class Prune(Step):
    needs_float = True
    Config = PruneConfig
    default_targets: ClassVar[list[str]] = ["Linear", "Conv1d", "Conv2d"]
    trains: ClassVar[bool] = False

    def __init__(self, config: PruneConfig, index: int = 0):
        super().__init__(config, index)
        self.layers_: list[str] = []
        self.callback_: GradualPruning | None = None

    @property
    def requires_training(self) -> bool:
        """True for ``schedule: gradual``: a later step with ``trains = True`` must run the schedule."""
        return self.config.schedule == "gradual"

    def run(self, model: nn.Module, ctx: Any) -> nn.Module:
        c: PruneConfig = self.config
        named, seen = [], {}
        for name, m in self.select(model, ctx, supported=SUPPORTED).layers:
            w = getattr(m, "weight", None)
            if not isinstance(w, nn.Parameter) or isinstance(w, nn.parameter.UninitializedParameter):
                ctx.skip(self.registered_name, name, "has no initialised weight")
                continue
            if id(w) in seen:  # tied weights: prune the shared tensor once
                ctx.skip(self.registered_name, name, f"shares its weight with {seen[id(w)]}")
                continue
            if not torch.isfinite(w).all():
                raise ModelError(f"{self.where}: {name}.weight", "contains NaN or inf",
                                 fix="check the checkpoint; magnitude pruning needs finite weights")
            seen[id(w)] = name
            ensure_mask(m)
            named.append((name, m))
        self.layers_ = [n for n, _ in named]
        ctx.report.step(target_sparsity=c.sparsity, scope=c.scope, schedule=c.schedule, layers=len(named))
        figures = ctx.report.steps[-1]["figures"]  # this step's figures; step() above proves it is open
        if c.schedule == "oneshot":
            prune_to([m for _, m in named], c.sparsity, c.scope)
            achieved = _report(ctx, figures, named, c.sparsity)
            ctx.log.info("prune: %d layers at sparsity %.4f (target %.4f, %s)", len(named), achieved,
                         c.sparsity, c.scope)
        else:
            self.callback_ = GradualPruning(self.layers_, c, ctx, figures)
            ctx.callbacks.append(self.callback_)
            figures["sparsity"] = 0.0
        return model

    def record(self) -> dict[str, Any]:
        return {"layers": list(self.layers_), "mask": MASK, "mask_dtype": "bool"}

    @classmethod
    def rebuild(cls, model: nn.Module, config: PruneConfig, record: dict[str, Any]) -> nn.Module:
        """Register zero-filled bool ``weight_mask`` buffers; ``load_state_dict`` then fills them."""
        for name in record.get("layers", []):
            m = recorded_module(model, name, (nn.Module,), "prune record")
            if not isinstance(getattr(m, "weight", None), torch.Tensor):
                raise ModelError(f"prune record: {name}", f"{type(m).__name__} has no weight",
                                 fix="load onto the same architecture that was compressed")
            if isinstance(getattr(m, MASK, None), torch.Tensor):
                getattr(m, MASK).zero_()
            else:
                m.register_buffer(MASK, torch.zeros_like(m.weight, dtype=torch.bool))
        return model
