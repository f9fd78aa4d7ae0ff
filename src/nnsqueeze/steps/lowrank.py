"""Step ``lowrank``: truncated-SVD factorization of Linear layers; Tucker-2 of Conv1d/Conv2d or the
spatial (Jaderberg) decomposition of Conv2d.

Recipe::

    steps:
      - lowrank:  {budget: 0.4}                 # each layer keeps <= 40% of its weights
      - finetune: {epochs: 10, lr: 1.0e-3}
    # or {energy: 0.9}: the smallest ranks keeping 90% of each weight's squared Frobenius norm
    # or {rank: 32}: a fixed rank (Linear) / channel ranks (conv), clipped to the layer
    # conv: spatial -> each k x k Conv2d becomes a (k x 1) conv to r channels, then a (1 x k) conv
    # or {sensitivity: 0.02}: per layer, the smallest rank whose factorization alone raises the
    #    calibration loss by at most 0.02 (candidate budgets 5% ... 90% of the layer's weights)

Python::

    >>> import torch
    >>> from torch import nn
    >>> from nnsqueeze.context import Context
    >>> from nnsqueeze.steps.lowrank import LowRank
    >>> ctx = Context(progress=False); ctx.report.begin_step("lowrank", {})
    >>> model = LowRank(LowRank.Config(rank=4)).run(nn.Sequential(nn.Linear(64, 32)), ctx)
    >>> model[0]
    Sequential(
      (0): Linear(in_features=64, out_features=4, bias=False)
      (1): Linear(in_features=4, out_features=32, bias=True)
    )

What it does: a ``Linear(in, out)`` becomes ``Sequential(Linear(in, r, bias=False), Linear(r, out))``
with the truncated SVD (``W ~ U_r S_r V_r^T``, the root of ``S_r`` on each side); a ``Conv(I, O, k)``
becomes ``Sequential(Conv(I, r_in, 1), Conv(r_in, r_out, k, stride, padding, dilation), Conv(r_out, O, 1))``
from the Tucker-2 decomposition (HOSVD of the two channel modes; bias on the last conv). With
``conv: spatial`` a ``Conv2d(I, O, (kh, kw))`` becomes ``Sequential(Conv2d(I, r, (kh, 1)), Conv2d(r, O, (1, kw)))``
(Jaderberg et al. 2014, scheme 2: the truncated SVD of the kernel unfolded to ``(I*kh, O*kw)``,
:func:`nnsqueeze.ops.svd.spatial_svd`; stride, padding and dilation split per axis); Conv1d and
1x1 layers are then skipped (reported). ``sensitivity: tol`` measures each layer on its own: it
factorizes only that layer at the ranks of the candidate budgets ``BUDGETS`` (smallest first) and
keeps the first whose loss on up to ``sensitivity_samples`` samples of ``calib_data`` (else
``train_data``) exceeds the unfactorized model's by at most ``tol`` (absolute: a relative rule
fails on a model that fits its calibration samples almost perfectly); loss as in ``finetune``
(``ctx.loss_fn``, the model's ``.loss`` for dict batches, else cross-entropy). A layer
is skipped (and reported) when factorizing it would not save parameters, when it is grouped or
pruned (a ``weight_mask``: factors are dense), or uses a non-zero padding mode. The record holds
each layer's kind and ranks, so ``nsq.load`` rebuilds the structure without data; the exported
ONNX model holds the smaller layers. Default targets: Linear, Conv1d, Conv2d.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from ..data import call_model, logits, split, take, to_device
from ..errors import ArtifactError, DataError, ModelError
from ..ops.svd import (rank_for_budget, rank_for_energy, singular_values, spatial_matrix, spatial_params,
                       spatial_rank_for_budget, spatial_reconstruct, spatial_svd, truncated_svd, tucker2,
                       tucker2_params, tucker2_ranks_for_budget, tucker2_ranks_for_energy)
from ..registry import STEPS
from .base import Step, StepConfig, record_int, recorded_module
from ..targets import set_module

SUPPORTED: tuple[type, ...] = (nn.Linear, nn.Conv1d, nn.Conv2d)
#: parameter budgets tried by the sensitivity rule, smallest first
BUDGETS = (0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


class LowRankConfig(StepConfig):
    rank: int | None = Field(None, ge=1, description="fixed rank (Linear) or channel ranks (conv)")
    energy: float | None = Field(None, gt=0.0, le=1.0, description="keep this fraction of sum(s**2)")
    budget: float | None = Field(None, gt=0.0, lt=1.0, description="keep at most this fraction of each "
                                 "layer's weights")
    sensitivity: float | None = Field(None, gt=0.0, description="per layer, the smallest candidate rank whose "
                                      "factorization alone raises the calibration loss by at most this much "
                                      "(absolute, in the loss's units)")
    sensitivity_samples: int = Field(512, ge=1, description="calibration samples for the sensitivity rule")
    conv: Literal["tucker2", "spatial"] = Field("tucker2", description="convolution decomposition: tucker2 "
                                                "(1x1, k, 1x1 convs) or spatial (Conv2d only: (kh x 1) then (1 x kw))")

    @model_validator(mode="after")
    def _one_rule(self) -> "LowRankConfig":
        given = [k for k in ("rank", "energy", "budget", "sensitivity") if getattr(self, k) is not None]
        if len(given) > 1:
            raise ValueError(f"give one of rank, energy, budget, sensitivity (got {', '.join(given)})")
        if not given:
            self.energy = 0.9
        return self



def _linear_factors(m: nn.Linear, r: int) -> nn.Sequential:
    dev, dt = m.weight.device, m.weight.dtype
    return nn.Sequential(nn.Linear(m.in_features, r, bias=False, device=dev, dtype=dt),
                         nn.Linear(r, m.out_features, bias=m.bias is not None, device=dev, dtype=dt))


def _conv_factors(m: nn.modules.conv._ConvNd, r_out: int, r_in: int) -> nn.Sequential:
    conv = type(m)
    dev, dt = m.weight.device, m.weight.dtype
    return nn.Sequential(
        conv(m.in_channels, r_in, 1, bias=False, device=dev, dtype=dt),
        conv(r_in, r_out, m.kernel_size, stride=m.stride, padding=m.padding, dilation=m.dilation, bias=False,
             device=dev, dtype=dt),
        conv(r_out, m.out_channels, 1, bias=m.bias is not None, device=dev, dtype=dt))


def _spatial_factors(m: nn.Conv2d, r: int) -> nn.Sequential:
    dev, dt = m.weight.device, m.weight.dtype
    (kh, kw), (sh, sw), (dh, dw) = m.kernel_size, m.stride, m.dilation
    if isinstance(m.padding, str):  # 'valid' / 'same' hold per axis
        pv = ph = m.padding
    else:
        pv, ph = (m.padding[0], 0), (0, m.padding[1])
    return nn.Sequential(
        nn.Conv2d(m.in_channels, r, (kh, 1), stride=(sh, 1), padding=pv, dilation=(dh, 1), bias=False,
                  device=dev, dtype=dt),
        nn.Conv2d(r, m.out_channels, (1, kw), stride=(1, sw), padding=ph, dilation=(1, dw),
                  bias=m.bias is not None, device=dev, dtype=dt))


@torch.no_grad()
def _mean_loss(model: nn.Module, batches: list, ctx: Any) -> float:
    """Sample-weighted mean loss of ``model`` on ``batches`` (ctx.loss_fn, the output's .loss, or CE)."""
    total = count = 0.0
    for batch in batches:
        inputs, targets = split(batch)
        out = call_model(model, inputs)
        if ctx.loss_fn is not None:
            loss = ctx.loss_fn(out, targets)
        elif isinstance(batch, dict):
            loss = out.get("loss") if isinstance(out, dict) else getattr(out, "loss", None)
        else:
            z = logits(out)
            loss = None if targets is None else F.cross_entropy(z.reshape(-1, z.shape[-1]), targets.reshape(-1))
        if loss is None:
            raise DataError("calib_data", "the sensitivity rule needs a loss: batches have no targets",
                            fix="give (inputs, targets) batches, dicts with labels, or loss_fn=...")
        n = len(targets) if isinstance(targets, torch.Tensor) else 1
        total, count = total + float(loss) * n, count + n
    return total / max(count, 1.0)


@STEPS.register("lowrank")
class LowRank(Step):
    needs_float = True
    Config = LowRankConfig
    default_targets: ClassVar[list[str]] = ["Linear", "Conv1d", "Conv2d"]

    def __init__(self, config: LowRankConfig, index: int = 0):
        super().__init__(config, index)
        self.layers_: dict[str, dict[str, Any]] = {}

    def _ranks(self, name: str, m: nn.Module, budget: float | None = None) -> tuple[list[int] | None, int, int]:
        """(ranks, params before, params after) for layer ``m``; ranks None when the budget cannot be met.
        ``budget`` overrides the config's rule (the sensitivity rule's candidates)."""
        c: LowRankConfig = self.config
        if budget is not None:
            c = c.model_copy(update={"rank": None, "energy": None, "budget": budget, "sensitivity": None})
        w = m.weight.detach()
        before = w.numel()
        if isinstance(m, nn.Linear):
            o, i = w.shape
            if c.rank is not None:
                r = min(c.rank, o, i)
            elif c.budget is not None:
                r = rank_for_budget(o, i, c.budget)
                if r is None:
                    return None, before, before
            else:
                r = rank_for_energy(singular_values(w), c.energy)
            return [r], before, r * (o + i)
        o, i = w.shape[:2]
        ksize = w[0, 0].numel()
        if c.conv == "spatial":
            kh, kw = w.shape[2:]
            if c.rank is not None:
                r = min(c.rank, i * kh, o * kw)
            elif c.budget is not None:
                r = spatial_rank_for_budget(o, i, kh, kw, c.budget)
                if r is None:
                    return None, before, before
            else:
                r = rank_for_energy(singular_values(spatial_matrix(w)), c.energy)
            return [r], before, spatial_params(o, i, kh, kw, r)
        if c.rank is not None:
            ro, ri = min(c.rank, o), min(c.rank, i)
        elif c.budget is not None:
            rr = tucker2_ranks_for_budget(o, i, ksize, c.budget)
            if rr is None:
                return None, before, before
            ro, ri = rr
        else:
            ro, ri = tucker2_ranks_for_energy(w, c.energy)
        return [ro, ri], before, tucker2_params(o, i, ksize, ro, ri)

    @torch.no_grad()
    def _factorize(self, m: nn.Module, ranks: list[int]) -> tuple[nn.Sequential, str]:
        w = m.weight.detach()
        if isinstance(m, nn.Linear):
            new = _linear_factors(m, ranks[0])
            b, a = truncated_svd(w, ranks[0])
            new[0].weight.copy_(a)
            new[1].weight.copy_(b)
            kind = "svd"
        elif self.config.conv == "spatial":
            new = _spatial_factors(m, ranks[0])
            v, h = spatial_svd(w, ranks[0])
            new[0].weight.copy_(v)
            new[1].weight.copy_(h)
            kind = "spatial"
        else:
            new = _conv_factors(m, *ranks)
            u_out, core, u_in = tucker2(w, *ranks)
            extra = (1,) * (w.dim() - 2)
            new[0].weight.copy_(u_in.reshape(*u_in.shape, *extra))
            new[1].weight.copy_(core)
            new[2].weight.copy_(u_out.reshape(*u_out.shape, *extra))
            kind = "tucker2"
        if m.bias is not None:
            new[-1].bias.copy_(m.bias)
        return new.train(m.training), kind

    def _params(self, m: nn.Module, ranks: list[int]) -> int:
        w = m.weight
        if isinstance(m, nn.Linear):
            return ranks[0] * (w.shape[0] + w.shape[1])
        if self.config.conv == "spatial":
            return spatial_params(w.shape[0], w.shape[1], w.shape[2], w.shape[3], ranks[0])
        return tucker2_params(w.shape[0], w.shape[1], w[0, 0].numel(), ranks[0], ranks[1])

    def _sensitivity_ranks(self, model: nn.Module, layers: list[tuple[str, nn.Module]],
                           ctx: Any) -> dict[str, list[int] | None]:
        """Per layer, the ranks of the smallest candidate budget whose factorization of that layer
        alone keeps the calibration loss within ``sensitivity`` of the unfactorized model's."""
        c: LowRankConfig = self.config
        data = ctx.calib_data if ctx.calib_data is not None else ctx.train_data
        if data is None:
            raise DataError(f"{self.where}.sensitivity", "the sensitivity rule needs data",
                            fix="pass calib_data=... (or train_data=...) or use rank/energy/budget")
        batches = [to_device(b, ctx.device) for b in take(data, c.sensitivity_samples)]
        was = model.training
        model.eval()
        try:
            base = _mean_loss(model, batches, ctx)
            limit = base + c.sensitivity
            out: dict[str, list[int] | None] = {}
            for name, m in layers:
                out[name] = None
                for b in BUDGETS:
                    ranks, before, after = self._ranks(name, m, budget=b)
                    if ranks is None or after >= before:
                        continue
                    set_module(model, name, self._factorize(m, ranks)[0].eval())
                    try:
                        loss = _mean_loss(model, batches, ctx)
                    finally:
                        set_module(model, name, m)
                    if loss <= limit:
                        out[name] = ranks
                        ctx.report.layer(name, sensitivity_budget=b, calib_loss=round(loss, 6),
                                         calib_loss_base=round(base, 6))
                        break
        finally:
            model.train(was)
        return out

    @torch.no_grad()
    def run(self, model: nn.Module, ctx: Any) -> nn.Module:
        c: LowRankConfig = self.config
        total_before = total_after = 0
        todo = []
        for name, m in self.select(model, ctx, supported=SUPPORTED).layers:
            why = None
            if type(m) not in SUPPORTED or not isinstance(getattr(m, "weight", None), nn.Parameter):
                why = f"{type(m).__name__} is not a plain layer with a weight"
            elif isinstance(getattr(m, "weight_mask", None), torch.Tensor):
                why = "pruned (weight_mask): low-rank factors would be dense"
            elif not isinstance(m, nn.Linear) and (m.groups != 1 or m.padding_mode != "zeros"):
                why = "grouped convolution or non-zero padding mode"
            elif self.config.conv == "spatial" and not isinstance(m, nn.Linear) and (
                    not isinstance(m, nn.Conv2d) or m.kernel_size == (1, 1)):
                why = "spatial decomposition needs a Conv2d with a kernel larger than 1x1"
            if why:
                ctx.skip(self.registered_name, name, why)
                continue
            if not torch.isfinite(m.weight).all():
                raise ModelError(f"{self.where}: {name}.weight", "contains NaN or inf",
                                 fix="check the checkpoint; SVD needs finite weights")
            todo.append((name, m))
        chosen = self._sensitivity_ranks(model, todo, ctx) if c.sensitivity is not None else {}
        for name, m in todo:
            if c.sensitivity is not None:
                if chosen[name] is None:
                    ctx.skip(self.registered_name, name, f"no candidate rank keeps the calibration loss within "
                             f"{c.sensitivity:g} of the original's")
                    continue
                ranks = chosen[name]
                before, after = m.weight.numel(), self._params(m, ranks)
            else:
                ranks, before, after = self._ranks(name, m)
            if ranks is None:
                ctx.skip(self.registered_name, name, f"even rank 1 keeps more than {self.config.budget} of its weights")
                continue
            if after >= before:
                ctx.skip(self.registered_name, name, f"rank {ranks} would not save parameters ({after} >= {before})")
                continue
            w = m.weight.detach()
            new, kind = self._factorize(m, ranks)
            rel = float(((w - self._dense(new)).norm() / w.norm().clamp(min=1e-12)))
            set_module(model, name, new.train(m.training))
            self.layers_[name] = {"kind": kind, "ranks": ranks}
            total_before, total_after = total_before + before, total_after + after
            ctx.report.layer(name, lowrank=kind, ranks=ranks, params_before=before, params_after=after,
                             rel_error=round(rel, 6))
        ctx.report.step(layers=len(self.layers_), params_before=total_before, params_after=total_after,
                        ratio=round(total_before / max(1, total_after), 3))
        return model

    @staticmethod
    def _dense(seq: nn.Sequential) -> torch.Tensor:
        """The factors multiplied back (for the reported relative error)."""
        if isinstance(seq[0], nn.Linear):
            return seq[1].weight @ seq[0].weight
        if len(seq) == 2:  # spatial
            return spatial_reconstruct(seq[0].weight, seq[1].weight)
        u_in = seq[0].weight.reshape(seq[0].weight.shape[:2])
        u_out = seq[2].weight.reshape(seq[2].weight.shape[:2])
        return torch.einsum("or,rs...,si->oi...", u_out, seq[1].weight, u_in)

    def record(self) -> dict[str, Any]:
        return {"layers": {k: dict(v) for k, v in self.layers_.items()}}

    @classmethod
    def rebuild(cls, model: nn.Module, config: LowRankConfig, record: dict[str, Any]) -> nn.Module:
        """Replace the recorded layers by (uninitialised) factor sequences of the recorded ranks."""
        for name, spec in record.get("layers", {}).items():
            m = recorded_module(model, name, (nn.Module,), "lowrank record")
            if not isinstance(spec, dict) or not isinstance(spec.get("ranks", []), list):
                raise ArtifactError(f"lowrank record: {name}", "must be a mapping with a list of ranks",
                                    fix="re-create the artifact")
            kind, ranks = spec.get("kind"), spec.get("ranks", []) + [None, None]
            at = f"lowrank record: {name}: ranks"
            if kind == "svd" and isinstance(m, nn.Linear):
                new = _linear_factors(m, record_int(ranks[0], 1, min(m.in_features, m.out_features), at))
            elif kind == "spatial" and isinstance(m, nn.Conv2d):
                kh, kw = m.kernel_size
                new = _spatial_factors(m, record_int(ranks[0], 1, max(m.in_channels * kh, m.out_channels * kw), at))
            elif kind == "tucker2" and isinstance(m, (nn.Conv1d, nn.Conv2d)):
                new = _conv_factors(m, record_int(ranks[0], 1, m.out_channels, at),
                                    record_int(ranks[1], 1, m.in_channels, at))
            else:
                raise ModelError(f"lowrank record: {name}", f"cannot apply {kind!r} to {type(m).__name__}",
                                 fix="load onto the same architecture that was compressed")
            set_module(model, name, new)
        return model
