"""torchvision's classification zoo: nnsqueeze's `structured-prune` vs Torch-Pruning, one row per family (issue 14).

For the smallest variant of each family (the list of ``tests/structured/test_torchvision_zoo.py``), both tools
prune the same random init (seed 0) at a 50% channel ratio with L2 group magnitude (nnsqueeze with `norms: prune`:
a LayerNorm over channels is pruned with them, as Torch-Pruning does), the final classifier kept
(Torch-Pruning: ``MetaPruner(..., ignored_layers=[last Linear])``; nnsqueeze keeps what reaches the output
anyway). Per tool: MACs and parameters left (fractions of the baseline; MACs by torch's
``FlopCounterMode``, which also sees functional linears and attention matmuls), seconds
to prune (graph + pruning), and the ONNX Runtime latency gain at batch 1, 1 thread: the three ONNX models
(baseline, nnsqueeze, Torch-Pruning) timed in interleaved blocks, the gain being the median of the per-block
baseline/pruned ratios (load from other processes cancels out), denormals flushed to zero (see ``session``).
"skipped": Conv/Linear layers nnsqueeze names in the report's skipped list (channels kept whole, with the
reason). A tool that crashes gets its error in the row instead of figures::

    pip install torch-pruning==1.6.1 torchvision     # the peer and the zoo
    python bench/zoo_vs_torch_pruning.py [--only resnet18 mnasnet0_5] [--size 224] [--blocks 5] [--tools nnsqueeze]
                                         [--json zoo.json]    # merged: rows of other families are kept

``--json FILE`` merges this run's rows into FILE (one entry per family, replaced when re-measured) and prints
the table of everything FILE holds, so rows can be re-measured one at a time.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from nnsqueeze.context import Context
from nnsqueeze.export.onnx import export_onnx
from nnsqueeze.env import cpu_model
from nnsqueeze.steps.channel_prune import StructuredPrune
from nnsqueeze.zoo.tvision import import_torchvision

ZOO = ["alexnet", "convnext_tiny", "densenet121", "efficientnet_b0", "efficientnet_v2_s", "googlenet", "inception_v3",
       "maxvit_t", "mnasnet0_5", "mobilenet_v2", "mobilenet_v3_small", "regnet_x_400mf", "regnet_y_400mf", "resnet18",
       "resnext50_32x4d", "shufflenet_v2_x0_5", "squeezenet1_0", "swin_t", "swin_v2_t", "vgg11", "vit_b_16",
       "wide_resnet50_2"]
TOOLS = ("nnsqueeze", "torch-pruning")
SIZE = {"inception_v3": 299}   # its own input size; every other family: --size (224)


def isa() -> str:
    try:
        flags = next(line for line in open("/proc/cpuinfo") if line.startswith("flags")).split()
    except (OSError, StopIteration):
        return "?"
    have = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8") if f in flags]
    return " ".join(have) or "no AVX2"


def macs(model: nn.Module, x: torch.Tensor) -> int:
    """MACs of one forward, by torch's own FlopCounterMode (aten ops: also the functional linears and the
    attention matmuls that module hooks miss, e.g. in Swin's shifted-window attention). The fused eval-mode
    fast path of ``nn.MultiheadAttention`` (``aten::_native_multi_head_attention``) has no formula there and
    counts 0, so it is switched off while counting: the same math through linears and matmuls."""
    was = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as fc:
            model(x)
    finally:
        torch.backends.mha.set_fastpath_enabled(was)
    return fc.get_total_flops() // 2


def params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def session(path: Path, threads: int):
    """An ONNX Runtime session for timing, denormals flushed to zero: random-init networks (mobile ones
    especially) carry activations around 1e-11 and below, whose denormal arithmetic would time the weights'
    accident instead of the architecture (it made two models of equal MACs differ 2-4x here)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
    so.add_session_config_entry("session.set_denormal_as_zero", "1")
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def latency_ms(sess, feed: dict, runs: int) -> float:
    """Median wall time of ``runs`` runs after 2 warm-up runs."""
    for _ in range(2):
        sess.run(None, feed)
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        sess.run(None, feed)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def build(name: str) -> nn.Module:
    torch.manual_seed(0)
    return import_torchvision().models.get_model(name, weights=None).eval()


def prune_nnsqueeze(model: nn.Module, x: torch.Tensor) -> tuple[nn.Module, int]:
    ctx = Context(example_inputs=x, progress=False)
    ctx.report.begin_step("structured-prune", {})
    out = StructuredPrune(StructuredPrune.Config(ratio=0.5, importance="l2", norms="prune")).run(model, ctx)
    layers = {n for n, m in model.named_modules() if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear))}
    skipped = {part.strip() for s in ctx.report.skipped for part in s["layer"].split(",")} & layers
    return out, len(skipped)


def prune_torch_pruning(model: nn.Module, x: torch.Tensor) -> nn.Module:
    import torch_pruning as tp

    last = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))][-1]  # squeezenet: a conv
    pruner = tp.pruner.MetaPruner(model, x, importance=tp.importance.GroupMagnitudeImportance(p=2),
                                  pruning_ratio=0.5, ignored_layers=[last])
    pruner.step()
    return model


def measure(name: str, size: int, blocks: int, threads: int, tools: tuple[str, ...] = TOOLS) -> dict:
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(1))
    base = build(name)
    m0, p0 = macs(base, x), params(base)
    row: dict = {"family": name, "input": size, "macs": m0, "params": p0,
                 "date": str(datetime.date.today()), "cpu": cpu_model(), "isa": isa(), "threads": threads}
    models = {"baseline": base}
    for tool, fn in (("nnsqueeze", prune_nnsqueeze), ("torch-pruning", prune_torch_pruning)):
        if tool not in tools:
            row[tool] = {"not_run": "--tools"}
            continue
        m = build(name)
        t0 = time.perf_counter()
        try:
            out = fn(m, x)
        except Exception as e:  # noqa: BLE001 - a crash is a result of the comparison, reported in the row
            row[tool] = {"error": f"{type(e).__name__}: {str(e)[:120]}"}
            continue
        secs = time.perf_counter() - t0
        m, skipped = out if isinstance(out, tuple) else (out, None)
        try:
            left = macs(m.eval(), x) / m0
        except Exception as e:  # noqa: BLE001 - a pruned model that no longer runs is a crash too
            row[tool] = {"error": f"pruned model fails: {type(e).__name__}: {str(e)[:100]}"}
            continue
        row[tool] = {"macs_left": left, "params_left": params(m) / p0,
                     "seconds": secs, **({"skipped": skipped} if skipped is not None else {})}
        models[tool] = m
    with tempfile.TemporaryDirectory() as tmp:
        paths = {}
        for tool, m in models.items():
            paths[tool] = Path(tmp) / f"{tool}.onnx"
            try:
                export_onnx(m, paths[tool], x)
            except Exception as e:  # noqa: BLE001 - reported in the row
                if tool == "baseline":
                    row["error"] = f"baseline export: {type(e).__name__}: {str(e)[:120]}"
                    return row
                row[tool]["export_error"] = f"{type(e).__name__}: {str(e)[:120]}"
                del paths[tool]
        sessions = {t: session(p, threads) for t, p in paths.items()}
        feed = {sessions["baseline"].get_inputs()[0].name: x.numpy()}
        one = latency_ms(sessions["baseline"], feed, 3)
        runs = max(5, min(30, int(1000 / max(one, 1e-3))))   # about a second per model and block
        lat: dict[str, list[float]] = {t: [] for t in paths}
        for _ in range(blocks):
            for tool, sess in sessions.items():
                lat[tool].append(latency_ms(sess, feed, runs))
        del sessions
    row["latency_ms"] = statistics.median(lat["baseline"])
    for tool in paths:
        if tool != "baseline":
            row[tool]["latency_ms"] = statistics.median(lat[tool])
            row[tool]["gain"] = statistics.median(b / p for b, p in zip(lat["baseline"], lat[tool]))
    return row


def cell(r: dict, key: str, fmt: str) -> str:
    return format(r[key], fmt) if key in r else "-"


def both(r: dict, key: str, fmt: str, crash: bool = False) -> list[str]:
    """nnsqueeze's and Torch-Pruning's ``key``; a tool that crashed: its error type (``crash``) or "-"."""
    def one(d: dict) -> str:
        if "error" in d:
            return f"crash ({d['error'].split(':')[0]})" if crash else "-"
        if "not_run" in d:
            return "not run" if crash else "-"
        return cell(d, key, fmt)
    return [one(r.get(t, {})) for t in TOOLS]


def table(rows: list[dict]) -> str:
    out = ["| family (input) | MACs | params | nnsqueeze MACs left | TP MACs left | nnsqueeze params left | "
           "TP params left | nnsqueeze skipped | ORT gain nnsqueeze | ORT gain TP | seconds nnsqueeze | seconds TP |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            out.append(f"| {r['family']} ({r['input']}) | {r['error']} |" + " |" * 10)
            continue
        gains = [g + "x" if g != "-" else g for g in both(r, "gain", ".2f")]
        out.append(" | ".join([f"| {r['family']} ({r['input']})", f"{r['macs'] / 1e9:.2f} G",
                               f"{r['params'] / 1e6:.1f} M", *both(r, "macs_left", ".2f", crash=True),
                               *both(r, "params_left", ".2f"), cell(r.get("nnsqueeze", {}), "skipped", "d"),
                               *gains, *both(r, "seconds", ".1f")]) + " |")
    return "\n".join(out)


def merge(path: Path, rows: list[dict]) -> list[dict]:
    """Rows held in ``path`` with ``rows`` replacing those of the same family; written back; in ZOO order."""
    held = {r["family"]: r for r in json.loads(path.read_text())} if path.exists() else {}
    held.update({r["family"]: r for r in rows})
    out = [held[n] for n in ZOO if n in held]
    path.write_text(json.dumps(out, indent=1))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="+", choices=ZOO, metavar="NAME", help="families to measure (default: all)")
    ap.add_argument("--size", type=int, default=224, help="input size (inception_v3: 299)")
    ap.add_argument("--blocks", type=int, default=5, help="interleaved latency blocks")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--tools", default=",".join(TOOLS), help="comma-separated: nnsqueeze, torch-pruning")
    ap.add_argument("--json", type=Path, help="merge the rows into this JSON file and print all it holds")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    logging.getLogger("nnsqueeze").setLevel(logging.ERROR)
    torch.set_num_threads(args.threads)
    rows = []
    for name in args.only or ZOO:
        t0 = time.perf_counter()
        rows.append(measure(name, SIZE.get(name, args.size), args.blocks, args.threads,
                            tuple(t.strip() for t in args.tools.split(","))))
        print(f"{name}: {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
        if args.json:  # after every row: a run cut short keeps what it measured
            merged = merge(args.json, rows[-1:])
    if args.json:
        rows = merged
    r0 = rows[0] if rows else {}
    print(f"\n{r0.get('date')} | {r0.get('cpu')} ({r0.get('isa')}) | torch {torch.__version__} | ORT batch 1, "
          f"{args.threads} thread(s), {args.blocks} interleaved blocks | ratio 0.5, l2 "
          "(nnsqueeze: norms: prune), random init\n")
    print(table(rows))


if __name__ == "__main__":
    main()
