"""The weight side of the fake-quant layers (mixed into
:class:`nnsqueeze.quant.modules.FakeQuantMixin`): the float weight the codes approximate (prune mask,
attached BatchNorm folded), its scales / zero points / levels per the layer's
:class:`~nnsqueeze.quant.scheme.WeightScheme`, the fake-quantized weight (with LSQ while training),
its codes, and the int32-rounded bias. ::

    >>> import torch
    >>> from torch import nn
    >>> from nnsqueeze.quant.modules import convert_
    >>> from nnsqueeze.quant.scheme import WeightScheme
    >>> q = convert_(nn.Linear(6, 3), scheme=WeightScheme(bits=4))
    >>> codes = q.weight_codes(); codes.dtype, int(codes.abs().max()) <= 7
    (torch.int8, True)
    >>> w = codes.float() * q.weight_scale_[:, None]              # per output channel, zero point 0
    >>> torch.allclose(w, q.fake_quant_weight(), atol=1e-6)
    True
"""

from __future__ import annotations

import torch
from torch import nn

from ..ops.lsq import lsq_fake_quantize, lsq_grad_scale
from ..ops.quant import (EPS, dequantize, fake_quantize_bias, fake_quantize_levels, fake_quantize_ste,
                         nearest_level, quantize, quantize_bias, sqnr_db)
from ..ops.rtn import row_qparams
from .fold import bn_factor

Tensor = torch.Tensor


class FakeQuantWeightMixin:
    """Weight maths of the fake-quant layers; the state it reads (``qargs``, ``weight_bits``,
    ``weight_frozen``, the qparam buffers) is set by :func:`nnsqueeze.quant.modules.convert_`."""

    weight: nn.Parameter
    bias: nn.Parameter | None

    # -- weights -----------------------------------------------------------------------------
    def masked_weight(self) -> Tensor:
        """The weight with a prune mask (buffer ``weight_mask``) applied: pruned zeros stay zero."""
        mask = getattr(self, "weight_mask", None)
        if mask is None:
            return self.weight
        return torch.where(mask.to(torch.bool), self.weight, torch.zeros((), dtype=self.weight.dtype,
                                                                        device=self.weight.device))

    def effective_weight(self) -> Tensor:
        """The float weight the codes approximate: the masked weight, times the folded BatchNorm
        factor ``gamma / sqrt(running_var + eps)`` when a BN is attached for QAT (``self.bn``)."""
        w = self.masked_weight()
        bn = self._modules.get("bn")
        if bn is None:
            return w
        f = bn_factor(bn)
        return w * f.reshape(-1, *([1] * (w.dim() - 1)))

    def effective_bias(self) -> Tensor | None:
        """The float bias: ``bias``, or with an attached BN ``(bias - mean) * f + beta``."""
        bn = self._modules.get("bn")
        if bn is None:
            return self.bias
        b = self.bias if self.bias is not None else torch.zeros_like(bn.running_mean)
        beta = bn.bias if bn.affine else torch.zeros_like(bn.running_mean)
        return (b - bn.running_mean) * bn_factor(bn) + beta

    @torch.no_grad()
    def learn_levels_(self) -> None:
        """k-means levels (``2**bits``) of the absmax-normalized weight rows (``levels: kmeans``)."""
        from ..ops.kmeans import kmeans1d

        rows = self.weight_rows(self.effective_weight().detach().float())
        norm = rows / rows.abs().amax(1, keepdim=True).clamp(min=EPS)  # zero padding: absmax unchanged
        mask = self.weight_row_mask()
        if mask is not None:
            norm = norm[mask]  # real weights only
        k = self.qargs.level_count
        centroids, _ = kmeans1d(norm, k, init="linear")
        lv = torch.full((k,), float(centroids[-1]))  # pad (when fewer distinct values)
        lv[:centroids.numel()] = centroids
        self.weight_levels_.copy_(torch.sort(lv).values)

    @torch.no_grad()
    def refresh_weight_scale_(self, force: bool = False) -> None:
        """Weight scales (and zero points) from the current weights, per the scheme; a no-op once
        ``weight_frozen`` (learned scales or codes) unless ``force``."""
        if self.weight_frozen and not force:
            return
        sc = self.qargs
        rows = self.weight_rows(self.effective_weight().detach().float())
        if sc.nonuniform:
            (scale,) = self.per_row(lambda r: (r.abs().amax(1),), rows)
            if sc.granularity == "tensor":
                scale = scale.amax().expand_as(scale)
            self.weight_scale_.copy_(scale.clamp(min=EPS))
            return
        if sc.granularity == "tensor":
            rows_for_range = rows.reshape(1, -1)
        else:
            rows_for_range = rows
        # clip: mse searches 20 ratios of the range down to 0.3 (nnsqueeze.ops.rtn.row_qparams)
        clip = {"clip_grid": 20, "clip_min": 0.3} if sc.clip == "mse" else {}

        def stats(r):
            return row_qparams(r, sc.bits, sc.symmetric, **clip)
        # per-group: a partial last group gets its own scale/zero point from its own values only
        scale, zp = stats(rows_for_range) if sc.granularity == "tensor" else self.per_row(stats, rows)
        self.weight_scale_.copy_(scale.expand(rows.shape[0]))
        if not sc.symmetric:
            self.weight_zero_point_.copy_(zp.expand(rows.shape[0]))

    def _weight_zp(self) -> Tensor:
        zp = self._buffers.get("weight_zero_point_")
        return zp if zp is not None else torch.zeros_like(self.weight_scale_, dtype=torch.int32)

    def fake_quant_weight(self) -> Tensor:
        w = self.effective_weight()
        rows = self.weight_rows(w)
        if self.qargs.nonuniform:
            return self.weight_from_rows(fake_quantize_levels(rows, self.weight_scale_, self.weight_levels_, axis=0))
        qmin, qmax = self.weight_qrange
        lsq = self._parameters.get("weight_step")
        if lsq is not None and self.training:  # padding outputs are dropped: no gradient to the step from them
            return self.weight_from_rows(lsq_fake_quantize(rows, lsq, self._weight_zp(), qmin, qmax, axis=0,
                                                           grad_scale=self._lsq_grad_scale()))
        return self.weight_from_rows(fake_quantize_ste(rows, self.weight_scale_, self._weight_zp(), qmin, qmax, axis=0))

    def weight_codes(self) -> Tensor:
        """Weight codes, shaped like the weight: int8 for symmetric grids, uint8 for asymmetric grids
        and level indices."""
        w = self.effective_weight().detach()
        rows = self.weight_rows(w)
        if self.qargs.nonuniform:
            s = self.weight_scale_[:, None]
            return self.weight_from_rows(nearest_level(rows.float() / s, self.weight_levels_).to(torch.uint8))
        qmin, qmax = self.weight_qrange
        q = quantize(rows, self.weight_scale_, self._weight_zp(), qmin, qmax, axis=0)
        return self.weight_from_rows(q.to(torch.int8 if self.qargs.signed_codes else torch.uint8))

    @torch.no_grad()
    def set_weight_codes_(self, codes: Tensor) -> None:
        """Make the weight exactly ``dequantize(codes)`` (uniform grids; e.g. AdaRound's learned codes)
        and freeze the scales, so that nearest rounding reproduces ``codes``. No BN may be attached."""
        if self._modules.get("bn") is not None or self.qargs.nonuniform:
            raise ValueError("set_weight_codes_ needs a uniform grid and no attached BatchNorm")
        if tuple(codes.shape) == tuple(self.weight.shape):
            codes = self.weight_rows(codes)  # codes given in the weight's shape -> (R, L) rows
        w = dequantize(codes.reshape(self.weight_scale_.shape[0], -1), self.weight_scale_, self._weight_zp(), axis=0)
        self.weight.copy_(self.weight_from_rows(w).to(self.weight.dtype))
        self.weight_frozen = True

    def weight_sqnr_db(self) -> float:
        w = self.effective_weight().detach()
        return sqnr_db(w, self.fake_quant_weight().detach())

    def quant_bias(self) -> Tensor | None:
        """The bias the simulation adds: int32 codes of scale ``input_scale_ * weight_scale_`` when
        ORT runs int8 kernels (what they add to the accumulator), else the float bias."""
        b = self.effective_bias()
        if b is None or not self.qargs.int8_kernels:
            return b
        return fake_quantize_bias(b, self.input_scale_, self.weight_scale_)

    def bias_codes(self) -> Tensor | None:
        """int32 bias codes of scale ``input_scale_ * weight_scale_`` (what ORT adds), or None."""
        b = self.effective_bias()
        if b is None:
            return None
        return quantize_bias(b.detach(), self.input_scale_, self.weight_scale_)[0]


    def _fq_folded(self, w_folded: Tensor) -> Tensor:
        """Fake-quantize an already BN-folded weight (QAT with an attached BN, batch statistics)."""
        rows = self.weight_rows(w_folded)
        qmin, qmax = self.weight_qrange
        if self.qargs.nonuniform:
            return self.weight_from_rows(fake_quantize_levels(rows, self.weight_scale_, self.weight_levels_, axis=0))
        lsq = self._parameters.get("weight_step")
        if lsq is not None:
            return self.weight_from_rows(lsq_fake_quantize(rows, lsq, self._weight_zp(), qmin, qmax, axis=0,
                                                           grad_scale=self._lsq_grad_scale()))
        return self.weight_from_rows(fake_quantize_ste(rows, self.weight_scale_, self._weight_zp(), qmin, qmax, axis=0))

    def _lsq_grad_scale(self) -> float:
        """LSQ gradient scale from the real weights per step size (padding of partial groups excluded)."""
        return lsq_grad_scale(self.weight.numel(), self.weight_scale_.numel(), self.weight_qrange[1])
