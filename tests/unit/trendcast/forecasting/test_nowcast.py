"""Nowcast and alert math: limits, monotonicity, and the tail approximations."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from trendcast.forecasting.nowcast import (
    alert_probabilities,
    gamma_sf,
    nb_shape,
    nowcast,
)

MEAN, P10, P50, P90 = (np.array([v]) for v in (12.0, 3.0, 10.0, 24.0))


def test_start_is_the_forecast_and_end_is_what_sold() -> None:
    start = nowcast(MEAN, P10, P50, P90, [0.0], [0.0])
    assert (start.nowcast[0], start.p10[0], start.p50[0], start.p90[0]) == (12.0, 3.0, 10.0, 24.0)
    end = nowcast(MEAN, P10, P50, P90, [1.0], [30.0])
    assert (end.nowcast[0], end.p10[0], end.p90[0]) == (30.0, 30.0, 30.0)


def test_on_track_sales_keep_the_forecast() -> None:
    n = nowcast(MEAN, P10, P50, P90, [0.5], [6.0])
    assert n.expected_so_far[0] == 6.0
    assert n.nowcast[0] == pytest.approx(12.0)


def test_credibility_grows_with_the_elapsed_share_and_the_spread() -> None:
    shares = np.array([0.1, 0.5, 0.9])
    wide = nowcast(np.full(3, 12.0), np.full(3, 1.0), np.full(3, 10.0), np.full(3, 40.0), shares, 0)
    assert np.all(np.diff(wide.credibility) > 0)
    sharp = nowcast(
        np.full(3, 12.0), np.full(3, 8.0), np.full(3, 12.0), np.full(3, 16.0), shares, 0
    )
    assert np.all(sharp.credibility < wide.credibility)


@given(
    mean=st.floats(0.0, 500.0),
    spread=st.floats(0.0, 3.0),
    share=st.floats(0.0, 1.0),
    sold=st.floats(0.0, 2_000.0),
)
def test_band_is_ordered_and_never_below_what_sold(
    mean: float, spread: float, share: float, sold: float
) -> None:
    p10, p90 = mean * max(0.0, 1 - spread), mean * (1 + spread)
    n = nowcast([mean], [p10], [mean], [p90], [share], [sold])
    assert sold <= n.p10[0] <= n.p50[0] <= n.p90[0]
    assert n.nowcast[0] >= sold
    assert np.isfinite(n.nowcast[0]) and 0.0 <= n.credibility[0] < 1.0


def test_more_sold_means_a_higher_nowcast() -> None:
    sold = np.array([0.0, 3.0, 6.0, 12.0, 40.0])
    k = len(sold)
    n = nowcast(np.full(k, 12.0), np.full(k, 3.0), np.full(k, 10.0), np.full(k, 24.0), 0.5, sold)
    assert np.all(np.diff(n.nowcast) > 0)


def test_surge_and_stall_probabilities() -> None:
    sold = np.array([0.0, 6.0, 15.0, 40.0])
    k = len(sold)
    a = alert_probabilities(np.full(k, 12.0), np.full(k, 3.0), np.full(k, 24.0), 0.5, sold)
    assert a.surge[0] == 1.0 and np.all(np.diff(a.surge) < 0)
    assert a.surges(sold, 0.01).tolist() == [False, False, False, True]
    assert a.stalls(sold, 0.5).tolist() == [True, False, False, False]
    # Stall probability falls as the day goes on without a sale.
    shares = np.array([0.1, 0.5, 0.9])
    stall = alert_probabilities(np.full(3, 12.0), np.full(3, 3.0), np.full(3, 24.0), shares, 0)
    assert np.all(np.diff(stall.stall) < 0)


def test_poisson_limit_of_the_stall_probability() -> None:
    # A forecast as sharp as Poisson: P(0 by t) = exp(-mean * share).
    a = alert_probabilities([10.0], [9.0], [11.0], [0.3], [0.0])
    assert nb_shape([10.0], [9.0], [11.0])[0] == 1e6
    assert a.stall[0] == pytest.approx(np.exp(-3.0), rel=1e-4)


def test_zero_forecast_flags_a_sale_as_a_surge() -> None:
    a = alert_probabilities([0.0], [0.0], [0.0], [0.5], [3.0])
    assert a.surge[0] < 1e-4


@pytest.mark.parametrize("shape", [0.5, 1.0, 4.0, 30.0])
def test_gamma_tail_matches_scipy(shape: float) -> None:
    stats = pytest.importorskip("scipy.stats")
    mean = 20.0
    var = mean**2 / shape
    for p in (0.1, 0.01, 0.001):
        y = stats.gamma(shape, scale=var / mean).isf(p)
        assert gamma_sf([y], [mean], [var])[0] == pytest.approx(p, rel=0.2)
