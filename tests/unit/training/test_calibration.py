"""The band calibration's math: misses counted as trendcast.metrics counts them, pooling, bounds."""

from __future__ import annotations

import numpy as np
import pytest

from training.calibration import (
    DEFAULT_TAIL,
    BandScales,
    fit_band_scales,
    pooled_steps,
    scale_band,
    tail_quantile,
    tail_ratios,
)
from trendcast.exceptions import ConfigError, ModelError
from trendcast.forecasting.onnx import unscale_outputs
from trendcast.metrics import coverage


def _intermittent(n: int = 600, horizon: int = 14, seed: int = 0):
    """Scaled actuals with many zeros and a model whose band is too narrow."""
    rng = np.random.default_rng(seed)
    rate = rng.gamma(0.8, 1.0, size=(n, 1))
    y = rng.poisson(rate * np.ones((1, horizon))).astype(np.float64)
    p50 = np.broadcast_to(rate * 0.8 - 0.2, y.shape).copy()
    down = np.full_like(y, 0.3)
    up = np.broadcast_to(rate * 0.5 + 0.1, y.shape).copy()
    return y, p50, down, up


def _served_coverage(y, p50, down, up, band: BandScales) -> tuple[float, float, float]:
    """Coverage and tail shares of the forecast as the worker serves it (clipped, sorted)."""
    raw = np.stack([p50 - down, p50, p50 + up], axis=-1)
    q = scale_band(raw, band).astype(np.float32)
    scale = np.full(y.shape[0], 3.0, np.float32)  # any positive item scale
    out = unscale_outputs(q[..., 1], q, scale)
    actual = (y * 3.0).astype(np.float32)
    below = float((actual < out.p10).mean())
    above = float((actual > out.p90).mean())
    return coverage(actual, out.p10, out.p90), below, above


def test_misses_are_counted_as_the_served_forecast_is_scored() -> None:
    y, p50, down, up = _intermittent()
    band = fit_band_scales(y, p50, down, up, high=4.0)
    cov, below, above = _served_coverage(y, p50, down, up, band)
    assert below == pytest.approx(band.below_after, abs=1e-9)
    assert above == pytest.approx(band.above_after, abs=1e-9)
    assert cov == pytest.approx(1.0 - band.below_after - band.above_after, abs=1e-9)
    identity = BandScales(np.ones(14), np.ones(14), 0, 0, 0, 0)
    cov0, below0, above0 = _served_coverage(y, p50, down, up, identity)
    assert (below0, above0) == pytest.approx((band.below_before, band.above_before), abs=1e-9)
    assert cov0 < 0.75 < cov  # the narrow band widens towards 0.8


@pytest.mark.parametrize("tail", [0.1, DEFAULT_TAIL])
def test_each_tail_holds_its_share_when_it_can(tail: float) -> None:
    rng = np.random.default_rng(1)
    y = rng.gamma(20.0, 5.0, size=(300, 28))  # smooth and high: no zeros, no clipping
    p50 = np.full_like(y, 100.0)
    offsets = np.full_like(y, 12.0)
    band = fit_band_scales(y, p50, offsets, offsets, high=3.0, tail=tail)
    assert band.below_before > 0.25 and band.above_before > 0.25
    assert band.below_after == pytest.approx(tail, abs=0.01)
    assert band.above_after == pytest.approx(tail, abs=0.01)
    assert np.all(band.p10 > 1.5) and np.all(band.p90 > 1.5)  # sd 22 vs offsets 12


def test_zero_actuals_are_never_above_the_band() -> None:
    lower, upper = tail_ratios([[0.0, 0.0]], [[-1.0, 2.0]], [[1.0, 1.0]], [[1.0, 1.0]])
    assert upper.tolist() == [[-np.inf, -np.inf]]
    # Below the band only when p10 > 0, i.e. the factor is under p50 / down.
    assert lower.tolist() == [[-1.0, 2.0]]


def test_a_tail_that_cannot_reach_its_share_keeps_the_lower_bound() -> None:
    y = np.zeros((50, 7))
    p50 = np.full_like(y, -0.5)  # a zero median: no factor can put a zero outside the band
    band = fit_band_scales(y, p50, np.ones_like(y), np.ones_like(y), low=0.5, high=3.0)
    assert band.p10.tolist() == [0.5] * 7 and band.p90.tolist() == [0.5] * 7
    assert band.below_after == band.above_after == 0.0


def test_factors_are_bounded() -> None:
    rng = np.random.default_rng(2)
    y = rng.normal(100.0, 30.0, size=(200, 7)).clip(0)
    tiny = np.full_like(y, 0.01)
    band = fit_band_scales(y, np.full_like(y, 100.0), tiny, tiny, low=0.5, high=3.0)
    assert band.p10.tolist() == [3.0] * 7 and band.p90.tolist() == [3.0] * 7
    huge = np.full_like(y, 1e4)
    band = fit_band_scales(y, np.full_like(y, 100.0), huge, huge, low=0.5, high=3.0)
    assert band.p10.tolist() == [0.5] * 7 and band.p90.tolist() == [0.5] * 7


def test_few_rows_pool_more_steps() -> None:
    # 40 series: 25 steps give the 1,000 cells; many series: the week minimum.
    assert {s.stop - s.start for s in pooled_steps(28, 40)} == {25}
    assert {s.stop - s.start for s in pooled_steps(28, 5_000)} == {7}
    assert {s.stop - s.start for s in pooled_steps(7, 3)} == {7}
    windows = pooled_steps(28, 5_000)
    assert all(w.start <= step < w.stop for step, w in enumerate(windows))


def test_pooling_smooths_noisy_steps() -> None:
    """Per-step quantiles of 40 rows jump around; pooled ones stay close to the truth."""
    rng = np.random.default_rng(3)
    y = rng.normal(0.0, 1.0, size=(40, 28)) + 10.0
    args = (y, np.full_like(y, 10.0), np.ones_like(y), np.ones_like(y))
    alone = fit_band_scales(*args, min_steps=1, min_cells=1)
    pooled = fit_band_scales(*args)
    truth = 1.2816
    assert np.abs(pooled.p90 - truth).max() < np.abs(alone.p90 - truth).max()
    assert np.ptp(pooled.p90) < np.ptp(alone.p90)


def test_tail_quantile_counts_ties_as_inside() -> None:
    ratios = np.array([1.0] * 5 + [2.0] * 5)
    assert tail_quantile(ratios, 0.1) == 2.0  # at 2.0 nothing is strictly above
    assert tail_quantile(ratios, 0.5) == 1.0  # at 1.0 half is above


def test_bad_input_is_refused() -> None:
    y = np.ones((3, 2))
    with pytest.raises(ConfigError, match="tail"):
        fit_band_scales(y, y, y, y, tail=0.6)
    with pytest.raises(ConfigError, match="low"):
        fit_band_scales(y, y, y, y, low=1.5)
    with pytest.raises(ModelError, match="expected forecasts of shape"):
        fit_band_scales(y, y[:, :1], y, y)
    empty = fit_band_scales(np.zeros((0, 2)), np.zeros((0, 2)), np.zeros((0, 2)), np.zeros((0, 2)))
    assert empty.p10.tolist() == [1.0, 1.0]


def test_as_dict_is_json_ready() -> None:
    y, p50, down, up = _intermittent(n=100, horizon=7)
    facts = fit_band_scales(y, p50, down, up).as_dict()
    assert len(facts["p10"]) == len(facts["p90"]) == 7
    assert 0.0 <= facts["coverage_before"] <= 1.0 and 0.0 <= facts["coverage_after"] <= 1.0
