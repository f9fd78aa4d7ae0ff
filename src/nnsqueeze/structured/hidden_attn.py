"""Hidden-size (residual stream) pruning around attention layers: torchvision's ViT and Swin.

A stream's width is its attention layers' input width: ``nn.MultiheadAttention``'s ``embed_dim`` (ViT: one
stream), torchvision's Swin window attention's ``qkv`` input (Swin: one stream per stage, 96 / 192 / 384 / 768
wide in ``swin_t``, separated by ``PatchMerging``). What touches a stream is found from the layer shapes, then
*proven* on the example inputs with :func:`.hidden.probe` (copies of the model, three forward passes per
stream), as :mod:`.hidden` does for Hugging Face models; nothing is taken on trust:

- candidate **writers**: a convolution (``groups=1``) or Linear with that many outputs, every attention's
  output projection (``out_proj``, ``proj``), an Embedding of that width, and loose parameters whose last
  axis has that width (ViT's ``class_token`` and ``encoder.pos_embedding``); candidate **readers**: every
  attention (``in_proj_weight`` / ``qkv`` input columns), every other Linear with that many inputs, and
  torchvision's ``PatchMerging`` / ``PatchMergingV2`` of that ``dim`` (its ``norm`` (V1) and ``reduction``
  read the 4 concatenated neighbours: channel ``c`` is their entries ``c, C+c, 2C+c, 3C+c``); **norms**: the
  LayerNorms of that width.
1. Every candidate writer and norm writes zeros to a random half ``S`` of the channels: a norm whose
   input is zero in ``S`` is on the stream, the others are left alone (reported).
2. Each candidate writer writes a constant to a channel of ``S`` of its own (a tag), the others zeros:
   a writer is on the stream only if its tag reaches a stream norm's input. The others keep their width.
3. The proven writers and norms write zeros to ``S``: every stream norm, attention and patch merging
   must then read zeros in ``S`` (a patch merging's ``reduction``: at the 4 entries of each), else a writer
   was missed (``ModelError``); a Linear reader is on the stream when its input is zero in ``S`` and not
   elsewhere (a classifier reading the ``class_token`` output).

Removing channel ``c`` removes it from all of them. The attention layers become their pruned forms
(:class:`~.attention.PrunedMultiheadAttention`, :class:`~.window_attention.PrunedWindowAttention`), whose
stream width follows the weights: the heads, ``head_dim`` and the scale are unchanged, only the stream
narrows, so the kept width needs to be no multiple of anything. Integer ``hidden_dim`` attributes equal
to the width (torchvision's ``VisionTransformer.hidden_dim``, read by its patch reshape) follow it. As in
:mod:`.hidden`, the LayerNorms then normalize over the kept channels only: distill after.

    >>> import torch
    >>> import nnsqueeze  # torchvision's model code imports even without its compiled ops
    >>> from torchvision.models.vision_transformer import VisionTransformer
    >>> from nnsqueeze.structured.hidden_attn import find_streams
    >>> _ = torch.manual_seed(0)
    >>> vit = VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=3, hidden_dim=24,
    ...                         mlp_dim=40, num_classes=5).eval()
    >>> [s] = find_streams(vit, torch.randn(2, 3, 32, 32))
    >>> s.width, s.head_dim, s.attention
    (24, 8, ['encoder.layers.encoder_layer_0.self_attention', 'encoder.layers.encoder_layer_1.self_attention'])
    >>> sorted(m.role for m in s.group.members if not m.module.startswith("encoder.layers"))
    ['in', 'out', 'out', 'param:class_token:2', 'param:pos_embedding:2']
"""

from __future__ import annotations

import sys
from typing import Any

import torch
from torch import nn

from ..errors import ModelError
from . import attention, window_attention
from .graph import Group, Member
from .heads import head_types, unsupported_reason
from .hidden import Stream, _is_norm, _norm_members, probe

NOT_STREAM = "hidden width kept: "
_MERGING = ("PatchMerging", "PatchMergingV2")      # torchvision.models.swin_transformer


def has_attention(model: nn.Module) -> bool:
    return any(isinstance(m, head_types()) for m in model.modules())


def _window(m: nn.Module) -> bool:
    return isinstance(m, window_attention.window_types())


def _width(m: nn.Module) -> int:
    return m.qkv.in_features if _window(m) else m.embed_dim


def _reader(name: str, m: nn.Module) -> tuple[str, str]:
    return (f"{name}.qkv", "in") if _window(m) else (name, "param:in_proj_weight:1")


def _writer(name: str, m: nn.Module) -> tuple[str, str]:
    return (f"{name}.proj", "out") if _window(m) else (f"{name}.out_proj", "out")


def _mergings(model: nn.Module, width: int) -> dict[str, nn.Module]:
    """torchvision's Swin patch mergings reading a stream of ``width`` channels."""
    tv = sys.modules.get("torchvision.models.swin_transformer")
    kinds = tuple(getattr(tv, n) for n in _MERGING if hasattr(tv, n))
    return {n: m for n, m in model.named_modules() if kinds and isinstance(m, kinds)
            and isinstance(m.reduction, nn.Linear) and m.reduction.in_features == 4 * width}


def _expanded(chans: torch.Tensor, width: int) -> torch.Tensor:
    """The positions of channels ``chans`` in a concatenation of 4 copies of the stream."""
    return (chans[:, None] + width * torch.arange(4)).flatten()


def _candidates(model: nn.Module, width: int, inside: set[str],
                attn: dict[str, nn.Module]) -> tuple[list[tuple[str, str]], list[str]]:
    """(writers as (module, role), Linear readers) of a stream of ``width`` channels, from shapes only."""
    own = {_writer(n, m)[0] for n, m in attn.items()}
    writers: list[tuple[str, str]] = []
    readers: list[str] = []
    for name, mod in model.named_modules():
        if name in inside and name not in own:
            continue
        if isinstance(mod, nn.modules.conv._ConvNd) and not mod.transposed and mod.groups == 1 \
                and mod.out_channels == width:
            writers.append((name, "out"))
        elif isinstance(mod, nn.Linear):
            if mod.out_features == width:
                writers.append((name, "out"))
            if mod.in_features == width and name not in own:
                readers.append(name)
        elif isinstance(mod, nn.Embedding) and mod.embedding_dim == width:
            writers.append((name, "out"))
        elif not isinstance(mod, (nn.LayerNorm, nn.modules.batchnorm._NormBase, nn.GroupNorm) + head_types()):
            for p, t in mod.named_parameters(recurse=False):
                if t.dim() >= 1 and t.shape[-1] == width:
                    writers.append((name, f"param:{p}:{t.dim() - 1}"))
    return writers, readers


def find_streams(model: nn.Module, example: Any, where: str = "structured-prune.hidden", gid: int = 0) -> list[Stream]:
    """The residual streams of a model built on attention layers (one per attention width, in model order),
    each proven on ``example`` (see the module docstring); ``gid``: the first group's id. ``ModelError``
    when the layout does not hold."""
    attn = {n: m for n, m in model.named_modules() if isinstance(m, head_types())}
    if not attn:
        raise ModelError(where, "no nn.MultiheadAttention or window attention layer: no residual stream to find",
                         fix="leave `hidden` unset for this model")
    bad = {n: r for n, m in attn.items() if (r := unsupported_reason(m))}
    if bad:
        n, r = next(iter(bad.items()))
        raise ModelError(where, f"{n}: hidden pruning does not support this attention layer ({r})",
                         fix="leave `hidden` unset for this model (heads and MLP neurons still prune)")
    widths = list(dict.fromkeys(_width(m) for m in attn.values()))
    return [find_stream(model, example, {n: m for n, m in attn.items() if _width(m) == w}, where, gid + i)
            for i, w in enumerate(widths)]


def find_stream(model: nn.Module, example: Any, attn: dict[str, nn.Module], where: str = "structured-prune.hidden",
                gid: int = 0) -> Stream:
    """The residual stream that the attention layers ``attn`` (one width) read and write."""
    fix = "leave `hidden` unset for this model (heads and MLP neurons still prune)"
    width = _width(next(iter(attn.values())))
    if width < 4:
        raise ModelError(where, f"hidden size {width} has nothing to prune", fix=fix)
    everything = {n: m for n, m in model.named_modules() if isinstance(m, head_types())}
    inside = {f"{a}.{n}" if n else a for a, m in everything.items() for n, _ in m.named_modules()}
    writers, readers = _candidates(model, width, inside, attn)
    norms = [n for n, m in model.named_modules() if _is_norm(m, width) and n not in inside]
    merges = _mergings(model, width)
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
    # 2. which writers add to it: a tag channel of its own each (seen where the stream is read: the norms,
    # the attention layers, the patch mergings), as many passes as needed; a tag must stay on its channel
    found: list[tuple[str, str]] = []
    for i in range(0, len(writers), len(chans)):
        tags = {w: int(c) for w, c in zip(writers[i:i + len(chans)], chans)}
        seen = probe(model, example, width, chans, writers + [(n, "norm") for n in on], on + list(attn) + list(merges),
                     tags)
        hit = torch.stack(list(seen.values())).amax(0) if seen else torch.zeros(width)
        untagged = chans[len(tags):]
        if untagged.numel() and float(hit[untagged].max()) != 0.0:
            raise ModelError(where, f"a layer mixes channels into the residual stream of width {width} (a tagged "
                             "writer's channel spread to others)", fix=fix)
        found += [w for w, c in tags.items() if float(hit[c]) > 0.0]
    for name, role in writers:
        if (name, role) not in found and name not in inside:
            skipped.setdefault(name, NOT_STREAM + "its output does not reach the residual stream")
    missing = [n for n, m in attn.items() if _writer(n, m) not in found]
    if missing:
        raise ModelError(where, f"the output of {missing[0]} does not reach the residual stream's norms", fix=fix)
    # 3. the proof: the found writers and the norms leave S empty for every norm, attention and merging
    wide = _expanded(chans, width)
    zero = found + [(n, "norm") for n in on]
    zero += [(f"{n}.norm", "norm", wide) for n, m in merges.items() if _is_norm(m.norm, 4 * width)]
    seen = probe(model, example, width, chans, zero,
                 on + list(attn) + list(merges) + readers + [(f"{n}.reduction", 4 * width) for n in merges])
    leak = [n for n in on + list(attn) + list(merges) if n not in seen or float(seen[n][chans].max()) != 0.0]
    leak += [f"{n}.reduction" for n in merges if f"{n}.reduction" not in seen
             or float(seen[f"{n}.reduction"][wide].max()) != 0.0]
    if leak:
        why = "did not run" if leak[0] not in seen else "reads channels that no found writer writes"
        raise ModelError(where, f"the residual stream of width {width} is not what the layer shapes suggest: "
                         f"{leak[0]} {why} ({len(leak)} such layers)", fix=fix)
    heads_in = [n for n in readers if n in seen and float(seen[n][chans].max()) == 0.0
                and float(seen[n][rest].max()) > 0.0]
    for n in readers:
        if n not in heads_in:
            skipped.setdefault(n, NOT_STREAM + ("did not run on the example inputs" if n not in seen else
                                                "its input is not the residual stream"))
    members = [Member(n, r, 0, 1) for n, r in found]
    members += [mb for n in on for mb in _norm_members(n, model.get_submodule(n), where)]
    members += [Member(*_reader(n, m), 0, 1) for n, m in attn.items()]
    members += [Member(n, "in", 0, 1) for n in heads_in]
    index = tuple(_expanded(torch.arange(width), width).tolist())
    for n, m in merges.items():
        members += [Member(f"{n}.reduction", "in", 0, 4, index=index)]
        members += [Member(f"{n}.norm", "out", 0, 4, index=index)] if _is_norm(m.norm, 4 * width) else []
    first = next(iter(attn.values()))
    head_dim = window_attention.head_dim(first) if _window(first) else attention.head_dim(first)
    return Stream(width, Group(gid, width, members), head_dim, 1, on, [], [], skipped, list(attn),
                  ("hidden_dim", "hidden_size"))
