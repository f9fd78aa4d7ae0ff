"""Step ``distill`` and its loss: hand-computed values, teacher handling, hints, composition."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import nnsqueeze as nsq
from nnsqueeze.context import Context
from nnsqueeze.errors import DataError, ModelError
from nnsqueeze.metrics import cosine
from nnsqueeze.ops.distill import hint_loss, kd_loss, soft_kl
from nnsqueeze.report import ReportBuilder
from nnsqueeze.steps.distill import Distill, DistillConfig


def test_kd_loss_hand_computed():
    # student [1, 0], teacher [0, 1], label 0, T = 1, alpha = 0.5
    e = math.e
    ce = math.log(1 + 1 / e)                                   # -log softmax([1, 0])[0]
    p_t, p_s = [1 / (1 + e), e / (1 + e)], [e / (1 + e), 1 / (1 + e)]
    kl = sum(a * math.log(a / b) for a, b in zip(p_t, p_s))   # = (e - 1) / (e + 1)
    s, t, y = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]]), torch.tensor([0])
    assert float(kd_loss(s, t, y, alpha=0.5, temperature=1.0)) == pytest.approx(0.5 * ce + 0.5 * kl, abs=1e-6)
    assert kl == pytest.approx((e - 1) / (e + 1))


def test_kd_loss_temperature_scaling_and_batch_mean():
    # T = 2: logits halve, KL scaled by T^2 = 4; two identical samples average to one.
    s, t = torch.tensor([[2.0, 0.0]] * 2), torch.tensor([[0.0, 2.0]] * 2)
    e = math.e
    kl_t1 = (e - 1) / (e + 1)
    assert float(soft_kl(s, t, 2.0)) == pytest.approx(4 * kl_t1, abs=1e-6)
    assert float(kd_loss(s, t, None, alpha=0.9, temperature=2.0)) == pytest.approx(4 * kl_t1, abs=1e-6)
    assert float(kd_loss(s, s, torch.tensor([0, 0]), alpha=0.0)) == pytest.approx(0.0, abs=1e-7)


def test_hint_loss_and_errors():
    assert float(hint_loss(torch.ones(2, 3), torch.zeros(2, 3))) == 1.0
    with pytest.raises(ValueError, match="differ"):
        hint_loss(torch.ones(2, 3), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="temperature"):
        soft_kl(torch.ones(1, 2), torch.ones(1, 2), 0.0)


def _ctx(data, teacher):
    ctx = Context(train_data=data, teacher=teacher, report=ReportBuilder(), progress=False)
    ctx.report.begin_step("distill", {})
    return ctx


def test_distill_moves_student_towards_teacher(tiny_cnn, toy_data):
    teacher = tiny_cnn
    torch.manual_seed(1)
    student = nn.Sequential(nn.Flatten(), nn.Linear(37, 16), nn.ReLU(), nn.Linear(16, 5))
    x = torch.cat([b[0] for b in toy_data["train"]])
    with torch.no_grad():
        t = teacher(x)
        before = float(soft_kl(student(x), t, 1.0))
    step = Distill(DistillConfig(steps=40, lr=1e-2, alpha=0.0, temperature=1.0), 0)
    student = step.run(student, _ctx(toy_data["train"], teacher))
    with torch.no_grad():
        after = float(soft_kl(student(x), t, 1.0))
    assert after < 0.5 * before
    assert not teacher.training  # left as it was (eval)
    assert all(p.grad is None for p in teacher.parameters())


def test_distill_hints_with_projection(tiny_cnn, toy_data):
    torch.manual_seed(1)
    student = nn.Sequential(nn.Flatten(), nn.Linear(37, 8), nn.ReLU(), nn.Linear(8, 5))
    # student's 8-wide hidden layer is projected onto the teacher's 11-wide classifier.1
    cfg = DistillConfig(steps=5, lr=1e-2, hints=[{"student": "1", "teacher": "classifier.1"}])
    step = Distill(cfg, 0)
    ctx = _ctx(toy_data["train"], tiny_cnn)
    step.run(student, ctx)
    assert ctx.report.steps[-1]["figures"]["hints"] == 1
    assert not tiny_cnn.classifier[1]._forward_hooks and not student[1]._forward_hooks  # hooks removed
    bad = Distill(DistillConfig(steps=1, hints=[{"student": "nope", "teacher": "classifier.1"}]), 0)
    with pytest.raises(ModelError, match="no module named 'nope'"):
        bad.run(student, _ctx(toy_data["train"], tiny_cnn))


def test_distill_needs_teacher(toy_data):
    with pytest.raises(DataError, match="no teacher"):
        Distill(DistillConfig(steps=1), 0).run(nn.Linear(37, 5), _ctx(toy_data["train"], None))


def test_distill_composes_with_gradual_pruning(tiny_cnn, toy_data):
    recipe = [{"prune": {"sparsity": 0.5, "schedule": "gradual"}}, {"distill": {"steps": 8, "lr": 1e-3}}]
    res = nsq.compress(tiny_cnn, {"steps": recipe, "export": {"onnx": None}, "evaluate": {"runs": 1}},
                       train_data=toy_data["train"], eval_data=toy_data["eval"], progress=False)
    w = res.model.classifier[1].weight
    assert int((w == 0).sum()) == round(0.5 * w.numel())


def test_unlabeled_batches_get_the_soft_term_only(tiny_cnn, toy_data):
    # a transfer set: bare input tensors mixed with (x, y) batches
    torch.manual_seed(2)
    student = nn.Sequential(nn.Flatten(), nn.Linear(37, 16), nn.ReLU(), nn.Linear(16, 5))
    x, y = toy_data["train"][0]
    step = Distill(DistillConfig(steps=4, lr=1e-3, alpha=0.5, temperature=3.0), 0)
    ctx = _ctx([x] + toy_data["train"], tiny_cnn)
    step._setup(student, ctx)
    with torch.no_grad():
        t = tiny_cnn(x)
        assert float(step._loss(student, x, ctx)) == pytest.approx(float(soft_kl(student(x), t, 3.0)), rel=1e-6)
        want = 0.5 * float(torch.nn.functional.cross_entropy(student(x), y)) + 0.5 * float(soft_kl(student(x), t, 3.0))
        assert float(step._loss(student, (x, y), ctx)) == pytest.approx(want, rel=1e-6)
    Distill(DistillConfig(steps=4, lr=1e-3, alpha=0.5, temperature=3.0), 0).run(student, ctx)  # trains through both


def test_output_loss_closed_forms():
    from nnsqueeze.ops.distill import output_loss
    s = torch.tensor([[1.0, 0.0], [3.0, 4.0]])
    t = torch.tensor([[0.0, 2.0], [6.0, 8.0]])
    # cosines: 0 (orthogonal) and 1 (same direction) -> 1 - mean = 0.5
    assert float(output_loss(s, t, "cosine")) == pytest.approx(0.5, abs=1e-7)
    assert float(output_loss(s, t, "mse")) == pytest.approx((1 + 4 + 9 + 16) / 4, abs=1e-6)
    with pytest.raises(ValueError, match="outputs differ"):
        output_loss(s, t[:, :1], "mse")


def test_cosine_soft_term_for_embedding_models():
    # An "encoder" whose output is a 6-d vector: targets are the teacher's embeddings, not labels.
    torch.manual_seed(3)
    teacher = nn.Sequential(nn.Linear(9, 12), nn.Tanh(), nn.Linear(12, 6)).eval()
    x = torch.randn(64, 9)
    with torch.no_grad():
        ref = teacher(x)
    data = [(x[i:i + 16], ref[i:i + 16]) for i in range(0, 64, 16)]
    student = nn.Sequential(nn.Linear(9, 12), nn.Tanh(), nn.Linear(12, 6))
    cfg = DistillConfig(steps=60, lr=2e-2, soft="cosine", alpha=0.5)
    step = Distill(cfg, 0)
    ctx = _ctx(data, teacher)
    step._setup(student, ctx)
    with torch.no_grad():  # no loss_fn: the soft term alone, whatever alpha says
        want = 1 - float(torch.nn.functional.cosine_similarity(student(x[:16]), ref[:16], dim=-1).mean())
        assert float(step._loss(student, data[0], ctx)) == pytest.approx(want, rel=1e-5)
    before = cosine(student, data)
    student = Distill(cfg, 0).run(student, _ctx(data, teacher))
    after = cosine(student, data)
    assert after > before and after > 0.9
