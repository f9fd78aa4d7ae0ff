"""Attention-map transfer in ``distill``: the loss by hand and against Hugging Face's own
``output_attentions``, on a tiny random BERT (teacher 4 layers -> student 2 layers, a layer map)."""

from __future__ import annotations

import math

import pytest
import torch

from nnsqueeze.context import Context
from nnsqueeze.errors import ModelError
from nnsqueeze.ops.distill import attention_kl, kd_loss
from nnsqueeze.report import ReportBuilder
from nnsqueeze.steps.distill import Distill, DistillConfig

transformers = pytest.importorskip("transformers", reason="transformers (the 'hf' extra) is not installed")

LAYER_MAP = {0: 1, 1: 3}  # student layer -> teacher layer


def test_attention_kl_hand_computed():
    # one head, one query: teacher [0.25, 0.75], student [0.5, 0.5]
    t = torch.tensor([0.25, 0.75]).reshape(1, 1, 1, 2)
    s = torch.tensor([0.5, 0.5]).reshape(1, 1, 1, 2)
    expected = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)
    assert float(attention_kl(s, t)) == pytest.approx(expected, abs=1e-6)
    # two queries average; a zero teacher weight contributes nothing
    t2 = torch.tensor([[0.25, 0.75], [1.0, 0.0]]).reshape(1, 1, 2, 2)
    s2 = torch.tensor([[0.5, 0.5], [0.5, 0.5]]).reshape(1, 1, 2, 2)
    assert float(attention_kl(s2, t2)) == pytest.approx((expected + math.log(2)) / 2, abs=1e-6)
    # head counts differ (2 vs 1): the student's heads are averaged first
    s3 = torch.tensor([[0.9, 0.1], [0.1, 0.9]]).reshape(1, 2, 1, 2)   # mean [0.5, 0.5]
    assert float(attention_kl(s3, t)) == pytest.approx(expected, abs=1e-6)
    with pytest.raises(ValueError, match="beyond the head count"):
        attention_kl(torch.full((1, 1, 2, 2), 0.5), t)


def _bert(layers: int, seed: int):
    cfg = transformers.BertConfig(vocab_size=53, hidden_size=24, num_hidden_layers=layers, num_attention_heads=2,
                                  intermediate_size=31, max_position_embeddings=32, num_labels=3,
                                  hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                                  attn_implementation="eager")
    torch.manual_seed(seed)
    return transformers.BertForSequenceClassification(cfg)


def _data(n=3, b=4, t=7):
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        mask = torch.ones(b, t, dtype=torch.long)
        mask[0, t - 2:] = 0
        out.append({"input_ids": torch.randint(0, 53, (b, t), generator=g), "attention_mask": mask,
                    "labels": torch.randint(0, 3, (b,), generator=g)})
    return out


def _cfg(**kw):
    att = [{"student": f"bert.encoder.layer.{s}.attention.self", "teacher": f"bert.encoder.layer.{t}.attention.self",
            "weight": 2.0} for s, t in LAYER_MAP.items()]
    return DistillConfig(attention=att, **kw)


def _ctx(data, teacher):
    ctx = Context(train_data=data, teacher=teacher, report=ReportBuilder(), progress=False)
    ctx.report.begin_step("distill", {})
    return ctx


def _reference(student, teacher, batch, alpha, temperature):
    """The loss from Hugging Face's own outputs (output_attentions=True), no hooks involved."""
    s = student(**batch, output_attentions=True)
    with torch.no_grad():
        t = teacher(**batch, output_attentions=True)
    loss = alpha * s.loss + (1 - alpha) * kd_loss(s.logits, t.logits, None, temperature=temperature)
    for si, ti in LAYER_MAP.items():
        a, b = s.attentions[si], t.attentions[ti]                 # (N, heads, T, T)
        kl = torch.where(b > 0, b * (b.log() - a.log()), 0.0).sum(-1)   # teacher || student; padded keys: 0
        loss = loss + 2.0 * kl.mean()
    return loss


def test_attention_transfer_loss_matches_hf_attentions_and_trains():
    teacher, student, data = _bert(4, 0).eval(), _bert(2, 1), _data()
    step = Distill(_cfg(steps=1, lr=3e-3, alpha=0.5, temperature=2.0), 0)
    ctx = _ctx(data, teacher)
    step._setup(student, ctx)
    try:
        student.train()
        got = step._loss(student, data[0], ctx)
        want = _reference(student, teacher, data[0], 0.5, 2.0)
    finally:
        for cap in (step.s_att_, step.t_att_):
            cap.close()
    assert float(got.detach()) == pytest.approx(float(want.detach()), rel=1e-5)

    def att_loss():
        with torch.no_grad():
            s = student.eval()(**data[0], output_attentions=True).attentions
            t = teacher(**data[0], output_attentions=True).attentions
        return sum(float(attention_kl(s[i], t[j])) for i, j in LAYER_MAP.items())

    before = att_loss()
    hooks = {id(m): len(m._forward_hooks) for net in (student, teacher) for m in net.modules()}
    student = Distill(_cfg(steps=15, lr=3e-3, alpha=0.5, temperature=2.0), 0).run(student, ctx)
    assert att_loss() < 0.5 * before
    assert ctx.report.steps[-1]["figures"]["attention_maps"] == 2
    assert hooks == {id(m): len(m._forward_hooks) for net in (student, teacher) for m in net.modules()}  # removed


def test_attention_transfer_needs_probabilities():
    teacher, student, data = _bert(4, 0).eval(), _bert(2, 1), _data(n=1)
    bad = DistillConfig(steps=1, attention=[{"student": "bert.encoder.layer.0", "teacher": "bert.encoder.layer.1"}])
    with pytest.raises(ModelError, match="no attention probabilities"):
        Distill(bad, 0).run(student, _ctx(data, teacher))
