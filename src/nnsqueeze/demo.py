"""``nnsqueeze demo``: the whole pipeline on an embedded workload, with its targets checked.

MNIST-1D is generated locally, a CNN is trained once (cached), the ``prune-int8`` preset prunes,
fine-tunes, quantizes to int8 and exports to ONNX; ONNX Runtime measures both models.

    from nnsqueeze.demo import run_demo
    ok = run_demo("nnsqueeze-demo")
"""

from __future__ import annotations

import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

# The demo's targets (foundation issue): baseline accuracy, accuracy kept, file size, speed, time.
MIN_BASELINE_ACC = 0.95
MAX_ACC_DROP_PT = 0.3
MAX_SIZE_RATIO = 0.30
MAX_SECONDS = 180.0


def check_targets(report: dict, seconds: float) -> list[tuple[str, str, bool]]:
    """(target, measured, met) rows for the demo's report."""
    b, c = report["baseline"], report["compressed"]
    drop = 100 * (b["accuracy"] - c["accuracy"])
    size = c["size_bytes"] / b["size_bytes"]
    speed = b["latency_ms"]["onnxruntime"] / c["latency_ms"]["onnxruntime"]
    return [
        (f"baseline accuracy >= {100 * MIN_BASELINE_ACC:.0f}%", f"{100 * b['accuracy']:.2f}%",
         b["accuracy"] >= MIN_BASELINE_ACC),
        (f"ONNX Runtime int8 accuracy within {MAX_ACC_DROP_PT} pt", f"{-drop:+.2f} pt", drop <= MAX_ACC_DROP_PT),
        (f"int8 ONNX file <= {100 * MAX_SIZE_RATIO:.0f}% of fp32", f"{100 * size:.1f}%", size <= MAX_SIZE_RATIO),
        ("ONNX Runtime int8 faster than fp32", f"{speed:.2f}x", speed > 1.0),
        (f"demo under {MAX_SECONDS:.0f} s", f"{seconds:.0f} s", seconds < MAX_SECONDS),
    ]


def run_demo(out: str | Path = "nnsqueeze-demo", retrain: bool = False, console: Console | None = None,
             progress: bool = True, overwrite: bool = False) -> bool:
    """Run the demo into ``out``; returns whether every target was met. A previous demo artifact
    there is replaced when it holds nothing nnsqueeze did not write (else ``overwrite`` is needed)."""
    import nnsqueeze as nsq
    from .artifact import check_out, only_ours
    from .zoo import mnist1d

    overwrite = overwrite or only_ours(out)
    check_out(out, overwrite, where="--out")  # before training and compressing

    console = console or Console()
    t0 = time.perf_counter()
    data = mnist1d.load_data()
    model = mnist1d.pretrained(force=retrain)
    result = nsq.compress(model, "prune-int8", train_data=data["train"], calib_data=data["calib"],
                          eval_data=data["test"], metric="accuracy", progress=progress)
    path = result.save(out, overwrite=overwrite)
    seconds = time.perf_counter() - t0
    result.report.print(console)
    rows = check_targets(result.report, seconds)
    t = Table(title="demo targets")
    for col in ("target", "measured", "met"):
        t.add_column(col)
    for name, val, ok in rows:
        t.add_row(name, val, "[green]yes[/]" if ok else "[red]NO[/]")
    console.print(t)
    console.print(f"artifact written to [bold]{path}[/] (report.md, model.onnx, model.safetensors)")
    return all(ok for _, _, ok in rows)
