"""Scoring the forecasts and laying them out as the frames of a backtest result.

Metrics pool every origin and item of a model (:class:`Pooled`), so all models are scored on
the same targets; the definitions are :mod:`trendcast.metrics`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import pandas as pd

from trendcast.backtest.forecasts import Forecast
from trendcast.backtest.inputs import Grid, OriginInputs
from trendcast.metrics import rmsse_by_step, score

__all__ = ["Pooled", "error_by_step", "forecast_frames", "metrics_frame", "plot_context"]

logger = logging.getLogger(__name__)

F64 = npt.NDArray[np.float64]


@dataclass(frozen=True)
class Pooled:
    """One model's forecasts at all origins stacked row-wise (one row per item and origin).

    Metrics pool every origin and item, so each model is scored on exactly the same targets.
    """

    actual: F64
    scale_sq: F64
    scale_abs: F64
    mean: F64
    p10: F64
    p50: F64
    p90: F64
    fallback: npt.NDArray[np.bool_]

    @classmethod
    def of(cls, parts: Sequence[Forecast]) -> Pooled:
        """Stack the per-origin forecasts of one model, oldest origin first."""
        return cls(
            actual=np.concatenate([p.inputs.actual for p in parts]),
            scale_sq=np.concatenate([p.inputs.scale_sq for p in parts]),
            scale_abs=np.concatenate([p.inputs.scale_abs for p in parts]),
            mean=np.concatenate([p.mean for p in parts]),
            p10=np.concatenate([p.p10 for p in parts]),
            p50=np.concatenate([p.p50 for p in parts]),
            p90=np.concatenate([p.p90 for p in parts]),
            fallback=np.concatenate([p.fallback for p in parts]),
        )


def metrics_frame(pooled: Mapping[str, Pooled], seconds: Mapping[str, float]) -> pd.DataFrame:
    """:attr:`BacktestResult.metrics`: one row per model, in the forecasters' order."""
    return pd.DataFrame(
        [_metrics_row(name, p, seconds[name]) for name, p in pooled.items()]
    ).set_index("model")


def _metrics_row(name: str, pooled: Pooled, seconds: float) -> dict[str, Any]:
    """One model's scores plus its fallback share and ``predict`` time.

    The fallback share says how much of a model's score is really its fallback's.
    """
    y = pooled.actual
    scores = score(
        y, pooled.mean, pooled.p10, pooled.p50, pooled.p90, pooled.scale_sq, pooled.scale_abs
    )
    return {
        "model": name,
        **scores.as_dict(),
        "fallback_share": float(pooled.fallback.mean()) if len(y) else float("nan"),
        "predict_seconds": seconds,
    }


def error_by_step(pooled: Mapping[str, Pooled], horizon: int) -> pd.DataFrame:
    """:attr:`BacktestResult.by_step`: how each model's error grows with the lead time."""
    return pd.concat(
        [_model_error_by_step(name, p, horizon) for name, p in pooled.items()], ignore_index=True
    )


def _model_error_by_step(name: str, pooled: Pooled, horizon: int) -> pd.DataFrame:
    """``model, step, rmsse, mae, wape`` of one model, one row per horizon step.

    WAPE is NaN at a step where nothing sold (no denominator).
    """
    abs_err = np.abs(pooled.actual - pooled.p50)
    denom = np.abs(pooled.actual).sum(axis=0)
    return pd.DataFrame(
        {
            "model": name,
            "step": np.arange(1, horizon + 1),
            "rmsse": rmsse_by_step(pooled.actual, pooled.mean, pooled.scale_sq),
            "mae": abs_err.mean(axis=0),
            "wape": np.divide(
                abs_err.sum(axis=0), denom, out=np.full(horizon, np.nan), where=denom > 0
            ),
        }
    )


def forecast_frames(
    forecasts: Mapping[str, Sequence[Forecast]], horizon: int, td: pd.Timedelta
) -> pd.DataFrame:
    """:attr:`BacktestResult.forecasts`: every model's forecasts as long rows, model by model."""
    return pd.concat(
        [
            _forecast_frame(name, forecast, horizon, td)
            for name, parts in forecasts.items()
            for forecast in parts
        ],
        ignore_index=True,
    )


def _forecast_frame(name: str, forecast: Forecast, horizon: int, td: pd.Timedelta) -> pd.DataFrame:
    """One model's forecast at one origin, one row per item and step (for plots and files)."""
    origin, items = forecast.inputs.origin, forecast.inputs.batch.item_ids
    n = len(items)
    return pd.DataFrame(
        {
            "model": name,
            "origin": origin,
            "item_id": np.repeat(items, horizon),
            "step": np.tile(np.arange(1, horizon + 1), n),
            "ts": np.tile(origin + td * np.arange(horizon), n),
            "actual": forecast.inputs.actual.ravel(),
            "mean": forecast.mean.ravel(),
            "p10": forecast.p10.ravel(),
            "p50": forecast.p50.ravel(),
            "p90": forecast.p90.ravel(),
            "fallback": np.repeat(forecast.fallback, horizon),
        }
    )


def plot_context(grid: Grid, last: OriginInputs, cut: int) -> pd.DataFrame:
    """``item_id, ts, quantity`` of the window before the last origin, for the forecast plots.

    Buckets before an item's first sale are dropped rather than drawn as zeros.
    """
    first = max(0, last.col - cut)
    ctx = grid.values[last.rows, first : last.col]
    ts = grid.start + grid.td * np.arange(first, last.col)
    return (
        pd.DataFrame(
            {
                "item_id": np.repeat(last.batch.item_ids, ctx.shape[1]),
                "ts": np.tile(ts, len(last.rows)),
                "quantity": ctx.ravel(),
            }
        )
        .dropna()
        .reset_index(drop=True)
    )
