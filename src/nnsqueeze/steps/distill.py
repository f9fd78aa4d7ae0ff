"""Step ``distill``: fine-tuning with knowledge distillation from a teacher (logits and feature hints).

Recipe (a pruned student taught by the model as it was before the recipe)::

    steps:
      - prune:   {sparsity: 0.9, scope: global, schedule: gradual}
      - distill: {epochs: 20, lr: 1.0e-3, alpha: 0.5, temperature: 4.0,
                  hints: [{student: classifier.0, teacher: classifier.0, weight: 1.0}]}

Python (a separate teacher, e.g. a small student trained from scratch)::

    import nnsqueeze as nsq
    result = nsq.compress(student, [{"distill": {"epochs": 30, "lr": 3e-3}}], teacher=big_cnn,
                          train_data=train, eval_data=test)

Loss per batch: ``alpha * CE(y, s) + (1 - alpha) * T^2 * KL(softmax(t/T) || softmax(s/T))``
(:func:`nnsqueeze.ops.distill.kd_loss`) plus, for every hint, ``weight * MSE(proj(s_feat), t_feat)``
between the outputs of the named student and teacher modules. ``proj`` is the identity when the
shapes agree, else a learned 1x1 projection (Linear on the last dim for 2-D features, 1x1 Conv for
3-D/4-D ones), trained with the student and discarded afterwards. For dict batches the hard term is
the model's own ``.loss``; ``ctx.loss_fn``, when given, replaces the hard term.

Embedding models (a sentence encoder's pooled vector is not a class distribution): ``soft: cosine``
(``1 - cosine(student output, teacher output)``) or ``soft: mse`` replaces the KL term
(:func:`nnsqueeze.ops.distill.output_loss`); the batch targets are then not labels, and only
``loss_fn`` adds a hard term. ``{distill: {epochs: 1, lr: 5.0e-5, soft: cosine}}``.

Attention-map transfer (transformers): every ``attention`` entry adds
``weight * attention_kl(student map, teacher map)`` (:func:`nnsqueeze.ops.distill.attention_kl`:
KL of each query's attention distribution, teacher || student, averaged; head-averaged when the
head counts differ). The named module's forward output must hold the attention probabilities
``(N, heads, queries, keys)``: the output itself or the last 4-D tensor of its output tuple, as a
Hugging Face ``*SelfAttention`` module returns them when the model runs the eager attention
(``attn_implementation="eager"``; SDPA/flash kernels return none, which raises ModelError). A
4-layer teacher -> 2-layer student map::

      - distill: {epochs: 3, lr: 1.0e-4, alpha: 0.5,
                  attention: [{student: bert.encoder.layer.0.attention.self,
                               teacher: bert.encoder.layer.1.attention.self},
                              {student: bert.encoder.layer.1.attention.self,
                               teacher: bert.encoder.layer.3.attention.self}]}

The teacher is ``teacher=`` given to :func:`nnsqueeze.compress`, else the model as it was before
the recipe ran (``ctx.teacher``); it runs in eval mode without gradients and is never modified.
Everything else is the ``finetune`` loop (same options, masks, callbacks, DDP): a gradual ``prune``
before it runs its schedule during distillation, and clustered centroids train as usual.
"""

from __future__ import annotations

import copy
from typing import Any, ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from ..data import call_model, logits, split, take, to_device
from ..errors import DataError, ModelError
from ..ops.distill import attention_kl, hint_loss, kd_loss, output_loss
from ..registry import STEPS
from .finetune import Finetune, FinetuneConfig


class HintConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    student: str = Field(description="module name in the student whose output is matched")
    teacher: str = Field(description="module name in the teacher")
    weight: float = Field(1.0, gt=0.0)


class AttentionConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    student: str = Field(description="attention module in the student whose output holds its probabilities")
    teacher: str = Field(description="attention module in the teacher")
    weight: float = Field(1.0, gt=0.0)


class DistillConfig(FinetuneConfig):
    alpha: float = Field(0.5, ge=0.0, le=1.0, description="weight of the hard-label loss")
    temperature: float = Field(4.0, gt=0.0, description="softmax temperature of the soft term")
    soft: Literal["kl", "mse", "cosine"] = Field(
        "kl", description="the soft term: kl between softened class/token distributions (classifiers, LMs); "
        "mse or cosine between the raw outputs (embedding models, whose outputs are vectors, not logits). With "
        "mse/cosine the batch targets are not class labels, so the hard term comes only from loss_fn")
    hints: list[HintConfig] = Field(default_factory=list, description="feature hints between named layers")
    attention: list[AttentionConfig] = Field(default_factory=list, description="attention-map transfer between "
                                             "named attention modules")


def _projection(s: torch.Tensor, t: torch.Tensor, where: str) -> nn.Module:
    if s.shape == t.shape:
        return nn.Identity()
    if s.dim() != t.dim() or s.shape[0] != t.shape[0] or s.shape[2:] != t.shape[2:] or s.dim() not in (2, 3, 4):
        raise ModelError(where, f"student feature {tuple(s.shape)} cannot be projected onto the teacher's "
                         f"{tuple(t.shape)} (only the channel width may differ)",
                         fix="pick layers whose outputs have the same batch and spatial shape")
    if s.dim() == 2:
        return nn.Linear(s.shape[1], t.shape[1])
    conv = nn.Conv1d if s.dim() == 3 else nn.Conv2d
    return conv(s.shape[1], t.shape[1], 1)


def attention_probs(out: Any, where: str) -> torch.Tensor:
    """The attention probabilities ``(N, H, Tq, Tk)`` in a module's output: the output itself or the
    last 4-D tensor of its output tuple."""
    if isinstance(out, torch.Tensor) and out.dim() == 4:
        return out
    if isinstance(out, (tuple, list)):
        for o in reversed(out):
            if isinstance(o, torch.Tensor) and o.dim() == 4:
                return o
    raise ModelError(where, "the module's output holds no attention probabilities (N, heads, queries, keys)",
                     fix="name the attention module itself (e.g. ...attention.self) and load Hugging Face models "
                     "with attn_implementation='eager' (SDPA/flash attention return no probabilities)")


class _Capture:
    """Forward hooks storing the outputs of named modules (``extract`` picks the tensor)."""

    def __init__(self, model: nn.Module, names: list[str], where: str, extract: Any = None):
        self.out: dict[str, torch.Tensor] = {}
        self.handles = []
        self.where = where
        self.extract = extract or (lambda out, _where: logits(out))
        for n in names:
            try:
                mod = model.get_submodule(n)
            except AttributeError:
                raise ModelError(where, f"no module named {n!r}",
                                 fix="use a name from model.named_modules()") from None
            self.handles.append(mod.register_forward_hook(self._hook(n)))

    def _hook(self, name: str):
        def hook(_m: nn.Module, _i: Any, out: Any) -> None:
            self.out[name] = self.extract(out, f"{self.where}: {name}")
        return hook

    def close(self) -> None:
        for h in self.handles:
            h.remove()


@STEPS.register("distill")
class Distill(Finetune):
    Config = DistillConfig
    trains: ClassVar[bool] = True

    def __init__(self, config: DistillConfig, index: int = 0):
        super().__init__(config, index)
        self.teacher_: nn.Module | None = None
        self.proj_ = nn.ModuleList()
        self.s_cap_: _Capture | None = None
        self.t_cap_: _Capture | None = None
        self.s_att_: _Capture | None = None
        self.t_att_: _Capture | None = None

    def _optimizer(self, params: list[nn.Parameter]) -> torch.optim.Optimizer:
        return super()._optimizer(list(params) + list(self.proj_.parameters()))

    def _loss(self, model: nn.Module, batch: Any, ctx: Any) -> torch.Tensor:
        c: DistillConfig = self.config
        inputs, targets = split(batch)
        out = call_model(model, inputs)
        with torch.no_grad():
            t_out = call_model(self.teacher_, inputs)
        s_logits, t_logits = logits(out), logits(t_out)
        if s_logits.shape != t_logits.shape:
            raise ModelError(f"{self.where}", f"student logits {tuple(s_logits.shape)} and teacher logits "
                             f"{tuple(t_logits.shape)} differ", fix="distill between models with the same outputs")
        if c.soft != "kl":
            soft = output_loss(s_logits, t_logits, c.soft)
            hard = ctx.loss_fn(out, targets) if ctx.loss_fn is not None else None
            loss = soft if hard is None or c.alpha == 0 else c.alpha * hard + (1 - c.alpha) * soft
        elif ctx.loss_fn is not None or isinstance(batch, dict):
            hard = ctx.loss_fn(out, targets) if ctx.loss_fn is not None else getattr(out, "loss", None)
            if hard is None and isinstance(out, dict):
                hard = out.get("loss")
            soft = kd_loss(s_logits, t_logits, None, temperature=c.temperature)
            loss = soft if hard is None or c.alpha == 0 else c.alpha * hard + (1 - c.alpha) * soft
        else:
            loss = kd_loss(s_logits, t_logits, targets, alpha=c.alpha, temperature=c.temperature)
        for h, proj in zip(c.hints, self.proj_):
            loss = loss + h.weight * hint_loss(proj(self.s_cap_.out[h.student]), self.t_cap_.out[h.teacher])
        for i, a in enumerate(c.attention):
            try:
                term = attention_kl(self.s_att_.out[a.student], self.t_att_.out[a.teacher])
            except ValueError as e:
                raise ModelError(f"{self.where}.attention[{i}]", str(e),
                                 fix="map layers with the same sequence lengths") from None
            loss = loss + a.weight * term
        return loss

    def _setup(self, model: nn.Module, ctx: Any) -> None:
        c: DistillConfig = self.config
        teacher = ctx.teacher
        if teacher is None:
            raise DataError(f"{self.where}", "no teacher: the context holds no model to distill from",
                            fix="run it through nsq.compress (the input model is the teacher) or pass teacher=...")
        p = next(iter(teacher.parameters()), None)
        if p is not None and p.device != torch.device(ctx.device):
            teacher = copy.deepcopy(teacher).to(ctx.device)  # never move the user's model
        self.teacher_ = teacher
        if c.attention:
            self.s_att_ = _Capture(model, [a.student for a in c.attention], f"{self.where}.attention.student",
                                   attention_probs)
            self.t_att_ = _Capture(teacher, [a.teacher for a in c.attention], f"{self.where}.attention.teacher",
                                   attention_probs)
        if not c.hints:
            return
        self.s_cap_ = _Capture(model, [h.student for h in c.hints], f"{self.where}.hints.student")
        self.t_cap_ = _Capture(teacher, [h.teacher for h in c.hints], f"{self.where}.hints.teacher")
        batch = to_device(take(ctx.train_data, 1)[0], ctx.device)
        was = model.training
        model.eval()
        with torch.no_grad():
            call_model(model, split(batch)[0])
            call_model(teacher, split(batch)[0])
        model.train(was)
        self.proj_ = nn.ModuleList(
            _projection(self.s_cap_.out[h.student], self.t_cap_.out[h.teacher], f"{self.where}.hints[{i}]")
            for i, h in enumerate(c.hints)).to(ctx.device)

    def run(self, model: nn.Module, ctx: Any) -> nn.Module:
        was_eval = [(m, m.training) for m in ([ctx.teacher] if ctx.teacher is not None else [])]
        try:
            self._setup(model, ctx)
            self.teacher_.eval()
            model = super().run(model, ctx)
        finally:
            for cap in (self.s_cap_, self.t_cap_, self.s_att_, self.t_att_):
                if cap is not None:
                    cap.close()
            for m, mode in was_eval:
                m.train(mode)
            self.teacher_, self.s_cap_, self.t_cap_, self.s_att_, self.t_att_ = None, None, None, None, None
        c: DistillConfig = self.config
        ctx.report.step(alpha=c.alpha, temperature=c.temperature, hints=len(c.hints), attention_maps=len(c.attention))
        return model
