"""BatchNorm folding: equivalent to the unfolded eval model within 1e-5."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nnsqueeze.quant.fold import fold_batchnorm, fold_bn_weights, refold_structure


def _randomize_bn(bn: nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    n = bn.num_features
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(n, generator=g))
        bn.running_var.copy_(torch.rand(n, generator=g) * 2 + 0.1)
        if bn.affine:
            bn.weight.copy_(torch.rand(n, generator=g) + 0.5)
            bn.bias.copy_(torch.randn(n, generator=g) * 0.3)


def test_fold_bn_weights_matches_float64_formula():
    g = torch.Generator().manual_seed(0)
    w, b = torch.randn(5, 3, 3, generator=g), torch.randn(5, generator=g)
    mean, var = torch.randn(5, generator=g), torch.rand(5, generator=g) + 0.1
    gamma, beta = torch.randn(5, generator=g), torch.randn(5, generator=g)
    wf, bf = fold_bn_weights(w, b, mean, var, 1e-3, gamma, beta)
    f = gamma.double().numpy() / np.sqrt(var.double().numpy() + 1e-3)
    np.testing.assert_allclose(wf.numpy(), w.double().numpy() * f[:, None, None], rtol=1e-6)
    np.testing.assert_allclose(bf.numpy(), (b.double().numpy() - mean.double().numpy()) * f + beta.double().numpy(),
                               rtol=1e-6, atol=1e-7)
    assert wf.dtype == torch.float32


@pytest.mark.parametrize("make,shape", [
    (lambda: nn.Sequential(nn.Conv1d(3, 7, 3, padding=1), nn.BatchNorm1d(7), nn.ReLU()), (4, 3, 37)),
    (lambda: nn.Sequential(nn.Conv1d(5, 9, 3, groups=1, bias=False), nn.BatchNorm1d(9)), (2, 5, 11)),
    (lambda: nn.Sequential(nn.Conv1d(6, 9, 3, groups=3), nn.BatchNorm1d(9, affine=False)), (2, 6, 13)),
    (lambda: nn.Sequential(nn.Conv2d(3, 5, 3, stride=2), nn.BatchNorm2d(5), nn.ReLU()), (2, 3, 9, 11)),
    (lambda: nn.Sequential(nn.Linear(13, 7), nn.BatchNorm1d(7)), (6, 13)),
])
def test_folded_model_is_equivalent(make, shape):
    torch.manual_seed(0)
    m = make().eval()
    _randomize_bn(m[1], seed=1)
    x = torch.randn(*shape)
    with torch.no_grad():
        ref = m(x)
        res = fold_batchnorm(m)
        got = m(x)
    assert res.folded == [("0", "1")] and res.unfolded == []
    assert isinstance(m[1], nn.Identity) and m[0].bias is not None
    assert (got - ref).abs().max().item() <= 1e-5


class TracedNet(nn.Module):
    """Not a Sequential: found through torch.fx. bn2's conv output is used twice, so it can't fold."""

    def __init__(self):
        super().__init__()
        self.c1, self.bn1 = nn.Conv1d(2, 5, 3), nn.BatchNorm1d(5)
        self.c2, self.bn2 = nn.Conv1d(5, 5, 1), nn.BatchNorm1d(5)

    def forward(self, x):
        y = F.relu(self.bn1(self.c1(x)))
        z = self.c2(y)
        return self.bn2(z) + z


def test_fx_finds_pairs_and_reports_unfoldable():
    m = TracedNet().eval()
    _randomize_bn(m.bn1, 2)
    _randomize_bn(m.bn2, 3)
    x = torch.randn(3, 2, 17)
    with torch.no_grad():
        ref = m(x)
        res = fold_batchnorm(m)
        got = m(x)
    assert res.folded == [("c1", "bn1")]
    assert [n for n, _ in res.unfolded] == ["bn2"] and "used elsewhere" in res.unfolded[0][1]
    assert isinstance(m.bn1, nn.Identity) and isinstance(m.bn2, nn.BatchNorm1d)
    assert (got - ref).abs().max().item() <= 1e-5


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv1d(1, 3, 3), nn.BatchNorm1d(3), nn.ReLU())
        self.extra = nn.BatchNorm1d(3)

    def forward(self, x):
        y = self.body(x)
        if y.sum() > 0:  # data-dependent control flow: symbolic tracing fails
            y = self.extra(y)
        return y


def test_untraceable_model_falls_back_to_sequential_adjacency():
    m = Untraceable().eval()
    _randomize_bn(m.body[1], 4)
    res = fold_batchnorm(m)
    assert res.folded == [("body.0", "body.1")]
    assert res.unfolded[0][0] == "extra" and "does not trace" in res.unfolded[0][1]


def test_bn_without_running_stats_is_not_folded():
    m = nn.Sequential(nn.Conv1d(1, 3, 3), nn.BatchNorm1d(3, track_running_stats=False)).eval()
    res = fold_batchnorm(m)
    assert res.folded == [] and "running statistics" in res.unfolded[0][1]


def test_refold_structure_then_load_state_dict_reproduces():
    torch.manual_seed(0)
    make = lambda: nn.Sequential(nn.Conv1d(3, 7, 3, bias=False), nn.BatchNorm1d(7), nn.ReLU())  # noqa: E731
    m = make().eval()
    _randomize_bn(m[1], 5)
    res = fold_batchnorm(m)
    fresh = refold_structure(make().eval(), res.folded)
    fresh.load_state_dict(m.state_dict())
    x = torch.randn(2, 3, 19)
    assert torch.equal(fresh(x), m(x))
