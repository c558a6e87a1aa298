"""Turning a :class:`ForecastBatch` into the long forecast table users read.

Columns: ``item_id, date, step, mean, p10, p50, p90, fallback`` — one row per item and
horizon bucket, ``date`` being the bucket start. The same shape is used by ``trendcast
forecast`` (CSV) and, per item, by the stream's forecast records.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from trendcast.forecasting.base import ForecastBatch, WindowBatch
from trendcast.freq import Freq

__all__ = ["forecast_frame", "horizon_starts_ms"]


def horizon_starts_ms(last_start_ms: np.ndarray, freq: Freq, horizon: int) -> np.ndarray:
    """Start (epoch ms) of each forecast bucket: the buckets after each window's last one.

    >>> from trendcast.freq import parse_freq
    >>> horizon_starts_ms(np.array([0]), parse_freq("1D"), 2).tolist()
    [[86400000, 172800000]]
    """
    steps = np.arange(1, horizon + 1, dtype=np.int64) * freq.step_ms
    return np.asarray(last_start_ms, dtype=np.int64)[:, None] + steps[None, :]


def forecast_frame(batch: WindowBatch, result: ForecastBatch, freq: Freq) -> pd.DataFrame:
    """Long table of forecasts, one row per item and horizon bucket."""
    n, horizon = result.mean.shape
    starts = horizon_starts_ms(batch.last_start_ms, freq, horizon)
    dates = pd.to_datetime(starts.ravel(), unit="ms")
    daily = freq.is_daily
    return pd.DataFrame(
        {
            "item_id": np.repeat(np.asarray(batch.item_ids, dtype=object), horizon),
            "date": dates.strftime("%Y-%m-%d") if daily else dates.strftime("%Y-%m-%dT%H:%M:%SZ"),
            "step": np.tile(np.arange(1, horizon + 1), n),
            "mean": result.mean.ravel().round(4),
            "p10": result.p10.ravel().round(4),
            "p50": result.p50.ravel().round(4),
            "p90": result.p90.ravel().round(4),
            "fallback": np.repeat(result.fallback, horizon),
        }
    )
