"""Per-layer-type physical shrinking: keep some indices of a layer's output or input dimension.

One function per role; each slices every parameter and buffer of the layer that has that dimension
(so an unstructured ``weight_mask`` from the ``prune`` step shrinks with its weight) and updates the
shape attributes (``out_channels``, ``in_features``, ``num_features``, ``groups``...)::

    >>> import torch
    >>> from torch import nn
    >>> from nnsqueeze.structured.pruners import shrink
    >>> conv = nn.Conv1d(4, 6, 3)
    >>> shrink(conv, "out", torch.tensor([0, 2, 5])); conv
    Conv1d(4, 3, kernel_size=(3,), stride=(1,))
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn

from ..errors import ModelError

Tensor = torch.Tensor

SHRINKABLE = (nn.modules.conv._ConvNd, nn.Linear, nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.Embedding)
NORMS = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm)


def _slice(module: nn.Module, dim_size: int, dim: int, keep: Tensor, only: set[str] | None = None) -> None:
    """Index every own parameter/buffer whose ``dim`` has ``dim_size`` entries (``only``: by name)."""
    for name, t in list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False)):
        if t is None or t.dim() <= dim or t.shape[dim] != dim_size or (only is not None and name not in only):
            continue
        new = t.detach().index_select(dim, keep.to(t.device)).clone()
        if isinstance(t, nn.Parameter):
            setattr(module, name, nn.Parameter(new, requires_grad=t.requires_grad))
        else:
            module._buffers[name] = new


def _weight_names(module: nn.Module) -> set[str]:
    """``weight`` plus buffers shaped like it (masks)."""
    w = module.weight
    return {"weight"} | {n for n, b in module.named_buffers(recurse=False) if b is not None and b.shape == w.shape}


def param_role(module: nn.Module, role: str) -> tuple[str, int] | None:
    """``param:ATTR:DIM`` (a per-channel parameter or buffer of ``module``) as ``(ATTR, DIM)``; else None."""
    if not role.startswith("param:"):
        return None
    _, attr, dim = role.split(":") if role.count(":") == 2 else ("", "", "")
    t = getattr(module, attr, None) if attr else None
    if not isinstance(t, Tensor) or not dim.lstrip("-").isdigit() or not -t.dim() <= int(dim) < t.dim():
        raise ModelError(type(module).__name__, f"no per-channel tensor for role {role!r}",
                         fix="load onto the same architecture that was compressed")
    return attr, int(dim) % t.dim()


@torch.no_grad()
def shrink(module: nn.Module, role: str, keep: Tensor) -> None:
    """Keep indices ``keep`` (sorted, int64) of ``module``'s ``out`` or ``in`` dimension, or of the
    per-channel parameter named by a ``param:ATTR:DIM`` role."""
    keep = torch.as_tensor(keep, dtype=torch.long)
    pr = param_role(module, role)
    if pr is not None:
        attr, dim = pr
        t = getattr(module, attr)
        new = t.detach().index_select(dim, keep.to(t.device)).clone()
        if isinstance(t, nn.Parameter):
            setattr(module, attr, nn.Parameter(new, requires_grad=t.requires_grad))
        else:
            module._buffers[attr] = new
    elif isinstance(module, nn.LayerNorm) and len(module.normalized_shape) == 1:
        _slice(module, module.normalized_shape[0], 0, keep)
        module.normalized_shape = (len(keep),)
    elif isinstance(module, nn.modules.conv._ConvNd):
        if module.transposed:
            raise ModelError(type(module).__name__, "transposed convolutions are not shrunk",
                             fix="ignore this layer")
        g = module.groups
        depthwise = g > 1 and g == module.in_channels == module.out_channels
        if role == "out":
            if len(keep) % g and not depthwise:
                raise ModelError(type(module).__name__, f"{len(keep)} output channels do not split into "
                                 f"groups={g}", fix="prune the same number of channels from every group")
            _slice(module, module.out_channels, 0, keep)
            module.out_channels = len(keep)
            if depthwise:
                module.in_channels = module.groups = len(keep)
        else:  # grouped: ``keep`` indexes the weight's C_in/groups input columns, shared by every group
            _slice(module, module.in_channels // g, 1, keep, _weight_names(module))
            module.in_channels = len(keep) * g
    elif isinstance(module, nn.Linear):
        if role == "out":
            _slice(module, module.out_features, 0, keep)
            module.out_features = len(keep)
        else:
            _slice(module, module.in_features, 1, keep, _weight_names(module))
            module.in_features = len(keep)
    elif isinstance(module, nn.modules.batchnorm._BatchNorm):
        _slice(module, module.num_features, 0, keep)
        module.num_features = len(keep)
    elif isinstance(module, nn.GroupNorm):  # whole norm groups go (the graph keeps them together)
        size = module.num_channels // module.num_groups
        if len(keep) % size:
            raise ModelError(type(module).__name__, f"{len(keep)} channels are not whole groups of {size}",
                             fix="remove whole GroupNorm groups")
        _slice(module, module.num_channels, 0, keep)
        module.num_channels, module.num_groups = len(keep), len(keep) // size
    elif isinstance(module, nn.Embedding):
        _slice(module, module.embedding_dim, 1, keep, _weight_names(module))
        module.embedding_dim = len(keep)
    else:
        raise ModelError(type(module).__name__, "no pruner for this layer type",
                         fix=f"structured pruning shrinks {', '.join(t.__name__ for t in SHRINKABLE)}")


def dim_size(module: nn.Module, role: str) -> int:
    """Current size of ``module``'s ``out``/``in`` dimension (or of a ``param:ATTR:DIM`` role)."""
    pr = param_role(module, role)
    if pr is not None:
        return getattr(module, pr[0]).shape[pr[1]]
    if isinstance(module, nn.LayerNorm) and len(module.normalized_shape) == 1:
        return module.normalized_shape[0]
    if isinstance(module, nn.modules.conv._ConvNd):
        return module.out_channels if role == "out" else module.in_channels // module.groups
    if isinstance(module, nn.GroupNorm):
        return module.num_channels
    if isinstance(module, nn.Linear):
        return module.out_features if role == "out" else module.in_features
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return module.num_features
    if isinstance(module, nn.Embedding):
        return module.embedding_dim
    raise ModelError(type(module).__name__, "no pruner for this layer type", fix="ignore it")


def channel_slices(module: nn.Module, role: str, offset: int, expand: int, n: int,
                   fn: Callable[[Tensor], Tensor] = lambda t: t.detach(),
                   index: Sequence[int] | None = None) -> list[Tensor]:
    """The weights that belong to channels ``0..n-1`` of a member, each shaped ``(n, -1)``.

    ``out`` gives the weight rows (and bias, BN scale/shift); ``in`` gives the input columns
    ``offset + c*expand + j`` (``index``: the ``n * expand`` positions, listed). ``fn`` maps each
    parameter first (e.g. to ``w * grad``). Used by the importance criteria.
    """
    pr = param_role(module, role)
    t0 = getattr(module, pr[0]) if pr is not None else module.weight
    idx = torch.arange(offset, offset + n * expand, device=t0.device) if index is None else \
        torch.tensor(list(index), dtype=torch.long, device=t0.device)
    if pr is not None:
        return [fn(t0).movedim(pr[1], 0)[idx].reshape(n, -1)]
    if isinstance(module, nn.LayerNorm):
        return [fn(t)[idx].reshape(n, -1) for t in (module.weight, module.bias) if t is not None]
    if isinstance(module, NORMS):
        return [fn(t)[idx].reshape(n, -1) for t in (module.weight, module.bias) if t is not None]
    if isinstance(module, nn.Embedding):
        return [fn(module.weight)[:, idx].t().reshape(n, -1)]
    w = fn(module.weight)
    if role == "out":
        out = [w[idx].reshape(n, -1)]
        if getattr(module, "bias", None) is not None:
            out.append(fn(module.bias)[idx].reshape(n, -1))
        return out
    cols = w.index_select(1, idx)  # (out, n*expand, ...)
    return [cols.transpose(0, 1).reshape(n, expand, -1).reshape(n, -1)]
