"""Validation scores of the trained model and of simple baselines on the same windows.

TensorFlow-free (numpy only), so ``export`` can score the INT8 model with the same code. One
validation row per item: its last ``horizon`` buckets, forecast from the window before them.
The metrics themselves are :mod:`trendcast.metrics` (the definitions the backtests use).
"""

from __future__ import annotations

import logging

import numpy as np
import numpy.typing as npt

from trendcast.forecasting.base import ForecastBatch, Forecaster, WindowBatch
from trendcast.forecasting.baselines import (
    SeasonalNaiveForecaster,
    WindowMeanForecaster,
    ZeroForecaster,
)
from trendcast.metrics import score

__all__ = ["HEADLINE", "baseline_scores", "score_forecast"]

logger = logging.getLogger(__name__)

F32 = npt.NDArray[np.float32]
F64 = npt.NDArray[np.float64]

# The headline numbers kept in bundle.json and summary tables.
HEADLINE = ("rmsse", "wape", "mase", "pinball", "coverage")


def score_forecast(
    y: F32 | F64, forecast: ForecastBatch, scale_sq: F64, scale_abs: F64
) -> dict[str, float]:
    """Headline scores (RMSSE of mean, WAPE of p50, MASE, pinball, coverage) of a forecast."""
    scores = score(
        y, forecast.mean, forecast.p10, forecast.p50, forecast.p90, scale_sq, scale_abs
    ).as_dict()
    return {k: float(scores[k]) for k in HEADLINE}


def baseline_scores(
    batch: WindowBatch,
    y: F32 | F64,
    scale_sq: F64,
    scale_abs: F64,
    horizon: int,
    *,
    season: int = 7,
) -> dict[str, dict[str, float]]:
    """Scores of zero, seasonal-naive and 28-bucket mean on the validation windows.

    ``season``: the seasonal-naive period in buckets (:func:`trendcast.freq.season_length`
    of the data: 7 for daily buckets, 60 for one-minute ones).
    """
    forecasters: list[Forecaster] = [
        ZeroForecaster(horizon),
        SeasonalNaiveForecaster(horizon, season),
        WindowMeanForecaster(horizon, 28),
    ]
    return {f.name: score_forecast(y, f.predict(batch), scale_sq, scale_abs) for f in forecasters}
