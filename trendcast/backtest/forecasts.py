"""Running every model at every origin, as in production: one batched call per model and origin.

Each call gets the tail of the origin's window the model wants, is timed, and its output's
shape is checked before anything is scored.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import pandas as pd

from trendcast.backtest.inputs import Grid, OriginInputs, origin_inputs
from trendcast.data import Panel
from trendcast.exceptions import ConfigError, DataError
from trendcast.forecasting.base import ForecastBatch, Forecaster, WindowBatch

__all__ = ["Forecast", "Runs", "run_origins"]

logger = logging.getLogger(__name__)

F64 = npt.NDArray[np.float64]


@dataclass(frozen=True)
class Forecast:
    """One model's forecast at one origin, cut to the horizon, beside the origin's inputs.

    Quantiles are float64 so that metrics do not depend on the precision a model returns.
    """

    inputs: OriginInputs
    mean: F64
    p10: F64
    p50: F64
    p90: F64
    fallback: npt.NDArray[np.bool_]


@dataclass(frozen=True)
class Runs:
    """Every model's forecasts at every origin, before scoring.

    Attributes:
        forecasts: Per model name (in the forecasters' order), one forecast per origin.
        seconds: Per model name, total ``predict`` time over all origins.
        seen: Items forecast at least once.
        last: The last origin's inputs (the plot context is the window before it).
    """

    forecasts: dict[str, list[Forecast]]
    seconds: dict[str, float]
    seen: set[str]
    last: OriginInputs


def run_origins(
    panel: Panel,
    grid: Grid,
    forecasters: Sequence[Forecaster],
    origin_list: Sequence[pd.Timestamp],
    *,
    windows: Mapping[str, int],
    horizon: int,
    on_origin: Callable[[int, int, pd.Timestamp], None] | None,
) -> Runs:
    """Forecast every origin with every model, one batched call per model and origin.

    Origins run oldest first and the hook is called after each, so progress can be shown
    while slow models (AutoETS in the bench) run.
    """
    cut = max(windows.values())
    forecasts: dict[str, list[Forecast]] = {f.name: [] for f in forecasters}
    seconds = dict.fromkeys(forecasts, 0.0)
    seen: set[str] = set()
    inputs: OriginInputs | None = None
    for index, origin in enumerate(origin_list):
        inputs = origin_inputs(panel, grid, origin, cut=cut, horizon=horizon)
        seen.update(inputs.batch.item_ids)
        for f in forecasters:
            forecast, took = _predict(f, inputs, window=windows[f.name], horizon=horizon)
            forecasts[f.name].append(forecast)
            seconds[f.name] += took
        if on_origin is not None:
            on_origin(index, len(origin_list), origin)
        logger.info("origin %s: %d items, %d models", origin, len(inputs.batch), len(forecasters))
    if inputs is None:  # choose_origins never returns an empty list
        raise ConfigError("expected at least one origin")
    return Runs(forecasts=forecasts, seconds=seconds, seen=seen, last=inputs)


def _predict(
    forecaster: Forecaster, inputs: OriginInputs, *, window: int, horizon: int
) -> tuple[Forecast, float]:
    """Run one model on one origin's whole batch (as in production), timed and shape-checked.

    Returns:
        The forecast and the seconds ``predict`` took (only the call, not the cutting).

    Raises:
        DataError: The model returned badly shaped output.
    """
    sub = _tail(inputs.batch, window)
    started = time.perf_counter()
    fc = forecaster.predict(sub)
    seconds = time.perf_counter() - started
    _check_forecast(forecaster.name, fc, len(inputs.batch), horizon)
    forecast = Forecast(
        inputs=inputs,
        mean=fc.mean[:, :horizon].astype(np.float64),
        p10=fc.p10[:, :horizon].astype(np.float64),
        p50=fc.p50[:, :horizon].astype(np.float64),
        p90=fc.p90[:, :horizon].astype(np.float64),
        fallback=fc.fallback.astype(bool),
    )
    return forecast, seconds


def _tail(batch: WindowBatch, window: int) -> WindowBatch:
    """The last ``window`` buckets of each row (the batch itself when it is that long).

    The tail is copied C-contiguous, so each model gets the layout of a freshly cut window.
    """
    if window == batch.window:
        return batch
    return WindowBatch(
        item_ids=batch.item_ids,
        quantities=np.ascontiguousarray(batch.quantities[:, -window:]),
        prices=None if batch.prices is None else np.ascontiguousarray(batch.prices[:, -window:]),
        last_start_ms=batch.last_start_ms,
        history_len=np.minimum(batch.history_len, window),
    )


def _check_forecast(name: str, fc: ForecastBatch, n: int, horizon: int) -> None:
    """Fail on a badly shaped forecast with the model's name, before numpy broadcasts it.

    Raises:
        DataError: An output is not ``[n, >=horizon]`` (quantiles) or ``[n]`` (fallback).
    """
    for label in ("mean", "p10", "p50", "p90"):
        arr = getattr(fc, label)
        if arr.ndim != 2 or arr.shape[0] != n or arr.shape[1] < horizon:
            raise DataError(
                f"forecaster {name}: expected {label} of shape [{n}, >={horizon}], got {arr.shape}"
            )
    if fc.fallback.shape != (n,):
        raise DataError(
            f"forecaster {name}: expected fallback of shape [{n}], got {fc.fallback.shape}"
        )
