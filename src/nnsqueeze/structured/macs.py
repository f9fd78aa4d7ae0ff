"""MACs and parameters per layer, counted with forward hooks on one example batch (per sample).

Counted: Conv (``out.numel() * in/groups * kernel``), Linear (``out.numel() * in``), Embedding (0
MACs), attention (q/k/v and output projections plus ``QK^T`` and ``AV``; ``nn.MultiheadAttention`` and
torchvision's Swin window attention, whose projections are functional ``F.linear`` calls that no
Linear hook sees; torchvision's MaxViT attention: ``QK^T`` and ``AV``, its ``to_qkv`` / ``merge`` being
Linear modules counted as such). Elementwise ops, norms and pools are not counted (they are memory-bound and small)::

    >>> import torch
    >>> from torch import nn
    >>> from nnsqueeze.structured.macs import count
    >>> c = count(nn.Sequential(nn.Conv1d(2, 4, 3), nn.Linear(6, 5)), torch.randn(1, 2, 8))
    >>> c.total_macs, c.per_layer["0"]["macs"], c.per_layer["1"]["macs"]
    (264, 144, 120)
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..data import call_model
from .attention import ATTENTION
from .maxvit_attention import macs as relative_macs, relative_types
from .window_attention import macs as window_macs, window_types

COUNTED = (nn.modules.conv._ConvNd, nn.Linear, nn.Embedding) + ATTENTION


@dataclass
class Counts:
    total_macs: int = 0
    total_params: int = 0
    per_layer: dict[str, dict[str, int]] = field(default_factory=dict)


def _batch(x: Any) -> int:
    if isinstance(x, torch.Tensor):
        return max(1, x.shape[0]) if x.dim() else 1
    if isinstance(x, (tuple, list)) and x:
        return _batch(x[0])
    if isinstance(x, dict) and x:
        return _batch(next(iter(x.values())))
    return 1


@contextmanager
def eval_mode(model: nn.Module):
    """Eval mode inside; afterwards every submodule gets back its own mode (a wrapper in train mode
    around an encoder in eval mode stays so: ``model.train(was)`` would switch dropout on inside)."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, t in modes:
            m.training = t


@torch.no_grad()
def count(model: nn.Module, example_inputs: Any) -> Counts:
    """MACs per sample and parameters, total and per counted layer."""
    n = _batch(example_inputs)
    c = Counts(total_params=sum(p.numel() for p in model.parameters()))
    hooks = []
    windows = window_types()
    relative = relative_types()

    def hook(name: str):
        def fn(mod: nn.Module, inp: Any, out: Any) -> None:
            out = out[0] if isinstance(out, tuple) else out
            if isinstance(mod, nn.modules.conv._ConvNd):
                macs = out.numel() * (mod.in_channels // mod.groups) * math.prod(mod.kernel_size)
            elif isinstance(mod, nn.Linear):
                macs = out.numel() * mod.in_features
            elif isinstance(mod, ATTENTION):
                q, k = inp[0], inp[1]
                tokens_q, tokens_k = q.numel() // q.shape[-1], k.numel() // k.shape[-1]
                inner = mod.num_heads * mod.head_dim
                e = mod.embed_dim
                # projections (q; k and v) + out_proj, then scores and weighted values per query/key pair
                pairs = tokens_q * k.shape[0 if not mod.batch_first and k.dim() == 3 else -2]
                macs = tokens_q * inner * e + 2 * tokens_k * inner * e + tokens_q * e * inner + 2 * pairs * inner
            elif isinstance(mod, windows):
                macs = window_macs(mod, inp[0])
            elif isinstance(mod, relative):
                macs = relative_macs(mod, inp[0])
            else:
                macs = 0
            own = mod.parameters(recurse=not isinstance(mod, relative))   # MaxViT's Linears have their own rows
            e = c.per_layer.setdefault(name, {"macs": 0, "params": sum(p.numel() for p in own)})
            e["macs"] += macs // n
            c.total_macs += macs // n
        return fn

    skip: set[int] = set()
    for name, mod in model.named_modules():
        if id(mod) in skip:
            continue
        if isinstance(mod, ATTENTION):  # counted as a whole, not its out_proj again
            skip.update(id(x) for x in mod.modules() if x is not mod)
        if isinstance(mod, COUNTED + windows + relative):
            hooks.append(mod.register_forward_hook(hook(name)))
    try:
        with eval_mode(model):
            call_model(model, example_inputs)
    finally:
        for h in hooks:
            h.remove()
    return c
