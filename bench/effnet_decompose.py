"""Where EfficientNet-Lite0's int8 error comes from: weights vs activations, and quantizer by quantizer.

Quantizes once with a ``quantize`` config (default: the ``int8-residual`` preset, bench/effnet_ablation.py's
``base``; ``--variant`` picks another of its VARIANTS), then switches single fake-quantizers back to float
in the torch simulation (which equals ONNX Runtime on all-integer models) and measures top-1 agreement and
KL(fp32 || q) on the validation crops (seed 2, calibration photos, never calibrated on) and the held-out
crops (seed 1, other photos). Nothing is re-calibrated: a float quantizer keeps every other scale as is.

A *site* is one tensor and every quantizer acting on it: a conv's output quantizer, the input quantizers
of the layers reading it (through Identity / Dropout / a zero pad) and the residual adds' input
quantizers tied to it; plus the network input and the classifier input. Weights-float uses the float
(BN-folded) weight and the float bias *before* bias correction.

Modes:

- ``decompose``: all quantized / weights only (activations float) / activations only (weights float);
- ``sites``: every site left float in turn (``--split val`` only: ranking on validation), sorted by KL gain;
- ``weights``: every layer's weight left float in turn, same;
- ``clip``: per site, the share of values outside its calibrated range on each split;
- ``keep``: one row with the sites / weights named by ``--float-site`` / ``--float-weight`` left float.

    python bench/effnet_decompose.py --mode decompose
    python bench/effnet_decompose.py --mode sites --split val --top 20
    python bench/effnet_decompose.py --mode keep --float-site stem.conv_stem:output
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from collections import defaultdict

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from nnsqueeze.context import Context  # noqa: E402
from nnsqueeze.env import cpu_model  # noqa: E402
from nnsqueeze.quant.fold import fold_batchnorm  # noqa: E402
from nnsqueeze.quant.functional import OpQuant, QuantAdd  # noqa: E402
from nnsqueeze.quant.modules import FakeQuantMixin  # noqa: E402
from nnsqueeze.steps.quantize import Quantize  # noqa: E402

from effnet_ablation import VARIANTS, agreement, run  # noqa: E402
from effnet_data import CALIB_PHOTOS, EVAL_PHOTOS, crops, load_model  # noqa: E402

_PASS = (nn.Identity, nn.Dropout, nn.ZeroPad2d, nn.ReLU6)  # ReLU6: after a conv that absorbed it


def quantize(cfg: dict, calib: torch.Tensor) -> nn.Module:
    ctx = Context(calib_data=[(calib[i:i + 16], None) for i in range(0, len(calib), 16)], progress=False)
    ctx.report.begin_step("quantize", {})
    return Quantize(Quantize.Config(**cfg)).run(load_model(), ctx).eval()


def float_biases(q: nn.Module) -> dict[str, torch.Tensor | None]:
    """Each quantized layer's float bias after BN folding, before bias correction."""
    fm = load_model()
    fold_batchnorm(fm)
    out = {}
    for name, m in q.named_modules():
        if isinstance(m, FakeQuantMixin):
            f = fm.get_submodule(name)
            if not torch.equal(f.weight, m.weight):
                raise SystemExit(f"{name}: the quantized layer's float weight is not the folded one")
            out[name] = None if f.bias is None else f.bias.detach().clone()
    return out


def sites(q: nn.Module) -> dict[str, list[tuple[str, str]]]:
    """Site name -> the (module, quantizer) handles on that tensor (see the module docstring)."""
    groups: dict[str, list[tuple[str, str]]] = defaultdict(list)
    gm = q if isinstance(q, torch.fx.GraphModule) else None
    if gm is None:
        raise SystemExit("expected the fx GraphModule that ops: [add] returns")

    def mod(node):
        return gm.get_submodule(node.target) if isinstance(node, torch.fx.Node) and node.op == "call_module" else None

    def source(node) -> str | None:
        m = mod(node)
        while isinstance(m, _PASS):
            node = node.args[0]
            m = mod(node)
        if isinstance(m, QuantAdd) or (isinstance(m, FakeQuantMixin) and m.quant_output):
            return node.target
        return None

    for node in gm.graph.nodes:
        m = mod(node)
        if isinstance(m, FakeQuantMixin):
            src = source(node.args[0])
            groups[f"{src}:output" if src else f"{node.target}:input"].append((node.target, "input"))
            if m.quant_output:
                groups[f"{node.target}:output"].append((node.target, "output"))
        elif isinstance(m, OpQuant):
            for which, arg in zip(("a", "b"), node.args[:2]):
                src = source(arg)
                groups[f"{src}:output" if src else f"{node.target}:{which}"].append((node.target, which))
            groups[f"{node.target}:output"].append((node.target, "output"))
    return dict(groups)


@contextlib.contextmanager
def floated(q: nn.Module, handles=(), weights=(), biases=None):
    """Quantizers ``handles`` ((module, which)) and the weights of layers ``weights`` in float, inside."""
    touched = []
    by_mod: dict[str, set[str]] = defaultdict(set)
    for name, which in handles:
        by_mod[name].add(which)
    for name in set(by_mod) | set(weights):
        m = q.get_submodule(name)
        off = by_mod.get(name, set())
        touched.append(m)
        if isinstance(m, FakeQuantMixin):
            m.runs_integer = lambda: False  # the float simulation of the rest, not the integer kernel
            orig = type(m)._quant_act
            m._quant_act = (lambda x, which, m=m, off=off, orig=orig: x if which in off else orig(m, x, which))
            if name in weights:
                m.fake_quant_weight = m.effective_weight
                m.quant_bias = (lambda b=biases[name]: b)
        else:  # an OpQuant: the float-sim forward (QuantAdd's exact integer path needs all three codes)
            orig = OpQuant._fq
            m.forward = (lambda a, b, m=m: OpQuant.forward(m, a, b))
            m._fq = (lambda x, which, m=m, off=off, orig=orig: x if which in off else orig(m, x, which))
    try:
        yield
    finally:
        for m in touched:
            for k in ("runs_integer", "_quant_act", "fake_quant_weight", "quant_bias", "forward", "_fq"):
                m.__dict__.pop(k, None)


@contextlib.contextmanager
def clip_stats(q: nn.Module, site_map: dict):
    """Inside: every quantizer counts the values outside its grid's range (float simulation). Yields
    site -> [clipped below, clipped above, values, largest |x| / range edge] (the site's first handle)."""
    stats: dict[str, list] = {}
    first = {hs[0]: site for site, hs in site_map.items()}
    touched = []

    def count(x, s, z, qmin, qmax, site):
        lo, hi = float((qmin - z) * s), float((qmax - z) * s)
        st = stats.setdefault(site, [0, 0, 0, 0.0])
        st[0] += int((x < lo).sum())
        st[1] += int((x > hi).sum())
        st[2] += x.numel()
        st[3] = max(st[3], float(x.max()) / hi if hi > 0 else 0.0, float(x.min()) / lo if lo < 0 else 0.0)

    for name, m in q.named_modules():
        if isinstance(m, FakeQuantMixin):
            touched.append(m)
            m.runs_integer = lambda: False

            def qa(x, which, m=m, name=name):
                if (name, which) in first:
                    count(x, m._buffers[f"{which}_scale_"], m._buffers[f"{which}_zero_point_"], *m.act_qrange,
                          first[(name, which)])
                return type(m)._quant_act(m, x, which)
            m._quant_act = qa
        elif isinstance(m, OpQuant):
            touched.append(m)
            m.forward = (lambda a, b, m=m: OpQuant.forward(m, a, b))

            def fq(x, which, m=m, name=name):
                if (name, which) in first:
                    count(x, m._buffers[f"{which}_scale_"], m._buffers[f"{which}_zero_point_"], *m.ascheme.qrange,
                          first[(name, which)])
                return OpQuant._fq(m, x, which)
            m._fq = fq
    try:
        yield stats
    finally:
        for m in touched:
            for k in ("runs_integer", "_quant_act", "forward", "_fq"):
                m.__dict__.pop(k, None)


class _Recorder(torch.fx.Interpreter):
    """Runs the graph and keeps the values of the nodes in ``keep``."""

    def __init__(self, gm, keep):
        super().__init__(gm, garbage_collect_values=True)
        self.keep, self.kept = keep, {}

    def run_node(self, n):
        v = super().run_node(n)
        if n in self.keep:
            self.kept[n] = v
        return v


class SuffixRunner:
    """Re-runs only the part of the graph from a cut (the first node a change touches) on: the values
    live across the cut come from one run of the unchanged model (batch by batch, ``batch`` crops)."""

    def __init__(self, gm: torch.fx.GraphModule, cuts: dict[str, int]):
        self.gm, self.nodes = gm, list(gm.graph.nodes)
        self.index = {n: i for i, n in enumerate(self.nodes)}
        last = {n: max((self.index[u] for u in n.users), default=-1) for n in self.nodes}
        self.live = {c: [n for n in self.nodes[:c] if last[n] >= c] for c in set(cuts.values())}
        self.keep = {n for ns in self.live.values() for n in ns}
        self.cuts = cuts

    def cut_of(self, module_names) -> int:
        return min(i for i, n in enumerate(self.nodes) if n.op == "call_module" and n.target in module_names)

    @torch.no_grad()
    def run(self, x: torch.Tensor, changes: dict, batch: int = 32) -> tuple[torch.Tensor, dict]:
        """Logits of the unchanged model and of each change (name -> (handles, weights, biases)) on ``x``."""
        base, outs = [], defaultdict(list)
        for i in range(0, len(x), batch):
            rec = _Recorder(self.gm, self.keep)
            base.append(rec.run(x[i:i + batch]))
            for name, (handles, weights, biases) in changes.items():
                c = self.cuts[name]
                env = {n: rec.kept.get(n) for n in self.nodes[:c]}
                with floated(self.gm, handles, weights, biases):
                    outs[name].append(torch.fx.Interpreter(self.gm).run(x[i:i + batch], initial_env=env))
        return torch.cat(base), {k: torch.cat(v) for k, v in outs.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mode", choices=["decompose", "sites", "weights", "keep", "clip"], default="decompose")
    ap.add_argument("--variant", default="base", help=f"the quantize config, one of {sorted(VARIANTS)}")
    ap.add_argument("--split", choices=["both", "val"], default="both")
    ap.add_argument("--only", action="append", help="sites/weights modes: names containing this (repeatable)")
    ap.add_argument("--float-site", action="append", default=[])
    ap.add_argument("--float-weight", action="append", default=[])
    ap.add_argument("--check", type=int, default=0, help="sites/weights: compare N suffix runs with whole runs")
    ap.add_argument("--input-range", type=float, nargs=2, metavar=("LO", "HI"),
                    help="set the network input's uint8 grid to [LO, HI] after calibration (e.g. the range "
                    "normalization gives [0, 1] pixels: -2.1179 2.6400)")
    ap.add_argument("--calib", type=int, default=128)
    ap.add_argument("--val", type=int, default=128)
    ap.add_argument("--eval", type=int, default=256)
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    calib = crops(CALIB_PHOTOS, args.calib, seed=0)
    splits = {"val": crops(CALIB_PHOTOS, args.val, seed=2)}
    if args.split == "both":
        splits["held"] = crops(EVAL_PHOTOS, args.eval, seed=1)
    fp = load_model()
    ref = {k: run(fp, x) for k, x in splits.items()}
    t = time.perf_counter()
    q = quantize(VARIANTS[args.variant], calib)
    biases = float_biases(q)
    if args.input_range:
        stem = next(m for _, m in q.named_modules() if isinstance(m, FakeQuantMixin))
        lo, hi = args.input_range
        scale = (hi - lo) / 255
        with torch.no_grad():
            stem.input_scale_.fill_(scale)
            stem.input_zero_point_.fill_(int(round(-lo / scale)))
        print(f"# network input grid set to [{lo}, {hi}]: scale {scale:.6f}, zero point {int(stem.input_zero_point_)}")
    site_map = sites(q)
    layers = list(biases)
    print(f"# EfficientNet-Lite0, quantize variant {args.variant!r}, {args.calib} calibration crops, "
          f"{len(site_map)} activation sites, {len(layers)} layers; CPU {cpu_model()}, torch 1 thread; "
          f"quantized in {time.perf_counter() - t:.0f} s (shared machine)", flush=True)

    def measure(label: str, handles=(), weights=()) -> dict[str, tuple[float, float]]:
        with floated(q, handles, weights, biases):
            res = {k: agreement(ref[k], run(q, x)) for k, x in splits.items()}
        cells = " | ".join(f"{100 * a:.1f}% | {kl:.4f}" for a, kl in res.values())
        print(f"| {label} | {cells} |", flush=True)
        return res

    if args.mode in ("decompose", "keep"):
        print("| variant | " + " | ".join(f"{k} agree | {k} KL" for k in splits) + " |")
        print("|---" * (1 + 2 * len(splits)) + "|")
    every = [h for hs in site_map.values() for h in hs]
    if args.mode == "decompose":
        measure("all quantized")
        measure("weights quantized only (activations float)", handles=every)
        measure("activations quantized only (weights float)", weights=layers)
        measure("nothing quantized (check: = fp32)", handles=every, weights=layers)
        adds = [h for n, hs in site_map.items() for h in hs if n.startswith("nsq_")]
        measure("activations quantized except residual-add sites", handles=adds, weights=layers)
        return
    if args.mode == "clip":
        out = {}
        for k, x in splits.items():
            with clip_stats(q, site_map) as st:
                run(q, x)
            out[k] = st
        print("\n# values outside each site's calibrated range (float simulation), per split: % below / % above, "
              "largest |x| / range edge")
        print("| site | " + " | ".join(f"{k} % below | {k} % above | {k} max/edge" for k in out) + " |")
        print("|---" * (1 + 3 * len(out)) + "|")
        for site in site_map:
            cells = [f"{100 * st[site][0] / st[site][2]:.3f} | {100 * st[site][1] / st[site][2]:.3f} | "
                     f"{st[site][3]:.2f}" for st in out.values()]
            print(f"| {site} | " + " | ".join(cells) + " |")
        return
    if args.mode == "keep":
        unknown = [s for s in args.float_site if s not in site_map]
        if unknown:
            raise SystemExit(f"unknown sites {unknown}; known: {sorted(site_map)}")
        measure(f"float: {args.float_site + args.float_weight}",
                handles=[h for s in args.float_site for h in site_map[s]], weights=args.float_weight)
        return
    names = list(site_map) if args.mode == "sites" else layers
    if args.only:
        names = [n for n in names if any(o in n for o in args.only)]
    changes = {n: ((site_map[n], (), None) if args.mode == "sites" else ((), [n], biases)) for n in names}
    finder = SuffixRunner(q, {})
    cuts = {n: finder.cut_of({h[0] for h in ch[0]} | set(ch[1])) for n, ch in changes.items()}
    runner = SuffixRunner(q, cuts)
    rows = []
    for split, x in splits.items():
        base, outs = runner.run(x, changes)
        if not torch.equal(base[:32], run(q, x[:32])):  # the interpreter runs what the model runs
            raise SystemExit("the graph interpreter does not reproduce the model's forward")
        for n in list(outs)[:args.check]:  # and a suffix run what the whole changed model runs
            with floated(q, *changes[n]):
                if not torch.equal(outs[n], run(q, x)):
                    raise SystemExit(f"the suffix run of {n} differs from the whole model's")
            print(f"# checked: the suffix run of {n} equals the whole model's forward", flush=True)
        b = agreement(ref[split], base)
        print(f"| all quantized ({split}) | {100 * b[0]:.1f}% | {b[1]:.4f} |")
        for n, out in outs.items():
            a = agreement(ref[split], out)
            rows.append((b[1] - a[1], split, n, a))
    print(f"\n# float {args.mode[:-1]} ranked by KL gain (KL all quantized - KL with this one float)")
    print("| split | float | KL gain | agree | KL |\n|---|---|---|---|---|")
    for gain, split, n, a in sorted(rows, key=lambda r: (r[1], -r[0])):
        print(f"| {split} | {n} | {gain:+.4f} | {100 * a[0]:.1f}% | {a[1]:.4f} |")

if __name__ == "__main__":
    main()
