"""Benchmark: ONNX Runtime's u8u8 kernels against u8s8 on the same int8 EfficientNet-Lite0 files.

On x86 without VNNI, ORT's u8s8 kernels (uint8 activations x int8 weights) add pairs of products into int16
with saturation, so nnsqueeze uses 7-bit weight codes there (``nnsqueeze.isa``). uint8 weights run on the
u8u8 kernels, which never saturate: the int8 weight codes + 128 with zero point 128 give the same values.
This rewrites each file of a ``bench/efficientnet_lite0.py --save DIR`` folder that way (every
``DequantizeLinear`` of an int8 constant), checks that ORT's outputs are unchanged, and times both files
side by side (ORT 2 threads, batch 1 and 8, rounds of 5 calls per file, median)::

    python bench/efficientnet_lite0.py --no-timing --save DIR --recipe int8-residual
    python bench/effnet_u8u8.py DIR/int8-residual.onnx DIR/ort.onnx DIR/fp32.onnx

Time it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper as nh

from nnsqueeze.env import cpu_model
from nnsqueeze.isa import describe


def to_uint8_weights(src: str, dst: str) -> int:
    """Rewrite ``src``'s int8 weight constants (DQ inputs) as uint8 codes + 128, zero point 128; returns how many."""
    m = onnx.load(src)
    inits = {i.name: i for i in m.graph.initializer}
    done: set[str] = set()
    for node in m.graph.node:
        if node.op_type != "DequantizeLinear" or node.input[0] not in inits or node.input[0] in done:
            continue
        name = node.input[0]
        w = nh.to_array(inits[name])
        if w.dtype != np.int8:
            continue
        zp = nh.to_array(inits[node.input[2]]) if len(node.input) > 2 and node.input[2] in inits else None
        if zp is not None and zp.any():
            raise SystemExit(f"{src}: {name} has a nonzero int8 zero point; only symmetric weights are rewritten")
        scale = nh.to_array(inits[node.input[1]]) if node.input[1] in inits else np.zeros(())
        done.add(name)
        inits[name].CopyFrom(nh.from_array((w.astype(np.int16) + 128).astype(np.uint8), name))
        zname = name + "_zp_u8"
        m.graph.initializer.append(nh.from_array(np.full(scale.shape, 128, np.uint8), zname))
        if len(node.input) > 2:
            node.input[2] = zname
        else:
            node.input.append(zname)
    onnx.save(m, dst)
    return len(done)


def session(path: str, threads: int) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads, so.log_severity_level = threads, 3
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("onnx", nargs="+", help="int8 QDQ files (a file without int8 weights is timed as it is)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=6)
    a = ap.parse_args()
    x = np.random.default_rng(0).standard_normal((8, 3, 224, 224)).astype(np.float32)
    paths: dict[str, str] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for p in a.onnx:
            paths[os.path.basename(p)] = p
            u8 = os.path.join(tmp, "u8-" + os.path.basename(p))
            if to_uint8_weights(p, u8):
                paths["uint8 weights: " + os.path.basename(p)] = u8
        ss = {k: session(p, a.threads) for k, p in paths.items()}
        outs = {k: s.run(None, {"input": x})[0] for k, s in ss.items()}
        isa = describe()
        print(f"# CPU: {cpu_model()}, ISA: {isa['isa']}, onnxruntime {isa['onnxruntime']}, {a.threads} threads, "
              f"median of {a.rounds * 5}")
        for k in paths:
            if k.startswith("uint8 weights: "):
                d = float(np.abs(outs[k] - outs[k.removeprefix("uint8 weights: ")]).max())
                print(f"# {k}: max |output difference| vs the int8 file {d:.3g}")
        print("| file | ms b1 | ms b8 |\n|---|---|---|")
        ms = {}
        for b in (1, 8):
            t: dict[str, list[float]] = {k: [] for k in ss}
            for _ in range(a.rounds):
                for k, s in ss.items():
                    s.run(None, {"input": x[:b]})
                    for _ in range(5):
                        t0 = time.perf_counter()
                        s.run(None, {"input": x[:b]})
                        t[k].append((time.perf_counter() - t0) * 1e3)
            ms[b] = {k: statistics.median(v) for k, v in t.items()}
        for k in ss:
            print(f"| {k} | {ms[1][k]:.2f} | {ms[8][k]:.2f} |")


if __name__ == "__main__":
    main()
