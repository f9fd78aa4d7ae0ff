"""The ``mixed`` step's allocation maths (:mod:`nnsqueeze.steps.mixed_precision`): estimated bytes
of a layer per format, the exact size-budgeted choice (a multiple-choice knapsack over the layers),
the "raise the most sensitive layers" search, and the :class:`Allocation` that records the choice. ::

    >>> from torch import nn
    >>> from nnsqueeze.steps.mixed_alloc import format_bytes
    >>> fc = nn.Linear(10, 4)                         # 40 weights, 4 biases
    >>> format_bytes(fc, "fp32"), format_bytes(fc, "fp16"), format_bytes(fc, "int8"), format_bytes(fc, "int4")
    (176, 88, 72, 52)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from torch import nn

from .mixed_config import Quality


def format_bytes(layer: nn.Module, fmt: str) -> int:
    """Estimated stored bytes of a layer's parameters in ``fmt`` (what the artifact packs)."""
    from ..sensitivity import FLOAT_FORMATS, FORMATS, HALF_FORMATS
    from .mixed_float import float_format_bytes

    if fmt in FLOAT_FORMATS:
        return float_format_bytes(layer, fmt)
    n_w = layer.weight.numel()
    n_b = 0 if getattr(layer, "bias", None) is None else layer.bias.numel()  # Embedding: no bias
    if fmt == "fp32":
        return 4 * (n_w + n_b)
    if fmt in HALF_FORMATS:  # the half step stores weight and bias in 16 bits
        return 2 * (n_w + n_b)
    args = FORMATS[fmt]
    codes = (n_w + 1) // 2 if args.bits <= 4 else n_w
    rows = layer.weight.shape[0]
    group = args.group_size   # per-group: one fp32 scale per group of each row
    scales = rows * (-(-(n_w // rows) // group) if group else 1)
    return codes + 4 * scales + 4 * n_b + (64 if args.nonuniform else 0)


def cheapest_allocation(options: dict[str, list[tuple[str, int, float]]], limit: float,
                        max_states: int = 20000) -> dict[str, str] | None:
    """Exact multiple-choice knapsack: the format per layer with the least total ``noise`` whose total
    ``bytes`` is at most ``limit``. ``options``: {layer: [(format, bytes, noise), ...]}.

    Walks the layers keeping only the Pareto front of partial assignments (fewer bytes or less noise
    than every other), pruned of those that cannot fit even with the cheapest formats left. Returns
    ``None`` when the front grows past ``max_states`` (the caller then uses the greedy), ``{}`` when
    nothing fits. Ties in noise go to fewer bytes. ::

        >>> cheapest_allocation({"a": [("fp32", 40, 0.0), ("int8", 10, 0.1)],
        ...                      "b": [("fp32", 40, 0.0), ("int8", 10, 0.2)]}, limit=50)
        {'a': 'int8', 'b': 'fp32'}
    """
    names = list(options)
    rest = [0] * (len(names) + 1)  # cheapest bytes of layers i.. (to prune hopeless partial states)
    for i in range(len(names) - 1, -1, -1):
        rest[i] = rest[i + 1] + min(b for _, b, _ in options[names[i]])
    front: list[tuple[int, float, tuple[str, ...]]] = [(0, 0.0, ())]
    for i, n in enumerate(names):
        grown = [(b + fb, z + fz, ch + (f,)) for b, z, ch in front for f, fb, fz in options[n]
                 if b + fb + rest[i + 1] <= limit]
        grown.sort(key=lambda s: (s[0], s[1]))
        front = []
        for st in grown:  # bytes ascending: keep a state only if it beats every cheaper one on noise
            if not front or st[1] < front[-1][1]:
                front.append(st)
        if len(front) > max_states:
            return None
    if not front:
        return {}
    best = min(front, key=lambda s: (s[1], s[0]))
    return dict(zip(names, best[2]))


def raise_until(quality: Quality, measure_k: Callable[[int], dict[str, float]], k_min: int,
                k_max: int) -> tuple[int, dict[str, float], bool]:
    """The smallest ``k`` in ``[k_min, k_max]`` whose whole model (``measure_k(k)``: the ``k`` most
    sensitive layers raised) meets ``quality``, else ``k_max``; with its figures and whether it met.
    ::

        >>> raise_until(Quality(min_sqnr_db=30), lambda k: {"output_sqnr_db": 10.0 * k}, 0, 5)
        (3, {'output_sqnr_db': 30.0}, True)
    """
    k, fig = k_min, measure_k(k_min)
    while k < k_max and not quality.holds(fig):  # raise the next most sensitive, re-measure all
        k += 1
        fig = measure_k(k)
    return k, fig, quality.holds(fig)


@dataclass
class Allocation:
    """What :meth:`MixedPrecision.allocate` chose, with the figures that chose it."""
    formats: dict[str, str]                      # layer -> chosen format
    size: dict[tuple[str, str], int]             # (layer, format) -> estimated bytes
    order: dict[str, list[str]]                  # layer -> its candidate formats, most bytes first
    sqnr: dict[tuple[str, str], float]           # (layer, format) -> output SQNR (dB) with that layer alone
    rows: list[dict[str, Any]]                   # the sensitivity rows, most sensitive first
    quality: Quality
    fp32_bytes: int                              # every parameter of the model in fp32
    other_bytes: int                             # parameters outside the allocated layers (fp32)
    limit: float | None = None                   # the size budget in bytes
    allocator: str | None = None                 # exact | greedy | raise
    ranking: list[str] = field(default_factory=list)   # search raise: most sensitive first
    raised: int = 0                              # search raise: how many of ``ranking`` were raised
    raise_max: int = 0                           # search raise: the most the size budget allowed
    whole: dict[str, float] = field(default_factory=dict)  # the whole model's measured figures
    quality_met: bool = True
    latency: float | None = None
    trials: int = 0

    def bytes(self, alloc: dict[str, str] | None = None) -> int:
        """Estimated bytes of every parameter with ``alloc`` (default: the chosen formats)."""
        return self.other_bytes + sum(self.size[(n, f)] for n, f in (alloc or self.formats).items())

    def smallest(self) -> dict[str, str]:
        return {n: fs[-1] for n, fs in self.order.items()}
