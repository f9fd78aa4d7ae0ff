"""One rank of the QAT-under-DDP test (tests/steps/test_qat_ddp.py); not a test module itself.

    PYTHONPATH=src python -m torch.distributed.run --standalone --nproc-per-node=2 tests/ddp_qat_worker.py OUT \
        ['{"freeze_bn_after": null}']   # optional JSON: qat options to override

Every rank builds the same small Conv2d+BatchNorm net and the same batches (fixed seeds) and runs the
recipe below through :func:`nnsqueeze.compress` (``qat`` with LSQ, BN folded on the fly and the
grid penalty, then ``finetune``; export + ONNX Runtime verification at the end). ``finetune`` gives
rank r the batches r, r+2, ... Saves this rank's final state_dict, the LSQ step sizes and attached-BN
statistics as they were when training ended, and a plain-BatchNorm finetune's state to
OUT/rank<r>.pt; rank 0 also writes the artifact (weights, manifest, model.onnx) to OUT/artifact.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from torch import nn

RECIPE = {
    "seed": 3,
    "steps": [
        {"qat": {"weights": {"bits": 4, "reduce_range": False}, "lsq": True, "bn": "train",
                 "freeze_bn_after": 4, "grid_lambda": 0.05}},
        {"finetune": {"steps": 6, "lr": 0.02, "optimizer": "sgd", "momentum": 0.9, "schedule": "cosine"}},
    ],
    "evaluate": {"threads": 1, "warmup": 0, "runs": 1, "per_step": False},
}


class ConvBNNet(nn.Module):
    """Two Conv2d+BN+ReLU blocks and a Linear head; odd channel counts and spatial sizes."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(2, 5, 3, padding=1), nn.BatchNorm2d(5), nn.ReLU(),
            nn.Conv2d(5, 6, 3, stride=2, bias=False), nn.BatchNorm2d(6), nn.ReLU())
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(6 * 3 * 4, 3))

    def forward(self, x):
        return self.head(self.features(x))


def make_model() -> nn.Module:
    torch.manual_seed(0)
    m = ConvBNNet()
    with torch.no_grad():  # non-trivial statistics and affine parameters, so folding matters
        for bn in (m.features[1], m.features[4]):
            bn.running_mean.uniform_(-0.3, 0.3)
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.2, 0.2)
    return m.eval()


def make_batches(n: int = 8, bs: int = 6, seed: int = 1) -> list:
    """Class c puts a bump in row 2c of channel 0: learnable, so the gradients are not noise."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        y = torch.randint(0, 3, (bs,), generator=g)
        x = 0.5 * torch.randn(bs, 2, 7, 9, generator=g)
        for i in range(bs):
            x[i, 0, 2 * int(y[i])] += 1.5
        out.append((x, y))
    return out


def lsq_and_bn_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """LSQ step sizes and the attached BNs' buffers/parameters (still present before the final fold)."""
    from nnsqueeze.quant.modules import fake_quant_modules

    out = {}
    for name, m in fake_quant_modules(model):
        for pname, p in m._parameters.items():
            if pname.endswith("_step") and p is not None:
                out[f"{name}.{pname}"] = p.detach().clone()
        bn = m._modules.get("bn")
        if bn is not None:
            for k, v in bn.state_dict().items():
                out[f"{name}.bn.{k}"] = v.detach().clone()
    return out


def recipe(**qat_overrides) -> dict:
    """RECIPE with some ``qat`` options replaced (e.g. ``freeze_bn_after=None``)."""
    steps = [{"qat": {**RECIPE["steps"][0]["qat"], **qat_overrides}}, RECIPE["steps"][1]]
    return {**RECIPE, "steps": steps}


def run(train: list, calib: list, qat_overrides: dict | None = None):
    """compress() with RECIPE; returns (result, LSQ/BN state as it was when training ended, i.e.
    just before the qat callback folds the BNs and turns the step sizes into fixed scales)."""
    import nnsqueeze as nsq
    from nnsqueeze.steps import qat

    seen: dict[str, torch.Tensor] = {}
    finalize = qat.finalize_qat_

    def spy(model, record):
        seen.update(lsq_and_bn_state(model))
        finalize(model, record)

    qat.finalize_qat_ = spy
    try:
        result = nsq.compress(make_model(), recipe(**(qat_overrides or {})), train_data=train, calib_data=calib,
                              metric=None, progress=False)
    finally:
        qat.finalize_qat_ = finalize
    return result, seen


def plain_bn_finetune(train: list) -> nn.Module:
    """A bare finetune of a net whose BatchNorm stays a plain nn.BatchNorm1d (no qat): under DDP it
    normalizes with each rank's own batch; the ranks must still end with identical buffers."""
    from nnsqueeze.context import Context
    from nnsqueeze.steps.finetune import Finetune, FinetuneConfig

    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(2 * 7 * 9, 5), nn.BatchNorm1d(5), nn.ReLU(), nn.Linear(5, 3))
    ctx = Context(train_data=train, progress=False)
    ctx.report.begin_step("finetune", {})
    return Finetune(FinetuneConfig(steps=3, lr=0.05, optimizer="sgd")).run(model, ctx)


if __name__ == "__main__":
    from nnsqueeze import distributed as dd

    out = Path(sys.argv[1])
    torch.set_num_threads(1)
    overrides = json.loads(sys.argv[2]) if len(sys.argv) > 2 else {}
    result, lsq_bn = run(make_batches(), make_batches(2, seed=2), overrides)
    assert not isinstance(result.model, nn.parallel.DistributedDataParallel)
    ft = next(s for s in result.report["steps"] if s["name"] == "finetune")
    if dd.is_main():  # as the CLI does: every rank computes, rank 0 alone writes the artifact
        result.save(out / "artifact")
    plain = plain_bn_finetune(make_batches())
    torch.save({"state": result.model.state_dict(), "lsq_bn": lsq_bn, "figures": ft["figures"],
                "export": result.report["export"]["compressed"], "plain_bn": plain.state_dict()},
               out / f"rank{dd.rank()}.pt")
