"""How a trial is scored: the trained Keras model as a forecaster, its backtest scores, baselines.

:class:`KerasForecaster` spares each trial an ONNX export (see the package docstring:
export's parity check makes the two interchangeable).
"""

from __future__ import annotations

import logging
from typing import Literal, get_args

import numpy as np

from training.trainer import TrainResult, predict_scaled
from trendcast.backtest import BacktestResult
from trendcast.data import Panel
from trendcast.forecasting.base import ForecastBatch, Forecaster, WindowBatch
from trendcast.forecasting.baselines import SeasonalNaiveForecaster, WindowMeanForecaster
from trendcast.forecasting.features import build_inputs
from trendcast.forecasting.onnx import unscale_outputs
from trendcast.freq import season_length

__all__ = [
    "METRICS",
    "KerasForecaster",
    "Metric",
]

logger = logging.getLogger(__name__)

Metric = Literal["rmsse", "wape", "pinball"]
METRICS: tuple[str, ...] = get_args(Metric)
_SCORES = ("rmsse", "wape", "mase", "pinball", "coverage", "fallback_share")


class KerasForecaster:
    """A trained Keras model as a :class:`~trendcast.forecasting.base.Forecaster` (``lstm``).

    Mirrors :class:`~trendcast.forecasting.onnx.OnnxForecaster` without the ONNX export: the
    same :func:`~trendcast.forecasting.features.build_inputs` with the training run's scales,
    prices and epsilon, the same unscaling, and the same seasonal-naive fallback for items
    with less than ``window`` buckets of history (or a non-finite forecast). The Keras model
    already holds the frozen blend and calibration layers the ONNX graph is converted from.
    """

    def __init__(self, result: TrainResult) -> None:
        self._result = result
        self._fallback = SeasonalNaiveForecaster(result.config.horizon, season_length(result.freq))

    @property
    def name(self) -> str:
        """``lstm``."""
        return "lstm"

    @property
    def horizon(self) -> int:
        """Buckets forecast."""
        return self._result.config.horizon

    @property
    def window(self) -> int:
        """Buckets of history the model reads."""
        return self._result.config.window

    def predict(self, batch: WindowBatch) -> ForecastBatch:
        """Forecast every window of ``batch`` (model or fallback, flagged)."""
        n, h = len(batch), self.horizon
        mean = np.zeros((n, h), np.float32)
        p10, p50, p90 = mean.copy(), mean.copy(), mean.copy()
        fallback = batch.history_len < self.window
        rows = np.flatnonzero(~fallback)
        if rows.size:
            result = self._result
            x, scale = build_inputs(
                batch.take(rows),
                result.features,
                result.scales,
                result.prices,
                result.freq,
                result.config.epsilon,
            )
            out = unscale_outputs(*predict_scaled(result.model, x), scale)
            finite = np.isfinite(out.mean).all(axis=1) & np.isfinite(out.p90).all(axis=1)
            fallback[rows[~finite]] = True
            ok = rows[finite]
            mean[ok], p10[ok] = out.mean[finite], out.p10[finite]
            p50[ok], p90[ok] = out.p50[finite], out.p90[finite]
        fb_rows = np.flatnonzero(fallback)
        if fb_rows.size:
            fb = self._fallback.predict(batch.take(fb_rows))
            mean[fb_rows], p10[fb_rows], p50[fb_rows], p90[fb_rows] = (
                fb.mean,
                fb.p10,
                fb.p50,
                fb.p90,
            )
        return ForecastBatch(mean=mean, p10=p10, p50=p50, p90=p90, fallback=fallback)


def _scores(result: BacktestResult, name: str) -> dict[str, float]:
    row = result.metrics.loc[name].to_dict()
    return {k: float(row[k]) for k in _SCORES}


def _baselines(horizon: int, panel: Panel) -> list[Forecaster]:
    return [
        SeasonalNaiveForecaster(horizon, season_length(panel.freq)),
        WindowMeanForecaster(horizon, 28),
    ]
