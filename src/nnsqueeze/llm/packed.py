"""Packed weight-only Linear for inference: int4 / int8 codes stay packed in memory and are read
directly by a matrix-vector kernel, so a language model generates from ~1/7 of its fp32 weight bytes.

:class:`PackedLinear` is a :class:`~nnsqueeze.quant.weight_only.WeightOnlyLinear` whose ``weight`` is
a ``uint8`` buffer holding the codes exactly as ``model.safetensors`` stores them (int4: (N,
ceil(K/2)), two codes per byte, low nibble first; int8: (N, K)), next to ``weight_scale_`` (N, G)
float32 and ``weight_zero_point_`` (N, G) uint8. No float copy of the weight is kept. The ``rtn`` and
``gptq`` steps with ``pack: true`` (and ``awq`` with ``pack: true``) produce these modules, and
``nsq.load`` rebuilds them::

    >>> import torch
    >>> from torch import nn
    >>> from nnsqueeze.quant.weight_only import convert_weight_only_
    >>> from nnsqueeze.llm.packed import PackedLinear, pack_linear_
    >>> layer = pack_linear_(convert_weight_only_(nn.Linear(300, 7), bits=4, group_size=32))
    >>> layer.weight.dtype, tuple(layer.weight.shape), isinstance(layer, PackedLinear)
    (torch.uint8, (7, 150), True)
    >>> x = torch.randn(1, 300)
    >>> bool(torch.allclose(layer(x), x @ layer.dequantized_weight().T + layer.bias, atol=1e-5))
    True

Forward (float32 activations on CPU, no gradient needed), by number of activation rows ``M``:

- ``M <= SMALL_M`` (token-by-token decoding): :func:`nnsqueeze.llm.gemv.gemv` reads the codes;
- larger ``M`` (prompt prefill, perplexity), by ``NNSQUEEZE_PACKED_PREFILL``: ``tiles`` (default)
  dequantizes blocks of output rows of about ``TILE_BYTES`` but at least ``MIN_TILE_ROWS`` (one buffer
  reused) in C and multiplies each with torch's float GEMM, so no whole float matrix of a layer wider
  than that is built; ``codes`` runs the
  matrix-vector kernel over all ``M`` rows (a blocked int4 GEMM reading the codes: each weight row is
  read once, converted once per activation row); ``full`` dequantizes the whole matrix per call (the
  old path, kept for the benchmark). ``bench/smollm2_decode.py`` measures the three (BENCHMARKS.md);
- anything else (no C compiler, CUDA tensors, other dtypes, autograd): dequantize with torch ops
  and ``F.linear``. This fallback is logged once as a warning (never silent); results are the same
  to float rounding, only slower.

An optional ``input_scale_`` buffer (in,) (AWQ with ``pack: true``, :func:`add_input_scale_`) divides
the input first: the codes then quantize ``W * s`` and the layer computes ``(x / s) @ Q(W * s).T``
(the ONNX export emits the same ``Div`` before ``MatMulNBits``).

``NNSQUEEZE_PACKED_ACT=int8`` (opt-in) makes the decode path round each activation row to int8 per
weight group (scale absmax / 127) and use integer dot products (AVX512-VNNI / AVX-VNNI, or AVX2 for
int4 codes), as llama.cpp does for Q4 weights: less work per weight than converting codes to float
(1.2-1.3x faster than the float kernel on an AVX2-only CPU, bench/int4_kernel.py), at an added error
of at most ``absmax_g / 254`` per input (:func:`nnsqueeze.llm.gemv.gemv_a8`); where the build has no
such path, the float kernel runs (logged once).

``NNSQUEEZE_PACKED_BACKEND`` selects the kernel: ``auto`` (default, the C kernel), ``aten`` (torch's
``_weight_int4pack_mm_for_cpu``, kept for the benchmark: int4 only, a group size of 32..256 dividing
K, and it builds its own repacked copy of the weight; other layers dequantize, logged), or
``dequant`` (the fallback). torch's ``_weight_int8pack_mm`` is not offered: it takes per-row
symmetric scales only, not groups or zero points.
"""

from __future__ import annotations

import logging
import os

import torch
import torch.nn.functional as F

from ..ops.int4 import pack_int4, unpack_int4
from ..ops.rtn import dequantize_groups
from ..quant.args import QuantArgs
from ..quant.convert import register
from ..quant.swap import swap_class
from ..quant.weight_only import WeightOnlyLinear, codes_of
from . import gemv as _gemv

Tensor = torch.Tensor
log = logging.getLogger("nnsqueeze")

SMALL_M = 4          # activation rows up to which the matrix-vector kernel beats dequantize + matmul
TILE_BYTES = 1 << 18  # float32 bytes of one dequantized tile on the prefill path (fits L2)
MIN_TILE_ROWS = 256  # but never fewer rows than this (see _prefill)
PREFILL_MODES = ("tiles", "codes", "full")
_warned: set[str] = set()


def _warn_once(key: str, msg: str) -> None:
    if key not in _warned:
        _warned.add(key)
        log.warning("%s", msg)


_backends: dict[str, tuple[str, object | None, str]] = {}


def backend() -> tuple[str, object | None, str]:
    """``(name, library, reason)``: the kernel PackedLinear uses on CPU float32 inputs.

    ``name`` is ``"c"``, ``"aten"`` or ``"dequant"``; ``reason`` says why a fallback was taken.
    """
    want = os.environ.get("NNSQUEEZE_PACKED_BACKEND", "auto")
    found = _backends.get(want)
    if found is None:
        if want == "dequant":
            found = ("dequant", None, "NNSQUEEZE_PACKED_BACKEND=dequant")
        elif want == "aten":
            found = ("aten", None, "")
        else:
            lib, why = _gemv.load_kernel()
            found = ("dequant", None, why) if lib is None else ("c", lib, "")
        _backends[want] = found
    return found


_export_check: list = []


def _in_onnx_export() -> bool:
    """``torch.onnx.is_in_onnx_export()`` without the two imports it runs on every call (the decode
    path asks ~200 times per token); the public function where torch's internals differ."""
    if not _export_check:
        try:
            from torch.onnx._internal.exporter import _flags
            from torch.onnx._internal.torchscript_exporter._globals import GLOBALS

            _export_check.append(lambda: GLOBALS.in_onnx_export or _flags._is_onnx_exporting)
        except ImportError:
            _export_check.append(torch.onnx.is_in_onnx_export)
    return _export_check[0]()


def prefill_mode() -> str:
    """``NNSQUEEZE_PACKED_PREFILL``: how the C backend multiplies many rows (see the module docstring)."""
    mode = os.environ.get("NNSQUEEZE_PACKED_PREFILL", "tiles")
    if mode not in PREFILL_MODES:
        _warn_once(f"prefill{mode}", f"NNSQUEEZE_PACKED_PREFILL={mode!r} is not one of {PREFILL_MODES}: using 'tiles'")
        return "tiles"
    return mode


def fallback_reason() -> str | None:
    """Why packed layers will dequantize on every call instead of using a kernel (None: they won't)."""
    name, _, why = backend()
    return None if name != "dequant" else why


class PackedLinear(WeightOnlyLinear):
    """See the module docstring. Built by :func:`pack_linear_` from a :class:`WeightOnlyLinear`."""

    def weight_codes(self) -> Tensor:
        """uint8 codes (N, K), unpacked."""
        return unpack_int4(self.weight, self.in_features) if self.bits == 4 else self.weight

    def dequantized_weight(self) -> Tensor:
        return dequantize_groups(self.weight_codes(), self.weight_scale_, self.weight_zero_point_, self.group_size)

    def param_counts(self) -> tuple[int, int]:
        """(weights + bias, non-zero of them) as computed, for the report: the packed codes are buffers, not
        parameters, and each still stands for one weight (an int4 weight is a parameter in 4 bits)."""
        nz = int(torch.count_nonzero(self.dequantized_weight()))
        bias = self.bias
        n_b, nz_b = (0, 0) if bias is None else (bias.numel(), int(torch.count_nonzero(bias.detach())))
        return self.out_features * self.in_features + n_b, nz + nz_b

    def weight_sqnr_db(self) -> float:
        raise TypeError("PackedLinear keeps no float weight to compare with; measure before packing")

    def refresh_weight_qparams_(self) -> None:
        raise TypeError("PackedLinear holds fixed codes; its scales cannot be recomputed")

    def _gsize(self) -> int:
        return self.in_features if self.group_size <= 0 else self.group_size

    def forward(self, x: Tensor) -> Tensor:
        k = self.in_features
        s_in = self._buffers.get("input_scale_")
        if s_in is not None:  # AWQ: the codes quantize W * s, so the input is divided by s first
            x = x / s_in
        if _in_onnx_export():
            return self._export_forward(x)
        bufs, bias = self._buffers, self.bias
        fast = (x.dtype == torch.float32 and x.device.type == "cpu" and bufs["weight"].device.type == "cpu"
                and bufs["weight_scale_"].dtype == torch.float32
                and (bias is None or bias.dtype == torch.float32)
                and not (x.requires_grad and torch.is_grad_enabled()))
        name, lib, why = backend() if fast else ("dequant", None, "")
        x2 = x.reshape(-1, k)
        if name == "c":
            x2, threads = x2.contiguous(), torch.get_num_threads()
            if x2.shape[0] <= SMALL_M:  # token-by-token decoding: read the codes directly
                y = self._decode(lib, x2, threads)
            else:                       # many rows (prefill)
                y = self._prefill(lib, x2, threads)
            return y.reshape(*x.shape[:-1], self.out_features)
        if fast and name == "dequant":
            _warn_once("kernel", f"packed int{self.bits} kernel unavailable ({why}): PackedLinear dequantizes its "
                       "weight on every call (same results, slower than fp32; weights stay packed)")
        if name == "aten" and not self._aten_ok():
            _warn_once(f"aten{self.bits}{self.group_size}{k}",
                       f"aten int4 kernel cannot take int{self.bits} g{self.group_size} K={k}: dequantizing")
            name = "dequant"
        if not fast and not getattr(self, "_noted", False):
            self._noted = True
            log.info("PackedLinear: %s %s input%s: dequantizing per call", x.device.type, x.dtype,
                     " with autograd" if x.requires_grad else "")
        if name == "aten":
            y = self._aten_forward(x2.contiguous())
        else:
            y = F.linear(x2, self.dequantized_weight().to(x.dtype), self.bias)
        return y.reshape(*x.shape[:-1], self.out_features)

    def _decode(self, lib, x2: Tensor, threads: int) -> Tensor:
        args = (self.bits, x2, self.weight, self.weight_scale_, self.weight_zero_point_, self._gsize(), self.bias,
                threads)
        if os.environ.get("NNSQUEEZE_PACKED_ACT", "float") == "int8":
            y = _gemv.gemv_a8(lib, *args)
            if y is not None:
                return y
            _warn_once(f"a8-{self.bits}", f"NNSQUEEZE_PACKED_ACT=int8: no integer kernel for int{self.bits} codes "
                       "on this CPU build (needs AVX2; int8 codes need VNNI): float activations instead")
        return _gemv.gemv(lib, *args)

    # -- many activation rows ----------------------------------------------------------------
    def _prefill(self, lib, x2: Tensor, threads: int) -> Tensor:
        mode = prefill_mode()
        k, n, gs = self.in_features, self.out_features, self._gsize()
        w, s, z = self.weight, self.weight_scale_, self.weight_zero_point_
        if mode == "codes":
            return _gemv.gemv(lib, self.bits, x2, w, s, z, gs, self.bias, threads)
        if mode == "full":
            return F.linear(x2, _gemv.dequantize(lib, self.bits, k, w, s, z, gs, threads), self.bias)
        # Blocks of at least 256 output rows: thinner GEMMs lose more to MKL's blocking than the dequantized
        # tile saves (measured on 2 threads at M 128 and 2048, SmolLM2's shapes). Each block's product is
        # written straight into its columns of y (one whole-matrix block writes y itself).
        rows = min(n, max(MIN_TILE_ROWS, TILE_BYTES // (4 * k)))
        buf = torch.empty(rows, k, dtype=torch.float32)
        y = torch.empty(x2.shape[0], n, dtype=torch.float32)
        for a in range(0, n, rows):
            b = min(n, a + rows)
            tile = _gemv.dequantize(lib, self.bits, k, w[a:b], s[a:b], z[a:b], gs, threads, out=buf[:b - a])
            if b - a == n:
                torch.mm(x2, tile.T, out=y)
            else:
                y[:, a:b] = torch.mm(x2, tile.T)
        return y.add_(self.bias) if self.bias is not None else y

    # -- torch's own int4 CPU kernel (benchmark comparison) ------------------------------------
    def _aten_ok(self) -> bool:
        g, k = self.group_size, self.in_features
        return self.bits == 4 and g in (32, 64, 128, 256) and k % g == 0

    def _aten_forward(self, x: Tensor) -> Tensor:
        """``aten._weight_int4pack_mm_for_cpu``: w = (q - 8) * s + zero, N padded to a multiple of 16."""
        if getattr(self, "_aten_w", None) is None:
            n, pad = self.out_features, -self.out_features % 16
            q = F.pad(self.weight_codes().to(torch.int32), (0, 0, 0, pad))
            s = F.pad(self.weight_scale_, (0, 0, 0, pad))
            z = F.pad(self.weight_zero_point_.to(torch.float32), (0, 0, 0, pad))
            self._aten_w = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
            self._aten_sz = torch.stack([s, (8 - z) * s], -1).transpose(0, 1).contiguous()  # (G, N, 2)
            self._aten_n = n
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x, self._aten_w, self.group_size, self._aten_sz)
        y = y[:, :self._aten_n]
        return y + self.bias if self.bias is not None else y

    # -- artifact: the stored layout is the in-memory one ---------------------------------------
    def pack_state(self, sd: dict, prefix: str) -> None:
        zkey = prefix + "weight_zero_point_"
        if self.bits == 4 and zkey in sd and sd[zkey].shape == self.weight_zero_point_.shape:
            sd[zkey] = pack_int4(sd[zkey])

    def unpack_state(self, sd: dict, prefix: str) -> None:
        key, zkey = prefix + "weight", prefix + "weight_zero_point_"
        q = sd.get(key)
        if q is None:
            return
        if self.bits == 4 and zkey in sd and sd[zkey].shape[-1] != self.weight_zero_point_.shape[-1]:
            sd[zkey] = unpack_int4(sd[zkey], self.weight_zero_point_.shape[1])
        if q.is_floating_point():  # float weights (not written by nnsqueeze): quantize with the stored grid
            codes = codes_of(q, sd[prefix + "weight_scale_"], sd[zkey], self.bits, self.group_size)
            sd[key] = pack_int4(codes) if self.bits == 4 else codes

    def extra_repr(self) -> str:
        return super().extra_repr() + ", packed" + (", input-scaled" if "input_scale_" in self._buffers else "")


def add_input_scale_(mod: PackedLinear, scales: Tensor | None = None) -> PackedLinear:
    """Give ``mod`` an ``input_scale_`` buffer (in,): forward computes ``(x / s) @ W_q.T`` (AWQ)."""
    s = torch.ones(mod.in_features) if scales is None else scales.detach().to(torch.float32).clone()
    if s.shape != (mod.in_features,):
        raise ValueError(f"input scales {tuple(s.shape)} do not match in_features {mod.in_features}")
    mod.register_buffer("input_scale_", s.to(mod.weight_scale_.device))
    return mod


@torch.no_grad()
def pack_linear_(mod: WeightOnlyLinear) -> PackedLinear:
    """Turn a :class:`WeightOnlyLinear` into a :class:`PackedLinear` in place (same object): its
    codes are packed into a uint8 ``weight`` buffer and the float weight parameter is dropped."""
    if isinstance(mod, PackedLinear):
        return mod
    if not isinstance(mod, WeightOnlyLinear):
        raise TypeError(f"pack_linear_ expects a WeightOnlyLinear, got {type(mod).__name__}")
    codes = mod.weight_codes()
    packed = pack_int4(codes) if mod.bits == 4 else codes
    del mod.weight                      # the float Parameter goes; its memory is freed with it
    swap_class(mod, PackedLinear)
    mod.register_buffer("weight", packed.contiguous())
    return mod


@register((WeightOnlyLinear, PackedLinear), "int-weight-only")
def _pack(mod: WeightOnlyLinear, args: QuantArgs, aargs: None) -> PackedLinear:
    """``convert(layer, args)`` of a weight-only layer with its own args: its packed form."""
    own = mod.qargs
    if args != own:
        raise ValueError(f"a {type(mod).__name__} holds {own.describe()} codes, not {args.describe()}: "
                         "convert the float layer instead")
    return pack_linear_(mod)
