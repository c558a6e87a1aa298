"""How a trial is scored: the trained Keras model as a forecaster, its backtest scores, baselines.

:class:`KerasForecaster` spares each trial an ONNX export (see the package docstring:
export's parity check makes the two interchangeable).
"""

from __future__ import annotations

import logging
from typing import Literal, get_args

from training.trainer import TrainResult, predict_scaled
from trendcast.backtest import BacktestResult
from trendcast.data import Panel
from trendcast.forecasting.base import ForecastBatch, Forecaster, WindowBatch
from trendcast.forecasting.baselines import SeasonalNaiveForecaster, WindowMeanForecaster
from trendcast.forecasting.features import build_inputs
from trendcast.forecasting.onnx import unscale_outputs, with_fallback
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
        return with_fallback(batch, self.window, self._model_forecast, self._fallback)

    def _model_forecast(self, batch: WindowBatch) -> ForecastBatch:
        result = self._result
        x, scale = build_inputs(
            batch,
            result.features,
            result.scales,
            result.prices,
            result.freq,
            result.config.epsilon,
        )
        return unscale_outputs(*predict_scaled(result.model, x), scale)


def _scores(result: BacktestResult, name: str) -> dict[str, float]:
    row = result.metrics.loc[name].to_dict()
    return {k: float(row[k]) for k in _SCORES}


def _baselines(horizon: int, panel: Panel) -> list[Forecaster]:
    return [
        SeasonalNaiveForecaster(horizon, season_length(panel.freq)),
        WindowMeanForecaster(horizon, 28),
    ]
