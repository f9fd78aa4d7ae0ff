"""Benchmark: what the module-swap design of the quantized layers costs per call, on a small input
(docs/architecture.md, "Module swap, not tensor subclass").

Rows, each ``y = layer(x)`` under ``torch.no_grad()`` in eval mode, one thread, the median of
``--runs`` single calls (each timed alone with ``perf_counter_ns``) after ``--warmup`` calls:

- ``nn.Linear``: the float layer;
- ``QuantLinear (nnsqueeze)``: the same object after :func:`nnsqueeze.quant.modules.convert_`
  (w8 per-channel symmetric, a8 per-tensor uint8, calibrated with minmax): the fake-quant
  simulation nnsqueeze runs;
- ``toy module swap`` and ``toy tensor subclass``: NOT nnsqueeze code, the two designs reduced to
  the same two torch ops (input fake-quantized per tensor, uint8; weight per output channel, int8;
  no int32 bias rounding), so that their difference is the mechanism alone: a class swapped in by
  ``__class__`` assignment whose ``forward`` applies them, and a ``torch.Tensor`` subclass weight
  whose ``__torch_function__`` applies them when ``F.linear`` sees it. Their outputs are checked
  equal (bit for bit).

The last line says whether the TorchScript ONNX exporter (``dynamo=False``, the one
:mod:`nnsqueeze.export.onnx` uses) accepts the toy subclass.

    python bench/module_swap.py [--in 256] [--out 256] [--batch 8] [--runs 5000]
"""

from __future__ import annotations

import argparse
import io
import statistics
import time
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from nnsqueeze.quant.modules import convert_
from nnsqueeze.quant.observers import MinMaxObserver


def _toy_math(x, w, w_scale, in_scale, in_zp, b):
    x = torch.fake_quantize_per_tensor_affine(x, in_scale, in_zp, 0, 255)
    zp = torch.zeros(w.shape[0], dtype=torch.int32)
    return F.linear(x, torch.fake_quantize_per_channel_affine(w, w_scale, zp, 0, -128, 127), b)


class ToySwapLinear(nn.Linear):
    """Toy module-swap design: swapped in by ``__class__`` assignment, qparams as attributes."""

    def forward(self, x):
        return _toy_math(x, self.weight, self.w_scale, self.in_scale, self.in_zp, self.bias)


class FakeQuantWeight(torch.Tensor):
    """Toy tensor-subclass design: the weight carries its qparams; ``F.linear`` on it fake-quantizes
    the input (per tensor, uint8) and the weight (per output channel, int8) first."""

    @staticmethod
    def __new__(cls, w: torch.Tensor, w_scale: torch.Tensor, in_scale: float, in_zp: int):
        t = torch.Tensor._make_subclass(cls, w.detach(), False)
        t.w_scale, t.in_scale, t.in_zp = w_scale, in_scale, in_zp
        return t

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear:
            x, w = args[0], args[1]
            b = args[2] if len(args) > 2 else kwargs.get("bias")
            with torch._C.DisableTorchFunctionSubclass():
                return _toy_math(x, w.as_subclass(torch.Tensor), w.w_scale, w.in_scale, w.in_zp, b)
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **kwargs)


def median_us(layer: nn.Module, x: torch.Tensor, warmup: int, runs: int) -> float:
    with torch.no_grad():
        for _ in range(warmup):
            layer(x)
        times = []
        for _ in range(runs):
            t0 = time.perf_counter_ns()
            layer(x)
            times.append(time.perf_counter_ns() - t0)
    return statistics.median(times) / 1000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--in", dest="n_in", type=int, default=256)
    ap.add_argument("--out", dest="n_out", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=500)
    ap.add_argument("--runs", type=int, default=5000)
    a = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    x = torch.randn(a.batch, a.n_in)
    ref = nn.Linear(a.n_in, a.n_out).eval()

    q = convert_(nn.Linear(a.n_in, a.n_out))
    q.load_state_dict(ref.state_dict(), strict=False)
    q.start_calibration(MinMaxObserver, "bench")
    with torch.no_grad():
        q(x)
    q.finish_calibration()
    q.eval()

    toy = nn.Linear(a.n_in, a.n_out).eval()
    toy.load_state_dict(ref.state_dict())
    # the swapped layer's own qparams, so both rows compute the same numbers
    # a buffer, not an nn.Parameter: torch refuses a Parameter of a subclass whose detach() returns a
    # plain Tensor (a real design would implement detach, clone, to, ... in __torch_dispatch__)
    w = FakeQuantWeight(toy.weight, q.weight_scale_.clone(), float(q.input_scale_), int(q.input_zero_point_))
    del toy.weight
    toy.register_buffer("weight", w)
    swap = nn.Linear(a.n_in, a.n_out).eval()
    swap.load_state_dict(ref.state_dict())
    swap.__class__ = ToySwapLinear
    swap.w_scale, swap.in_scale, swap.in_zp = w.w_scale, w.in_scale, w.in_zp
    with torch.no_grad():
        same = torch.equal(toy(x), swap(x))

    rows = [("nn.Linear", ref), ("QuantLinear (nnsqueeze)", q), ("toy module swap", swap),
            ("toy tensor subclass", toy)]
    print(f"Linear {a.n_in}->{a.n_out}, batch {a.batch}, 1 thread, median of {a.runs} calls, torch {torch.__version__}")
    base = None
    for name, layer in rows:
        us = median_us(layer, x, a.warmup, a.runs)
        base = base or us
        print(f"  {name:28s} {us:8.1f} us  ({us / base:.2f}x nn.Linear)")
    print(f"  the two toys compute the same output: {same}")

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(toy, (x,), io.BytesIO(), dynamo=False, opset_version=17)
        print("  TorchScript ONNX export of the toy subclass: ok")
    except Exception as e:  # report whatever the exporter raises
        first = str(e).splitlines()[0][:160]
        print(f"  TorchScript ONNX export of the toy subclass: fails ({type(e).__name__}: {first})")


if __name__ == "__main__":
    main()
