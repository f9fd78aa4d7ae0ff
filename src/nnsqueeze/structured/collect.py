"""Gather what the importance criteria need: weight slices, ``w * grad`` slices, activations.

Module walking lives here; the criteria in :mod:`.importance` stay pure math::

    >>> import torch
    >>> from torch import nn
    >>> from nnsqueeze.structured.graph import build_graph
    >>> from nnsqueeze.structured.collect import weight_parts
    >>> m = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    >>> g = build_graph(m, torch.randn(1, 3))
    >>> [(p.kind, p.role, tuple(p.data.shape)) for p in weight_parts(m, g.groups[0])]
    [('linear', 'out', (4, 3)), ('linear', 'out', (4, 1)), ('linear', 'in', (4, 2))]
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from ..data import call_model, logits, split
from ..errors import DataError
from .graph import Group
from .importance import Part
from .macs import eval_mode
from .pruners import channel_slices


def _kind(m: nn.Module, role: str = "out") -> str:
    if role.startswith("param:"):
        return "param"
    if isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm)):
        return "bn"
    if isinstance(m, nn.Embedding):
        return "embedding"
    return "linear" if isinstance(m, nn.Linear) else "conv"


def weight_parts(model: nn.Module, group: Group, fn: Callable | None = None, kind: str | None = None) -> list[Part]:
    parts = []
    for mb in group.members:
        mod = model.get_submodule(mb.module)
        slices = channel_slices(mod, mb.role, mb.offset, mb.expand, group.size, fn, index=mb.index) if fn else \
            channel_slices(mod, mb.role, mb.offset, mb.expand, group.size, index=mb.index)
        parts += [Part(kind or _kind(mod, mb.role), mb.role, s) for s in slices]
    return parts


def accumulate_grads(model: nn.Module, data: Iterable, batches: int, loss_fn: Callable | None, where: str) -> int:
    """Sum gradients of the training loss over the first ``batches`` batches; returns batches used."""
    model.zero_grad(set_to_none=True)
    used = 0
    for batch in data:
        if used >= batches:
            break
        x, y = split(batch)
        out = call_model(model, x)
        if loss_fn is not None:
            loss = loss_fn(out, y)
        elif getattr(out, "loss", None) is not None:
            loss = out.loss
        elif y is not None:
            loss = F.cross_entropy(logits(out), y)
        else:
            raise DataError(where, "taylor importance needs targets or a loss", fix="pass (x, y) batches or loss_fn=")
        loss.backward()
        used += 1
    if not used:
        raise DataError(where, "taylor importance needs training data", fix="pass train_data= or calib_data=")
    return used


def taylor_parts(model: nn.Module, group: Group) -> list[Part]:
    def wg(p: torch.Tensor) -> torch.Tensor:
        return p.detach() * (p.grad if p.grad is not None else torch.zeros_like(p))
    return weight_parts(model, group, wg, kind="taylor")


@torch.no_grad()
def activations(model: nn.Module, names: list[str], data: Iterable, batches: int, where: str,
                max_cols: int = 4096) -> dict[str, torch.Tensor]:
    """Per producer, its output channels as rows ``(C, samples)`` over calibration batches."""
    acts: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    gen = torch.Generator().manual_seed(0)

    def hook(name: str, conv: bool):
        def fn(mod: nn.Module, inp: Any, out: torch.Tensor) -> None:
            x = out.detach().movedim(1 if conv else -1, 0).reshape(out.shape[1 if conv else -1], -1)
            if x.shape[1] > max_cols:
                x = x[:, torch.randperm(x.shape[1], generator=gen)[:max_cols]]
            acts[name].append(x.float())
        return fn

    hooks = [model.get_submodule(n).register_forward_hook(
        hook(n, isinstance(model.get_submodule(n), nn.modules.conv._ConvNd))) for n in names]
    used = 0
    try:
        with eval_mode(model):
            for batch in data:
                if used >= batches:
                    break
                call_model(model, split(batch)[0])
                used += 1
    finally:
        for h in hooks:
            h.remove()
    if not used:
        raise DataError(where, "activation importance needs calibration data", fix="pass calib_data=")
    return {n: torch.cat(v, 1) for n, v in acts.items()}


def activation_parts(group: Group, acts: dict[str, torch.Tensor]) -> list[Part]:
    """Rows ``offset + c*expand + j`` (or the member's explicit ``index``) of each producer's outputs,
    one row per channel ``(n, expand*samples)``."""
    n = group.size
    return [Part("activation", "out", acts[mb.module][torch.tensor(mb.positions(n))].reshape(n, -1))
            for mb in group.members if mb.role == "out" and mb.module in acts]
