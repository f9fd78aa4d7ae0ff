"""Ablation: one ``quantize`` option at a time on EfficientNet-Lite0, agreement with fp32 on two splits.

Runs the ``quantize`` step alone (no export, no timing) for each variant and measures the torch
simulation, which equals what ONNX Runtime runs on the all-integer models (bench/efficientnet_lite0.py
prints that parity: max abs ~3e-6 on the logits). Two splits, so options can be chosen without
looking at the held-out crops:

- validation: ``--val`` crops (seed 2) of the *calibration* photos, never used for calibration;
- held out: ``--eval`` crops (seed 1) of the other photos, the figures BENCHMARKS.md reports.

Each row gives top-1 agreement and KL(fp32 || q) on both, and the change against the first variant.
The last line gives the fraction of held-out crops whose fp32 top-1/top-2 logit margin is tiny
(< 0.1, < 0.25, < 0.5): those crops flip under almost any perturbation.

    python bench/effnet_ablation.py --variant base --variant mse --variant cle   # see VARIANTS
    python bench/effnet_ablation.py --list
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import nnsqueeze as nsq  # noqa: E402
from nnsqueeze.context import Context  # noqa: E402
from nnsqueeze.steps.quantize import Quantize  # noqa: E402

from effnet_data import CALIB_PHOTOS, EVAL_PHOTOS, crops, load_model  # noqa: E402

BASE = nsq.load_recipe("int8-residual").to_dict()["steps"][0]["quantize"]


def _with(**kw) -> dict:
    cfg = copy.deepcopy(BASE)
    for k, v in kw.items():
        if isinstance(v, dict) and isinstance(cfg.get(k), dict):
            cfg[k] = {**cfg[k], **v}
        else:
            cfg[k] = v
    return cfg


VARIANTS = {
    "base": _with(),                                        # int8-residual: minmax, per-channel, bias correction
    "int8": _with(ops=[]),                                  # the int8 preset (float residual adds)
    "no-bias-corr": _with(bias_correction=False),
    "per-tensor-w": _with(weights={"granularity": "per-tensor"}),
    "w-clip-mse": _with(weights={"clip": "mse"}),           # each weight row's clipping ratio searched (MSE)
    "mse": _with(calibration={"method": "mse"}),
    "percentile": _with(calibration={"method": "percentile"}),
    "kl": _with(calibration={"method": "kl"}),
    "ema": _with(calibration={"method": "ema"}),
    "cle": _with(equalize={"method": "cle", "iterations": 2}),  # leaves ReLU6 pairs alone (quant/equalize.py)
    "act-eq": _with(equalize={"method": "range"}),          # a no-op here: every pair has a ReLU6 between
    "adaround": _with(weights={"adaround": {"iters": 500, "samples": 128, "batch": 32}}),
    "adaround-2k": _with(weights={"adaround": {"iters": 2000, "samples": 128, "batch": 32}}),
    # AdaRound on the first conv alone (bench/effnet_decompose.py: the first layer's input and output are the
    # activation sites that matter on the validation split), with mse calibration
    "mse-adaround-stem": _with(calibration={"method": "mse"}, layer_weights={
        "_conv_stem.1": {"adaround": {"iters": 500, "samples": 128, "batch": 32}}}),
    "mse-adaround-stem-2k": _with(calibration={"method": "mse"}, layer_weights={
        "_conv_stem.1": {"adaround": {"iters": 2000, "samples": 128, "batch": 32}}}),
    "mse-adaround-first3": _with(calibration={"method": "mse"}, layer_weights={  # the weight ranking's top 3
        k: {"adaround": {"iters": 500, "samples": 128, "batch": 32}}
        for k in ("_conv_stem.1", "_blocks.0._depthwise_conv", "_blocks.0._project_conv")}),
    "wide-1": _with(wide_first=1),
    "wide-3": _with(wide_first=3),
}


def agreement(ref: torch.Tensor, got: torch.Tensor) -> tuple[float, float]:
    kl = torch.nn.functional.kl_div(got.log_softmax(1), ref.log_softmax(1), log_target=True, reduction="batchmean")
    return float((ref.argmax(1) == got.argmax(1)).float().mean()), float(kl)


@torch.no_grad()
def run(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    return torch.cat([model(x[i:i + 32]) for i in range(0, len(x), 32)])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--calib", type=int, default=128)
    ap.add_argument("--val", type=int, default=128)
    ap.add_argument("--eval", type=int, default=256)
    ap.add_argument("--variant", action="append", help=f"one of {sorted(VARIANTS)} (default: all)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    ap.add_argument("--list", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.list:
        for k, v in VARIANTS.items():
            print(k, v)
        return
    torch.manual_seed(0)
    calib = crops(CALIB_PHOTOS, args.calib, seed=0)
    val = crops(CALIB_PHOTOS, args.val, seed=2)
    held = crops(EVAL_PHOTOS, args.eval, seed=1)
    fp = load_model()
    ref_v, ref_h = run(fp, val), run(fp, held)
    top2 = ref_h.topk(2, 1).values
    margin = top2[:, 0] - top2[:, 1]
    print("# fp32 held-out top-1/top-2 logit margin: " + ", ".join(
        f"< {t}: {100 * float((margin < t).float().mean()):.1f}%" for t in (0.1, 0.25, 0.5, 1.0)))
    print("| variant | val agree | val KL | held agree | held KL | Δ held agree | Δ held KL | s |")
    print("|---|---|---|---|---|---|---|---|")
    first = None
    for name in args.variant or list(VARIANTS):
        t = time.perf_counter()
        ctx = Context(calib_data=[(calib[i:i + 16], None) for i in range(0, len(calib), 16)], progress=False)
        ctx.report.begin_step("quantize", {})
        step = Quantize(Quantize.Config(**VARIANTS[name]))
        q = step.run(load_model(), ctx).eval()
        av, kv = agreement(ref_v, run(q, val))
        ah, kh = agreement(ref_h, run(q, held))
        first = first or (ah, kh)
        print(f"| {name} | {100 * av:.1f}% | {kv:.4f} | {100 * ah:.1f}% | {kh:.4f} | "
              f"{100 * (ah - first[0]):+.1f} | {kh - first[1]:+.4f} | {time.perf_counter() - t:.0f} |", flush=True)


if __name__ == "__main__":
    main()
