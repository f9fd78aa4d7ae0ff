"""Step ``finetune``: hand-written reference loops, masks that hold, callbacks, losses, errors."""

from __future__ import annotations

import copy
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError
from torch import nn

from nnsqueeze.context import Context
from nnsqueeze.errors import DataError, ModelError
from nnsqueeze.report import ReportBuilder
from nnsqueeze.steps.finetune import Finetune, FinetuneConfig
from nnsqueeze.steps.prune import Prune, PruneConfig


def make_ctx(train, **kw) -> Context:
    ctx = Context(train_data=train, report=ReportBuilder(), progress=kw.pop("progress", False), **kw)
    ctx.report.begin_step("finetune", {})
    return ctx


def finetune(model, ctx, **cfg):
    return Finetune(FinetuneConfig(**cfg), 1).run(model, ctx)


def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))


def batches(n=3, bs=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(bs, 4, generator=g), torch.randint(0, 3, (bs,), generator=g)) for _ in range(n)]


def figures(ctx):
    return ctx.report.steps[-1]["figures"]


@pytest.mark.parametrize("schedule", ["constant", "cosine"])
def test_sgd_matches_hand_written_loop(schedule):
    data, steps, lr, mu, wd = batches(), 7, 0.1, 0.9, 0.05
    model = mlp()
    ref = copy.deepcopy(model)
    finetune(model, make_ctx(data), steps=steps, lr=lr, optimizer="sgd", momentum=mu, weight_decay=wd,
             schedule=schedule)
    # Reference: SGD with momentum written out; decay only on matrices; data cycled 0,1,2,0,...
    bufs = {n: torch.zeros_like(p) for n, p in ref.named_parameters()}
    for t in range(steps):
        x, y = data[t % len(data)]
        ref.zero_grad()
        F.cross_entropy(ref(x), y).backward()
        lr_t = lr if schedule == "constant" else lr * 0.5 * (1 + math.cos(math.pi * t / steps))
        with torch.no_grad():
            for n, p in ref.named_parameters():
                g = p.grad + (wd * p if p.ndim > 1 else 0)
                bufs[n] = g if t == 0 else mu * bufs[n] + g
                p -= lr_t * bufs[n]
    for (n, a), b in zip(model.named_parameters(), ref.parameters()):
        assert torch.allclose(a, b, atol=1e-6), n


def test_masks_hold_under_adamw_with_weight_decay(tiny_cnn, toy_data):
    model = Prune(PruneConfig(sparsity=0.6), 0).run(tiny_cnn, make_ctx(None))
    masked = {n: m for n, m in model.named_modules() if hasattr(m, "weight_mask")}
    masks = {n: m.weight_mask.clone() for n, m in masked.items()}
    before = {n: m.weight.detach().clone() for n, m in masked.items()}
    ctx = make_ctx(toy_data["train"])
    finetune(model, ctx, steps=12, lr=1e-2, optimizer="adamw", weight_decay=0.1, grad_clip=1.0)
    for n, m in masked.items():
        assert torch.equal(m.weight_mask, masks[n])
        assert (m.weight[~m.weight_mask] == 0).all(), n
        assert not torch.allclose(m.weight[m.weight_mask], before[n][m.weight_mask])  # it did train
    f = figures(ctx)
    assert f["steps"] == 12 and f["final_loss"] < f["first_loss"] and f["seconds"] > 0
    assert not model.training  # the model's mode is restored (tiny_cnn came in eval mode)

    # Control: a plain AdamW loop (no mask handling) does move the pruned weights, so the check bites.
    plain = copy.deepcopy(model).train()
    opt = torch.optim.AdamW(plain.parameters(), lr=1e-2, weight_decay=0.1)
    for x, y in toy_data["train"][:2]:
        opt.zero_grad()
        F.cross_entropy(plain(x), y).backward()
        opt.step()
    moved = plain.classifier[1]
    assert (moved.weight[~moved.weight_mask] != 0).any()


def test_callbacks_order_and_epochs_total(toy_data):
    calls = []

    class Spy:
        def on_train_begin(self, model, total):
            calls.append(("begin", total, isinstance(model, nn.Sequential)))

        def on_step_end(self, model, step, total):
            calls.append(("step", step, total))

        def on_train_end(self, model):
            calls.append(("end",))

    ctx = make_ctx(batches(3), callbacks=[Spy()])
    finetune(mlp(), ctx, epochs=2, lr=1e-3)
    assert calls == [("begin", 6, True)] + [("step", s, 6) for s in range(6)] + [("end",)]
    assert figures(ctx)["steps"] == 6 and figures(ctx)["world_size"] == 1


def test_gradual_prune_through_finetune_reaches_target(tiny_cnn, toy_data):
    pctx = make_ctx(toy_data["train"])
    model = Prune(PruneConfig(sparsity=0.7, scope="global", schedule="gradual", end=0.5), 0).run(tiny_cnn, pctx)
    total_w = sum(m.weight.numel() for m in model.modules() if hasattr(m, "weight_mask"))
    pctx.report.begin_step("finetune", {})
    finetune(model, pctx, steps=10, lr=1e-3)
    zeros = sum(int((m.weight == 0).sum()) for m in model.modules() if hasattr(m, "weight_mask"))
    assert zeros == round(0.7 * total_w)
    prune_figs = pctx.report.steps[0]["figures"]  # the prune step's figures are completed at train end
    assert prune_figs["sparsity"] == pytest.approx(round(0.7 * total_w) / total_w, abs=1e-6)


def test_loss_fn_and_dict_batches_with_model_loss():
    # Regression through ctx.loss_fn: the fit must approach the least-squares solution.
    g = torch.Generator().manual_seed(2)
    x = torch.randn(64, 3, generator=g)
    y = x @ torch.tensor([[1.0], [-2.0], [0.5]]) + 0.3
    torch.manual_seed(0)
    lin = nn.Linear(3, 1)
    seen = []

    def mse(out, t):
        seen.append(out.shape)
        return F.mse_loss(out, t)

    finetune(lin, make_ctx([(x[i:i + 16], y[i:i + 16]) for i in range(0, 64, 16)], loss_fn=mse),
             steps=300, lr=0.05, optimizer="adamw", schedule="constant")
    assert seen[0] == (16, 1)
    assert torch.allclose(lin.weight, torch.tensor([[1.0, -2.0, 0.5]]), atol=0.05)
    assert abs(lin.bias.item() - 0.3) < 0.05

    class HFLike(nn.Module):  # returns an output object with .loss, like transformers models
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(3, 1)

        def forward(self, input_values, labels=None):
            out = self.proj(input_values)
            return SimpleNamespace(logits=out, loss=F.mse_loss(out, labels) if labels is not None else None)

    torch.manual_seed(0)
    hf = HFLike()
    data = [{"input_values": x[i:i + 16], "labels": y[i:i + 16]} for i in range(0, 64, 16)]
    ctx = make_ctx(data)
    finetune(hf, ctx, steps=300, lr=0.05, schedule="constant")
    assert torch.allclose(hf.proj.weight, torch.tensor([[1.0, -2.0, 0.5]]), atol=0.05)
    with pytest.raises(DataError, match="loss"):
        finetune(hf, make_ctx([{"input_values": x}]), steps=1)


def test_targets_freeze_the_rest(toy_data, tiny_cnn):
    before = copy.deepcopy(tiny_cnn.state_dict())
    ctx = make_ctx(toy_data["train"])
    finetune(tiny_cnn, ctx, steps=3, lr=1e-2, targets=["classifier.3"])
    after = tiny_cnn.state_dict()
    assert not torch.equal(after["classifier.3.weight"], before["classifier.3.weight"])
    for k in ("features.0.weight", "classifier.1.weight", "features.1.weight"):
        assert torch.equal(after[k], before[k]), k
    assert all(p.requires_grad for p in tiny_cnn.parameters())  # unfrozen afterwards
    assert figures(ctx)["trainable_params"] == 11 * 5 + 5

    before = copy.deepcopy(tiny_cnn.state_dict())
    ctx = make_ctx(toy_data["train"])
    finetune(tiny_cnn, ctx, steps=2, lr=1e-2, ignore=["features"])
    after = tiny_cnn.state_dict()
    assert torch.equal(after["features.3.weight"], before["features.3.weight"])
    assert not torch.equal(after["classifier.1.weight"], before["classifier.1.weight"])
    assert {"step": "finetune", "layer": "features", "reason": "frozen (ignored by recipe)"} in ctx.report.skipped


def test_data_errors_name_train_data_and_the_step():
    with pytest.raises(DataError) as e:
        finetune(mlp(), make_ctx(None), steps=1)
    assert e.value.where == "train_data"
    data = batches(4)
    data[2][0][0, 0] = float("nan")
    with pytest.raises(DataError, match="optimizer step 2"):
        finetune(mlp(), make_ctx(data), steps=4)
    calls = iter(range(100))

    def blows_up(out, t):  # finite data, non-finite loss at the 4th call: the model's fault
        return F.cross_entropy(out, t) * (math.inf if next(calls) == 3 else 1.0)

    with pytest.raises(ModelError, match="optimizer step 3"):
        finetune(mlp(), make_ctx(batches(4), loss_fn=blows_up), steps=4)
    with pytest.raises(DataError, match="targets"):
        finetune(mlp(), make_ctx([(torch.randn(2, 4),)]), steps=1)


@pytest.mark.parametrize("cfg,key", [
    ({"optimizer": "adam"}, "optimizer"),
    ({"schedule": "linear"}, "schedule"),
    ({"lr": 0.0}, "lr"),
    ({"steps": 0}, "steps"),
    ({"grad_clip": -1.0}, "grad_clip"),
    ({"epoch": 3}, "epoch"),
])
def test_bad_config_names_the_key(cfg, key):
    with pytest.raises(ValidationError) as e:
        FinetuneConfig(**cfg)
    assert key in {str(x) for err in e.value.errors() for x in err["loc"]}
    with pytest.raises(ValidationError, match="either epochs or steps"):
        FinetuneConfig(epochs=1, steps=3)
    assert Finetune.trains is True


def test_onecycle_and_progress_bar_run(capsys):
    model = mlp()
    before = copy.deepcopy(model.state_dict())
    ctx = make_ctx(batches(3), progress=True)
    finetune(model, ctx, steps=5, lr=1e-2, schedule="onecycle", optimizer="sgd")
    assert not torch.equal(model.state_dict()["0.weight"], before["0.weight"])
    assert math.isfinite(figures(ctx)["final_loss"])


def test_shift_batch_rolls_each_sample():
    from nnsqueeze.steps.finetune import shift_batch
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(6, 2, 9, generator=g), torch.arange(6)
    out, y2 = shift_batch((x, y), 3, torch.Generator().manual_seed(4))
    assert y2 is y
    offsets = []
    for i in range(6):  # each sample (both channels) is torch.roll'ed by one offset in [-3, 3]
        match = [s for s in range(-3, 4) if torch.equal(out[i], torch.roll(x[i], s, dims=-1))]
        assert len(match) == 1
        offsets.append(match[0])
    assert len(set(offsets)) > 1
    assert shift_batch((x, y), 0, g)[0] is x


def test_finetune_shift_augmentation_feeds_shifted_inputs():
    data = [(torch.arange(8.0).repeat(4, 1) + 10 * torch.arange(4.0)[:, None], torch.zeros(4, dtype=torch.long))]
    model = nn.Sequential(nn.Linear(8, 3))
    seen = []
    model[0].register_forward_hook(lambda m, i, o: seen.append(i[0].detach().clone()))
    finetune(model, make_ctx(data), steps=3, lr=1e-3, shift=2)
    x = data[0][0]
    for batch in seen:
        for row, orig in zip(batch, x):
            assert any(torch.equal(row, torch.roll(orig, s)) for s in range(-2, 3))
    assert any(not torch.equal(b, x) for b in seen)
    with pytest.raises(DataError, match="shift augmentation"):
        finetune(nn.Linear(8, 3), make_ctx([(torch.arange(8).repeat(2, 1), torch.zeros(2, dtype=torch.long))]),
                 steps=1, shift=2)
