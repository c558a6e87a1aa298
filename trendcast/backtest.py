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

    # Dense item x bucket matrix (NaN before an item's first bucket) for actuals and scales.
    items = np.array(sorted(panel.frame["item_id"].unique()), dtype=object)
    row_of = {str(item): i for i, item in enumerate(items)}
    n_cols = panel.n_buckets
    wide = np.full((len(items), n_cols), np.nan)
    col = ((panel.frame["ts"] - panel.start) / td).to_numpy().astype(np.int64)
    wide[panel.frame["item_id"].map(row_of).to_numpy(), col] = panel.frame["quantity"].to_numpy()

    own_windows = {f.name: _window_of(f, window) for f in forecasters} | dict(windows or {})
    if min(own_windows.values()) < 1:
        raise ConfigError(f"expected windows of at least 1 bucket, got {own_windows}")
    cut = max(own_windows.values())
    steps = np.arange(1, horizon + 1)
    collected: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
    seconds = dict.fromkeys(names, 0.0)
    seen: set[str] = set()
    history = pd.DataFrame(columns=["item_id", "ts", "quantity"])
    for index, origin in enumerate(origin_list):
        batch = windows_from_panel(panel, cut, cutoff=origin)
        if len(batch) == 0:
            raise DataError(f"no item has a bucket before origin {origin}")
        rows = np.array([row_of[i] for i in batch.item_ids], dtype=np.int64)
        o_col = int((origin - panel.start) / td)
        actual = wide[rows, o_col : o_col + horizon]
        scale_sq, scale_abs = naive_scales(wide[rows, :o_col])
        seen.update(batch.item_ids)
        for f in forecasters:
            sub = _tail(batch, own_windows[f.name])
            started = time.perf_counter()
            fc = f.predict(sub)
            seconds[f.name] += time.perf_counter() - started
            _check_forecast(f.name, fc, len(batch), horizon)
            collected[f.name].append(
                {
                    "origin": origin,
                    "items": batch.item_ids,
                    "actual": actual,
                    "scale_sq": scale_sq,
                    "scale_abs": scale_abs,
                    "mean": fc.mean[:, :horizon].astype(np.float64),
                    "p10": fc.p10[:, :horizon].astype(np.float64),
                    "p50": fc.p50[:, :horizon].astype(np.float64),
                    "p90": fc.p90[:, :horizon].astype(np.float64),
                    "fallback": fc.fallback.astype(bool),
                }
            )
        if index == len(origin_list) - 1:
            ctx = wide[rows, max(0, o_col - cut) : o_col]
            ts = panel.start + td * np.arange(max(0, o_col - cut), o_col)
            history = (
                pd.DataFrame(
                    {
                        "item_id": np.repeat(batch.item_ids, ctx.shape[1]),
                        "ts": np.tile(ts, len(rows)),
                        "quantity": ctx.ravel(),
                    }
                )
                .dropna()
                .reset_index(drop=True)
            )
        if on_origin is not None:
            on_origin(index, len(origin_list), origin)
        logger.info("origin %s: %d items, %d models", origin, len(batch), len(forecasters))

    metric_rows: list[dict[str, Any]] = []
    step_frames: list[pd.DataFrame] = []
    long_frames: list[pd.DataFrame] = []
    for name in names:
        parts = collected[name]
        cat = {
            k: np.concatenate([p[k] for p in parts])
            for k in ("actual", "scale_sq", "scale_abs", "mean", "p10", "p50", "p90", "fallback")
        }
        y = cat["actual"]
        scores = score(
            y, cat["mean"], cat["p10"], cat["p50"], cat["p90"], cat["scale_sq"], cat["scale_abs"]
        )
        metric_rows.append(
            {
                "model": name,
                **scores.as_dict(),
                "fallback_share": float(cat["fallback"].mean()) if len(y) else float("nan"),
                "predict_seconds": seconds[name],
            }
        )
        abs_err = np.abs(y - cat["p50"])
        denom = np.abs(y).sum(axis=0)
        step_frames.append(
            pd.DataFrame(
                {
                    "model": name,
                    "step": steps,
                    "rmsse": rmsse_by_step(y, cat["mean"], cat["scale_sq"]),
                    "mae": abs_err.mean(axis=0),
                    "wape": np.divide(
                        abs_err.sum(axis=0), denom, out=np.full(horizon, np.nan), where=denom > 0
                    ),
                }
            )
        )
        for p in parts:
            n = len(p["items"])
            long_frames.append(
                pd.DataFrame(
                    {
                        "model": name,
                        "origin": p["origin"],
                        "item_id": np.repeat(p["items"], horizon),
                        "step": np.tile(steps, n),
                        "ts": np.tile(p["origin"] + td * np.arange(horizon), n),
                        "actual": p["actual"].ravel(),
                        "mean": p["mean"].ravel(),
                        "p10": p["p10"].ravel(),
                        "p50": p["p50"].ravel(),
                        "p90": p["p90"].ravel(),
                        "fallback": np.repeat(p["fallback"], horizon),
                    }
                )
            )
    settings = {
        "horizon": horizon,
        "window": window,
        "windows": own_windows,
        "freq": freq.name,
        "step": step if step is not None else _week_buckets(freq),
        "n_origins": len(origin_list),
        "data_start": panel.start.isoformat(),
        "data_end": panel.end.isoformat(),
    }
    return BacktestResult(
        settings=settings,
        origins=list(origin_list),
        n_items=len(seen),
        metrics=pd.DataFrame(metric_rows).set_index("model"),
        by_step=pd.concat(step_frames, ignore_index=True),
        forecasts=pd.concat(long_frames, ignore_index=True),
        history=history,
    )


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
