"""The ``qat`` step: prepare a model for quantization-aware training; ``finetune`` then trains it.

``qat`` does what ``quantize`` does (same config: weight scheme, calibration...) and then:

- keeps each BatchNorm that follows a quantized conv/linear, attached to that layer (``bn: train``):
  during training the layer folds it on the fly with the running statistics and rescales to the
  batch statistics (:func:`nnsqueeze.quant.fold.bn_train_forward`, Krishnamoorthi 2018), so the
  weight is quantized on the grid it will have after folding; after ``freeze_bn_after`` optimizer
  steps the running statistics are frozen and the layer computes exactly the folded int8 layer;
- with ``lsq: true`` learns the step sizes of the weights and of the activations (LSQ, Esser et al.
  2020; :mod:`nnsqueeze.ops.lsq`); the fake quantization uses the straight-through estimator;
- with ``grid_lambda > 0`` adds ``lambda * mean(((W - Q(W)) / s)**2)`` (distance to the grid, in
  grid steps) to the training loss, through a ``ctx.callbacks`` entry with ``penalty(model)``.

At the end of the ``finetune`` step (``on_train_end``) the BNs are folded for good and the learned
step sizes become the layers' fixed scales: the model is then a static int8 model that exports to
QDQ ONNX like the ``quantize`` step's. Recipe::

    steps:
      - qat:
          weights: {bits: 4}
          lsq: true
          freeze_bn_after: 200
          grid_lambda: 0.0
      - finetune: {steps: 400, lr: 1.0e-4}

The step's record is updated in place when training ends (folded BNs, LSQ removed), so the saved
artifact rebuilds the final structure.

Under ``torchrun`` (data-parallel ``finetune``) the result is that of one process training on the
union of the ranks' batches: attached BNs use the batch statistics of all ranks together
(:func:`nnsqueeze.distributed.batch_moments`, so their running statistics and the folded weights
stay identical on every rank), and the activation step sizes' LSQ gradient scale counts the global
batch (:func:`lsq_world_scale_hooks`). Tested against that reference in tests/steps/test_qat_ddp.py.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from .. import distributed as dd
from ..errors import RecipeError
from ..ops.quant import EPS, fake_quantize, fake_quantize_levels
from ..quant.fold import attach_batchnorm, attach_structure, fold_attached_
from ..quant.modules import fake_quant_modules
from ..registry import STEPS
from .quantize import SUPPORTED, Quantize, QuantizeConfig


class QatConfig(QuantizeConfig):
    bn: Literal["train", "static"] = Field("train", description="train: fold BatchNorm on the fly during "
                                           "training; static: fold it once before training (as quantize)")
    freeze_bn_after: int | None = Field(None, ge=0, description="optimizer steps after which the BN running "
                                        "statistics are frozen (null: at the end of training)")
    lsq: bool = Field(True, description="learn the weight and activation step sizes (LSQ)")
    grid_lambda: float = Field(0.0, ge=0, description="weight of the distance-to-grid regularizer")
    bias_correction: bool = False

    @model_validator(mode="after")
    def _int_only(self) -> "QatConfig":
        if self.weights.format != "int":
            raise ValueError(f"qat trains int grids; weights format {self.weights.format} is a quantize option")
        return self


def add_lsq_(layer: nn.Module) -> None:
    """Learnable step sizes initialized from the calibrated scales (uniform weight grids only)."""
    if not layer.qargs.nonuniform and "weight_step" not in layer._parameters:
        layer.register_parameter("weight_step", nn.Parameter(layer.weight_scale_.detach().clone()))
    for which in ("input", "output"):
        buf = layer._buffers.get(f"{which}_scale_")
        if buf is not None and f"{which}_step" not in layer._parameters:
            layer.register_parameter(f"{which}_step", nn.Parameter(buf.detach().clone()))


def share_steps(model: nn.Module) -> dict[str, str]:
    """Consumers whose input grid IS a producer's output grid (same calibrated scale and zero point:
    a conv's quantized output feeding the next layer). LSQ must keep them identical, else the
    exported graph requantizes between two grids (and ONNX Runtime fuses that differently from the
    simulation). Returns ``{consumer: producer}``."""
    outs = [(n, m) for n, m in fake_quant_modules(model) if m.quant_output]
    shared = {}
    for name, m in fake_quant_modules(model):
        for pname, p in outs:
            if pname != name and p.ascheme == m.ascheme and torch.equal(p.output_scale_, m.input_scale_) and \
                    torch.equal(p.output_zero_point_, m.input_zero_point_):
                shared[name] = pname
                break
    return shared


def add_lsq_model_(model: nn.Module, shared: dict[str, str]) -> None:
    """LSQ parameters on every fake-quant layer; shared input/output grids use one parameter."""
    for _, m in fake_quant_modules(model):
        add_lsq_(m)
    for consumer, producer in shared.items():
        c, p = model.get_submodule(consumer), model.get_submodule(producer)
        c._parameters["input_step"] = p._parameters["output_step"]


@torch.no_grad()
def drop_lsq_(layer: nn.Module) -> bool:
    """Learned step sizes become the fixed scales (weights' scales then stay frozen)."""
    found = False
    for which in ("weight", "input", "output"):
        p = layer._parameters.pop(f"{which}_step", None)
        if p is not None:
            layer._buffers[f"{which}_scale_"].copy_(p.detach().abs().clamp(min=EPS))
            found = True
            if which == "weight":
                layer.weight_frozen = True
    return found


def grid_distance(layer: nn.Module) -> torch.Tensor:
    """Mean squared distance of the (effective) weight to its quantization grid, in grid steps."""
    w = layer.effective_weight()
    rows = layer.weight_rows(w)
    s = layer.weight_scale_.detach()
    with torch.no_grad():
        if layer.qargs.nonuniform:
            q = fake_quantize_levels(rows, s, layer.weight_levels_, axis=0)
        else:
            qmin, qmax = layer.weight_qrange
            q = fake_quantize(rows, s, layer._weight_zp(), qmin, qmax, axis=0)
    # back to the weight's shape: the padding of a partial last group does not count
    return layer.weight_from_rows(((rows - q) / s[:, None]) ** 2).mean()


class QatCallback:
    """Training hooks for ``finetune``: BN freezing, the grid penalty, and the final fold."""

    def __init__(self, record: dict[str, Any], freeze_bn_after: int | None, grid_lambda: float):
        self.record, self.freeze_bn_after, self.grid_lambda = record, freeze_bn_after, grid_lambda

    def on_train_begin(self, model: nn.Module, total: int) -> None:
        if self.freeze_bn_after == 0:
            self._freeze(model)
        self._hooks = lsq_world_scale_hooks(model, dd.world_size() if dd.synced() else 1)

    def on_step_end(self, model: nn.Module, step: int, total: int) -> None:
        if self.freeze_bn_after is not None and step + 1 >= self.freeze_bn_after:
            self._freeze(model)

    @staticmethod
    def _freeze(model: nn.Module) -> None:
        for _, m in fake_quant_modules(model):
            m.bn_frozen = True

    def penalty(self, model: nn.Module) -> torch.Tensor | float:
        if self.grid_lambda == 0:
            return 0.0
        terms = [grid_distance(m) for _, m in fake_quant_modules(model)]
        return self.grid_lambda * torch.stack(terms).mean() if terms else 0.0

    def on_train_end(self, model: nn.Module) -> None:
        for h in getattr(self, "_hooks", []):
            h.remove()
        self._hooks = []
        finalize_qat_(model, self.record)


def lsq_world_scale_hooks(model: nn.Module, world: int) -> list:
    """Under data parallelism over ``world`` ranks: scale the activation step sizes' gradients by
    ``1 / sqrt(world)``. LSQ's gradient scale ``1 / sqrt(numel * qmax)`` counts the elements of the
    batch the layer sees, a rank's share of the global batch; the global batch has ``world`` times
    as many, so this makes the averaged gradient the one training on the union of the ranks' batches
    gets (weight step sizes do not depend on the batch). Returns the hook handles."""
    if world <= 1:
        return []
    seen: set[int] = set()
    hooks = []
    for _, m in fake_quant_modules(model):
        for which in ("input_step", "output_step"):
            p = m._parameters.get(which)
            if p is not None and id(p) not in seen:  # a shared grid is one parameter: scale it once
                seen.add(id(p))
                hooks.append(p.register_hook(lambda g, f=world ** -0.5: g * f))
    return hooks


def finalize_qat_(model: nn.Module, record: dict[str, Any]) -> None:
    """Fold attached BNs for good, turn learned step sizes into scales; update ``record`` to match."""
    folded = {layer: bn for layer, bn in record.get("bn_attached", [])}
    for name, m in fake_quant_modules(model):
        if fold_attached_(m):
            record.setdefault("folded", []).append([name, folded[name]])
        drop_lsq_(m)
        m.__dict__.pop("bn_frozen", None)
    record["bn_attached"] = []
    record["lsq"] = False


@STEPS.register("qat")
class Qat(Quantize):
    """Quantization-aware training preparation; see the module docstring."""
    needs_float = True
    quantizes = True

    Config = QatConfig

    def _check_supported(self) -> None:
        super()._check_supported()
        if self.config.equalize is not None and self.config.bn == "train":
            raise RecipeError(f"{self.where}.equalize", "equalization rescales weights before BN is folded",
                              fix="use bn: static with equalize")
        if any(w.adaround is not None for w in [self.config.weights, *self.config.layer_weights.values()]):
            raise RecipeError(f"{self.where}.weights.adaround", "AdaRound is a post-training method; QAT learns "
                              "the weights themselves", fix="drop adaround from the qat step")

    def _prepare_bn(self, model: nn.Module, ctx) -> list[tuple[str, str]]:
        if self.config.bn == "static":
            self._attached = []
            return super()._prepare_bn(model, ctx)
        names = {n for n, _ in self.select(model, None, supported=SUPPORTED).layers}
        res = attach_batchnorm(model, names)
        for bn, why in res.unfolded:
            ctx.skip(self.registered_name, bn, f"BatchNorm not folded during training: {why}")
        self._attached = [list(p) for p in res.folded]
        return []

    def run(self, model: nn.Module, ctx) -> nn.Module:
        was_training = model.training
        model = super().run(model, ctx)
        cfg = self.config
        shared: dict[str, str] = {}
        if cfg.lsq:
            shared = share_steps(model)
            add_lsq_model_(model, shared)
        self._record["lsq_shared"] = shared
        self._record["bn_attached"] = self._attached
        self._record["lsq"] = cfg.lsq
        ctx.callbacks.append(QatCallback(self._record, cfg.freeze_bn_after, cfg.grid_lambda))
        ctx.report.step(bn_attached=len(self._attached), lsq=cfg.lsq, grid_lambda=cfg.grid_lambda,
                        freeze_bn_after=cfg.freeze_bn_after)
        model.train(was_training)
        return model

    @classmethod
    def rebuild(cls, model: nn.Module, config: QatConfig, record: dict[str, Any]) -> nn.Module:
        attach_structure(model, [tuple(p) for p in record.get("bn_attached", [])])
        model = Quantize.rebuild(model, config, record)
        if record.get("lsq"):
            add_lsq_model_(model, dict(record.get("lsq_shared", {})))
        return model
