"""Find consecutive layer pairs and rescale them: cross-layer equalization and SmoothQuant for the
``quantize`` step (the math is :mod:`nnsqueeze.ops.equalize`).

A pair is ``L1 -> (ReLU | ReLU6 | Identity | Dropout)* -> L2`` where L1's output feeds only that
chain, L2 is a plain Conv1d/Conv2d/Linear of L1's type reading all of L1's channels (``groups == 1``,
or a depthwise conv: one channel per group), L1 is ``groups == 1`` or depthwise, and both are called
once. Recipe (inside ``quantize``)::

    - quantize:
        equalize: {method: cle, iterations: 2}          # or {method: smoothquant, alpha: 0.5}

Run after BatchNorm folding, before the layers are converted, so the model stays a float model
computing the same function (up to float rounding).

ReLU6 (mobile CNNs: MobileNetV2, EfficientNet-Lite) clips at 6, so ``relu6(z / s) = relu6(z) / s``
only where ``z`` stays below ``6 min(1, s)``: :func:`find_chains` marks such pairs and
:func:`equalize` leaves them alone (the ``quantize`` step reports them). Measured
on EfficientNet-Lite0 (BN folded, 32 calibration crops, 32 crops of other photos), scaling across the
ReLU6 moved the float model's logits by up to 3.5 when channels were scaled up (their clip moves to
``6 s`` < 6; channels almost silent on the calibration crops, max 0.01, reach far more on other
photos), and by up to 3.0 (87.5% top-1 equal, in float) with CLE even when channels may only shrink
and any channel reaching 0.8 * 6 on the calibration crops keeps ``s = 1`` (channels below 4.8 there
exceed 6 on other photos). AIMET's CLE replaces ReLU6 by ReLU, which changes the function outright.
A depthwise L2 is scaled along its output channels (its weight is (C, 1, *k)).

``method: range`` (activation-range equalization) scales only pairs whose L2 is depthwise: with
per-channel weights, the depthwise weights and L1's rows absorb any per-channel scale at no cost, so
every channel of the activation between them is scaled to the same maximum (the largest channel's)
and per-tensor activation codes resolve small channels as finely as large ones.

    >>> import torch
    >>> from torch import nn
    >>> m = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1, groups=4)).eval()
    >>> x = torch.randn(8, 3, 6, 6)
    >>> ref = m(x)
    >>> [e["pair"] for e in equalize(m, ["0", "2"], "range", data=[(x, None)])]
    [['0', '2']]
    >>> bool(torch.allclose(m(x), ref, atol=1e-5))
    True
"""

from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import nn

from ..data import call_model, split, to_device
from ..ops.equalize import AbsMaxAccumulator, cle_scales, fold_scales, in_channel_absmax, smoothquant_scales

LAYERS = (nn.Conv1d, nn.Conv2d, nn.Linear)
PASS = (nn.ReLU, nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d)


def _channels(m: nn.Module, out: bool) -> int:
    if isinstance(m, nn.Linear):
        return m.out_features if out else m.in_features
    return m.out_channels if out else m.in_channels


def _depthwise(m: nn.Module) -> bool:
    return isinstance(m, (nn.Conv1d, nn.Conv2d)) and m.groups > 1 and m.groups == m.in_channels == m.out_channels


def _grouping_ok(m: nn.Module) -> bool:
    return getattr(m, "groups", 1) == 1 or _depthwise(m)


def _is_relu6(gm: Any, node: Any) -> bool:
    if node.op == "call_module":
        mod = gm.get_submodule(node.target)
        return type(mod) is nn.ReLU6 or (type(mod) is nn.Hardtanh and (mod.min_val, mod.max_val) == (0.0, 6.0))
    return node.op == "call_function" and node.target is torch.nn.functional.relu6


def find_pairs(model: nn.Module, names: Iterable[str]) -> list[tuple[str, str]]:
    """(L1, L2) pairs among ``names`` (see module doc); empty when the model does not trace."""
    return [(a, b) for a, b, _ in find_chains(model, names)]


def find_chains(model: nn.Module, names: Iterable[str]) -> list[tuple[str, str, bool]]:
    """(L1, L2, clipped) for every pair: ``clipped`` when a ReLU6 sits between them."""
    import torch.fx

    names = set(names)
    try:
        gm = torch.fx.symbolic_trace(model)
    except Exception:
        return []
    calls: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    pairs = []
    for node in gm.graph.nodes:
        if node.op != "call_module" or node.target not in names or calls[node.target] != 1:
            continue
        l1 = gm.get_submodule(node.target)
        if type(l1) not in LAYERS or not _grouping_ok(l1):
            continue
        cur, clipped = node, False
        while len(cur.users) == 1:
            nxt = next(iter(cur.users))
            if (nxt.op == "call_function" and nxt.target in (torch.relu, torch.nn.functional.relu)) or \
                    (nxt.op == "call_method" and nxt.target == "relu"):
                cur = nxt
                continue
            if _is_relu6(gm, nxt):  # stateless: a shared ReLU6 module computes the same for each call
                cur, clipped = nxt, True
                continue
            if nxt.op != "call_module":
                break
            mod = gm.get_submodule(nxt.target)
            if type(mod) in PASS and calls[nxt.target] == 1:
                cur = nxt
                continue
            if nxt.target in names and type(mod) in LAYERS and calls[nxt.target] == 1 and \
                    _grouping_ok(mod) and _channels(mod, False) == _channels(l1, True) and \
                    type(mod) is type(l1):  # a Linear after a conv reads its last axis, not its channels
                pairs.append((node.target, nxt.target, clipped))
            break
    return pairs


def _rows(m: nn.Module, t: torch.Tensor) -> torch.Tensor:
    """(samples, channels): a Linear's last axis or a conv's axis 1 as columns."""
    return t.reshape(-1, t.shape[-1]) if isinstance(m, nn.Linear) else t.transpose(0, 1).reshape(t.shape[1], -1).T


def _run(model: nn.Module, hooks: list, data: Iterable, device: Any) -> None:
    """Run ``data`` through ``model`` so that ``hooks`` see it, then remove them."""
    try:
        for batch in data:
            inputs, _ = split(batch)
            call_model(model, to_device(inputs, device))
    finally:
        for h in hooks:
            h.remove()


@torch.no_grad()
def _input_absmax(model: nn.Module, names: list[str], data: Iterable, device: Any) -> dict[str, torch.Tensor]:
    """Per-input-channel ``max |x|`` entering each named layer over ``data`` (float64)."""
    accs, hooks = {}, []
    for n in names:
        m = model.get_submodule(n)
        accs[n] = AbsMaxAccumulator(_channels(m, False), m.weight.device, -1 if isinstance(m, nn.Linear) else 1)
        hooks.append(m.register_forward_pre_hook(lambda m, args, acc=accs[n]: acc.add(args[0])))
    _run(model, hooks, data, device)
    return {n: acc.absmax for n, acc in accs.items() if acc.tokens}


@torch.no_grad()
def _output_max(model: nn.Module, names: list[str], data: Iterable, device: Any) -> dict[str, torch.Tensor]:
    """Per-output-channel maximum (signed) of each named layer over ``data`` (float64)."""
    out: dict[str, torch.Tensor] = {}
    hooks = []
    for n in names:
        m = model.get_submodule(n)

        def hook(m, args, y, n=n):
            y = _rows(m, y.detach()).amax(0).double()
            out[n] = y if n not in out else torch.maximum(out[n], y)
        hooks.append(m.register_forward_hook(hook))
    _run(model, hooks, data, device)
    return out


def _consumer_view(l2: nn.Module) -> torch.Tensor:
    """L2's weight with the channels it reads along dim 1 (a depthwise conv's are its rows)."""
    return l2.weight.transpose(0, 1) if _depthwise(l2) else l2.weight


@torch.no_grad()
def equalize(model: nn.Module, names: Iterable[str], method: str = "cle", iterations: int = 1,
             alpha: float = 0.5, data: Iterable | None = None, device: Any = "cpu") -> list[dict[str, Any]]:
    """Rescale every pair in place (pairs with a ReLU6 between are left alone, see the module doc);
    returns ``[{"pair": [l1, l2], "scale_min", "scale_max"}]``.

    ``method="cle"`` repeats ``iterations`` sweeps (chains like conv-conv-conv converge over sweeps);
    ``"smoothquant"`` and ``"range"`` need ``data`` (calibration batches) for the activation maxima.
    """
    chains = find_chains(model, names)
    chains = [ch for ch in chains if not ch[2]]       # across a ReLU6: see the module doc
    if method == "range":
        chains = [c for c in chains if _depthwise(model.get_submodule(c[1]))]
    out: list[dict[str, Any]] = []
    if not chains:
        return out
    data = list(data or [])
    act = _input_absmax(model, [b for _, b, _ in chains], data, device) if method == "smoothquant" else {}
    need_max = [a for a, _, _ in chains] if method == "range" else []
    zmax = _output_max(model, need_max, data, device) if need_max else {}
    total = {a: torch.ones(_channels(model.get_submodule(a), True), dtype=torch.float64) for a, _, _ in chains}
    lo: dict[tuple[str, str], float] = {}
    hi: dict[tuple[str, str], float] = {}
    for _ in range(iterations if method == "cle" else 1):
        for a, b, _ in chains:
            l1, l2 = model.get_submodule(a), model.get_submodule(b)
            w2 = _consumer_view(l2)
            if method == "cle":
                s = cle_scales(l1.weight, w2)
            elif method == "range":
                if a not in zmax:
                    continue
                m = zmax[a].clamp(min=0)
                target = float(m.max())
                s = torch.where(m > 1e-6, m / max(target, 1e-12), torch.ones_like(m))
            else:
                if b not in act:
                    continue
                s = smoothquant_scales(act[b], w2, alpha)
            total[a] = total[a] * s
            (w1, b1), (w2s,) = fold_scales(s, [l1.weight, l1.bias], [w2])
            l1.weight.copy_(w1)
            if b1 is not None:
                l1.bias.copy_(b1)
            l2.weight.copy_(w2s.transpose(0, 1) if _depthwise(l2) else w2s)
            lo[(a, b)] = min(lo.get((a, b), float("inf")), float(s.min()))
            hi[(a, b)] = max(hi.get((a, b), 0.0), float(s.max()))
    for p in lo:
        out.append({"pair": list(p), "scale_min": round(lo[p], 6), "scale_max": round(hi[p], 6)})
    return out


def _has_padding(m: nn.Module) -> bool:
    if isinstance(m, nn.Linear):
        return False
    pad = m.padding
    return pad == "same" or (not isinstance(pad, str) and any(p != 0 for p in pad))


@torch.no_grad()
def absorb_biases(model: nn.Module, pairs: list[tuple[str, str]], data: Iterable, device: Any = "cpu",
                  k: float = 3.0) -> list[dict[str, Any]]:
    """High-bias absorption (Nagel et al. 2019, sec. 4.2), in place, after equalization.

    For a pair ``L1 -> ReLU -> L2`` whose L1 pre-activation channel ``i`` has mean ``m_i`` and
    standard deviation ``s_i`` on the calibration data, ``c_i = max(0, m_i - k s_i)`` is moved out of
    L1's bias into L2's: ``b1 -= c`` and ``b2 += W2 @ c`` (summed over kernel taps). Wherever
    ``z_i >= c_i`` (all but the far lower tail when ``k = 3``), ``relu(z - c) + c = relu(z)``, so the
    output is unchanged while L1's output range (what gets quantized) loses ``c``. Pairs whose L2
    pads its input (padding would see ``-c``) or whose L1 has no bias are skipped.
    """
    # relu(z - c) + c = relu(z) needs an unclipped ReLU: pairs with a ReLU6 between are left alone, and
    # so are depthwise L2s (their shift is per channel, not W2 @ c)
    names = {n for p in pairs for n in p}
    clipped = {(a, b) for a, b, c in find_chains(model, names) if c}
    todo = [(a, b) for a, b in pairs if model.get_submodule(a).bias is not None and (a, b) not in clipped and
            not _has_padding(model.get_submodule(b)) and not _depthwise(model.get_submodule(b))]
    if not todo:
        return []
    sums: dict[str, list] = {}
    hooks = []
    for a, _ in todo:
        def hook(m, args, out, a=a):
            z = _rows(m, out.detach().double())
            acc = sums.setdefault(a, [0.0, 0.0, 0])
            acc[0] = acc[0] + z.sum(0)
            acc[1] = acc[1] + (z * z).sum(0)
            acc[2] += z.shape[0]
        hooks.append(model.get_submodule(a).register_forward_hook(hook))
    _run(model, hooks, data, device)
    out = []
    for a, b in todo:
        if a not in sums:
            continue
        s1, s2, n = sums[a]
        mean = s1 / n
        std = (s2 / n - mean * mean).clamp(min=0).sqrt()
        c = (mean - k * std).clamp(min=0)
        if not bool((c > 0).any()):
            continue
        l1, l2 = model.get_submodule(a), model.get_submodule(b)
        l1.bias.sub_(c.to(l1.bias.dtype))
        w2 = l2.weight.detach().double()
        shift = w2.reshape(w2.shape[0], w2.shape[1], -1).sum(-1) @ c          # (C_out2,)
        if l2.bias is None:
            l2.bias = nn.Parameter(shift.to(l2.weight.dtype))
        else:
            l2.bias.add_(shift.to(l2.bias.dtype))
        out.append({"pair": [a, b], "absorbed_max": round(float(c.max()), 6), "channels": int((c > 0).sum())})
    return out


__all__ = ["find_pairs", "find_chains", "equalize", "absorb_biases", "in_channel_absmax"]
