"""Known values and edge cases of trendcast.metrics."""

from __future__ import annotations

import math

import numpy as np
import pytest

from trendcast import metrics as m


def test_wape_of_zero_forecast_is_exactly_one():
    rng = np.random.default_rng(0)
    y = rng.poisson(2.0, size=(50, 28)).astype(float)
    assert m.wape(y, np.zeros_like(y)) == 1.0


def test_wape_all_zero_actuals_is_nan():
    assert math.isnan(m.wape(np.zeros((2, 3)), np.ones((2, 3))))


def test_wape_pools_items_and_steps():
    y = np.array([[10.0, 0.0], [0.0, 10.0]])
    p50 = np.array([[5.0, 0.0], [0.0, 15.0]])
    assert m.wape(y, p50) == pytest.approx(10.0 / 20.0)


def test_naive_scales_known_values_and_nan_padding():
    sq, ab = m.naive_scales([[np.nan, np.nan, 0.0, 2.0, 0.0], [1.0, 2.0, 4.0, 7.0, 11.0]])
    assert sq.tolist() == [4.0, pytest.approx((1 + 4 + 9 + 16) / 4)]
    assert ab.tolist() == [2.0, 2.5]


def test_rmsse_known_value():
    y = np.array([[2.0, 4.0, 6.0]])
    f = np.array([[1.0, 4.0, 9.0]])
    # mse = (1 + 0 + 9) / 3; scale 2.5 -> sqrt(10 / 3 / 2.5)
    assert m.rmsse(y, f, [2.5])[0] == pytest.approx(math.sqrt(10 / 3 / 2.5))


def test_mase_equals_twice_scaled_median_pinball():
    rng = np.random.default_rng(1)
    y = rng.poisson(3.0, size=(20, 7)).astype(float)
    q = rng.poisson(3.0, size=(20, 7)).astype(float)
    scale = rng.uniform(0.5, 2.0, size=20)
    np.testing.assert_allclose(m.mase(y, q, scale), 2 * m.pinball(y, q, 0.5, scale))


def test_pinball_asymmetry():
    y = np.array([[10.0]])
    assert m.pinball(y, [[0.0]], 0.9)[0] == pytest.approx(9.0)  # under-forecast: tau * 10
    assert m.pinball(y, [[20.0]], 0.9)[0] == pytest.approx(1.0)  # over-forecast: 0.1 * 10
    with pytest.raises(ValueError, match="quantile level"):
        m.pinball(y, y, 1.0)


def test_coverage_counts_bounds_inclusive():
    y = np.array([[0.0, 1.0, 2.0, 3.0, 4.0]])
    assert m.coverage(y, np.full_like(y, 1.0), np.full_like(y, 3.0)) == pytest.approx(0.6)


def test_zero_scale_rows_are_excluded_and_counted():
    y = np.array([[1.0, 2.0], [5.0, 0.0], [3.0, 3.0]])
    f = np.zeros_like(y)
    history = np.array([[0.0, 1.0, 0.0], [4.0, 4.0, 4.0], [np.nan, np.nan, 2.0]])
    sq, ab = m.naive_scales(history)
    assert sq[1] == 0.0 and math.isnan(sq[2])
    s = m.score(y, f, f, f, f, sq, ab)
    assert s.n_rows == 3 and s.n_unscaled == 2
    # Only row 0 is scaled: rmsse = sqrt((1 + 4) / 2 / 1), finite despite the zero scale.
    assert s.rmsse == pytest.approx(math.sqrt(2.5))
    assert s.mase == pytest.approx(1.5)
    # WAPE and coverage use every row.
    assert s.wape == 1.0
    assert s.coverage == pytest.approx(1 / 6)  # the one zero actual lies in [0, 0]


def test_all_unscaled_gives_nan_not_error():
    y = np.ones((2, 3))
    s = m.score(y, y, y, y, y, [0.0, 0.0], [0.0, 0.0])
    assert math.isnan(s.rmsse) and math.isnan(s.mase) and s.n_unscaled == 2


def test_perfect_forecast_scores_zero():
    rng = np.random.default_rng(2)
    y = rng.poisson(4.0, size=(10, 14)).astype(float)
    ones = np.ones(10)
    s = m.score(y, y, y, y, y, ones, ones)
    assert (s.rmsse, s.mase, s.wape, s.pinball, s.coverage) == (0.0, 0.0, 0.0, 0.0, 1.0)


def test_shape_mismatch_raises():
    with pytest.raises(ValueError, match="expected forecasts of shape"):
        m.rmsse(np.zeros((2, 3)), np.zeros((2, 4)), [1.0, 1.0])
    with pytest.raises(ValueError, match="expected scales"):
        y = np.zeros((2, 3))
        m.score(y, y, y, y, y, [1.0], [1.0])


def test_rmsse_by_step_matches_one_step_rmsse():
    rng = np.random.default_rng(3)
    y = rng.poisson(3.0, size=(8, 5)).astype(float)
    f = rng.poisson(3.0, size=(8, 5)).astype(float)
    scale = rng.uniform(0.5, 2.0, size=8)
    by_step = m.rmsse_by_step(y, f, scale)
    for h in range(5):
        assert by_step[h] == pytest.approx(np.mean(m.rmsse(y[:, [h]], f[:, [h]], scale)))
