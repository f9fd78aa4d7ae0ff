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
from typing import Callable

import torch
from torch import nn

from ..distributed import batch_moments
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
    pairs, result.unfolded = _foldable_pairs(model)
    for layer_name, bn_name in pairs:
        _fold_into(model.get_submodule(layer_name), model.get_submodule(bn_name))
        set_module(model, bn_name, nn.Identity())
        result.folded.append((layer_name, bn_name))
    return result


def _foldable_pairs(model: nn.Module, layers: set[str] | None = None,
                    extra_check: Callable[[nn.Module], str | None] | None = None
                    ) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """``(pairs, left)``: the (layer, BN) pairs that may fold, and every other BN with the reason.
    ``layers`` limits the pairs to those layers; ``extra_check(layer)`` may refuse a pair."""
    bns = [n for n, m in model.named_modules() if isinstance(m, BATCHNORMS)]
    if not bns:
        return [], []
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
    ok: list[tuple[str, str]] = []
    for layer_name, bn_name in pairs:
        layer, bn = model.get_submodule(layer_name), model.get_submodule(bn_name)
        why = "its layer is not selected" if layers is not None and layer_name not in layers else None
        why = why or _check_pair(layer, bn)
        if why is None and (uses[id(layer)] > 1 or uses[id(bn)] > 1):
            why = "layer or BN object is shared by several names"
        why = why or (extra_check(layer) if extra_check is not None else None)
        if why is not None:
            reasons[bn_name] = why
            continue
        ok.append((layer_name, bn_name))
    done = {bn for _, bn in ok}
    left = [(n, reasons.get(n, "not directly after a Conv1d/Conv2d/Linear")) for n in bns if n not in done]
    return ok, left


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


# ------------------------------------------------------------------------------------------------
# BatchNorm folding that stays correct during quantization-aware training
# ------------------------------------------------------------------------------------------------
def bn_factor(bn: nn.Module) -> Tensor:
    """Per-channel ``gamma / sqrt(running_var + eps)`` (differentiable in gamma)."""
    f = torch.rsqrt(bn.running_var + bn.eps)
    return f * bn.weight if bn.affine else f


def bn_train_forward(layer: Callable[[Tensor, Tensor | None], Tensor], w: Tensor, b: Tensor | None,
                     bn: nn.Module, quantize_weight: Callable[[Tensor], Tensor]) -> Tensor:
    """Training-mode forward of ``bn(layer(x))`` with the BN folded into the quantized weight.

    Fold-on-the-fly of Krishnamoorthi (2018), sec. 3.2: the weight is folded with the RUNNING
    statistics, ``w_f = w * gamma / sigma_run`` (so it is quantized on the grid it will have after
    training), and the output is rescaled to the batch statistics the float BN would use::

        y = layer(x; Q(w_f)) * sigma_run / sigma_B + beta + gamma * (b - mu_B) / sigma_B

    which equals ``bn(layer(x; w))`` in training mode when ``Q`` is the identity. ``layer(w, b)`` runs
    the layer on the (already quantized) input; the batch statistics come from a float pass, and
    the BN's running statistics are updated as ``nn.BatchNorm`` does (momentum, unbiased variance).
    Under data-parallel training the batch statistics are those of all ranks' batches
    (:func:`nnsqueeze.distributed.batch_moments`), like ``nn.SyncBatchNorm``.
    """
    y_float = layer(w, b)                                           # (N, C, *) with the bias
    dims = [0] + list(range(2, y_float.dim()))
    # Under DDP, the moments of all ranks' batches together (SyncBatchNorm semantics), so the ranks'
    # running statistics, and hence the folded weights, stay identical; in one process plain moments.
    mu, var, n = batch_moments(y_float, dims)
    shape = [1, -1] + [1] * (y_float.dim() - 2)
    sigma_run = torch.sqrt(bn.running_var + bn.eps)
    gamma = bn.weight if bn.affine else torch.ones_like(mu)
    beta = bn.bias if bn.affine else torch.zeros_like(mu)
    w_f = w * (gamma / sigma_run).reshape(-1, *([1] * (w.dim() - 1)))
    y_q = layer(quantize_weight(w_f), None)
    sigma_b = torch.sqrt(var + bn.eps)
    b0 = b if b is not None else torch.zeros_like(mu)
    y = y_q * (sigma_run / sigma_b).reshape(shape) + (beta + gamma * (b0 - mu) / sigma_b).reshape(shape)
    with torch.no_grad():  # running statistics, exactly as nn.BatchNorm updates them
        bn.num_batches_tracked.add_(1)
        m = bn.momentum if bn.momentum is not None else 1.0 / float(bn.num_batches_tracked)
        bn.running_mean.mul_(1 - m).add_(mu.detach() * m)
        bn.running_var.mul_(1 - m).add_(var.detach() * (n / max(n - 1, 1)) * m)
    return y


@torch.no_grad()
def attach_batchnorm(model: nn.Module, layers: set[str]) -> FoldResult:
    """For QAT: move each BN that follows one of ``layers`` into that layer as its child ``bn`` (the
    BN's place becomes ``nn.Identity``). The fake-quant layer then folds it on the fly
    (:func:`bn_train_forward`) and :func:`fold_attached_` folds it for good after training.
    Same pairing rules as :func:`fold_batchnorm`; ``result.folded`` lists the attached pairs,
    ``result.unfolded`` every other BN with the reason."""
    result = FoldResult()
    pairs, result.unfolded = _foldable_pairs(
        model, layers, lambda layer: "the layer already has a child named 'bn'" if "bn" in layer._modules else None)
    for layer_name, bn_name in pairs:
        bn = model.get_submodule(bn_name)
        set_module(model, bn_name, nn.Identity())
        model.get_submodule(layer_name).add_module("bn", bn)
        result.folded.append((layer_name, bn_name))
    return result


def attach_structure(model: nn.Module, attached: list[tuple[str, str]]) -> nn.Module:
    """Replay :func:`attach_batchnorm` without data (artifact rebuild)."""
    for layer_name, bn_name in attached:
        bn = model.get_submodule(bn_name)
        set_module(model, bn_name, nn.Identity())
        model.get_submodule(layer_name).add_module("bn", bn)
    return model


@torch.no_grad()
def _fold_into(layer: nn.Module, bn: nn.Module) -> None:
    """Overwrite ``layer``'s weight and bias with the BN-folded ones (running statistics)."""
    w, b = fold_bn_weights(layer.weight, layer.bias, bn.running_mean, bn.running_var, bn.eps,
                           bn.weight if bn.affine else None, bn.bias if bn.affine else None)
    layer.weight.copy_(w)
    if layer.bias is None:
        layer.bias = nn.Parameter(b)
    else:
        layer.bias.copy_(b)


def fold_attached_(layer: nn.Module) -> bool:
    """Fold a layer's attached ``bn`` into its weight and bias with the running statistics and drop
    it. Returns False when there is none."""
    bn = layer._modules.get("bn")
    if bn is None:
        return False
    _fold_into(layer, bn)
    del layer._modules["bn"]
    return True
