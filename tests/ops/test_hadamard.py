"""Hadamard / random orthogonal matrices and the fast online rotation (ops/hadamard.py)."""

from __future__ import annotations

import pytest
import torch

from nnsqueeze.ops.hadamard import (KronRotation, fwht, hadamard, hadamard_block, paley, random_hadamard,
                                    random_orthogonal, sylvester)

EYE = lambda n: torch.eye(n, dtype=torch.float64)  # noqa: E731


@pytest.mark.parametrize("n", [1, 2, 4, 12, 20, 24, 64, 72, 96, 576, 1536])
def test_hadamard_is_orthogonal_and_plus_minus(n):
    h = hadamard(n)
    assert torch.allclose(h @ h.T, EYE(n), atol=1e-12)
    assert torch.allclose(h.abs(), torch.full_like(h, n ** -0.5))


def test_block_choice_and_unsupported_sizes():
    assert (hadamard_block(576), hadamard_block(1536), hadamard_block(4096)) == (72, 12, 1)
    for n in (3, 36, 63, 100):
        assert hadamard_block(n) is None
        with pytest.raises(ValueError, match="sizes are 2\\*\\*k"):
            hadamard(n)
    with pytest.raises(ValueError, match="Paley"):
        paley(13)                        # 13 % 4 == 1
    with pytest.raises(ValueError, match="power of two"):
        sylvester(6)


@pytest.mark.parametrize("n", [8, 256])
def test_fwht_equals_dense_sylvester(n):
    x = torch.randn(3, 5, n, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(fwht(x), x @ sylvester(n) / n ** 0.5, atol=1e-12)
    with pytest.raises(ValueError, match="power-of-two"):
        fwht(torch.zeros(2, 12))


@pytest.mark.parametrize("n,block", [(64, "hadamard"), (96, "hadamard"), (576, "hadamard"),
                                     (36, "random"), (63, "random"), (96, "random")])
def test_kron_rotation_fast_equals_dense_and_orthogonal(n, block):
    r = KronRotation(n, block, seed=5)
    m = r.matrix()
    assert torch.allclose(m @ m.T, EYE(n), atol=1e-12)
    x = torch.randn(4, n, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(r.apply(x), x @ m, atol=1e-12)
    if block == "hadamard":
        assert torch.allclose(m, hadamard(n))
    x32 = x.float()
    assert r.apply(x32).dtype == torch.float32


def test_kron_rotation_errors():
    with pytest.raises(ValueError, match="sizes are"):
        KronRotation(36, "hadamard")
    with pytest.raises(ValueError, match="block must be"):
        KronRotation(64, "dense")
    with pytest.raises(ValueError, match="size 64"):
        KronRotation(64).apply(torch.zeros(2, 32))


def test_random_matrices_reproducible_from_seed():
    a, b, c = random_orthogonal(24, 3), random_orthogonal(24, 3), random_orthogonal(24, 4)
    assert torch.equal(a, b) and not torch.allclose(a, c)
    assert torch.allclose(a @ a.T, EYE(24), atol=1e-12)
    h = random_hadamard(64, 7)
    assert torch.equal(h, random_hadamard(64, 7)) and torch.allclose(h @ h.T, EYE(64), atol=1e-12)
    assert not torch.equal(h, hadamard(64))
