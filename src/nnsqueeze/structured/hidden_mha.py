"""Hidden-size (residual stream) pruning for models built on ``nn.MultiheadAttention`` (torchvision's ViT).

The stream's width is the attention layers' ``embed_dim``. What touches it is found from the layer
shapes, then *proven* on the example inputs with :func:`.hidden.probe` (copies of the model, three
forward passes), as :mod:`.hidden` does for Hugging Face models; nothing is taken on trust:

- candidate **writers**: a convolution (``groups=1``) or Linear with that many outputs, every
  attention's ``out_proj``, an Embedding of that width, and loose parameters whose last axis has that
  width (ViT's ``class_token`` and ``encoder.pos_embedding``); candidate **readers**: every attention
  (its packed ``in_proj_weight`` columns) and every other Linear with that many inputs; **norms**: the
  LayerNorms of that width.
1. Every candidate writer and norm writes zeros to a random half ``S`` of the channels: a norm whose
   input is zero in ``S`` is on the stream, the others are left alone (reported).
2. Each candidate writer writes a constant to a channel of ``S`` of its own (a tag), the others zeros:
   a writer is on the stream only if its tag reaches a stream norm's input. The others keep their width.
3. The proven writers and norms write zeros to ``S``: every stream norm and every attention must then
   read zeros in ``S`` (else a writer was missed: ``ModelError``), and a Linear reader is on the stream
   when its input is zero in ``S`` and not elsewhere (a classifier reading the ``class_token`` output).

Removing channel ``c`` removes it from all of them. The attention layers become
:class:`~.attention.PrunedMultiheadAttention` of the narrower ``embed_dim`` (:func:`~.attention.fit_width`):
the heads, ``head_dim`` and the ``1/sqrt(head_dim)`` scale are unchanged, only the stream narrows, so the
kept width needs to be no multiple of anything. Integer ``hidden_dim`` attributes equal to the width
(torchvision's ``VisionTransformer.hidden_dim``, read by its patch reshape) follow it. As in :mod:`.hidden`,
the LayerNorms then normalize over the kept channels only: distill after.

    >>> import torch
    >>> import nnsqueeze  # torchvision's model code imports even without its compiled ops
    >>> from torchvision.models.vision_transformer import VisionTransformer
    >>> from nnsqueeze.structured.hidden_mha import find_stream
    >>> _ = torch.manual_seed(0)
    >>> vit = VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=3, hidden_dim=24,
    ...                         mlp_dim=40, num_classes=5).eval()
    >>> s = find_stream(vit, torch.randn(2, 3, 32, 32))
    >>> s.width, s.head_dim, s.attention
    (24, 8, ['encoder.layers.encoder_layer_0.self_attention', 'encoder.layers.encoder_layer_1.self_attention'])
    >>> sorted(m.role for m in s.group.members if not m.module.startswith("encoder.layers"))
    ['in', 'out', 'out', 'param:class_token:2', 'param:pos_embedding:2']
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..errors import ModelError
from .attention import ATTENTION, unsupported_reason
from .graph import Group, Member
from .hidden import Stream, _is_norm, _norm_members, probe

NOT_STREAM = "hidden width kept: "
_LEAF_PARAMS = (nn.Linear, nn.modules.conv._ConvNd, nn.Embedding, nn.LayerNorm) + ATTENTION


def has_attention(model: nn.Module) -> bool:
    return any(isinstance(m, ATTENTION) for m in model.modules())


def _candidates(model: nn.Module, width: int, inside: set[str]) -> tuple[list[tuple[str, str]], list[str]]:
    """(writers as (module, role), Linear readers) of a stream of ``width`` channels, from shapes only."""
    writers: list[tuple[str, str]] = []
    readers: list[str] = []
    for name, mod in model.named_modules():
        if isinstance(mod, nn.modules.conv._ConvNd) and not mod.transposed and mod.groups == 1 \
                and mod.out_channels == width:
            writers.append((name, "out"))
        elif isinstance(mod, nn.Linear):
            if mod.out_features == width and (name not in inside or name.endswith(".out_proj")):
                writers.append((name, "out"))
            if mod.in_features == width and name not in inside:
                readers.append(name)
        elif isinstance(mod, nn.Embedding) and mod.embedding_dim == width:
            writers.append((name, "out"))
        elif not isinstance(mod, _LEAF_PARAMS) and name not in inside:
            for p, t in mod.named_parameters(recurse=False):
                if t.dim() >= 1 and t.shape[-1] == width:
                    writers.append((name, f"param:{p}:{t.dim() - 1}"))
    return writers, readers


def find_stream(model: nn.Module, example: Any, where: str = "structured-prune.hidden", gid: int = 0) -> Stream:
    """The residual-stream group of a model whose attention layers are ``nn.MultiheadAttention``, proven
    on ``example`` (see the module docstring; ``gid``: the group's id); ``ModelError`` when the layout does
    not hold."""
    fix = "leave `hidden` unset for this model (heads and MLP neurons still prune)"
    attn = {n: m for n, m in model.named_modules() if isinstance(m, ATTENTION)}
    if not attn:
        raise ModelError(where, "no nn.MultiheadAttention layer: no residual stream to find", fix=fix)
    bad = {n: r for n, m in attn.items() if (r := unsupported_reason(m))}
    if bad:
        n, r = next(iter(bad.items()))
        raise ModelError(where, f"{n}: hidden pruning does not support this attention layer ({r})", fix=fix)
    widths = {m.embed_dim for m in attn.values()}
    if len(widths) != 1:
        raise ModelError(where, f"the attention layers disagree on embed_dim ({sorted(widths)}): more than one "
                         "residual stream", fix=fix)
    width = widths.pop()
    if width < 4:
        raise ModelError(where, f"hidden size {width} has nothing to prune", fix=fix)
    inside = {f"{a}.{n}" if n else a for a, m in attn.items() for n, _ in m.named_modules()}
    writers, readers = _candidates(model, width, inside)
    norms = [n for n, m in model.named_modules() if _is_norm(m, width) and n not in inside]
    chans = torch.sort(torch.randperm(width, generator=torch.Generator().manual_seed(0))[: width // 2]).values
    rest = torch.ones(width, dtype=torch.bool)
    rest[chans] = False

    # 1. which norms normalize the stream
    seen = probe(model, example, width, chans, writers + [(n, "norm") for n in norms], norms)
    on = [n for n in norms if n in seen and float(seen[n][chans].max()) == 0.0]
    skipped = {n: NOT_STREAM + ("did not run on the example inputs" if n not in seen else
                                "its input is not the residual stream") for n in norms if n not in on}
    if not on:
        raise ModelError(where, f"no LayerNorm of width {width} reads a residual stream that the candidate writers "
                         f"({len(writers)}) write", fix=fix)
    # 2. which writers add to it: a tag channel of its own each, as many passes as needed
    found: list[tuple[str, str]] = []
    for i in range(0, len(writers), len(chans)):
        batch = writers[i:i + len(chans)]
        tags = {w: int(c) for w, c in zip(batch, chans)}
        seen = probe(model, example, width, chans, writers + [(n, "norm") for n in on], on, tags)
        hit = torch.stack([seen[n] for n in on if n in seen]).amax(0) if seen else torch.zeros(width)
        found += [w for w, c in tags.items() if float(hit[c]) > 0.0]
    for name, role in writers:
        if (name, role) not in found and not name.endswith(".out_proj"):
            skipped.setdefault(name, NOT_STREAM + "its output does not reach the residual stream")
    missing = [n for n in attn if (f"{n}.out_proj", "out") not in found]
    if missing:
        raise ModelError(where, f"the output of {missing[0]} does not reach the residual stream's norms", fix=fix)
    # 3. the proof: the found writers and the norms leave S empty for every norm and attention
    watch = on + list(attn) + readers
    seen = probe(model, example, width, chans, found + [(n, "norm") for n in on], watch)
    leak = [n for n in on + list(attn) if n not in seen or float(seen[n][chans].max()) != 0.0]
    if leak:
        raise ModelError(where, f"the residual stream is not what the layer shapes suggest: {leak[0]} "
                         f"{'did not run' if leak[0] not in seen else 'reads channels that no found writer writes'}"
                         f" ({len(leak)} such layers)", fix=fix)
    heads_in = [n for n in readers if n in seen and float(seen[n][chans].max()) == 0.0
                and float(seen[n][rest].max()) > 0.0]
    for n in readers:
        if n not in heads_in:
            skipped.setdefault(n, NOT_STREAM + ("did not run on the example inputs" if n not in seen else
                                                "its input is not the residual stream"))
    members = [Member(n, r, 0, 1) for n, r in found]
    members += [mb for n in on for mb in _norm_members(n, model.get_submodule(n), where)]
    members += [Member(n, "param:in_proj_weight:1", 0, 1) for n in attn]
    members += [Member(n, "in", 0, 1) for n in heads_in]
    head_dim = next(iter(attn.values())).head_dim
    return Stream(width, Group(gid, width, members), head_dim, 1, on, [], [], skipped, list(attn),
                  ("hidden_dim", "hidden_size"))
