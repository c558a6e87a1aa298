"""Baseline forecasters: all-zero, naive, seasonal-naive and window mean.

They are the bar the LSTM must clear in backtests, and seasonal-naive is also the fallback
for items with too little history. Quantiles come from the empirical distribution of each
method's own in-window errors (what the method would have got wrong recently), added to its
point forecast and clipped at zero — simple, distribution-free and honest about intermittency.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from trendcast.forecasting.base import ForecastBatch, WindowBatch

__all__ = [
    "NaiveForecaster",
    "SeasonalNaiveForecaster",
    "WindowMeanForecaster",
    "ZeroForecaster",
    "seasonal_naive",
]

F32 = npt.NDArray[np.float32]
F64 = npt.NDArray[np.float64]
QUANTILES = (0.1, 0.5, 0.9)


def seasonal_naive(
    quantities: F32, history_len: npt.NDArray[np.int64], season: int, horizon: int
) -> F32:
    """Repeat each window's last ``season`` buckets over the horizon.

    Items with less than one season of history repeat the mean of what they have.

    >>> q = np.array([[0, 1, 2, 3, 4, 5, 6, 7]], dtype=np.float32)
    >>> seasonal_naive(q, np.array([8]), 3, 5).tolist()
    [[5.0, 6.0, 7.0, 5.0, 6.0]]
    >>> padded = np.array([[0, 0, 0, 0, 0, 0, 6, 7]], dtype=np.float32)
    >>> seasonal_naive(padded, np.array([2]), 3, 2).tolist()
    [[6.5, 6.5]]
    """
    n, window = quantities.shape
    season = min(season, window)
    last = quantities[:, window - season :]
    reps = -(-horizon // season)
    out = np.tile(last, (1, reps))[:, :horizon].astype(np.float32)
    short = history_len < season
    if short.any():
        sums = quantities[short].sum(axis=1)
        means = sums / np.maximum(history_len[short], 1)
        out[short] = means[:, None]
    return out


def row_nanquantiles(values: F32, quantiles: tuple[float, ...] = QUANTILES) -> F64:
    """``np.nanquantile(values, quantiles, axis=1)`` (linear method), vectorised.

    numpy reduces a NaN-holding array row by row in Python (``apply_along_axis``), which
    made the quantiles of the fallback forecaster most of the worker's inference time for
    items with a short history. This sorts every row at once (NaN last) and interpolates
    as numpy does — the same virtual index ``(n - 1) * q``, the same two-sided lerp with
    the difference taken in the input's dtype — so the results are bit-identical once cast
    back to float32 (tests/unit/trendcast/forecasting/test_baselines.py compares them). Rows
    without a value
    give NaN, as numpy's do.

    >>> row_nanquantiles(np.array([[1, 2, np.nan, 4], [np.nan] * 4], dtype=np.float32)).tolist()
    [[1.2, nan], [2.0, nan], [3.6, nan]]
    """
    ordered = np.sort(values, axis=1)
    counts = np.count_nonzero(~np.isnan(values), axis=1)
    out = np.full((len(quantiles), values.shape[0]), np.nan, dtype=np.float64)
    rows = np.flatnonzero(counts > 0)
    n = counts[rows]
    for i, q in enumerate(quantiles):
        virtual = (n - 1) * np.float64(q)
        below = np.floor(virtual)
        gamma = virtual - below
        lo = below.astype(np.intp)
        a, b = ordered[rows, lo], ordered[rows, np.minimum(lo + 1, n - 1)]
        diff = b - a
        out[i, rows] = np.where(gamma >= 0.5, b - diff * (1 - gamma), a + diff * gamma)
    return out


def _error_quantiles(point: F32, errors: F32, valid: npt.NDArray[np.bool_]) -> tuple[F32, F32, F32]:
    """Add empirical error quantiles (per row, over valid in-window errors) to a point forecast."""
    if point.shape[0] == 0:
        return point.copy(), point.copy(), point.copy()
    masked = np.where(valid, errors, np.nan)
    # Rows without any valid error (a single bucket of history) give NaN: treated as 0.
    qs = np.nan_to_num(row_nanquantiles(masked), nan=0.0).astype(np.float32)  # [3, n]
    p10, p50, p90 = (np.maximum(point + qs[i][:, None], 0.0).astype(np.float32) for i in range(3))
    return np.minimum(p10, p50), p50, np.maximum(p90, p50)


def _valid_mask(batch: WindowBatch, lag: int) -> npt.NDArray[np.bool_]:
    """Positions whose value and its ``lag``-earlier value are both real history."""
    cols = np.arange(batch.window)[None, :]
    first_real = (batch.window - batch.history_len)[:, None]
    return (cols - lag >= first_real) & (cols >= lag)


def _lagged_batch(batch: WindowBatch, point: F32, lag: int, name: str) -> ForecastBatch:
    q = batch.quantities
    errors = np.zeros_like(q)
    # A one-bucket window has no lagged pair (lag 0 would slice ``q[:, :-0]`` to nothing):
    # its errors stay empty and the quantiles collapse onto the point forecast.
    lag = max(lag, 1)
    if lag < batch.window:
        errors[:, lag:] = q[:, lag:] - q[:, :-lag]
    p10, p50, p90 = _error_quantiles(point, errors, _valid_mask(batch, lag))
    return ForecastBatch(
        mean=point, p10=p10, p50=p50, p90=p90, fallback=np.zeros(len(batch), dtype=bool)
    )


class ZeroForecaster:
    """Forecasts zero everywhere: the bar for intermittent demand (its WAPE is exactly 1)."""

    def __init__(self, horizon: int) -> None:
        self._horizon = horizon

    @property
    def name(self) -> str:
        return "zero"

    @property
    def horizon(self) -> int:
        return self._horizon

    def predict(self, batch: WindowBatch) -> ForecastBatch:
        zeros = np.zeros((len(batch), self._horizon), dtype=np.float32)
        return ForecastBatch(zeros, zeros, zeros, zeros, np.zeros(len(batch), dtype=bool))


class SeasonalNaiveForecaster:
    """Repeats the last season (default 7 buckets: a week of days); ``season=1`` is naive."""

    def __init__(self, horizon: int, season: int = 7) -> None:
        self._horizon = horizon
        self.season = season

    @property
    def name(self) -> str:
        return "naive" if self.season == 1 else f"seasonal_naive{self.season}"

    @property
    def horizon(self) -> int:
        return self._horizon

    def predict(self, batch: WindowBatch) -> ForecastBatch:
        point = seasonal_naive(batch.quantities, batch.history_len, self.season, self._horizon)
        return _lagged_batch(batch, point, min(self.season, batch.window - 1), self.name)


class NaiveForecaster(SeasonalNaiveForecaster):
    """Repeats the last bucket."""

    def __init__(self, horizon: int) -> None:
        super().__init__(horizon, season=1)


class WindowMeanForecaster:
    """Forecasts the mean of the last ``length`` buckets (default 28) for every step."""

    def __init__(self, horizon: int, length: int = 28) -> None:
        self._horizon = horizon
        self.length = length

    @property
    def name(self) -> str:
        return f"mean{self.length}"

    @property
    def horizon(self) -> int:
        return self._horizon

    def predict(self, batch: WindowBatch) -> ForecastBatch:
        length = min(self.length, batch.window)
        recent = batch.quantities[:, batch.window - length :]
        real = np.minimum(batch.history_len, length).astype(np.float32)
        level = recent.sum(axis=1) / np.maximum(real, 1.0)
        point = np.repeat(level[:, None], self._horizon, axis=1).astype(np.float32)
        errors = (batch.quantities - level[:, None]).astype(np.float32)
        cols = np.arange(batch.window)[None, :]
        valid = cols >= (batch.window - np.minimum(batch.history_len, length))[:, None]
        p10, p50, p90 = _error_quantiles(point, errors, valid)
        return ForecastBatch(
            mean=point, p10=p10, p50=p50, p90=p90, fallback=np.zeros(len(batch), dtype=bool)
        )
