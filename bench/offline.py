"""Offline benchmark: trendcast's LSTM against baselines, AutoETS and a LightGBM global model.

Run::

    python bench/offline.py [--data PATH] [--dataset retail|smooth|both] [--quick]
                            [--skip-lstm] [--out DIR]

Two data sets, both derived from UCI Online Retail II, daily buckets (``--dataset``, default
both; one table each, the same models, the LSTM trained on each):

* ``retail``: items whose id looks like a product code and that sold on at least 100 days:
  intermittent, spiky wholesale demand (~1,500 series, most days zero).
* ``smooth``: a smooth, high-volume set in the manner of store x department totals: the daily
  number of order lines of each product family (the first three digits of the StockCode, e.g.
  ``fam849``: 84945, 84946...), families with order lines on at least 450 days (of about 520
  days the shop opened): 40-50 series, a few dozen to a few hundred lines a day, a strong
  weekly pattern (no trade on Saturdays, less on Sundays and Fridays) and the Christmas
  closure. Order lines, not units: units of a family are still driven by a few wholesale
  orders of thousands of pieces (coefficient of variation ~0.95 on open days, seasonal-naive
  WAPE ~0.8), while order lines, like a shop's unit sales, add up many small purchases
  (~0.45 and ~0.45).

Models are trained on data through 2011-06-30; rolling weekly origins in July-August 2011, each
forecasting 28 days, placed so the last horizon ends on 2011-08-31. Every model is scored by
:mod:`trendcast.metrics` through the same :func:`trendcast.backtest.backtest` call, so all rows
of a table are comparable. Under each table: the LSTM's p10-p90 coverage by origin and on its
validation split (the last 28 days of training, in-sample for the band calibration).

Models:

* ``zero``, ``naive``, ``seasonal_naive7``, ``mean28``: trendcast's baselines.
* ``auto_ets``: statsforecast AutoETS (season 7), refit on each item's last 364 days at each
  origin; p10/p90 from its 80% interval. Items with < 28 days of history use seasonal-naive
  (counted as fallback).
* ``lightgbm``: one global LightGBM model, *direct* multi-horizon with the horizon step as a
  feature (one model for all 28 steps, no error feedback as in recursive forecasting). Features
  are computed at the origin from the last 56 days, divided by the item's window mean so that
  items of any size share one model: lags 1-28, rolling means 7/14/28/56, std and share of zero
  days over 28, days since the last sale, same-weekday lags for the target day, target weekday,
  step, log level, relative price. Trained once on weekly cutoffs over the year before
  2011-07-01 (7 random steps per window). Mean from an L2 model, p10/p50/p90 from quantile
  objectives.
* ``lstm``: trendcast's model, trained through 2011-06-30 and served from its ONNX bundle
  (training wall time and ONNX Runtime windows/s at batch 1 and 256 are reported too).
* ``lstm_uncalibrated_band``: the same trained network exported once more with its p10/p90
  band calibration reset to identity (labelled extra row: before vs after calibration on the
  same weights).

AutoETS and LightGBM are bench-only dependencies (``pip install .[bench]``), imported here only.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pandas as pd

from trendcast.backtest import (
    BacktestResult,
    backtest,
    backtest_origins,
    bundle_leakage_warning,
    metrics_markdown,
    print_metrics,
    write_report,
)
from trendcast.data import ColumnMap, Panel, bucketize, clean_lines, load_sales, read_table
from trendcast.exceptions import ConfigError, TrendcastError
from trendcast.forecasting.base import ForecastBatch, Forecaster, WindowBatch
from trendcast.forecasting.baselines import (
    NaiveForecaster,
    SeasonalNaiveForecaster,
    WindowMeanForecaster,
    ZeroForecaster,
    seasonal_naive,
)
from trendcast.forecasting.windows import windows_from_panel
from trendcast.freq import parse_freq

logger = logging.getLogger("bench.offline")

# The shared data lives beside the checkout (../shared), never in the repository.
DATA = (
    Path(__file__).resolve().parents[2]
    / "shared/data/online_retail/online_retail_2009-12_2011-08.parquet"
)
COLUMNS = ColumnMap(item="StockCode", time="InvoiceDate", quantity="Quantity", price="UnitPrice")
ITEM_PATTERN = r"^\d{5}[A-Z]?$"
MIN_ACTIVE = 100
TRAIN_END = pd.Timestamp("2011-06-30")  # last training day (inclusive)
TEST_END = pd.Timestamp("2011-08-31")  # every horizon ends by this day
HORIZON = 28
WINDOW = 56  # input length for baselines and LightGBM features
DAY_MS = 86_400_000
DATASETS = ("retail", "smooth")
SMOOTH_FAMILY_DIGITS = 3  # product family: the StockCode's first digits
SMOOTH_MIN_ACTIVE = 450  # days with order lines, of ~520 open days 2009-12..2011-08

F32 = npt.NDArray[np.float32]


# --------------------------------------------------------------------------------------------
# LSTM adapter: the only place that knows the training/export API (imported lazily: TF).
# --------------------------------------------------------------------------------------------


def train_lstm_bundle(panel_train: Panel, out_dir: Path) -> tuple[Path, Path | None]:
    """Train the LSTM on ``panel_train`` and export it to ``out_dir/bundle``.

    Written against ``training.train(panel, TrainConfig)`` -> ``TrainResult`` and
    ``export.onnx_export.export_bundle(result, dir)`` as they stood when this bench was
    written; imported lazily (TensorFlow) so ``--skip-lstm`` never needs them. The training
    split is taken inside ``train`` (its last ``horizon`` buckets validate), so everything it
    sees is before 2011-07-01.

    Returns:
        The bundle, and the same network with its band calibration reset to identity exported
        to ``out_dir/bundle-uncalibrated-band`` (``None`` if training did not calibrate).
    """
    trainer = importlib.import_module("training.trainer")
    exporter = importlib.import_module("export.onnx_export")
    model_mod = importlib.import_module("training.model")
    config = trainer.TrainConfig(window=WINDOW, horizon=HORIZON)
    result = trainer.train(panel_train, config)
    bundle_dir: Path = Path(exporter.export_bundle(result, out_dir / "bundle"))
    if result.extra.get("band_calibration") is None:
        return bundle_dir, None
    ones = [1.0] * HORIZON
    model_mod.calibrate_band(result.model, ones, ones)
    plain: Path = Path(exporter.export_bundle(result, out_dir / "bundle-uncalibrated-band"))
    return bundle_dir, plain


class Renamed:
    """A forecaster under another name (two bundles of one model in one backtest)."""

    def __init__(self, inner: Forecaster, name: str) -> None:
        self._inner = inner
        self._name = name
        self.window = _window(inner)

    @property
    def name(self) -> str:
        return self._name

    @property
    def horizon(self) -> int:
        return self._inner.horizon

    def predict(self, batch: WindowBatch) -> ForecastBatch:
        return self._inner.predict(batch)


def load_lstm(bundle_dir: Path) -> Forecaster:
    """The ONNX-served LSTM as a :class:`Forecaster` (the other helper's ``OnnxForecaster``)."""
    from trendcast.bundle import load_bundle

    onnx_mod = importlib.import_module("trendcast.forecasting.onnx")
    forecaster: Forecaster = onnx_mod.OnnxForecaster(load_bundle(bundle_dir))
    return forecaster


def onnx_throughput(
    forecaster: Forecaster, batch: WindowBatch, sizes: Sequence[int] = (1, 256), runs: int = 7
) -> dict[int, float]:
    """Windows per second of ``forecaster.predict`` at each batch size (median of ``runs``)."""
    out: dict[int, float] = {}
    for size in sizes:
        idx = np.arange(size) % len(batch)
        sub = WindowBatch(
            item_ids=[batch.item_ids[i] for i in idx],
            quantities=batch.quantities[idx],
            prices=None if batch.prices is None else batch.prices[idx],
            last_start_ms=batch.last_start_ms[idx],
            history_len=batch.history_len[idx],
        )
        forecaster.predict(sub)  # warm-up (session init, allocations)
        reps = max(runs, 200 // size)  # tiny batches are noisy: time more of them
        times = []
        for _ in range(reps):
            started = time.perf_counter()
            forecaster.predict(sub)
            times.append(time.perf_counter() - started)
        out[size] = size / float(np.median(times))
    return out


# --------------------------------------------------------------------------------------------
# AutoETS (statsforecast)
# --------------------------------------------------------------------------------------------


class AutoETSForecaster:
    """statsforecast AutoETS(season 7) refit per item at every call; p10/p90 = 80% interval."""

    name = "auto_ets"

    def __init__(self, horizon: int, window: int = 364, min_history: int = 28) -> None:
        self._horizon = horizon
        self.window = window  # the backtest hands this forecaster its last `window` buckets
        self.min_history = min_history

    @property
    def horizon(self) -> int:
        return self._horizon

    def predict(self, batch: WindowBatch) -> ForecastBatch:
        from statsforecast import StatsForecast
        from statsforecast.models import AutoETS, SeasonalNaive

        n = len(batch)
        fallback = batch.history_len < self.min_history
        point = seasonal_naive(batch.quantities, batch.history_len, 7, self._horizon)
        mean, lo, hi = point.copy(), point.copy(), point.copy()
        fit_rows = np.flatnonzero(~fallback)
        if fit_rows.size:
            ids, ds, ys = [], [], []
            for row in fit_rows:
                length = int(batch.history_len[row])
                last = pd.Timestamp(int(batch.last_start_ms[row]), unit="ms")
                ids.append(np.full(length, row))
                ds.append(pd.date_range(end=last, periods=length, freq="D").to_numpy())
                ys.append(batch.quantities[row, -length:].astype(np.float64))
            df = pd.DataFrame(
                {
                    "unique_id": np.concatenate(ids),
                    "ds": np.concatenate(ds),
                    "y": np.concatenate(ys),
                }
            )
            sf = StatsForecast(
                models=[AutoETS(season_length=7)],
                freq="D",
                n_jobs=-1,
                fallback_model=SeasonalNaive(season_length=7),
            )
            fc = sf.forecast(df=df, h=self._horizon, level=[80])
            fc = fc.sort_values(["unique_id", "ds"])
            rows = fc["unique_id"].to_numpy().reshape(-1, self._horizon)[:, 0].astype(np.int64)
            mean[rows] = fc["AutoETS"].to_numpy().reshape(-1, self._horizon)
            lo[rows] = fc["AutoETS-lo-80"].to_numpy().reshape(-1, self._horizon)
            hi[rows] = fc["AutoETS-hi-80"].to_numpy().reshape(-1, self._horizon)
        mean = np.maximum(np.nan_to_num(mean), 0.0).astype(np.float32)
        p10 = np.minimum(np.maximum(np.nan_to_num(lo), 0.0), mean).astype(np.float32)
        p90 = np.maximum(np.nan_to_num(hi), mean).astype(np.float32)
        return ForecastBatch(
            mean=mean,
            p10=p10,
            p50=mean.copy(),
            p90=p90,
            fallback=fallback.astype(bool) if n else np.zeros(0, dtype=bool),
        )


# --------------------------------------------------------------------------------------------
# LightGBM global model (direct multi-horizon, step as a feature)
# --------------------------------------------------------------------------------------------


def lgbm_features(batch: WindowBatch, steps: npt.NDArray[np.int64]) -> tuple[F32, F32]:
    """Feature matrix for (window row, step) pairs, and each row's level (scale).

    ``steps`` is ``[n, k]``: the horizon steps (1-based) wanted for each window; the result has
    ``n * k`` rows in row-major order. All quantity features are divided by the window's level
    (mean of its real buckets + 1) so one model serves items of any size.
    """
    q = batch.quantities.astype(np.float32)
    n, w = q.shape
    real = np.maximum(batch.history_len, 1).astype(np.float32)
    level = (q.sum(axis=1) / real + 1.0).astype(np.float32)
    s = q / level[:, None]
    base = [s[:, w - k] for k in range(1, 29)]  # lag_1 .. lag_28
    for length in (7, 14, 28, 56):
        base.append(s[:, w - length :].sum(axis=1) / np.minimum(real, length))
    base.append(s[:, -28:].std(axis=1))
    base.append((q[:, -28:] == 0).mean(axis=1))
    sold = q > 0
    last_sale = np.where(sold.any(axis=1), w - 1 - np.argmax(sold[:, ::-1], axis=1), -1)
    base.append(np.where(last_sale >= 0, w - 1 - last_sale, w).astype(np.float32))
    base.append(np.log1p(level))
    base.append(np.minimum(batch.history_len, w).astype(np.float32))
    if batch.prices is not None:
        p = batch.prices
        with np.errstate(invalid="ignore", divide="ignore"):
            mean_p = np.nanmean(np.where(np.isfinite(p), p, np.nan), axis=1)
            base.append(p[:, -1] / mean_p)
    else:
        base.append(np.full(n, np.nan, dtype=np.float32))
    per_window = np.stack(base, axis=1).astype(np.float32)  # [n, f]
    k = steps.shape[1]
    rep = np.repeat(per_window, k, axis=0)
    h = steps.ravel()
    row = np.repeat(np.arange(n), k)
    # Same weekday as the target, most recent and mean of the last 4 such days.
    back = 7 * ((h + 6) // 7)  # the smallest multiple of 7 >= h
    pos = w - 1 + h - back
    same = np.stack([s[row, np.maximum(pos - 7 * j, 0)] for j in range(4)], axis=1)
    dow = ((batch.last_start_ms[row] // DAY_MS + h + 3) % 7).astype(np.float32)  # 0 = Monday
    extra = np.column_stack([h.astype(np.float32), dow, same[:, 0], same.mean(axis=1)])
    features = np.hstack([rep, extra]).astype(np.float32)
    if features.shape[1] != len(LGBM_FEATURES):
        raise AssertionError(f"expected {len(LGBM_FEATURES)} features, got {features.shape[1]}")
    return features, level


LGBM_FEATURES = [f"lag_{k}" for k in range(1, 29)] + [
    "mean_7",
    "mean_14",
    "mean_28",
    "mean_56",
    "std_28",
    "zero_share_28",
    "days_since_sale",
    "log_level",
    "history_len",
    "rel_price",
    "step",
    "target_dow",
    "same_dow_lag",
    "same_dow_mean4",
]


class LightGBMForecaster:
    """Global LightGBM: mean (L2) and p10/p50/p90 (quantile objective) on level-scaled targets."""

    name = "lightgbm"

    def __init__(self, horizon: int, *, rounds: int = 300, seed: int = 0) -> None:
        self._horizon = horizon
        self.window = WINDOW
        self.rounds = rounds
        self.seed = seed
        self.models: dict[str, Any] = {}
        self.fit_seconds = 0.0

    @property
    def horizon(self) -> int:
        return self._horizon

    def fit(self, panel_train: Panel, *, weeks: int = 52, steps_per_window: int = 7) -> None:
        """Train on weekly cutoffs over the last ``weeks`` whose targets lie in ``panel_train``."""
        import lightgbm as lgb

        started = time.perf_counter()
        rng = np.random.default_rng(self.seed)
        td = panel_train.freq.timedelta
        last_cut = panel_train.end + td - self._horizon * td
        cutoffs = [last_cut - 7 * k * td for k in range(weeks)]
        frame = panel_train.frame
        wide = frame.pivot(index="item_id", columns="ts", values="quantity")
        col_of: dict[pd.Timestamp, int] = {pd.Timestamp(ts): i for i, ts in enumerate(wide.columns)}
        values = wide.to_numpy(dtype=np.float32)
        row_of = {str(item): i for i, item in enumerate(wide.index)}
        xs, ys = [], []
        for cut in cutoffs:
            if cut <= panel_train.start + 14 * td:
                continue
            batch = windows_from_panel(panel_train, self.window, cutoff=cut)
            if len(batch) == 0:
                continue
            steps = (
                np.sort(
                    np.stack(
                        [
                            rng.choice(self._horizon, steps_per_window, replace=False)
                            for _ in range(len(batch))
                        ]
                    ),
                    axis=1,
                )
                + 1
            )
            x, level = lgbm_features(batch, steps)
            rows = np.array([row_of[i] for i in batch.item_ids])
            target_cols = col_of[cut] + steps - 1
            y = values[rows[:, None], target_cols] / level[:, None]
            xs.append(x)
            ys.append(y.ravel())
        x_all, y_all = np.vstack(xs), np.concatenate(ys)
        logger.info("lightgbm: %d training rows x %d features", *x_all.shape)
        params_base: dict[str, Any] = {
            "learning_rate": 0.05,
            "num_leaves": 63,
            "min_data_in_leaf": 100,
            "feature_fraction": 0.8,
            "bagging_fraction": 0.8,
            "bagging_freq": 1,
            "seed": self.seed,
            "verbose": -1,
            "num_threads": 0,
        }
        data = lgb.Dataset(
            x_all,
            y_all,
            feature_name=LGBM_FEATURES,
            categorical_feature=["target_dow"],
            free_raw_data=False,
        )
        objectives: dict[str, dict[str, Any]] = {"mean": {"objective": "l2"}}
        for q in (0.1, 0.5, 0.9):
            objectives[f"p{int(q * 100)}"] = {"objective": "quantile", "alpha": q}
        for key, params in objectives.items():
            self.models[key] = lgb.train(params_base | params, data, num_boost_round=self.rounds)
        self.fit_seconds = time.perf_counter() - started

    def predict(self, batch: WindowBatch) -> ForecastBatch:
        if not self.models:
            raise ConfigError("LightGBMForecaster.predict called before fit")
        n = len(batch)
        steps = np.tile(np.arange(1, self._horizon + 1), (n, 1))
        x, level = lgbm_features(batch, steps)
        out = {}
        for key, model in self.models.items():
            pred = np.asarray(model.predict(x), dtype=np.float32).reshape(n, self._horizon)
            out[key] = np.maximum(pred * level[:, None], 0.0).astype(np.float32)
        # Quantile models are trained separately and can cross: sort them per cell.
        qs = np.sort(np.stack([out["p10"], out["p50"], out["p90"]]), axis=0)
        return ForecastBatch(
            mean=out["mean"], p10=qs[0], p50=qs[1], p90=qs[2], fallback=np.zeros(n, dtype=bool)
        )


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------


def _sample_items(panel: Panel, n: int, seed: int) -> Panel:
    items = np.array(sorted(panel.frame["item_id"].unique()))
    rng = np.random.default_rng(seed)
    keep = set(rng.choice(items, size=min(n, len(items)), replace=False).tolist())
    frame = panel.frame[panel.frame["item_id"].isin(keep)].reset_index(drop=True)
    return Panel(frame=frame, freq=panel.freq, has_price=panel.has_price)


def smooth_panel(
    lines: pd.DataFrame,
    *,
    digits: int = SMOOTH_FAMILY_DIGITS,
    min_active: int = SMOOTH_MIN_ACTIVE,
) -> Panel:
    """Daily order lines per product family from canonical sales lines (the ``smooth`` set).

    A family is ``fam`` + the first ``digits`` characters of the item id; every sales line with
    a positive quantity counts 1, whatever its quantity (see the module docstring for why).

    >>> lines = pd.DataFrame({"item_id": ["84945", "84946", "84945", "22423"],
    ...     "ts": pd.to_datetime(["2011-01-03 09:00", "2011-01-03 10:00", "2011-01-04 11:00",
    ...         "2011-01-04 12:00"]), "quantity": [1.0, 480.0, 6.0, 2.0]})
    >>> p = smooth_panel(lines, min_active=2)
    >>> p.frame.assign(ts=p.frame.ts.dt.day).values.tolist()
    [['fam849', 3, 2.0], ['fam849', 4, 1.0]]
    """
    sold = lines[lines["quantity"] > 0]
    families = pd.DataFrame(
        {
            "item_id": "fam" + sold["item_id"].astype(str).str[:digits],
            "ts": sold["ts"],
            "quantity": 1.0,
        }
    )
    return bucketize(families, parse_freq("1D"), has_price=False, min_active=min_active)


def load_dataset(name: str, path: Path) -> Panel:
    """The ``retail`` or ``smooth`` panel (see the module docstring), through :data:`TEST_END`.

    Raises:
        ConfigError: Unknown name, or the data does not reach :data:`TEST_END`.
    """
    if name == "retail":
        panel = load_sales(
            path,
            parse_freq("1D"),
            columns=COLUMNS,
            item_pattern=ITEM_PATTERN,
            min_active=MIN_ACTIVE,
        )
    elif name == "smooth":
        lines, _ = clean_lines(
            read_table(path), columns=COLUMNS, item_pattern=ITEM_PATTERN, source=str(path)
        )
        panel = smooth_panel(lines)
    else:
        raise ConfigError(f"expected a data set in {list(DATASETS)}, got {name!r}")
    panel = Panel(
        frame=panel.frame[panel.frame["ts"] <= TEST_END].reset_index(drop=True),
        freq=panel.freq,
        has_price=panel.has_price,
    )
    if panel.end != TEST_END:
        raise ConfigError(f"expected data through {TEST_END.date()}, got {panel.end.date()}")
    return panel


def coverage_by_origin(forecasts: pd.DataFrame, model: str) -> dict[str, float]:
    """p10-p90 coverage of ``model`` at each origin (as :func:`trendcast.metrics.coverage`).

    >>> f = pd.DataFrame({"model": ["lstm"] * 3, "origin": pd.to_datetime(["2011-07-07"] * 2
    ...     + ["2011-07-14"]), "actual": [1.0, 5.0, 0.0], "p10": [0.0] * 3, "p90": [2.0] * 3})
    >>> coverage_by_origin(f, "lstm")
    {'2011-07-07': 0.5, '2011-07-14': 1.0}
    """
    rows = forecasts[forecasts["model"] == model]
    inside = (rows["actual"] >= rows["p10"]) & (rows["actual"] <= rows["p90"])
    by_origin = inside.groupby(pd.to_datetime(rows["origin"]).dt.date).mean()
    return {str(origin): round(float(share), 3) for origin, share in by_origin.items()}


DATASET_TITLES = {
    "retail": f"Online Retail II, daily units, items with >= {MIN_ACTIVE} selling days",
    "smooth": (
        f"smooth set: Online Retail II, daily order lines per product family "
        f"(first {SMOOTH_FAMILY_DIGITS} StockCode digits, >= {SMOOTH_MIN_ACTIVE} active days)"
    ),
}


def run_dataset(name: str, args: argparse.Namespace, t0: float) -> str:
    """Backtest every model on data set ``name``; print and return its markdown block."""
    panel = load_dataset(name, args.data)
    if args.quick:
        panel = _sample_items(panel, args.quick_items, seed=0)
    train = panel.until(TRAIN_END + panel.freq.timedelta)
    origins = backtest_origins(
        TEST_END,
        panel.freq,
        horizon=HORIZON,
        n_origins=1 if args.quick else None,
        weeks=None if args.quick else 8,
        step=7,
    )
    print(
        f"[{name}] data: {panel.n_items} items, {panel.start.date()}..{panel.end.date()}; train "
        f"through {train.end.date()}; origins {[o.date().isoformat() for o in origins]}; "
        f"load {time.perf_counter() - t0:.1f}s",
        flush=True,
    )

    forecasters: list[Forecaster] = [
        ZeroForecaster(HORIZON),
        NaiveForecaster(HORIZON),
        SeasonalNaiveForecaster(HORIZON, 7),
        WindowMeanForecaster(HORIZON, 28),
    ]
    timings: dict[str, str] = {}
    lstm: Forecaster | None = None
    notes: list[str] = []
    validation: list[str] = []
    if not args.skip_lstm:
        from trendcast.bundle import load_bundle

        plain_dir: Path | None = None
        if args.lstm_bundle is not None:
            # Reuse a bundle trained elsewhere (its own leakage check below still applies).
            bundle_dir = Path(args.lstm_bundle)
            timings["lstm training wall time"] = "n/a (--lstm-bundle)"
        else:
            base = args.lstm_dir or Path(tempfile.mkdtemp(prefix="tc-lstm-"))
            started = time.perf_counter()
            bundle_dir, plain_dir = train_lstm_bundle(train, base / name)
            timings["lstm training wall time (+ 2 exports)"] = (
                f"{time.perf_counter() - started:.1f} s"
            )
        lstm = load_lstm(bundle_dir)
        bundle = load_bundle(bundle_dir)
        note = bundle_leakage_warning(bundle, origins)
        if note:
            notes.append(note)
        validation.append(_validation_line(bundle.meta.metrics, bundle.meta.training.extra))
        forecasters.insert(0, lstm)
        if plain_dir is not None:
            forecasters.insert(1, Renamed(load_lstm(plain_dir), "lstm_uncalibrated_band"))
    if not args.skip_ets:
        forecasters.append(AutoETSForecaster(HORIZON))
    if not args.skip_lgbm:
        lgbm = LightGBMForecaster(HORIZON, rounds=100 if args.quick else args.lgbm_rounds)
        lgbm.fit(train)
        timings["lightgbm training wall time"] = f"{lgbm.fit_seconds:.1f} s"
        forecasters.append(lgbm)

    def progress(index: int, count: int, origin: pd.Timestamp) -> None:
        print(
            f"  [{name}] origin {index + 1}/{count} {origin.date()} done "
            f"({time.perf_counter() - t0:.0f}s)",
            flush=True,
        )

    result: BacktestResult = backtest(
        panel, forecasters, horizon=HORIZON, window=WINDOW, origins=origins, on_origin=progress
    )
    if lstm is not None:
        batch = windows_from_panel(panel, _window(lstm), cutoff=origins[-1])
        for size, rate in onnx_throughput(lstm, batch).items():
            timings[f"onnx runtime windows/s at batch {size}"] = f"{rate:,.0f}"
    for model, secs in result.metrics["predict_seconds"].items():
        timings[f"{model} predict (all origins)"] = f"{secs:.2f} s"

    print_metrics(result)
    columns = ["rmsse", "wape", "mase", "pinball", "coverage", "fallback_share"]
    lines = [
        f"{DATASET_TITLES[name]}: {result.n_items} series, trained through {TRAIN_END.date()}, "
        f"{len(origins)} weekly origin(s) {origins[0].date()}..{origins[-1].date()}, horizon "
        f"{HORIZON}{' (QUICK: sampled items)' if args.quick else ''}:",
        "",
        metrics_markdown(result.metrics, columns),
        "",
    ]
    for model in ("lstm", "lstm_uncalibrated_band"):
        if model in result.metrics.index:
            by_origin = coverage_by_origin(result.forecasts, model)
            lines.append(
                f"{model} p10-p90 coverage by origin: "
                + ", ".join(f"{o} {c:.3f}" for o, c in by_origin.items())
            )
    lines.extend(validation)
    lines += ["", "| timing | value |", "|---|---:|"]
    lines += [f"| {key} | {value} |" for key, value in timings.items()]
    lines += [f"\nWARNING: {note}" for note in notes]
    if args.out:
        written = write_report(
            result, Path(args.out) / name, extra={"timings": timings, "notes": notes}
        )
        lines.append(f"\nreport: {', '.join(str(p) for p in written.values())}")
    block = "\n".join(lines)
    print()
    print(block, flush=True)
    return block


def _validation_line(metrics: dict[str, Any], extra: dict[str, Any]) -> str:
    """The LSTM's scores on its validation split, with the band calibration's before/after."""
    scores = metrics.get("validation", {}).get("lstm", {})
    band = extra.get("band_calibration")
    text = (
        f"lstm validation split (last {HORIZON} days of training): coverage "
        f"{scores.get('coverage', float('nan')):.3f}, pinball {scores.get('pinball', 0):.4f}, "
        f"RMSSE {scores.get('rmsse', float('nan')):.4f}, WAPE {scores.get('wape', 0):.4f}"
    )
    if band:
        text += (
            f"; band calibration (in-sample): coverage {band['coverage_before']:.3f} -> "
            f"{band['coverage_after']:.3f}, p10 offset x{min(band['p10']):.2f}.."
            f"{max(band['p10']):.2f}, p90 offset x{min(band['p90']):.2f}..{max(band['p90']):.2f}"
        )
    return text


def run(args: argparse.Namespace) -> int:
    """Run the bench on the chosen data set(s); return the exit code."""
    t0 = time.perf_counter()
    names = DATASETS if args.dataset == "both" else (args.dataset,)
    if args.lstm_bundle is not None and len(names) > 1:
        raise ConfigError("expected --dataset retail or smooth with --lstm-bundle, got both")
    blocks = [run_dataset(name, args, t0) for name in names]
    if len(blocks) > 1:
        print("\n" + "=" * 80 + "\nall data sets\n")
        print("\n\n".join(blocks))
    print(f"\ntotal {time.perf_counter() - t0:.0f}s")
    return 0


def _window(forecaster: Forecaster) -> int:
    own = getattr(forecaster, "window", None)
    return own if isinstance(own, int) else WINDOW


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0] if __doc__ else None)
    parser.add_argument("--data", type=Path, default=DATA, help="Online Retail parquet/CSV")
    parser.add_argument(
        "--dataset",
        choices=[*DATASETS, "both"],
        default="both",
        help="retail: intermittent items; smooth: order lines per product family",
    )
    parser.add_argument(
        "--quick", action="store_true", help="<= --quick-items series, 1 origin (smoke test)"
    )
    parser.add_argument("--quick-items", type=int, default=100)
    parser.add_argument("--skip-lstm", action="store_true", help="baselines only (no TF)")
    parser.add_argument("--skip-ets", action="store_true")
    parser.add_argument("--skip-lgbm", action="store_true")
    parser.add_argument("--lgbm-rounds", type=int, default=300)
    parser.add_argument("--lstm-dir", type=Path, default=None, help="where to train the LSTM")
    parser.add_argument(
        "--lstm-bundle", type=Path, default=None, help="score this bundle instead of training"
    )
    parser.add_argument(
        "--out", type=Path, default=None, help="also write the reports here (one dir per set)"
    )
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    try:
        return run(args)
    except TrendcastError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:  # a bench must fail loudly but in one line, with a non-zero exit
        logger.debug("bench failed", exc_info=True)
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
