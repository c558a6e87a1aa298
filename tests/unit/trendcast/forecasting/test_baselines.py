"""Generic output checks run against every baseline forecaster, plus per-method behaviour."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trendcast.forecasting.base import ForecastBatch, Forecaster, WindowBatch
from trendcast.forecasting.baselines import (
    NaiveForecaster,
    SeasonalNaiveForecaster,
    WindowMeanForecaster,
    ZeroForecaster,
)

HORIZON = 10

BASELINES = [
    pytest.param(lambda: ZeroForecaster(HORIZON), id="zero"),
    pytest.param(lambda: NaiveForecaster(HORIZON), id="naive"),
    pytest.param(lambda: SeasonalNaiveForecaster(HORIZON, 7), id="seasonal_naive7"),
    pytest.param(lambda: WindowMeanForecaster(HORIZON, 28), id="mean28"),
]


def make_batch(quantities: np.ndarray, history_len: list[int] | None = None) -> WindowBatch:
    q = np.asarray(quantities, dtype=np.float32)
    n, window = q.shape
    lengths = np.array(history_len if history_len is not None else [window] * n, dtype=np.int64)
    return WindowBatch(
        item_ids=[f"i{k}" for k in range(n)],
        quantities=q,
        prices=None,
        last_start_ms=np.full(n, 1_300_000_000_000, dtype=np.int64),
        history_len=lengths,
    )


def random_batch(n: int = 12, window: int = 35, seed: int = 0) -> WindowBatch:
    rng = np.random.default_rng(seed)
    q = rng.poisson(rng.uniform(0.1, 20.0, size=(n, 1)), size=(n, window)).astype(np.float32)
    lengths = rng.integers(1, window + 1, size=n)
    lengths[:3] = [1, 2, window]  # always include very short and full histories
    for row, length in enumerate(lengths):
        q[row, : window - length] = 0.0  # left padding is zeros
    return make_batch(q, lengths.tolist())


def check_output_shape(forecaster: Forecaster, batch: WindowBatch) -> ForecastBatch:
    """Contract of every forecaster: shapes, finite, non-negative, ordered quantiles."""
    fc = forecaster.predict(batch)
    n = len(batch)
    for name in ("mean", "p10", "p50", "p90"):
        arr = getattr(fc, name)
        assert arr.shape == (n, forecaster.horizon), name
        assert np.isfinite(arr).all(), name
        assert (arr >= 0).all(), name
    assert fc.fallback.shape == (n,) and fc.fallback.dtype == np.bool_
    assert (fc.p10 <= fc.p50).all() and (fc.p50 <= fc.p90).all()
    return fc


@pytest.mark.parametrize("make", BASELINES)
def test_contract_on_random_padded_batch(make):
    forecaster = make()
    assert isinstance(forecaster, Forecaster)
    assert forecaster.horizon == HORIZON and forecaster.name
    check_output_shape(forecaster, random_batch())


@pytest.mark.parametrize("make", BASELINES)
@pytest.mark.parametrize("window", [1, 2, 7, 8])
def test_contract_on_short_windows(make, window):
    rng = np.random.default_rng(window)
    q = rng.poisson(3.0, size=(4, window)).astype(np.float32)
    check_output_shape(make(), make_batch(q))


@pytest.mark.parametrize("make", BASELINES)
def test_contract_on_empty_and_all_zero_batches(make):
    empty = make_batch(np.zeros((0, 14)))
    assert len(make().predict(empty)) == 0
    fc = check_output_shape(make(), make_batch(np.zeros((3, 14))))
    assert (fc.p90 == 0).all()


def test_seasonal_naive_repeats_the_last_week():
    week = np.array([0, 1, 2, 3, 4, 5, 6], dtype=np.float32)
    q = np.tile(week + 10, 4)[None, :]
    fc = SeasonalNaiveForecaster(HORIZON, 7).predict(make_batch(q))
    np.testing.assert_array_equal(fc.mean[0], np.tile(week + 10, 2)[:HORIZON])
    # A perfectly weekly history has zero lag-7 errors: the band collapses onto the point.
    np.testing.assert_array_equal(fc.p10, fc.mean)
    np.testing.assert_array_equal(fc.p90, fc.mean)


def test_seasonal_naive_short_history_uses_the_mean_of_what_it_has():
    q = np.zeros((1, 14), dtype=np.float32)
    q[0, -3:] = [3.0, 6.0, 9.0]
    fc = SeasonalNaiveForecaster(HORIZON, 7).predict(make_batch(q, [3]))
    np.testing.assert_allclose(fc.mean, 6.0)


def test_naive_repeats_last_value():
    q = np.array([[1.0, 5.0, 2.0]], dtype=np.float32)
    fc = NaiveForecaster(HORIZON).predict(make_batch(q))
    np.testing.assert_array_equal(fc.mean, 2.0)


def test_window_mean_ignores_padding():
    q = np.zeros((1, 40), dtype=np.float32)
    q[0, -4:] = [1.0, 2.0, 3.0, 6.0]
    fc = WindowMeanForecaster(HORIZON, 28).predict(make_batch(q, [4]))
    np.testing.assert_allclose(fc.mean, 3.0)


def test_zero_forecaster_is_zero():
    fc = ZeroForecaster(HORIZON).predict(random_batch())
    assert not fc.mean.any() and not fc.p90.any()


@settings(max_examples=300, deadline=None)
@given(
    st.integers(1, 40),
    st.integers(1, 30),
    st.sampled_from([1.0, 0.37, 1e-3, 1e6]),
    st.floats(0.0, 1.0),
    st.integers(0, 2**32 - 1),
)
def test_row_nanquantiles_is_numpys_nanquantile(
    n: int, window: int, scale: float, full_share: float, seed: int
) -> None:
    """Bit-identical to ``np.nanquantile(axis=1)`` after the float32 cast the forecasters do."""
    import warnings

    from trendcast.forecasting.baselines import QUANTILES, row_nanquantiles

    rng = np.random.default_rng(seed)
    values = (rng.poisson(3, (n, window)) - rng.poisson(3, (n, window))).astype(np.float32)
    values = values * np.float32(scale) + rng.normal(size=(n, window)).astype(np.float32)
    history = np.where(rng.random(n) < full_share, window, rng.integers(0, window + 1, n))
    masked = np.where(np.arange(window)[None, :] >= (window - history)[:, None], values, np.nan)
    masked = masked.astype(np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN rows
        expected = np.nanquantile(masked, QUANTILES, axis=1).astype(np.float32)
    got = row_nanquantiles(masked).astype(np.float32)
    np.testing.assert_array_equal(got, expected)
