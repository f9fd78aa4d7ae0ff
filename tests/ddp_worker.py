"""One rank of the DDP test (tests/test_distributed.py); not a test module itself.

    PYTHONPATH=src python -m torch.distributed.run --standalone --nproc-per-node=2 tests/ddp_worker.py OUT

Builds the same small MLP and data on every rank (fixed seeds), runs a gradual global prune + finetune
through the real steps, and saves this rank's final state_dict to OUT/rank<r>.pt.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn

from nnsqueeze import distributed as dd
from nnsqueeze.context import Context
from nnsqueeze.report import ReportBuilder
from nnsqueeze.steps.finetune import Finetune, FinetuneConfig
from nnsqueeze.steps.prune import Prune, PruneConfig

PRUNE = dict(sparsity=0.5, scope="global", schedule="gradual", end=0.5, frequency=1)
FINETUNE = dict(steps=6, lr=0.05, optimizer="sgd", momentum=0.9, weight_decay=0.01, schedule="cosine")


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 9), nn.ReLU(), nn.Linear(9, 4))


def make_batches(n: int = 8, bs: int = 5) -> list:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(bs, 6, generator=g), torch.randint(0, 4, (bs,), generator=g)) for _ in range(n)]


def train(data: list) -> tuple[nn.Module, ReportBuilder]:
    ctx = Context(train_data=data, report=ReportBuilder(), progress=True)
    ctx.report.begin_step("prune", PRUNE)
    model = Prune(PruneConfig(**PRUNE), 0).run(make_model(), ctx)
    ctx.report.begin_step("finetune", FINETUNE)
    model = Finetune(FinetuneConfig(**FINETUNE), 1).run(model, ctx)
    return model, ctx.report


if __name__ == "__main__":
    out = Path(sys.argv[1])
    model, report = train(make_batches())
    assert not isinstance(model, nn.parallel.DistributedDataParallel)  # unwrapped after training
    figs = report.steps[-1]["figures"]
    torch.save({"state": model.state_dict(), "figures": figs}, out / f"rank{dd.rank()}.pt")
