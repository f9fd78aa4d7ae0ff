"""Attention-head pruning for torchvision's Swin window attention (``ShiftedWindowAttention``, V1 and V2).

torchvision's ``shifted_window_attention`` derives the head size from the input width
(``C // num_heads``) and reshapes the heads' output back to ``C``, so a module with fewer heads cannot
run through it. A head-pruned layer is therefore replaced by :class:`PrunedWindowAttention`: the same
parameter and buffer names (``qkv``, ``proj``, ``relative_position_bias_table`` / ``logit_scale``,
``cpb_mlp``, ``relative_position_index``, ``relative_coords_table``), the same call and output, an inner
width of ``num_heads * head_dim`` (``head_dim`` and the ``head_dim ** -0.5`` scale unchanged). A removed
head takes its q, k and v rows of ``qkv`` (weight and bias), its ``proj`` input columns, its column of
the relative-position bias table (V1), its ``logit_scale`` entry and its row of ``cpb_mlp``'s last Linear
(V2). The output equals the original's with the removed heads' ``proj`` input columns set to zero::

    >>> import torch
    >>> from nnsqueeze.structured.window_attention import prune_heads
    >>> from torchvision.models.swin_transformer import ShiftedWindowAttention
    >>> attn = ShiftedWindowAttention(12, [3, 3], [1, 1], num_heads=4).eval()
    >>> small = prune_heads(attn, [0, 3])
    >>> small.num_heads, tuple(small.qkv.weight.shape), tuple(small.proj.weight.shape)
    (2, (18, 12), (12, 6))
    >>> small(torch.randn(2, 5, 7, 12)).shape
    torch.Size([2, 5, 7, 12])

The torchvision classes are recognised without importing torchvision (:func:`window_types` looks them
up in ``sys.modules``: a model holding them has imported them already).
"""

from __future__ import annotations

import copy
import math
import sys

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from ..errors import ModelError

Tensor = torch.Tensor

_TV = "torchvision.models.swin_transformer"
_TV_CLASSES = ("ShiftedWindowAttention", "ShiftedWindowAttentionV2")


def window_attention(x: Tensor, qkv_weight: Tensor, proj_weight: Tensor, bias: Tensor, window_size: list[int],
                     num_heads: int, head_dim: int, shift_size: list[int], attention_dropout: float = 0.0,
                     dropout: float = 0.0, qkv_bias: Tensor | None = None, proj_bias: Tensor | None = None,
                     logit_scale: Tensor | None = None, training: bool = True) -> Tensor:
    """torchvision's ``shifted_window_attention`` with the head size given (``head_dim``) instead of
    ``C // num_heads``: ``x`` is ``[B, H, W, C]``, the heads' inner width ``num_heads * head_dim``."""
    b, h, w, c = x.shape
    pad_r = (window_size[1] - w % window_size[1]) % window_size[1]
    pad_b = (window_size[0] - h % window_size[0]) % window_size[0]
    x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))
    _, ph, pw, _ = x.shape
    shift = list(shift_size)
    if window_size[0] >= ph:
        shift[0] = 0
    if window_size[1] >= pw:
        shift[1] = 0
    if sum(shift) > 0:
        x = torch.roll(x, shifts=(-shift[0], -shift[1]), dims=(1, 2))
    nw = (ph // window_size[0]) * (pw // window_size[1])
    x = x.view(b, ph // window_size[0], window_size[0], pw // window_size[1], window_size[1], c)
    x = x.permute(0, 1, 3, 2, 4, 5).reshape(b * nw, window_size[0] * window_size[1], c)
    if logit_scale is not None and qkv_bias is not None:  # V2: the key bias is held at zero
        qkv_bias = qkv_bias.clone()
        n = qkv_bias.numel() // 3
        qkv_bias[n:2 * n].zero_()
    qkv = F.linear(x, qkv_weight, qkv_bias)
    qkv = qkv.reshape(x.size(0), x.size(1), 3, num_heads, head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    if logit_scale is not None:  # V2: cosine attention
        attn = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)
        attn = attn * torch.clamp(logit_scale, max=math.log(100.0)).exp()
    else:
        attn = (q * head_dim ** -0.5).matmul(k.transpose(-2, -1))
    attn = attn + bias
    if sum(shift) > 0:
        mask = x.new_zeros((ph, pw))
        hs = ((0, -window_size[0]), (-window_size[0], -shift[0]), (-shift[0], None))
        ws = ((0, -window_size[1]), (-window_size[1], -shift[1]), (-shift[1], None))
        cnt = 0
        for hh in hs:
            for ww in ws:
                mask[hh[0]:hh[1], ww[0]:ww[1]] = cnt
                cnt += 1
        mask = mask.view(ph // window_size[0], window_size[0], pw // window_size[1], window_size[1])
        mask = mask.permute(0, 2, 1, 3).reshape(nw, window_size[0] * window_size[1])
        mask = mask.unsqueeze(1) - mask.unsqueeze(2)
        mask = mask.masked_fill(mask != 0, float(-100.0)).masked_fill(mask == 0, float(0.0))
        attn = attn.view(x.size(0) // nw, nw, num_heads, x.size(1), x.size(1))
        attn = (attn + mask.unsqueeze(1).unsqueeze(0)).view(-1, num_heads, x.size(1), x.size(1))
    attn = F.dropout(F.softmax(attn, dim=-1), p=attention_dropout, training=training)
    x = attn.matmul(v).transpose(1, 2).reshape(x.size(0), x.size(1), num_heads * head_dim)
    x = F.dropout(F.linear(x, proj_weight, proj_bias), p=dropout, training=training)
    co = x.shape[-1]
    x = x.view(b, ph // window_size[0], pw // window_size[1], window_size[0], window_size[1], co)
    x = x.permute(0, 1, 3, 2, 4, 5).reshape(b, ph, pw, co)
    if sum(shift) > 0:
        x = torch.roll(x, shifts=(shift[0], shift[1]), dims=(1, 2))
    return x[:, :h, :w, :].contiguous()


torch.fx.wrap("window_attention")   # one opaque call in the channel graph, as torchvision's own function is


def relative_bias(table: Tensor, index: Tensor, window_size: list[int]) -> Tensor:
    """``[1, heads, N, N]`` bias of an ``N = Wh*Ww`` window from a ``[(2Wh-1)(2Ww-1), heads]`` table."""
    n = window_size[0] * window_size[1]
    return table[index].view(n, n, -1).permute(2, 0, 1).contiguous().unsqueeze(0)


class PrunedWindowAttention(nn.Module):
    """A Swin window attention with ``num_heads`` heads of ``head_dim``; built by :func:`prune_heads`."""

    def __init__(self, num_heads: int, head_dim: int, window_size: list[int], shift_size: list[int],
                 attention_dropout: float = 0.0, dropout: float = 0.0, v2: bool = False):
        super().__init__()
        self.num_heads, self.head_dim, self.v2 = num_heads, head_dim, v2
        self.window_size, self.shift_size = list(window_size), list(shift_size)
        self.attention_dropout, self.dropout = attention_dropout, dropout

    def get_relative_position_bias(self) -> Tensor:
        if self.v2:
            table = self.cpb_mlp(self.relative_coords_table).view(-1, self.num_heads)
            return 16 * torch.sigmoid(relative_bias(table, self.relative_position_index, self.window_size))
        return relative_bias(self.relative_position_bias_table, self.relative_position_index, self.window_size)

    def forward(self, x: Tensor) -> Tensor:
        return window_attention(x, self.qkv.weight, self.proj.weight, self.get_relative_position_bias(),
                                self.window_size, self.num_heads, self.head_dim, self.shift_size,
                                self.attention_dropout, self.dropout, self.qkv.bias, self.proj.bias,
                                self.logit_scale if self.v2 else None, self.training)


def window_types() -> tuple[type, ...]:
    """torchvision's window-attention classes (when torchvision's Swin module is loaded) and ours."""
    tv = sys.modules.get(_TV)
    return tuple(getattr(tv, n) for n in _TV_CLASSES if hasattr(tv, n)) + (PrunedWindowAttention,)


def _v2(m: nn.Module) -> bool:
    return bool(getattr(m, "v2", False)) or isinstance(getattr(m, "logit_scale", None), Tensor)


def head_dim(m: nn.Module) -> int:
    return m.head_dim if isinstance(m, PrunedWindowAttention) else m.qkv.in_features // m.num_heads


def unsupported_reason(m: nn.Module) -> str | None:
    """Why the heads of ``m`` cannot be pruned (None: they can)."""
    h = m.num_heads
    if not isinstance(m, PrunedWindowAttention) and m.qkv.in_features % h:
        return f"width {m.qkv.in_features} is not a multiple of num_heads={h}"
    if m.qkv.out_features != 3 * h * head_dim(m) or m.proj.in_features != h * head_dim(m):
        return "qkv / proj widths do not match num_heads"
    if _v2(m) and m.cpb_mlp[-1].out_features != h:
        return "cpb_mlp's last layer does not output one value per head"
    return None


def packed_head_parts(qkv: nn.Linear, proj: nn.Linear, h: int, d: int) -> list[Tensor]:
    """Per head (rows) of a packed ``qkv`` Linear (q, k, v blocks of ``h`` heads of ``d``) and its output
    projection: the head's q, k, v rows (+ biases) and its ``proj`` input columns."""
    w = qkv.weight.detach().reshape(3, h, d, -1)
    parts = [w[i].reshape(h, -1) for i in range(3)]
    if qkv.bias is not None:
        parts += [b.reshape(h, -1) for b in qkv.bias.detach().reshape(3, h, d)]
    parts.append(proj.weight.detach().reshape(-1, h, d).transpose(0, 1).reshape(h, -1))
    return parts


def head_parts(m: nn.Module) -> list[Tensor]:
    """Per head (rows): its q, k, v rows of ``qkv`` (+ biases) and its ``proj`` input columns."""
    return packed_head_parts(m.qkv, m.proj, m.num_heads, head_dim(m))


def copy_linear(src: nn.Linear, weight: Tensor, bias: Tensor | None) -> nn.Linear:
    """A Linear holding copies of ``weight`` / ``bias``, with ``src``'s requires_grad and training mode."""
    new = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device, dtype=weight.dtype)
    new.weight = nn.Parameter(weight.clone(), requires_grad=src.weight.requires_grad)
    if bias is not None:
        new.bias = nn.Parameter(bias.clone(), requires_grad=src.bias.requires_grad)
    new.train(src.training)
    return new


def keep_packed_heads(m: nn.Module, qkv: nn.Linear, proj: nn.Linear, h: int, d: int,
                      keep: list[int]) -> tuple[Tensor, nn.Linear, nn.Linear]:
    """``(kept head indices, qkv, proj)`` of attention ``m`` holding heads ``keep`` only (validated)."""
    if not keep or len(set(keep)) != len(keep) or not 0 <= min(keep) <= max(keep) < h:
        raise ModelError(type(m).__name__, f"heads to keep {sorted(keep)} are not distinct indices in [0, {h})",
                         fix="keep at least one head, each of the layer's own")
    kt = torch.as_tensor(sorted(keep), dtype=torch.long, device=qkv.weight.device)
    qb = qkv.bias.reshape(3, h, d)[:, kt].reshape(-1) if qkv.bias is not None else None
    new_qkv = copy_linear(qkv, qkv.weight.reshape(3, h, d, -1)[:, kt].reshape(3 * len(keep) * d, -1), qb)
    new_proj = copy_linear(proj, proj.weight.reshape(-1, h, d)[:, kt].reshape(proj.out_features, -1), proj.bias)
    return kt, new_qkv, new_proj


@torch.no_grad()
def prune_heads(m: nn.Module, keep: list[int]) -> PrunedWindowAttention:
    """A :class:`PrunedWindowAttention` holding heads ``keep`` (sorted) of the window attention ``m``."""
    reason = unsupported_reason(m)
    if reason:
        raise ModelError(type(m).__name__, f"its heads cannot be pruned: {reason}",
                         fix="leave its heads whole (`ignore` the layer)")
    h, d = m.num_heads, head_dim(m)
    kt, qkv, proj = keep_packed_heads(m, m.qkv, m.proj, h, d, keep)
    new = PrunedWindowAttention(len(keep), d, m.window_size, m.shift_size, m.attention_dropout, m.dropout, _v2(m))
    new.qkv, new.proj = qkv, proj
    if new.v2:
        last = m.cpb_mlp[-1]
        new.cpb_mlp = copy.deepcopy(m.cpb_mlp)     # its other layers unchanged; the last one loses rows
        lb = last.bias[kt] if last.bias is not None else None
        new.cpb_mlp[len(m.cpb_mlp) - 1] = copy_linear(last, last.weight[kt], lb)
        new.logit_scale = nn.Parameter(m.logit_scale[kt].clone(), requires_grad=m.logit_scale.requires_grad)
    else:
        t = m.relative_position_bias_table
        new.relative_position_bias_table = nn.Parameter(t[:, kt].clone(), requires_grad=t.requires_grad)
    for name, buf in m.named_buffers(recurse=False):
        new.register_buffer(name, buf.clone(), persistent=name not in m._non_persistent_buffers_set)
    new.train(m.training)
    return new


def macs(m: nn.Module, x: Tensor) -> int:
    """MACs of one call on ``x`` (``[B, H, W, C]``): ``qkv`` and ``proj`` on the padded tokens, ``QK^T`` and
    ``AV`` within each window (the V2 ``cpb_mlp`` runs as its own layers and is counted there)."""
    b, h, w, c = x.shape
    wh, ww = m.window_size
    tokens = b * (h + (wh - h % wh) % wh) * (w + (ww - w % ww) % ww)
    inner = m.proj.in_features
    return tokens * (m.qkv.out_features * c + m.proj.out_features * inner + 2 * wh * ww * inner)
