"""Fold eval-mode BatchNorm into the preceding Conv1d/Conv2d/Linear, replacing the BN by nn.Identity.

``y = gamma * (conv(x) - mean) / sqrt(var + eps) + beta`` is again a conv with
``w' = w * f`` and ``b' = (b - mean) * f + beta`` where ``f = gamma / sqrt(var + eps)`` per output
channel. Folding before quantization lets the int8 layer carry the BN for free (and lets ONNX
Runtime fuse it into QLinearConv)::

    >>> import torch
    >>> from torch import nn
    >>> from nnsqueeze.quant.fold import fold_batchnorm
    >>> m = nn.Sequential(nn.Conv1d(1, 3, 3), nn.BatchNorm1d(3), nn.ReLU()).eval()
    >>> x = torch.randn(2, 1, 9); y = m(x)
    >>> result = fold_batchnorm(m)
    >>> result.folded, type(m[1]).__name__, torch.allclose(m(x), y, atol=1e-6)
    ([('0', '1')], 'Identity', True)

Pairs are found with ``torch.fx.symbolic_trace`` (the conv's output must feed only the BN), or, if
the model does not trace, by adjacency inside ``nn.Sequential``. BNs that cannot be folded are
returned in ``result.unfolded`` with a reason, for the caller to log (``ctx.skip``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..targets import set_module

Tensor = torch.Tensor

FOLDABLE_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Linear)
BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d)


def fold_bn_weights(w: Tensor, b: Tensor | None, mean: Tensor, var: Tensor, eps: float,
                    gamma: Tensor | None, beta: Tensor | None) -> tuple[Tensor, Tensor]:
    """Weight ``(C_out, ...)`` and bias ``(C_out,)`` of ``bn(layer(x))`` as one layer.

    Computed in float64 and returned in ``w``'s dtype. ``b``/``gamma``/``beta`` may be None
    (no bias; ``affine=False`` BN).
    """
    dt = w.dtype
    w64 = w.detach().double()
    c = w64.shape[0]
    b64 = torch.zeros(c, dtype=torch.float64, device=w.device) if b is None else b.detach().double()
    g64 = torch.ones(c, dtype=torch.float64, device=w.device) if gamma is None else gamma.detach().double()
    be64 = torch.zeros(c, dtype=torch.float64, device=w.device) if beta is None else beta.detach().double()
    f = g64 / torch.sqrt(var.detach().double() + eps)  # (C_out,)
    w_new = w64 * f.reshape(-1, *([1] * (w64.dim() - 1)))
    b_new = (b64 - mean.detach().double()) * f + be64
    return w_new.to(dt), b_new.to(dt)


@dataclass
class FoldResult:
    folded: list[tuple[str, str]] = field(default_factory=list)    # (layer name, bn name)
    unfolded: list[tuple[str, str]] = field(default_factory=list)  # (bn name, reason)



def _module_uses(model: nn.Module) -> dict[int, int]:
    """How many names each module object is registered under (shared modules can't be folded)."""
    uses: dict[int, int] = {}
    for _, m in model.named_modules(remove_duplicate=False):
        uses[id(m)] = uses.get(id(m), 0) + 1
    return uses


def _fx_pairs(model: nn.Module) -> tuple[list[tuple[str, str]], dict[str, str]]:
    """(layer, bn) pairs from the traced graph, plus a reason for every BN call that doesn't pair."""
    import torch.fx

    gm = torch.fx.symbolic_trace(model)
    calls: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    pairs, reasons = [], {}
    for node in gm.graph.nodes:
        if node.op != "call_module" or not isinstance(gm.get_submodule(node.target), BATCHNORMS):
            continue
        bn_name = node.target
        src = node.args[0] if node.args else None
        if not isinstance(src, torch.fx.Node) or src.op != "call_module" or \
                not isinstance(gm.get_submodule(src.target), FOLDABLE_LAYERS):
            reasons[bn_name] = "input is not the output of a Conv1d/Conv2d/Linear module"
        elif len(src.users) != 1:
            reasons[bn_name] = f"output of {src.target} is also used elsewhere"
        elif calls[src.target] != 1 or calls[bn_name] != 1:
            reasons[bn_name] = "layer or BN is called more than once in forward"
        else:
            pairs.append((src.target, bn_name))
    return pairs, reasons


def _sequential_pairs(model: nn.Module) -> list[tuple[str, str]]:
    pairs = []
    for seq_name, seq in model.named_modules():
        if not isinstance(seq, nn.Sequential):
            continue
        children = list(seq.named_children())
        for (n1, m1), (n2, m2) in zip(children, children[1:]):
            if isinstance(m1, FOLDABLE_LAYERS) and isinstance(m2, BATCHNORMS):
                prefix = f"{seq_name}." if seq_name else ""
                pairs.append((prefix + n1, prefix + n2))
    return pairs


def _check_pair(layer: nn.Module, bn: nn.Module) -> str | None:
    """Why this (layer, bn) pair can't be folded, or None."""
    if type(layer) not in FOLDABLE_LAYERS:
        return f"preceding layer is a {type(layer).__name__} (only plain Conv1d/Conv2d/Linear are folded)"
    if isinstance(layer, nn.Linear) and not isinstance(bn, nn.BatchNorm1d):
        return "a BatchNorm2d after a Linear"
    if isinstance(layer, nn.Conv2d) and not isinstance(bn, nn.BatchNorm2d):
        return "BN dimensionality does not match the conv"
    if isinstance(layer, nn.Conv1d) and not isinstance(bn, nn.BatchNorm1d):
        return "BN dimensionality does not match the conv"
    out = layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels
    if bn.num_features != out:
        return f"BN has {bn.num_features} features but the layer has {out} outputs"
    if bn.running_mean is None or bn.running_var is None:
        return "BN has no running statistics (track_running_stats=False)"
    return None


@torch.no_grad()
def fold_batchnorm(model: nn.Module) -> FoldResult:
    """Fold every foldable BN in place (eval statistics); the BN becomes ``nn.Identity``."""
    result = FoldResult()
    bns = [n for n, m in model.named_modules() if isinstance(m, BATCHNORMS)]
    if not bns:
        return result
    try:
        pairs, reasons = _fx_pairs(model)
    except Exception as e:  # untraceable forward (data-dependent control flow...): use adjacency
        pairs = _sequential_pairs(model)
        reasons = {}
        why = f"model does not trace with torch.fx ({type(e).__name__}) and the BN is not right after a " \
              "Conv/Linear inside an nn.Sequential"
        for n in bns:
            reasons.setdefault(n, why)
    uses = _module_uses(model)
    done: set[str] = set()
    for layer_name, bn_name in pairs:
        layer, bn = model.get_submodule(layer_name), model.get_submodule(bn_name)
        why = _check_pair(layer, bn)
        if why is None and (uses[id(layer)] > 1 or uses[id(bn)] > 1):
            why = "layer or BN object is shared by several names"
        if why is not None:
            reasons[bn_name] = why
            continue
        w, b = fold_bn_weights(layer.weight, layer.bias, bn.running_mean, bn.running_var, bn.eps,
                               bn.weight if bn.affine else None, bn.bias if bn.affine else None)
        layer.weight.copy_(w)
        if layer.bias is None:
            layer.bias = nn.Parameter(b)
        else:
            layer.bias.copy_(b)
        set_module(model, bn_name, nn.Identity())
        result.folded.append((layer_name, bn_name))
        done.add(bn_name)
    for n in bns:
        if n not in done:
            result.unfolded.append((n, reasons.get(n, "not directly after a Conv1d/Conv2d/Linear")))
    return result


def refold_structure(model: nn.Module, folded: list[tuple[str, str]]) -> nn.Module:
    """Replay :func:`fold_batchnorm`'s structural change without data: BN -> Identity and a (zero)
    bias on the layer, so that a saved state dict of the folded model loads into ``model``."""
    for layer_name, bn_name in folded:
        layer = model.get_submodule(layer_name)
        if layer.bias is None:
            out = layer.weight.shape[0]
            layer.bias = nn.Parameter(torch.zeros(out, dtype=layer.weight.dtype, device=layer.weight.device))
        set_module(model, bn_name, nn.Identity())
    return model
