"""The structured-pruning dependency graph from torch.fx vs from torch.export: build time and coverage (issue 14).

Per model (random init, seed 0, eval mode): the graph built by ``build_graph`` (torch.fx + ShapeProp) and by
``build_export_graph`` (``torch.export.export(strict=False)`` + translation), each the median of ``--runs``
builds (seconds, wall clock, this process's torch threads). Coverage: prunable groups, prunable channels (sum of
group sizes: what the allocator can choose from) and frozen spaces; "same" says whether both builders found
exactly the same groups (members, offsets, expansions). A builder that cannot trace the model gets its error
instead (the Hugging Face models: torch.fx cannot trace them; their "fx" column is then the module patterns of
``structured/hf.py``, marked ``patterns``). ``norms: prune`` for ConvNeXt (as the zoo test), else ``keep``::

    python bench/graph_build.py [--runs 5] [--only resnet18 bert] [--threads 2]
"""

from __future__ import annotations

import argparse
import datetime
import logging
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

from nnsqueeze.env import cpu_model
from nnsqueeze.errors import ModelError
from nnsqueeze.structured.graph import build_graph
from nnsqueeze.structured.hf import hf_graph
from nnsqueeze.structured.xgraph import build_export_graph
from nnsqueeze.zoo.mnist1d import build_model
from nnsqueeze.zoo.tvision import import_torchvision

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "structured"))

TV = ["resnet18", "mobilenet_v2", "efficientnet_b0", "shufflenet_v2_x0_5", "convnext_tiny", "mnasnet0_5",
      "densenet121", "regnet_y_400mf", "vit_b_16"]
NORMS = {"convnext_tiny"}


def models() -> dict:
    tv = import_torchvision()
    from test_hf import Logits, Pooled, bert_inputs, tiny_bert, tiny_llama

    out = {"demo_cnn": (lambda: build_model(), lambda: torch.randn(2, 1, 40))}
    for name in TV:
        kw = {"image_size": 32} if name == "vit_b_16" else {}
        out[name] = ((lambda n=name, k=kw: tv.models.get_model(n, weights=None, **k)),
                     lambda: torch.randn(1, 3, 32, 32))
    out["bert"] = (lambda: Pooled(tiny_bert("sdpa")), lambda: bert_inputs())
    out["llama_gqa"] = (lambda: Logits(tiny_llama("sdpa")), lambda: torch.randint(0, 40, (2, 9)))
    return out


def key(g) -> list:
    return sorted((grp.size, tuple(sorted((m.module, m.role, m.offset, m.expand, m.index) for m in grp.members)))
                  for grp in g.groups)


def measure(build, runs: int) -> tuple[float, object]:
    times, g = [], None
    for _ in range(runs):
        t = time.perf_counter()
        g = build()
        times.append(time.perf_counter() - t)
    return statistics.median(times), g


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--only", nargs="*")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    print(f"# {datetime.date.today()} CPU: {cpu_model()}, {a.threads} threads, torch {torch.__version__}, "
          f"median of {a.runs} builds")
    print("| model | fx s | export s | fx groups / channels / frozen | export groups / channels / frozen | same |")
    print("|---|---|---|---|---|---|")
    for name, (make, inputs) in models().items():
        if a.only and name not in a.only:
            continue
        torch.manual_seed(0)
        model, x = make().eval(), inputs()
        norms = name in NORMS
        row = [name]
        graphs = []
        builders = {"fx": build_graph, "export": build_export_graph}
        for kind in ("fx", "export"):
            try:
                s, g = measure(lambda f=builders[kind], m=model, i=x, n=norms: f(m, i, norms=n), a.runs)
                row.append(f"{s:.3f}")
            except ModelError as e:
                s, g = measure(lambda m=model: hf_graph(m), a.runs)
                row.append(f"patterns {s:.3f} ({kind}: {e.problem[:40]}...)")
            graphs.append(g)
        for g in graphs:
            row.append(f"{len(g.groups)} / {sum(grp.size for grp in g.groups)} / {len(g.frozen)}")
        row.append("yes" if key(graphs[0]) == key(graphs[1]) else "no")
        print("| " + " | ".join(row) + " |", flush=True)


if __name__ == "__main__":
    main()
