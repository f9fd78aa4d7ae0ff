"""Distillation losses (Hinton et al. 2015; FitNets hints). Pure torch.

    >>> import torch
    >>> from nnsqueeze.ops.distill import kd_loss
    >>> s, t, y = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]]), torch.tensor([0])
    >>> round(float(kd_loss(s, t, y, alpha=0.5, temperature=1.0)), 4)
    0.3877

``kd_loss = alpha * CE(y, s) + (1 - alpha) * T^2 * KL(softmax(t / T) || softmax(s / T))``, the KL
summed over classes and averaged over samples (``batchmean``); the ``T^2`` keeps the soft term's
gradient scale independent of ``T``. Without targets (``y is None``) only the soft term is used
(``alpha`` is then ignored). ``hint_loss`` is the mean squared error between a (projected)
student feature map and the teacher's. ``attention_kl`` is attention-map transfer (as in MiniLM):
``KL(teacher row || student row)`` of every query's attention distribution over the keys, summed
over keys and averaged over batch, heads and queries; when the head counts differ, both maps are
first averaged over their heads.

    >>> from nnsqueeze.ops.distill import attention_kl
    >>> t = torch.tensor([0.25, 0.75]).reshape(1, 1, 1, 2)   # (N, heads, queries, keys)
    >>> s = torch.tensor([0.5, 0.5]).reshape(1, 1, 1, 2)
    >>> round(float(attention_kl(s, t)), 4)                  # 0.25 ln 0.5 + 0.75 ln 1.5
    0.1308
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

Tensor = torch.Tensor


def soft_kl(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """``T^2 * KL(softmax(t/T) || softmax(s/T))``, batch mean; sequence logits are flattened."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    s = student_logits.reshape(-1, student_logits.shape[-1]).float()
    t = teacher_logits.reshape(-1, teacher_logits.shape[-1]).float()
    if s.shape != t.shape:
        raise ValueError(f"student logits {tuple(s.shape)} and teacher logits {tuple(t.shape)} differ")
    log_p_s = F.log_softmax(s / temperature, dim=-1)
    log_p_t = F.log_softmax(t / temperature, dim=-1)
    return F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True) * temperature ** 2


def kd_loss(student_logits: Tensor, teacher_logits: Tensor, targets: Tensor | None, alpha: float = 0.5,
            temperature: float = 4.0) -> Tensor:
    """Hinton's distillation loss; ``alpha`` weighs the hard-label cross-entropy."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    soft = soft_kl(student_logits, teacher_logits, temperature)
    if targets is None or alpha == 0.0:
        return soft
    z = student_logits.reshape(-1, student_logits.shape[-1])
    hard = F.cross_entropy(z.float(), targets.reshape(-1))
    return alpha * hard + (1.0 - alpha) * soft


def hint_loss(student_feature: Tensor, teacher_feature: Tensor) -> Tensor:
    """Mean squared error between feature maps of the same shape (FitNets)."""
    if student_feature.shape != teacher_feature.shape:
        raise ValueError(f"feature shapes differ: {tuple(student_feature.shape)} vs {tuple(teacher_feature.shape)}")
    return F.mse_loss(student_feature.float(), teacher_feature.float())


def attention_kl(student_probs: Tensor, teacher_probs: Tensor, eps: float = 1e-12) -> Tensor:
    """Mean over (batch, heads, queries) of ``KL(teacher || student)`` of attention probabilities
    ``(N, H, Tq, Tk)``. Different head counts: compare the head-averaged maps. ``eps`` floors the
    student's probabilities so a key the student ignores gives a large but finite loss."""
    s, t = student_probs.float(), teacher_probs.float()
    if s.dim() != 4 or t.dim() != 4:
        raise ValueError(f"attention maps must be (N, heads, queries, keys), got {tuple(s.shape)} and {tuple(t.shape)}")
    if s.shape[1] != t.shape[1]:
        s, t = s.mean(1, keepdim=True), t.mean(1, keepdim=True)
    if s.shape != t.shape:
        raise ValueError(f"attention maps differ beyond the head count: {tuple(s.shape)} vs {tuple(t.shape)}")
    kl = torch.xlogy(t, t) - torch.xlogy(t, s.clamp_min(eps))   # 0 where the teacher's weight is 0
    return kl.sum(-1).mean()


def output_loss(student_out: Tensor, teacher_out: Tensor, kind: str) -> Tensor:
    """Soft term for models whose outputs are vectors, not class logits (sentence embeddings):
    ``mse``, the mean squared difference, or ``cosine``, ``1 - mean cosine`` along the last axis."""
    if student_out.shape != teacher_out.shape:
        raise ValueError(f"outputs differ: {tuple(student_out.shape)} vs {tuple(teacher_out.shape)}")
    s, t = student_out.float(), teacher_out.float()
    if kind == "mse":
        return F.mse_loss(s, t)
    if kind == "cosine":
        return 1.0 - F.cosine_similarity(s, t, dim=-1, eps=1e-12).mean()
    raise ValueError(f"unknown output loss {kind!r} (mse or cosine)")
