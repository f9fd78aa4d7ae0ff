"""How many channels each group keeps, and which: pure math over per-group score vectors.

- :func:`keep_count`: channels kept from ``n`` at a removal ``ratio``, rounded to a multiple of
  ``round_to`` (hardware-friendly widths) and never below ``min_channels``;
- :func:`layer_plan`: each group at its own ratio (the lowest scores go);
- :func:`global_plan`: one ranking across groups (scores divided by their group mean so layers are
  comparable); groups with a fixed ratio (per-layer overrides) keep it; no group loses more than
  ``max_ratio``.

    >>> import torch
    >>> from nnsqueeze.structured.allocate import keep_count, layer_plan
    >>> keep_count(30, 0.5, round_to=8), keep_count(5, 0.5, round_to=8)
    (16, 5)
    >>> layer_plan([torch.tensor([3.0, 1.0, 2.0, 0.5])], [0.5])
    [tensor([1, 3])]
"""

from __future__ import annotations

import torch

Tensor = torch.Tensor


def keep_count(n: int, ratio: float, round_to: int = 1, min_channels: int = 1) -> int:
    keep = n - int(round(n * ratio))
    if round_to > 1:
        if n <= round_to:
            return n
        keep = min(n, max(round_to, int(round(keep / round_to)) * round_to))
    return max(keep, min(min_channels, n))


def lowest(scores: Tensor, keep: int) -> Tensor:
    """Sorted indices of the ``n - keep`` lowest scores (ties: the later channel goes first)."""
    scores = scores.detach().double().cpu()
    n = scores.numel()
    order = torch.argsort(scores - 1e-12 * torch.arange(n, dtype=torch.float64), stable=True)
    return torch.sort(order[: n - keep]).values


def layer_plan(scores: list[Tensor], ratios: list[float], round_to: int | list[int] = 1,
               min_channels: int = 1) -> list[Tensor]:
    """Pruned channel indices per group, each group at its own ratio (``round_to``: one, or one per group)."""
    rounds = round_to if isinstance(round_to, list) else [round_to] * len(scores)
    return [lowest(s, keep_count(s.numel(), r, k, min_channels)) for s, r, k in zip(scores, ratios, rounds)]


def global_plan(scores: list[Tensor], ratio: float, fixed: list[float | None], max_ratio: float = 0.9,
                round_to: int | list[int] = 1, min_channels: int = 1) -> list[Tensor]:
    """Pruned indices per group from one ranking of ``ratio`` of the free groups' channels."""
    scores = [s.detach().double().cpu() for s in scores]
    free = [i for i, f in enumerate(fixed) if f is None]
    ratios: list[float] = [f if f is not None else 0.0 for f in fixed]
    if free and ratio > 0:
        normed = torch.cat([scores[i].double() / scores[i].double().mean().clamp_min(1e-12) for i in free])
        k = int(round(ratio * normed.numel()))
        thr = torch.sort(normed).values[k - 1] if k > 0 else -float("inf")
        for i in free:
            s = scores[i].double() / scores[i].double().mean().clamp_min(1e-12)
            ratios[i] = min(max_ratio, float((s <= thr).sum()) / s.numel())
    return layer_plan(scores, ratios, round_to, min_channels)


def enforce_ties(pruned: list[Tensor], scores: list[Tensor],
                 ties: list[list[dict[int, dict[int, int]]]]) -> tuple[list[Tensor], int]:
    """Put channels back until every tie's pieces lose equally many positions; returns (plan, restored).

    A tie (``chunk`` of an interleaved tensor, :mod:`.permute`) is a list of pieces, each
    ``{group: {channel: positions in the piece}}``; a piece that loses more than the others gets its
    best-scored removed channels back. Only restorations happen, so this ends::

        >>> enforce_ties([torch.tensor([0, 1]), torch.tensor([0])], [torch.tensor([1.0, 2.0, 3.0])] * 2,
        ...              [[{0: {0: 1, 1: 1}}, {1: {0: 1, 1: 1}}]])
        ([tensor([0]), tensor([0])], 1)
    """
    if not ties:
        return pruned, 0
    gone = [set(p.tolist()) for p in pruned]
    restored, changed = 0, True
    while changed:
        changed = False
        for tie in ties:
            lost = [sum(k for g, chans in piece.items() for c, k in chans.items() if c in gone[g]) for piece in tie]
            while max(lost) > min(lost):
                hi, lo = lost.index(max(lost)), lost.index(min(lost))
                excess = lost[hi] - lost[lo]
                # removed channels that weigh more in the piece that lost most than in the one that lost least
                cand = [(tie[hi][g][c] - tie[lo].get(g, {}).get(c, 0), float(scores[g][c]), -g, -c)
                        for g, chans in tie[hi].items() for c in chans if c in gone[g]]
                cand = [x for x in cand if x[0] > 0]
                fit = [x for x in cand if x[0] <= excess]
                _, _, g, c = max(fit, key=lambda x: (x[1], x[2], x[3])) if fit else min(cand)
                gone[-g].discard(-c)
                lost = [n - piece.get(-g, {}).get(-c, 0) for piece, n in zip(tie, lost)]
                restored, changed = restored + 1, True
    return [torch.tensor(sorted(s), dtype=torch.long) for s in gone], restored
