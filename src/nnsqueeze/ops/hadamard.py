"""Orthogonal rotations for QuaRot/SpinQuant-style transforms: Hadamard matrices, seeded random
orthogonal matrices, and a fast Walsh-Hadamard transform for rotating activations online.

Pure tensor math. Every matrix returned here is *orthogonal* (``R @ R.T == I``), already divided by
``sqrt(n)``. Hadamard sizes: ``n = 2**k * m`` with ``m = 1`` (Sylvester) or ``m = q + 1`` for a
prime ``q % 4 == 3`` (Paley I: 4, 12, 20, 24, 32, 44, 48, 60, 72, ...), built as the Kronecker
product ``H_m ⊗ H_(2**k)``. The smallest such ``m`` is used. That covers 576 (SmolLM2: 8 x 72), 768,
1536 (128 x 12), 2048, 4096, 11008 (2 x 5504, a large dense block) ...; other sizes (any odd size > 1, 36, 100) raise
ValueError; :class:`KronRotation` with ``block="random"`` handles every size as ``O_m ⊗ H_(2**k)``,
``O_m`` a seeded random orthogonal block (``m`` the odd part of ``n``)::

    >>> import torch
    >>> from nnsqueeze.ops.hadamard import hadamard, KronRotation
    >>> h = hadamard(12, torch.float64)
    >>> torch.allclose(h @ h.T, torch.eye(12, dtype=torch.float64))
    True
    >>> r = KronRotation(24)                    # 12 x 2: Paley block, fast transform on the 2
    >>> x = torch.randn(3, 24, dtype=torch.float64)
    >>> torch.allclose(r.apply(x), x @ r.matrix(torch.float64))
    True
"""

from __future__ import annotations

import math

import torch

Tensor = torch.Tensor


def _is_prime(q: int) -> bool:
    return q >= 2 and all(q % d for d in range(2, int(math.isqrt(q)) + 1))


def _pow2_part(n: int) -> tuple[int, int]:
    """``(2**k, m)`` with ``n = 2**k * m`` and ``m`` odd."""
    p = n & -n
    return p, n // p


def sylvester(n: int, dtype: torch.dtype = torch.float64) -> Tensor:
    """Unnormalized ``±1`` Hadamard matrix of size ``n`` (a power of two), symmetric."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"sylvester needs a power of two, got {n}")
    h = torch.ones(1, 1, dtype=dtype)
    base = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=dtype)
    while h.shape[0] < n:
        h = torch.kron(base, h)
    return h


def paley(q: int, dtype: torch.dtype = torch.float64) -> Tensor:
    """Unnormalized ``±1`` Hadamard matrix of size ``q + 1`` (Paley I; ``q`` prime, ``q % 4 == 3``)."""
    if not (_is_prime(q) and q % 4 == 3):
        raise ValueError(f"Paley I needs a prime q with q % 4 == 3, got {q}")
    squares = {(i * i) % q for i in range(1, q)}
    chi = [0] + [1 if r in squares else -1 for r in range(1, q)]          # Legendre symbol
    jac = torch.tensor([[chi[(j - i) % q] for j in range(q)] for i in range(q)], dtype=dtype)
    s = torch.zeros(q + 1, q + 1, dtype=dtype)
    s[0, 1:], s[1:, 0], s[1:, 1:] = 1.0, -1.0, jac                       # skew-symmetric core
    return s + torch.eye(q + 1, dtype=dtype)


def hadamard_block(n: int) -> int | None:
    """The non-power-of-two factor ``m`` used for a Hadamard of size ``n`` (1: pure Sylvester), or
    None when this module cannot build one (``n`` not of the form ``2**k * (q + 1)``)."""
    if n < 1:
        return None
    p, _ = _pow2_part(n)
    while p >= 1:
        m = n // p
        if m in (1, 2) or (m % 4 == 0 and _is_prime(m - 1) and (m - 1) % 4 == 3):
            return 1 if m <= 2 else m
        p //= 2
    return None


def hadamard(n: int, dtype: torch.dtype = torch.float64) -> Tensor:
    """Orthogonal Hadamard matrix of size ``n`` (entries ``±1/sqrt(n)``); ValueError if unsupported."""
    m = hadamard_block(n)
    if m is None:
        raise ValueError(f"no Hadamard matrix of size {n} here: sizes are 2**k * m with m = 1 or "
                         "m = q + 1, q a prime with q % 4 == 3 (e.g. 64, 576 = 8 x 72, 1536 = 128 x 12)")
    h = sylvester(n // m, dtype) if m == 1 else torch.kron(paley(m - 1, dtype), sylvester(n // m, dtype))
    return h / math.sqrt(n)


def random_orthogonal(n: int, seed: int, dtype: torch.dtype = torch.float64) -> Tensor:
    """A random orthogonal ``n x n`` matrix (Haar), reproducible from ``seed`` (QR in float64)."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, n, generator=g, dtype=torch.float64)
    q, r = torch.linalg.qr(a)
    q = q * torch.sign(torch.diagonal(r)).unsqueeze(0)  # unique factor: positive diagonal of R
    return q.contiguous().to(dtype)


def random_signs(n: int, seed: int, dtype: torch.dtype = torch.float64) -> Tensor:
    """``n`` random ``±1`` values reproducible from ``seed``."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(0, 2, (n,), generator=g) * 2 - 1).to(dtype)


def random_hadamard(n: int, seed: int, dtype: torch.dtype = torch.float64) -> Tensor:
    """``diag(s) H``: a Hadamard matrix with rows of random sign (QuaRot's randomized Hadamard)."""
    return random_signs(n, seed, dtype).unsqueeze(1) * hadamard(n, dtype)


def fwht(x: Tensor) -> Tensor:
    """``x @ H / sqrt(n)`` along the last dimension (Sylvester ``H``, ``n`` a power of two), in
    ``n log n`` additions."""
    n = x.shape[-1]
    if n & (n - 1):
        raise ValueError(f"fwht needs a power-of-two last dimension, got {n}")
    lead = x.shape[:-1]
    y = x.reshape(-1, n)
    h = 1
    while h < n:
        y = y.view(-1, n // (2 * h), 2, h)
        y = torch.stack((y[:, :, 0] + y[:, :, 1], y[:, :, 0] - y[:, :, 1]), dim=2)
        h *= 2
    return (y.reshape(*lead, n) / math.sqrt(n)).to(x.dtype)


class KronRotation:
    """The orthogonal ``R = B ⊗ H_p / sqrt(p)`` of size ``n = m * p`` (``p = 2**k``), applied as
    ``x @ R`` with a fast Walsh-Hadamard transform on the power-of-two part and a small dense
    ``m x m`` block ``B``: a Paley Hadamard (``block="hadamard"``, ValueError when ``n`` has none)
    or a random orthogonal matrix from ``seed`` (``block="random"``, any size)."""

    def __init__(self, n: int, block: str = "hadamard", seed: int = 0):
        if block == "hadamard":
            m = hadamard_block(n)
            if m is None:
                hadamard(n)  # raises the explanatory ValueError
            b = torch.ones(1, 1, dtype=torch.float64) if m == 1 else paley(m - 1) / math.sqrt(m)
        elif block == "random":
            _, m = _pow2_part(n)
            b = random_orthogonal(m, seed)
        else:
            raise ValueError(f"block must be 'hadamard' or 'random', got {block!r}")
        self.n, self.m, self.block, self.seed = n, m, block, seed
        self.b = b  # (m, m) float64, orthogonal

    def matrix(self, dtype: torch.dtype = torch.float64) -> Tensor:
        p = self.n // self.m
        return torch.kron(self.b, sylvester(p) / math.sqrt(p)).to(dtype)

    def apply(self, x: Tensor) -> Tensor:
        """``x @ R`` along the last dimension, in ``x``'s dtype."""
        if x.shape[-1] != self.n:
            raise ValueError(f"rotation of size {self.n} applied to a last dimension of {x.shape[-1]}")
        p = self.n // self.m
        y = fwht(x.reshape(*x.shape[:-1], self.m, p))                  # H_p on the fast axis
        if self.m > 1:  # index a*p + c: (x (B ⊗ H))_(b, d) = sum_a B_ab (x_a H)_d
            y = torch.einsum("...ap,ab->...bp", y, self.b.to(y.dtype).to(y.device))
        return y.reshape(x.shape)
