"""Rolling-origin backtests of any :class:`~trendcast.forecasting.base.Forecaster`.

At each origin every model sees only the buckets before it (``windows_from_panel(cutoff=
origin)``) and forecasts the next ``horizon`` buckets, which are then compared with what
actually sold. Origins are spaced ``step`` buckets apart and placed so that the *last* origin's
horizon ends exactly on the panel's last bucket: the most recent data is always tested, and no
forecast reaches past the data.

Each forecaster is called once per origin with the whole batch of items, as in production.
In-sample scales (for RMSSE/MASE) come from each item's full history before the origin, never
from the test period.
"""

from __future__ import annotations

import importlib
import json
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pandas as pd
from rich.console import Console
from rich.table import Table

from trendcast.bundle import Bundle
from trendcast.data import Panel
from trendcast.exceptions import ConfigError, DataError
from trendcast.forecasting.base import ForecastBatch, Forecaster, WindowBatch
from trendcast.forecasting.baselines import (
    NaiveForecaster,
    SeasonalNaiveForecaster,
    WindowMeanForecaster,
    ZeroForecaster,
)
from trendcast.forecasting.windows import windows_from_panel
from trendcast.freq import Freq
from trendcast.metrics import naive_scales, rmsse_by_step, score
from trendcast.plots import plot_error_by_step, plot_forecasts, plot_training_curves

__all__ = [
    "BacktestResult",
    "Evaluation",
    "backtest",
    "backtest_origins",
    "baseline_forecasters",
    "bundle_leakage_warning",
    "evaluate",
    "leakage_warning",
    "metrics_markdown",
    "metrics_table",
    "print_metrics",
    "write_report",
]

logger = logging.getLogger(__name__)

F64 = npt.NDArray[np.float64]

# Columns where lower is better; coverage is best closest to its nominal 0.8.
_LOWER_IS_BETTER = ("rmsse", "wape", "mase", "pinball")
_NOMINAL_COVERAGE = 0.8
_TABLE_COLUMNS = ("rmsse", "wape", "mase", "pinball", "coverage", "fallback_share")
_SHORT_HEADERS = {"fallback_share": "fallback"}
DEFAULT_WINDOW = 56
TRAINING_HISTORY = Path("training") / "history.json"


def _week_buckets(freq: Freq) -> int:
    """Buckets per week (at least 1): the default spacing of origins.

    >>> from trendcast.freq import parse_freq
    >>> [_week_buckets(parse_freq(f)) for f in ("1D", "1h", "1W")]
    [7, 168, 1]
    """
    return max(1, (7 * 86_400_000) // freq.step_ms)


def backtest_origins(
    end: pd.Timestamp,
    freq: Freq,
    *,
    horizon: int,
    step: int | None = None,
    n_origins: int | None = None,
    weeks: int | None = None,
) -> list[pd.Timestamp]:
    """Origins (first forecast bucket), oldest first, the last one's horizon ending at ``end``.

    Give either ``n_origins`` or ``weeks``: ``weeks`` is the length of the test period at the
    end of the data, and as many origins as fit in it (every ``step`` buckets, default a week)
    are used, so every forecast target lies within those weeks.

    Raises:
        ConfigError: Neither or both of ``n_origins``/``weeks``, or a period shorter than the
            horizon.

    >>> from trendcast.freq import parse_freq
    >>> end = pd.Timestamp("2011-08-31")
    >>> daily = parse_freq("1D")
    >>> [o.strftime("%m-%d") for o in backtest_origins(end, daily, horizon=28, weeks=8)]
    ['07-07', '07-14', '07-21', '07-28', '08-04']
    >>> [o.strftime("%m-%d") for o in backtest_origins(end, daily, horizon=7, n_origins=2, step=3)]
    ['08-22', '08-25']
    """
    if horizon < 1:
        raise ConfigError(f"expected a horizon of at least 1 bucket, got {horizon}")
    step = _week_buckets(freq) if step is None else step
    if step < 1:
        raise ConfigError(f"expected an origin step of at least 1 bucket, got {step}")
    if (n_origins is None) == (weeks is None):
        raise ConfigError("expected exactly one of n_origins or weeks")
    if weeks is not None:
        if weeks < 1:
            raise ConfigError(f"expected at least 1 week, got {weeks}")
        period = (weeks * 7 * 86_400_000) // freq.step_ms
        if period < horizon:
            raise ConfigError(
                f"expected a test period of at least the horizon ({horizon} buckets), "
                f"got {weeks} week(s) = {period} bucket(s) of {freq.name}"
            )
        n_origins = (period - horizon) // step + 1
    if n_origins is None or n_origins < 1:
        raise ConfigError(f"expected at least 1 origin, got {n_origins}")
    last = end - (horizon - 1) * freq.timedelta
    return [last - k * step * freq.timedelta for k in reversed(range(n_origins))]


def _window_of(forecaster: Forecaster, default: int) -> int:
    """Input length a forecaster wants: its own ``window`` attribute if it has one.

    The ONNX model is fixed to the window it was trained with (``bundle.meta.window``) while
    baselines take any length, so a backtest cuts the longest window once per origin and hands
    each model the tail it needs.
    """
    own = getattr(forecaster, "window", None)
    return own if isinstance(own, int) and own > 0 else default


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


@dataclass(frozen=True)
class BacktestResult:
    """Everything a backtest produced.

    Attributes:
        settings: horizon, window(s), step, frequency.
        origins: The origins, oldest first.
        n_items: Distinct items forecast at least once.
        metrics: One row per model (index ``model``): rmsse, wape, mase, pinball (+ per
            quantile), coverage, fallback_share, n_rows, n_unscaled, predict_seconds.
        by_step: Long frame ``model, step, rmsse, mae, wape`` (error by horizon step).
        forecasts: Long frame ``model, origin, item_id, step, ts, actual, mean, p10, p50, p90,
            fallback``.
        history: ``item_id, ts, quantity`` of the window before the last origin (plot context).
    """

    settings: dict[str, Any]
    origins: list[pd.Timestamp]
    n_items: int
    metrics: pd.DataFrame
    by_step: pd.DataFrame
    forecasts: pd.DataFrame
    history: pd.DataFrame = field(repr=False)

    def to_json(self) -> dict[str, Any]:
        """JSON-ready summary: models side by side, settings, origins, item count."""
        models = {
            str(name): {k: _json_number(v) for k, v in row.items()}
            for name, row in self.metrics.to_dict(orient="index").items()
        }
        by_step: dict[str, dict[str, list[float | None]]] = {}
        for name, group in self.by_step.groupby("model", sort=False):
            by_step[str(name)] = {
                col: [_json_number(v) for v in group[col]] for col in ("rmsse", "mae", "wape")
            }
        return {
            "settings": self.settings,
            "origins": [o.isoformat() for o in self.origins],
            "n_items": self.n_items,
            "models": models,
            "by_step": by_step,
        }


def _json_number(value: Any) -> Any:
    if isinstance(value, (float, np.floating)):
        return None if not math.isfinite(float(value)) else round(float(value), 6)
    if isinstance(value, np.integer):
        return int(value)
    return value


def backtest(
    panel: Panel,
    forecasters: Sequence[Forecaster],
    *,
    horizon: int,
    window: int,
    n_origins: int | None = None,
    weeks: int | None = None,
    step: int | None = None,
    origins: Sequence[pd.Timestamp] | None = None,
    windows: Mapping[str, int] | None = None,
    on_origin: Callable[[int, int, pd.Timestamp], None] | None = None,
) -> BacktestResult:
    """Rolling-origin backtest of several forecasters on the same origins and items.

    The steps, in order: check the forecasters, choose the origins, settle each model's input
    length, forecast every origin with every model, then score and assemble the frames.

    Args:
        panel: The full bucketed data (history and test period).
        forecasters: Models to compare; names must be unique; each must forecast at least
            ``horizon`` buckets (extra steps are ignored).
        horizon: Buckets forecast from each origin.
        window: Input length for forecasters without their own ``window`` attribute.
        windows: Input length per forecaster name, overriding ``window`` and the attribute
            (e.g. ``{"lstm": bundle.meta.window}``).
        n_origins: Number of origins (see :func:`backtest_origins`).
        weeks: Or: length of the test period at the end of the data.
        step: Buckets between origins (default: one week).
        origins: Or: explicit origins (bucket starts); each horizon must end by the panel's
            last bucket.
        on_origin: Hook called after each origin with ``(index, count, origin)`` (progress).

    Raises:
        ConfigError: Bad settings (no forecasters, duplicate names, origins outside the data).
        DataError: A forecaster returned badly shaped output, or no item has history.
    """
    _check_forecasters(forecasters, horizon=horizon, window=window)
    origin_list = _choose_origins(
        panel, horizon=horizon, n_origins=n_origins, weeks=weeks, step=step, origins=origins
    )
    own_windows = _input_windows(forecasters, window, windows)
    grid = _Grid.of(panel)
    runs = _run_origins(
        panel,
        grid,
        forecasters,
        origin_list,
        windows=own_windows,
        horizon=horizon,
        on_origin=on_origin,
    )
    pooled = {name: _Pooled.of(parts) for name, parts in runs.forecasts.items()}
    return BacktestResult(
        settings=_settings(
            panel,
            horizon=horizon,
            window=window,
            windows=own_windows,
            step=step,
            n_origins=len(origin_list),
        ),
        origins=list(origin_list),
        n_items=len(runs.seen),
        metrics=_metrics(pooled, runs.seconds),
        by_step=_error_by_step(pooled, horizon),
        forecasts=_forecast_frames(runs.forecasts, horizon, grid.td),
        history=_plot_context(grid, runs.last, max(own_windows.values())),
    )


def _check_forecasters(forecasters: Sequence[Forecaster], *, horizon: int, window: int) -> None:
    """Reject a comparison that cannot be made before any model runs.

    Results are keyed by model name, so names must be unique; a model forecasting fewer than
    ``horizon`` buckets could not be scored on the same targets as the others.

    Raises:
        ConfigError: No forecasters, duplicate names, a window below 1 or a short horizon.
    """
    if not forecasters:
        raise ConfigError("expected at least one forecaster")
    names = [f.name for f in forecasters]
    if len(set(names)) != len(names):
        raise ConfigError(f"expected unique forecaster names, got {names}")
    if window < 1:
        raise ConfigError(f"expected a window of at least 1 bucket, got {window}")
    for f in forecasters:
        if f.horizon < horizon:
            raise ConfigError(
                f"forecaster {f.name} forecasts {f.horizon} buckets, expected >= {horizon}"
            )


def _choose_origins(
    panel: Panel,
    *,
    horizon: int,
    n_origins: int | None,
    weeks: int | None,
    step: int | None,
    origins: Sequence[pd.Timestamp] | None,
) -> list[pd.Timestamp]:
    """The origins to test, oldest first: explicit ones, or those :func:`backtest_origins` places.

    Explicit origins are checked against the data, because an origin without history before it,
    whose horizon runs past the data, or that falls between bucket starts would be scored on
    targets that do not exist (or on shifted ones).

    Raises:
        ConfigError: No origin, or an origin outside the data or off the bucket grid.
    """
    freq = panel.freq
    if origins is None:
        origin_list = backtest_origins(
            panel.end, freq, horizon=horizon, step=step, n_origins=n_origins, weeks=weeks
        )
    else:
        origin_list = sorted(pd.Timestamp(o) for o in origins)
    if not origin_list:
        raise ConfigError("expected at least one origin")
    td = freq.timedelta
    for origin in origin_list:
        if origin <= panel.start or origin + (horizon - 1) * td > panel.end:
            raise ConfigError(
                f"origin {origin} needs history before it and {horizon} buckets up to the data's "
                f"end {panel.end}; data spans {panel.start}..{panel.end}"
            )
        if (origin - panel.start) % td != pd.Timedelta(0):
            raise ConfigError(f"origin {origin} is not a {freq.name} bucket start")
    return origin_list


def _input_windows(
    forecasters: Sequence[Forecaster], window: int, windows: Mapping[str, int] | None
) -> dict[str, int]:
    """Input length per model name: ``windows`` over the model's own ``window`` over ``window``.

    The longest of them is the one window cut per origin (see :func:`_tail`).

    Raises:
        ConfigError: A window below 1 bucket.
    """
    own_windows = {f.name: _window_of(f, window) for f in forecasters} | dict(windows or {})
    if min(own_windows.values()) < 1:
        raise ConfigError(f"expected windows of at least 1 bucket, got {own_windows}")
    return own_windows


@dataclass(frozen=True)
class _Grid:
    """The panel as a dense item x bucket matrix, NaN before an item's first bucket.

    Models get their inputs from :func:`windows_from_panel`; scoring needs more of each item's
    row — the test period (actuals) and *all* history before the origin (in-sample scales) —
    which this matrix gives by slicing.

    Attributes:
        start: The panel's first bucket (column 0).
        td: One bucket.
        row_of: Row of each item id.
        values: ``[items, buckets]`` quantities.
    """

    start: pd.Timestamp
    td: pd.Timedelta
    row_of: dict[str, int]
    values: F64

    @classmethod
    def of(cls, panel: Panel) -> _Grid:
        """Spread the panel's long ``item_id, ts, quantity`` rows into the matrix."""
        td = panel.freq.timedelta
        items = np.array(sorted(panel.frame["item_id"].unique()), dtype=object)
        row_of = {str(item): i for i, item in enumerate(items)}
        values = np.full((len(items), panel.n_buckets), np.nan)
        rows = panel.frame["item_id"].map(row_of).to_numpy()
        cols = ((panel.frame["ts"] - panel.start) / td).to_numpy().astype(np.int64)
        values[rows, cols] = panel.frame["quantity"].to_numpy()
        return cls(start=panel.start, td=td, row_of=row_of, values=values)


@dataclass(frozen=True)
class _OriginInputs:
    """What every model is given at one origin, and what its forecast is scored against.

    Attributes:
        origin: The first forecast bucket.
        batch: Windows of the longest input length, ending just before the origin, of the
            items with at least one bucket before it.
        rows: Each batch item's row in the :class:`_Grid`.
        col: The origin's column in the :class:`_Grid`.
        actual: ``[n, horizon]`` what sold from the origin on.
        scale_sq: Per item in-sample scale for RMSSE (all history before the origin).
        scale_abs: Per item in-sample scale for MASE and pinball.
    """

    origin: pd.Timestamp
    batch: WindowBatch
    rows: npt.NDArray[np.int64]
    col: int
    actual: F64
    scale_sq: F64
    scale_abs: F64


def _origin_inputs(
    panel: Panel, grid: _Grid, origin: pd.Timestamp, *, cut: int, horizon: int
) -> _OriginInputs:
    """Cut the window once per origin and look up its actuals and scales.

    Cutting the longest window once and handing each model its tail (:func:`_tail`) keeps all
    models on the same items; the scales come from the history before the origin only, never
    from the test period.

    Raises:
        DataError: No item has a bucket before the origin.
    """
    batch = windows_from_panel(panel, cut, cutoff=origin)
    if len(batch) == 0:
        raise DataError(f"no item has a bucket before origin {origin}")
    rows = np.array([grid.row_of[i] for i in batch.item_ids], dtype=np.int64)
    col = int((origin - grid.start) / grid.td)
    scale_sq, scale_abs = naive_scales(grid.values[rows, :col])
    return _OriginInputs(
        origin=origin,
        batch=batch,
        rows=rows,
        col=col,
        actual=grid.values[rows, col : col + horizon],
        scale_sq=scale_sq,
        scale_abs=scale_abs,
    )


@dataclass(frozen=True)
class _Forecast:
    """One model's forecast at one origin, cut to the horizon, beside the origin's inputs.

    Quantiles are float64 so that metrics do not depend on the precision a model returns.
    """

    inputs: _OriginInputs
    mean: F64
    p10: F64
    p50: F64
    p90: F64
    fallback: npt.NDArray[np.bool_]


def _predict(
    forecaster: Forecaster, inputs: _OriginInputs, *, window: int, horizon: int
) -> tuple[_Forecast, float]:
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
    forecast = _Forecast(
        inputs=inputs,
        mean=fc.mean[:, :horizon].astype(np.float64),
        p10=fc.p10[:, :horizon].astype(np.float64),
        p50=fc.p50[:, :horizon].astype(np.float64),
        p90=fc.p90[:, :horizon].astype(np.float64),
        fallback=fc.fallback.astype(bool),
    )
    return forecast, seconds


@dataclass(frozen=True)
class _Runs:
    """Every model's forecasts at every origin, before scoring.

    Attributes:
        forecasts: Per model name (in the forecasters' order), one forecast per origin.
        seconds: Per model name, total ``predict`` time over all origins.
        seen: Items forecast at least once.
        last: The last origin's inputs (the plot context is the window before it).
    """

    forecasts: dict[str, list[_Forecast]]
    seconds: dict[str, float]
    seen: set[str]
    last: _OriginInputs


def _run_origins(
    panel: Panel,
    grid: _Grid,
    forecasters: Sequence[Forecaster],
    origin_list: Sequence[pd.Timestamp],
    *,
    windows: Mapping[str, int],
    horizon: int,
    on_origin: Callable[[int, int, pd.Timestamp], None] | None,
) -> _Runs:
    """Forecast every origin with every model, one batched call per model and origin.

    Origins run oldest first and the hook is called after each, so progress can be shown
    while slow models (AutoETS in the bench) run.
    """
    cut = max(windows.values())
    forecasts: dict[str, list[_Forecast]] = {f.name: [] for f in forecasters}
    seconds = dict.fromkeys(forecasts, 0.0)
    seen: set[str] = set()
    inputs: _OriginInputs | None = None
    for index, origin in enumerate(origin_list):
        inputs = _origin_inputs(panel, grid, origin, cut=cut, horizon=horizon)
        seen.update(inputs.batch.item_ids)
        for f in forecasters:
            forecast, took = _predict(f, inputs, window=windows[f.name], horizon=horizon)
            forecasts[f.name].append(forecast)
            seconds[f.name] += took
        if on_origin is not None:
            on_origin(index, len(origin_list), origin)
        logger.info("origin %s: %d items, %d models", origin, len(inputs.batch), len(forecasters))
    if inputs is None:  # _choose_origins never returns an empty list
        raise ConfigError("expected at least one origin")
    return _Runs(forecasts=forecasts, seconds=seconds, seen=seen, last=inputs)


def _plot_context(grid: _Grid, last: _OriginInputs, cut: int) -> pd.DataFrame:
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


@dataclass(frozen=True)
class _Pooled:
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
    def of(cls, parts: Sequence[_Forecast]) -> _Pooled:
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


def _metrics(pooled: Mapping[str, _Pooled], seconds: Mapping[str, float]) -> pd.DataFrame:
    """:attr:`BacktestResult.metrics`: one row per model, in the forecasters' order."""
    return pd.DataFrame(
        [_metrics_row(name, p, seconds[name]) for name, p in pooled.items()]
    ).set_index("model")


def _metrics_row(name: str, pooled: _Pooled, seconds: float) -> dict[str, Any]:
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


def _error_by_step(pooled: Mapping[str, _Pooled], horizon: int) -> pd.DataFrame:
    """:attr:`BacktestResult.by_step`: how each model's error grows with the lead time."""
    return pd.concat(
        [_model_error_by_step(name, p, horizon) for name, p in pooled.items()], ignore_index=True
    )


def _model_error_by_step(name: str, pooled: _Pooled, horizon: int) -> pd.DataFrame:
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


def _forecast_frames(
    forecasts: Mapping[str, Sequence[_Forecast]], horizon: int, td: pd.Timedelta
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


def _forecast_frame(name: str, forecast: _Forecast, horizon: int, td: pd.Timedelta) -> pd.DataFrame:
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


def _settings(
    panel: Panel,
    *,
    horizon: int,
    window: int,
    windows: dict[str, int],
    step: int | None,
    n_origins: int,
) -> dict[str, Any]:
    """The settings a result was produced with, so a saved ``metrics.json`` explains itself."""
    return {
        "horizon": horizon,
        "window": window,
        "windows": windows,
        "freq": panel.freq.name,
        "step": step if step is not None else _week_buckets(panel.freq),
        "n_origins": n_origins,
        "data_start": panel.start.isoformat(),
        "data_end": panel.end.isoformat(),
    }


def leakage_warning(data_end: str | pd.Timestamp, origins: Sequence[pd.Timestamp]) -> str | None:
    """A message if training data reaches the first backtest origin, else ``None``.

    A model trained on buckets at or after an origin has seen the answers it is scored on, so
    its backtest scores are optimistic. ``data_end`` is the last training timestamp (inclusive,
    ISO string as in ``bundle.meta.training.data_end``; a timezone is converted to UTC).

    >>> o = [pd.Timestamp("2011-07-07"), pd.Timestamp("2011-08-04")]
    >>> leakage_warning("2011-06-30", o) is None
    True
    >>> msg = leakage_warning("2011-07-31T00:00:00Z", o)
    >>> msg.split(": ")[1].split(" — ")[0]
    '1 of 2 origins are inside the training range'
    """
    if not origins:
        return None
    end = pd.Timestamp(data_end)
    if end.tzinfo is not None:
        end = end.tz_convert("UTC").tz_localize(None)
    first = min(pd.Timestamp(o) for o in origins)
    if end < first:
        return None
    leaked = sum(1 for o in origins if pd.Timestamp(o) <= end)
    message = (
        f"model trained on data up to {end}, at or after the first backtest origin {first}: "
        f"{leaked} of {len(origins)} origins are inside the training range "
        f"— scores are optimistic; retrain with data before {first}"
    )
    logger.warning(message)
    return message


def bundle_leakage_warning(bundle: Bundle, origins: Sequence[pd.Timestamp]) -> str | None:
    """:func:`leakage_warning` for a loaded bundle (``bundle.meta.training.data_end``)."""
    return leakage_warning(bundle.meta.training.data_end, origins)


def _best(metrics: pd.DataFrame) -> dict[str, str | None]:
    best: dict[str, str | None] = {}
    for col in _TABLE_COLUMNS:
        values = metrics[col].astype(float)
        if col == "fallback_share" or values.isna().all() or len(values) < 2:
            best[col] = None
        elif col == "coverage":
            best[col] = str((values - _NOMINAL_COVERAGE).abs().idxmin())
        else:
            best[col] = str(values.idxmin())
    return best


def _fmt(value: Any) -> str:
    return "—" if value is None or not math.isfinite(float(value)) else f"{float(value):.3f}"


def metrics_table(metrics: pd.DataFrame, *, title: str = "Backtest") -> Table:
    """A rich table, models as rows, the best value of each column in bold green.

    Best means lowest, except coverage (closest to 0.8); fallback share is not ranked.
    """
    best = _best(metrics)
    table = Table(title=title)
    table.add_column("model", no_wrap=True)
    for col in _TABLE_COLUMNS:
        table.add_column(_SHORT_HEADERS.get(col, col), justify="right")
    for name, row in metrics.iterrows():
        cells = [str(name)]
        for col in _TABLE_COLUMNS:
            text = _fmt(row[col])
            cells.append(f"[bold green]{text}[/]" if best[col] == name else text)
        table.add_row(*cells)
    return table


def print_metrics(result: BacktestResult, console: Console | None = None) -> None:
    """Print the metrics table with the origins and item count as caption."""
    table = metrics_table(result.metrics)
    first, last = result.origins[0].date(), result.origins[-1].date()
    table.caption = (
        f"{result.n_items} items, {len(result.origins)} origins {first}..{last}, "
        f"horizon {result.settings['horizon']}; coverage target 0.8"
    )
    (console or Console()).print(table)


def metrics_markdown(metrics: pd.DataFrame, columns: Sequence[str] = _TABLE_COLUMNS) -> str:
    """A GitHub markdown table (best value of each column in bold), ready for a README.

    >>> m = pd.DataFrame({"rmsse": [1.0, 0.5], "wape": [1.0, 0.7], "mase": [1.0, 0.9],
    ...     "pinball": [0.5, 0.4], "coverage": [0.0, 0.7], "fallback_share": [0.0, 0.0]},
    ...     index=pd.Index(["zero", "naive"], name="model"))
    >>> print(metrics_markdown(m, ["rmsse", "coverage"]))
    | model | rmsse | coverage |
    |---|---:|---:|
    | zero | 1.000 | 0.000 |
    | naive | **0.500** | **0.700** |
    """
    best = _best(metrics)
    lines = ["| model | " + " | ".join(columns) + " |", "|---|" + "---:|" * len(columns)]
    for name, row in metrics.iterrows():
        cells = []
        for col in columns:
            text = _fmt(row[col])
            cells.append(f"**{text}**" if best.get(col) == name else text)
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_report(
    result: BacktestResult,
    out_dir: Path | str,
    *,
    plot_model: str | None = None,
    n_plot_items: int = 4,
    write_forecasts: bool = True,
    extra: dict[str, Any] | None = None,
) -> dict[str, Path]:
    """Write ``metrics.json``, ``forecasts.parquet`` and PNG plots into ``out_dir``.

    Args:
        result: A backtest result.
        out_dir: Directory (created if needed).
        plot_model: Model whose band is drawn in ``forecasts.png`` (default: ``lstm`` if
            present, else the best by RMSSE).
        n_plot_items: Items in ``forecasts.png``.
        write_forecasts: Also write the long forecast frame (can be large).
        extra: More JSON-able entries for ``metrics.json`` (e.g. bundle version, leakage note).

    Returns:
        Written files by kind: ``metrics``, ``forecasts``, ``forecasts_png``, ``error_png``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    payload = result.to_json() | (extra or {})
    written["metrics"] = out / "metrics.json"
    written["metrics"].write_text(json.dumps(payload, indent=2, default=str) + "\n")
    if write_forecasts:
        written["forecasts"] = out / "forecasts.parquet"
        result.forecasts.to_parquet(written["forecasts"], index=False)
    names = list(result.metrics.index)
    if plot_model is None:
        plot_model = "lstm" if "lstm" in names else str(result.metrics["rmsse"].idxmin())
    others = [n for n in ("seasonal_naive7",) if n in names and n != plot_model]
    written["forecasts_png"] = plot_forecasts(
        result.forecasts,
        result.history,
        out / "forecasts.png",
        model=plot_model,
        n_items=n_plot_items,
        others=others,
    )
    written["error_png"] = plot_error_by_step(result.by_step, out / "error_by_step.png")
    logger.info("wrote backtest report to %s", out)
    return written


def _season_for(freq: Freq) -> int:
    """Seasonal-naive period: a day of sub-daily buckets, a week of daily ones, else a year.

    >>> from trendcast.freq import parse_freq
    >>> [_season_for(parse_freq(f)) for f in ("1h", "6h", "1D", "1W")]
    [24, 4, 7, 52]
    """
    day, week = 86_400_000, 7 * 86_400_000
    if freq.step_ms < day:
        return max(1, day // freq.step_ms)
    if freq.step_ms < week:
        return max(1, week // freq.step_ms)
    return max(1, 52 * week // freq.step_ms)


def baseline_forecasters(horizon: int, freq: Freq) -> list[Forecaster]:
    """The baselines every backtest reports: zero, naive, seasonal-naive, 28-bucket mean."""
    return [
        ZeroForecaster(horizon),
        NaiveForecaster(horizon),
        SeasonalNaiveForecaster(horizon, _season_for(freq)),
        WindowMeanForecaster(horizon, 28),
    ]


@dataclass(frozen=True)
class Evaluation:
    """What :func:`evaluate` produced: the backtest, the files written, and warnings to show."""

    result: BacktestResult
    files: dict[str, Path]
    warnings: list[str]


def evaluate(
    panel: Panel,
    out_dir: Path | str,
    *,
    bundle: Bundle | None = None,
    weeks: int = 8,
    horizon: int = 28,
    window: int = DEFAULT_WINDOW,
    step: int | None = None,
    on_origin: Callable[[int, int, pd.Timestamp], None] | None = None,
) -> Evaluation:
    """Backtest the bundle's model (if any) beside the baselines and write the report.

    This is ``trendcast evaluate``: with a bundle, the horizon and the model's window come
    from its metadata, a leakage warning is raised when its training data reaches the first
    origin, and its training curves (``training/history.json`` inside the bundle, if present)
    are plotted too.

    Raises:
        ConfigError: The bundle's frequency differs from the data's, or bad settings.
        DataError: No usable item.
    """
    forecasters: list[Forecaster] = []
    windows: dict[str, int] = {}
    if bundle is not None:
        if bundle.meta.freq != panel.freq.name:
            raise ConfigError(
                f"bundle was trained on {bundle.meta.freq} buckets, data is bucketed by "
                f"{panel.freq.name} (pass --freq {bundle.meta.freq})"
            )
        horizon = bundle.meta.horizon
        # Imported here: the ONNX forecaster pulls in onnxruntime, needless for baselines.
        onnx_module = importlib.import_module("trendcast.forecasting.onnx")
        model: Forecaster = onnx_module.OnnxForecaster(bundle)
        forecasters.append(model)
        windows[model.name] = bundle.meta.window
    forecasters += baseline_forecasters(horizon, panel.freq)
    window = max(window, _season_for(panel.freq) + 1)
    result = backtest(
        panel,
        forecasters,
        horizon=horizon,
        window=window,
        weeks=weeks,
        step=step,
        windows=windows,
        on_origin=on_origin,
    )
    warnings: list[str] = []
    extra: dict[str, Any] = {}
    if bundle is not None:
        note = bundle_leakage_warning(bundle, result.origins)
        if note is not None:
            warnings.append(note)
        extra["bundle"] = {
            "path": str(bundle.path),
            "model_version": bundle.meta.model_version,
            "training": bundle.meta.training.model_dump(mode="json"),
        }
    extra["warnings"] = warnings
    files = write_report(result, out_dir, extra=extra)
    if bundle is not None and (bundle.path / TRAINING_HISTORY).is_file():
        history_path = bundle.path / TRAINING_HISTORY
        try:
            history = json.loads(history_path.read_text())
        except (OSError, ValueError) as exc:
            warnings.append(f"cannot read {history_path}: {exc}")
        else:
            files["training_png"] = plot_training_curves(
                history, Path(out_dir) / "training_curves.png"
            )
    return Evaluation(result=result, files=files, warnings=warnings)
