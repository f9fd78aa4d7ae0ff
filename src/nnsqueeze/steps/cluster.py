"""Step ``cluster``: weight sharing by per-layer k-means (Deep Compression), stored entropy-coded.

Recipe (the ``deep-compression`` preset)::

    steps:
      - prune:   {sparsity: 0.92, scope: global, schedule: gradual, end: 0.7}
      - distill: {epochs: 60, lr: 1.0e-3, alpha: 0.3, temperature: 2.0}   # or finetune
      - cluster: {bits: 3, conv_bits: 5, init: linear, fold_bn: true}     # k = 2**bits per layer
      - distill: {epochs: 20, lr: 1.0e-3, alpha: 0.3, temperature: 2.0}   # trains the centroids

Python::

    >>> import torch
    >>> from torch import nn
    >>> from nnsqueeze.context import Context
    >>> from nnsqueeze.steps.cluster import Cluster
    >>> ctx = Context(progress=False); ctx.report.begin_step("cluster", {})
    >>> model = Cluster(Cluster.Config(bits=2)).run(nn.Sequential(nn.Linear(8, 8)), ctx)
    >>> model[0].weight.unique().numel(), type(model[0]).__name__
    (4, 'ClusteredLinear')

What it leaves on the model: each clustered layer's class becomes ``Clustered<Layer>`` (same
object, same forward maths), its ``weight`` Parameter is replaced by a Parameter ``centroids``
(k,) and a buffer ``weight_code`` (int16, shaped like the weight: 0 = pruned, ``c + 1`` = centroid
``c``); ``weight`` is then the property ``[0, *centroids][weight_code]``. A ``weight_mask`` left by
``prune`` is folded into the codes (code 0) and dropped. Fine-tuning afterwards trains the
centroids: autograd sums the gradients of every weight of a cluster into its centroid, as in the
paper, so a layer keeps exactly k distinct nonzero values and its pruned zeros.

Storage: ``pack_state`` replaces ``weight_code`` by ``weight_code.dc``, a uint8 blob of
:mod:`nnsqueeze.storage.entropy` (relative-index-coded positions + Huffman-coded cluster indices);
``unpack_state`` decodes it bit-exactly. A weight that is exactly zero (pruned or not) gets code 0
and stays zero; tied weights (one Parameter in several layers, e.g. after ``share``) are skipped
in every layer that uses them (reported), so the tie holds. The step reports, per
layer and in total, the bytes of blob + centroids and the ratio to the fp32 weight.

``fold_bn: true`` first folds every foldable BatchNorm into its Conv/Linear (exact in eval mode;
the record lists the pairs and ``nsq.load`` replays it). ONNX export writes each clustered layer's
decoded fp32 weight as a constant (the ``weight`` property steps out of the TorchScript tracer for
that, via ``torch._C._get_tracing_state``). Default targets: Linear, Conv1d, Conv2d.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import torch
from pydantic import Field
from torch import nn

from ..errors import ArtifactError, ModelError
from ..ops.kmeans import Init, kmeans1d
from ..quant.fold import fold_batchnorm, refold_structure
from ..quant.protocol import Packable, QuantizedModule
from ..quant.swap import swap_class
from ..registry import STEPS
from ..storage.entropy import pack_codes, unpack_codes
from .base import Step, StepConfig, record_int, recorded_module

CODE = "weight_code"
SUPPORTED: tuple[type, ...] = (nn.Linear, nn.Conv1d, nn.Conv2d)


class ClusterConfig(StepConfig):
    bits: int = Field(4, ge=1, le=8, description="k = 2**bits shared values per layer")
    conv_bits: int | None = Field(None, ge=1, le=8, description="bits for convolutions (the paper gives "
                                  "them more than fully connected layers); default: bits")
    init: Init = Field("linear", description="k-means initialisation: linear, density, random, kmeans++")
    iterations: int = Field(50, ge=1, description="Lloyd iterations (stops early when converged)")
    fold_bn: bool = Field(False, description="first fold every foldable BatchNorm into its Conv/Linear "
                          "(exact in eval mode; drops the BN's parameters and statistics from the artifact)")


class ClusteredMixin(QuantizedModule, Packable):
    """Weight = ``[0, *centroids][weight_code]``; packs ``weight_code`` entropy-coded. Export hints
    stay the defaults: the export is a plain float graph (the decoded weight as a constant)."""

    centroids: nn.Parameter

    @property
    def qargs(self) -> None:
        """None: a k-entry centroid table shared by the whole layer, with its own codes, is no
        :class:`~nnsqueeze.quant.args.QuantArgs` scheme (it has no scale or bit width)."""
        return None

    def dequantized_weight(self) -> torch.Tensor:
        return self._decoded()

    def qparams(self) -> dict[str, torch.Tensor]:
        return {"centroids": self.centroids}

    @property
    def weight(self) -> torch.Tensor:  # type: ignore[override]
        state = torch._C._get_tracing_state() if torch.onnx.is_in_onnx_export() else None
        if state is not None:  # ONNX export: a plain fp32 weight initializer, not a Gather of int64 codes
            torch._C._set_tracing_state(None)
            try:
                return self._decoded().detach()
            finally:
                torch._C._set_tracing_state(state)
        return self._decoded()

    def param_counts(self) -> tuple[int, int]:
        """(weights + bias, non-zero of them) as deployed, for the report (not the k centroids)."""
        w = self._decoded()
        bias = getattr(self, "bias", None)
        n_b = 0 if bias is None else bias.numel()
        nz_b = 0 if bias is None else int(torch.count_nonzero(bias.detach()))
        return w.numel() + n_b, int(torch.count_nonzero(w.detach())) + nz_b

    def _decoded(self) -> torch.Tensor:
        table = torch.cat([self.centroids.new_zeros(1), self.centroids])
        return table[getattr(self, CODE).long()]

    def pack_state(self, sd: dict[str, torch.Tensor], prefix: str) -> None:
        codes = sd.pop(prefix + CODE).cpu().numpy()
        blob = pack_codes(codes, self.centroids.numel())
        sd[prefix + CODE + ".dc"] = torch.frombuffer(bytearray(blob), dtype=torch.uint8)

    def unpack_state(self, sd: dict[str, torch.Tensor], prefix: str) -> None:
        key = prefix + CODE + ".dc"
        if key not in sd:
            return
        shape = getattr(self, CODE).shape
        try:
            codes = unpack_codes(sd.pop(key).numpy().tobytes(), int(np.prod(shape)))
        except ValueError as e:
            raise ArtifactError(key, f"cannot decode the clustered weight: {e}", fix="re-create the artifact") from None
        sd[prefix + CODE] = torch.from_numpy(codes.astype(np.int16)).reshape(shape)

    def stored_bytes(self) -> int:
        """Bytes this layer's weight takes in the artifact: blob + fp32 centroids."""
        blob = pack_codes(getattr(self, CODE).cpu().numpy(), self.centroids.numel())
        return len(blob) + 4 * self.centroids.numel()


class ClusteredLinear(ClusteredMixin, nn.Linear):
    pass


class ClusteredConv1d(ClusteredMixin, nn.Conv1d):
    pass


class ClusteredConv2d(ClusteredMixin, nn.Conv2d):
    pass


_CLASSES: dict[type, type] = {nn.Linear: ClusteredLinear, nn.Conv1d: ClusteredConv1d, nn.Conv2d: ClusteredConv2d}


def clustered_class(base: type) -> type:
    return _CLASSES[base]


def _convert(m: nn.Module, centroids: torch.Tensor, codes: torch.Tensor) -> None:
    """Swap ``m`` to its clustered class in place (no data needed when rebuilding)."""
    dev = m.weight.device
    del m.weight  # the Parameter; ``weight`` becomes the class property
    m._buffers.pop("weight_mask", None)
    swap_class(m, clustered_class(type(m)))
    m.centroids = nn.Parameter(centroids.to(dev))
    m.register_buffer(CODE, codes.to(torch.int16).to(dev))


@STEPS.register("cluster")
class Cluster(Step):
    needs_float = True
    quantizes = True
    Config = ClusterConfig
    default_targets: ClassVar[list[str]] = ["Linear", "Conv1d", "Conv2d"]

    def __init__(self, config: ClusterConfig, index: int = 0):
        super().__init__(config, index)
        self.layers_: dict[str, int] = {}  # name -> k
        self.folded_: list[tuple[str, str]] = []

    def run(self, model: nn.Module, ctx: Any) -> nn.Module:
        c: ClusterConfig = self.config
        total_fp32 = total_stored = weights = nonzero = 0
        if c.fold_bn:
            was_training = model.training
            model.eval()  # folding uses the running statistics
            res = fold_batchnorm(model)
            model.train(was_training)
            self.folded_ = list(res.folded)
            for bn, why in res.unfolded:
                ctx.skip(self.registered_name, bn, f"BatchNorm not folded: {why}")
        users: dict[int, list[str]] = {}  # id(weight Parameter) -> the modules using it
        for n, mod in model.named_modules(remove_duplicate=False):
            if isinstance(mod._parameters.get("weight"), nn.Parameter):
                users.setdefault(id(mod._parameters["weight"]), []).append(n)
        for name, m in self.select(model, ctx, supported=SUPPORTED).layers:
            if isinstance(m, ClusteredMixin):
                ctx.skip(self.registered_name, name, "already clustered")
                continue
            w = getattr(m, "weight", None)
            if not isinstance(w, nn.Parameter) or type(m) not in SUPPORTED:
                ctx.skip(self.registered_name, name, f"{type(m).__name__} is not a plain layer with a weight")
                continue
            others = [n for n in users.get(id(w), []) if n != name]
            if others:  # tied weights (e.g. the share step): clustering one user would untie them
                ctx.skip(self.registered_name, name, f"shares its weight with {', '.join(others)}")
                continue
            if not torch.isfinite(w).all():
                raise ModelError(f"{self.where}: {name}.weight", "contains NaN or inf",
                                 fix="check the checkpoint; clustering needs finite weights")
            with torch.no_grad():
                mask = getattr(m, "weight_mask", None)
                keep = (w != 0) if mask is None else (mask.bool() & (w != 0))
                codes = torch.zeros(w.shape, dtype=torch.int64)
                if not bool(keep.any()):
                    ctx.skip(self.registered_name, name, "all weights are zero")
                    continue
                is_conv = isinstance(m, nn.modules.conv._ConvNd)
                k_max = 1 << ((c.conv_bits or c.bits) if is_conv else c.bits)
                cent, idx = kmeans1d(w.detach().cpu()[keep.cpu()], k_max, c.init, c.iterations, seed=ctx.seed)
                codes[keep.cpu()] = idx + 1
            _convert(m, cent, codes)
            self.layers_[name] = int(cent.numel())
            fp32, stored = 4 * w.numel(), m.stored_bytes()
            total_fp32, total_stored = total_fp32 + fp32, total_stored + stored
            weights, nonzero = weights + codes.numel(), nonzero + int((codes != 0).sum())
            ctx.report.layer(name, clusters=int(cent.numel()), stored_bytes=stored,
                             fp32_bytes=fp32, ratio=round(fp32 / stored, 2))
            ctx.log.info("cluster: %s k=%d %d -> %d bytes (%.1fx)", name, cent.numel(), fp32, stored, fp32 / stored)
        ctx.report.step(layers=len(self.layers_), bits=c.bits, conv_bits=c.conv_bits or c.bits,
                        bn_folded=len(self.folded_), fp32_bytes=total_fp32, stored_bytes=total_stored,
                        ratio=round(total_fp32 / max(1, total_stored), 2), weights=weights, nonzero_weights=nonzero)
        return model

    def record(self) -> dict[str, Any]:
        return {"layers": dict(self.layers_), "folded": [list(p) for p in self.folded_]}

    @classmethod
    def rebuild(cls, model: nn.Module, config: ClusterConfig, record: dict[str, Any]) -> nn.Module:
        """Swap the recorded layers to their clustered class with empty centroids and codes."""
        refold_structure(model, [tuple(p) for p in record.get("folded", [])])
        for name, k in record.get("layers", {}).items():
            m = recorded_module(model, name, (nn.Module,), "cluster record")
            if type(m) not in SUPPORTED:
                raise ModelError(f"cluster record: {name}", f"expected a Linear/Conv layer, got {type(m).__name__}",
                                 fix="load onto the same architecture that was compressed")
            # codes are int16 and index the centroids: k is at most the weights and 2**15
            k = record_int(k, 1, min(m.weight.numel(), 1 << 15), f"cluster record: {name}: k")
            _convert(m, torch.zeros(k), torch.zeros(m.weight.shape, dtype=torch.int64))
        return model


def clustered_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of every clustered layer."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, ClusteredMixin)]
