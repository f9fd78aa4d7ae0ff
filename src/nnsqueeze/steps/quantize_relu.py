"""Which ReLU/ReLU6 each quantized conv absorbs (``quantize``'s export plan): ORT drops an activation whose
input is a conv's quantized output (it starts at 0, and ends at 6 for ReLU6), so the simulation clamps the
conv's output range the same way.

    >>> from torch import nn
    >>> from nnsqueeze.steps.quantize_relu import relu_plan
    >>> net = nn.Sequential(nn.Conv2d(3, 4, 1), nn.Dropout(), nn.ReLU6(), nn.Conv2d(4, 2, 1))
    >>> relu_plan(net, ["0", "3"])
    {'0': ('relu6', '2')}
"""

from __future__ import annotations

from torch import nn

_TRANSPARENT = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d)
# Activations a conv absorbs: its quantized output starts at 0 (and ends at 6), so ORT drops them.
_ACTS = {nn.ReLU: "relu", nn.ReLU6: "relu6"}


def relu_plan(model: nn.Module, convs: list[str]) -> dict[str, tuple[str, str | None]]:
    """For each conv name: (the following activation to absorb, "relu" or "relu6"; name of its
    nn.ReLU/nn.ReLU6 module when that can become Identity).

    A ReLU or ReLU6 is absorbed when the conv's output (through Identity/Dropout) feeds only that ReLU. The
    ReLU module is replaced only if it is called once and not shared; otherwise it stays (a second
    ReLU on non-negative values changes nothing).
    """
    plan: dict[str, tuple[bool, str | None]] = {}
    uses: dict[int, int] = {}
    for _, m in model.named_modules(remove_duplicate=False):
        uses[id(m)] = uses.get(id(m), 0) + 1
    try:
        import torch.fx

        gm = torch.fx.symbolic_trace(model)
    except Exception:
        gm = None
    if gm is not None:
        calls: dict[str, int] = {}
        for node in gm.graph.nodes:
            if node.op == "call_module":
                calls[node.target] = calls.get(node.target, 0) + 1
        wanted = set(convs)
        for node in gm.graph.nodes:
            if node.op != "call_module" or node.target not in wanted or calls[node.target] != 1:
                continue
            cur = node
            while len(cur.users) == 1:
                nxt = next(iter(cur.users))
                if nxt.op == "call_module" and isinstance(gm.get_submodule(nxt.target), _TRANSPARENT):
                    cur = nxt
                    continue
                if nxt.op == "call_module" and type(gm.get_submodule(nxt.target)) in _ACTS:
                    relu = gm.get_submodule(nxt.target)
                    own = calls[nxt.target] == 1 and uses[id(relu)] == 1
                    plan[node.target] = (_ACTS[type(relu)], nxt.target if own else None)
                elif (nxt.op == "call_function" and nxt.target in (torch.relu, torch.nn.functional.relu,
                                                                  torch.relu_)) or \
                        (nxt.op == "call_method" and nxt.target in ("relu", "relu_")):
                    plan[node.target] = ("relu", None)
                elif nxt.op == "call_function" and nxt.target is torch.nn.functional.relu6:
                    plan[node.target] = ("relu6", None)
                break
        return plan
    # Untraceable model: adjacency inside nn.Sequential.
    for seq_name, seq in model.named_modules():
        if not isinstance(seq, nn.Sequential):
            continue
        children = list(seq.named_children())
        prefix = f"{seq_name}." if seq_name else ""
        for i, (n, _) in enumerate(children):
            if prefix + n not in convs:
                continue
            j = i + 1
            while j < len(children) and isinstance(children[j][1], _TRANSPARENT):
                j += 1
            if j < len(children) and type(children[j][1]) in _ACTS:
                relu = children[j][1]
                plan[prefix + n] = (_ACTS[type(relu)], prefix + children[j][0] if uses[id(relu)] == 1 else None)
    return plan
