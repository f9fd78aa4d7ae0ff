"""percentile / mse / kl observers: ranges against closed forms on known distributions."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from nnsqueeze.errors import DataError
from nnsqueeze.ops.quant import qrange
from nnsqueeze.quant.mse import quant_mse
from nnsqueeze.registry import OBSERVERS


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_registered():
    assert {"percentile", "percentile-99.9", "mse", "kl", "minmax"} <= set(OBSERVERS.names())


def test_percentile_exact_below_capacity():
    x = torch.randn(5001, generator=_gen())
    obs = OBSERVERS.get("percentile-99.9")(name="x")
    obs.observe(x[:2000])
    obs.observe(x[2000:])
    lo, hi = obs._range(8, False)
    assert math.isclose(float(lo), np.percentile(x.numpy().astype(np.float64), 0.1), rel_tol=1e-5)
    assert math.isclose(float(hi), np.percentile(x.numpy().astype(np.float64), 99.9), rel_tol=1e-5)
    lo, hi = obs._range(8, True)
    assert math.isclose(float(hi), np.percentile(np.abs(x.numpy()).astype(np.float64), 99.9), rel_tol=1e-5)


def test_percentile_uniform_stream_closed_form():
    obs = OBSERVERS.get("percentile-99.9")(name="x")
    for i in range(4):  # 400k values > capacity: a uniform sample is kept
        obs.observe(torch.rand(100_000, generator=_gen(i)) * 2 - 1)
    lo, hi = obs._range(8, False)
    assert abs(float(hi) - 0.998) < 0.003 and abs(float(lo) + 0.998) < 0.003
    s, z = obs.qparams(8, False)
    assert abs(float(s) * 255 - 2 * 0.998) < 0.01


def _gauss_mse_optimum(bits: int) -> float:
    """float64 reference: the symmetric clip c minimising E[(x - Q_c(x))^2] for x ~ N(0, 1)."""
    xs = np.linspace(-10, 10, 400_001)
    pdf = np.exp(-xs ** 2 / 2) / math.sqrt(2 * math.pi)
    qmin, qmax = qrange(bits, True)

    def err(c):
        s = c / qmax
        q = np.clip(np.rint(xs / s), qmin, qmax) * s
        return float(np.sum((xs - q) ** 2 * pdf) * (xs[1] - xs[0]))

    cs = np.linspace(1.0, 5.0, 801)
    return float(cs[int(np.argmin([err(c) for c in cs]))])


def test_mse_gaussian_matches_float64_optimum():
    obs = OBSERVERS.get("mse")(name="x")
    obs.observe(torch.randn(120_000, generator=_gen(3)))
    _, hi = obs._range(4, True)
    ref = _gauss_mse_optimum(4)
    assert 2.3 < ref < 2.8  # Banner et al.: ~2.5 sigma at 4 bits
    assert abs(float(hi) - ref) / ref < 0.06
    x = obs.samples
    assert quant_mse(x, -hi, hi, 4, True) <= quant_mse(x, obs.min_, obs.max_, 4, True)


def test_kl_keeps_uniform_range_and_clips_outliers():
    obs = OBSERVERS.get("kl")(name="x")
    obs.observe(torch.rand(60_000, generator=_gen(4)))  # one-sided uniform: clipping only hurts
    lo, hi = obs._range(8, False)
    assert float(lo) == 0.0 and float(hi) > 0.97
    obs = OBSERVERS.get("kl")(name="x")
    x = torch.randn(60_000, generator=_gen(5))
    x[:5] = 60.0  # a few huge outliers
    obs.observe(x)
    lo, hi = obs._range(8, False)
    assert 3.0 < float(hi) < 20.0 and float(lo) == -float(hi)


def test_per_channel_and_empty_are_typed_errors():
    with pytest.raises(DataError):
        OBSERVERS.get("mse")(axis=0, name="x")
    with pytest.raises(DataError):
        OBSERVERS.get("kl")(name="x").qparams()
    with pytest.raises(DataError):
        OBSERVERS.get("percentile")(name="x").observe(torch.tensor([float("nan")]))


@pytest.mark.slow
@pytest.mark.parametrize("method", ["percentile", "mse", "kl"])
def test_static_quantize_step_uses_observer(tiny_cnn, toy_data, method, tmp_path):
    import nnsqueeze as nsq

    recipe = [{"quantize": {"calibration": {"method": method, "samples": 64}}}]
    res = nsq.compress(tiny_cnn, recipe, calib_data=toy_data["calib"], eval_data=toy_data["eval"][:1],
                       progress=False)
    assert res.report["export"]["compressed"]["ort_int8_ops"]
