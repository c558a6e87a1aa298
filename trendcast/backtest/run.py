""":func:`backtest`, the rolling-origin backtest, as the sequence of its steps."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from trendcast.backtest.forecasts import run_origins
from trendcast.backtest.inputs import Grid, input_windows
from trendcast.backtest.origins import choose_origins, week_buckets
from trendcast.backtest.scoring import (
    Pooled,
    error_by_step,
    forecast_frames,
    metrics_frame,
    plot_context,
)
from trendcast.data import Panel
from trendcast.exceptions import ConfigError
from trendcast.forecasting.base import Forecaster

__all__ = ["BacktestResult", "backtest"]

logger = logging.getLogger(__name__)


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
    """A JSON-safe number: NaN/inf (strict JSON has none) become null, numpy scalars plain ones.

    Floats are rounded to 6 digits so that ``metrics.json`` files compare readably in a diff.
    """
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
        n_origins: Number of origins (see :func:`~trendcast.backtest.origins.backtest_origins`).
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
    origin_list = choose_origins(
        panel, horizon=horizon, n_origins=n_origins, weeks=weeks, step=step, origins=origins
    )
    own_windows = input_windows(forecasters, window, windows)
    grid = Grid.of(panel)
    runs = run_origins(
        panel,
        grid,
        forecasters,
        origin_list,
        windows=own_windows,
        horizon=horizon,
        on_origin=on_origin,
    )
    pooled = {name: Pooled.of(parts) for name, parts in runs.forecasts.items()}
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
        metrics=metrics_frame(pooled, runs.seconds),
        by_step=error_by_step(pooled, horizon),
        forecasts=forecast_frames(runs.forecasts, horizon, grid.td),
        history=plot_context(grid, runs.last, max(own_windows.values())),
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
        "step": step if step is not None else week_buckets(panel.freq),
        "n_origins": n_origins,
        "data_start": panel.start.isoformat(),
        "data_end": panel.end.isoformat(),
    }
