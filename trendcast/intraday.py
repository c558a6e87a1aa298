"""Offline replay of intraday nowcasts and alerts: ``trendcast evaluate --intraday``.

For each item and each of the last ``buckets`` buckets of the data (the test period), replay
what the stream would have said about the open bucket:

* the *start-of-bucket forecast*: step 1 of the bundle's forecast made with the window that
  ends the bucket before (the close forecast the stream sends when that bucket closes);
* the *nowcast* (:func:`trendcast.forecasting.nowcast.nowcast`) made 25%, 50% and 75% of the
  way through the bucket (06:00, 12:00, 18:00 of a day), from the units sold by then in the
  sales lines and the bundle's intraday profile;

and score both against the bucket's total: WAPE of the median, RMSSE of the mean (scaled by
each item's one-step naive error before the test period, :func:`trendcast.metrics.rmsse`) and
coverage of the p10-p90 band. Items are those with history before the test period (every
item then has a forecast for every test bucket).

Alerts are replayed as the stream raises them: a ``surge`` is checked at every sales line
(the event that crosses the threshold raises it), a ``stall`` on a grid of
:data:`STALL_CHECKS` checks per bucket (the stream checks every ``TRENDCAST_REFRESH_S``), at
most one of each kind per item and bucket. For each threshold of
``TRENDCAST_ALERT_PROBABILITY`` the table gives alerts per bucket (per day for daily
buckets), how often a surge was followed by a bucket total above the forecast's p90, how
often a stalled item's bucket ended below its p10 (or with nothing sold), and how far into
the bucket the alerts came (median share of the bucket's duration).
:func:`recommend_threshold` turns that into a default.

numpy/pandas and ONNX Runtime only (no TensorFlow): it runs wherever ``trendcast forecast``
does.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pandas as pd

from trendcast.bundle import Bundle
from trendcast.data import Panel
from trendcast.exceptions import ConfigError, DataError
from trendcast.forecasting.base import ForecastBatch, Forecaster
from trendcast.forecasting.nowcast import DEFAULT_KAPPA, alert_probabilities, nowcast
from trendcast.forecasting.profile import IntradayProfile
from trendcast.forecasting.windows import windows_from_panel
from trendcast.metrics import naive_scales, rmsse
from trendcast.metrics import wape as wape_score

__all__ = [
    "DEFAULT_FRACTIONS",
    "DEFAULT_THRESHOLDS",
    "MIN_SURGE_PRECISION",
    "STALL_CHECKS",
    "IntradayEvaluation",
    "evaluate_intraday",
    "recommend_threshold",
]

logger = logging.getLogger(__name__)

F64 = npt.NDArray[np.float64]

DEFAULT_FRACTIONS = (0.25, 0.5, 0.75)
DEFAULT_THRESHOLDS = (0.05, 0.01, 0.001, 0.0001)
#: Stall checks per bucket in the replay (every 15 minutes of a day).
STALL_CHECKS = 96
#: A surge threshold is recommended only if at least this share of its surges ended above p90:
#: an alert someone acts on should be right more than two times in three.
MIN_SURGE_PRECISION = 0.7


@dataclass(frozen=True)
class IntradayEvaluation:
    """What :func:`evaluate_intraday` measured.

    Attributes:
        accuracy: One row per forecast (``start of bucket``, ``nowcast at 25%``…): ``wape``,
            ``rmsse``, ``coverage``, ``mean_share`` (mean profile share elapsed), ``rows``.
        alerts: One row per alert kind and threshold: ``alerts_per_bucket``, ``precision``
            (surge: bucket total above p90; stall: below p10 or nothing), ``median_at``
            (share of the bucket elapsed when raised), ``alerts``.
        recommended_probability: The suggested ``TRENDCAST_ALERT_PROBABILITY``.
        n_items: Items replayed.
        n_buckets: Test buckets replayed.
        files: Written files (``intraday.md``, CSVs), empty without ``out_dir``.
    """

    accuracy: pd.DataFrame
    alerts: pd.DataFrame
    recommended_probability: float
    n_items: int
    n_buckets: int
    files: dict[str, Path]

    def markdown(self) -> str:
        """The two tables as Markdown (what ``intraday.md`` holds)."""
        acc = self.accuracy.reset_index()
        alerts = self.alerts.reset_index()
        lines = [
            f"Open-bucket total, {self.n_items} items x {self.n_buckets} test buckets:",
            "",
            "| forecast | WAPE (p50) | RMSSE (mean) | coverage p10-p90 | profile share |",
            "|---|---:|---:|---:|---:|",
        ]
        for row in acc.itertuples(index=False):
            lines.append(
                f"| {row.forecast} | {row.wape:.3f} | {row.rmsse:.3f} | {row.coverage:.1%} "
                f"| {row.mean_share:.2f} |"
            )
        lines += [
            "",
            "Alerts (at most one per item, kind and bucket):",
            "",
            "| kind | probability < | alerts per bucket | precision | median at |",
            "|---|---:|---:|---:|---:|",
        ]
        for row in alerts.itertuples(index=False):
            lines.append(
                f"| {row.kind} | {row.threshold:g} | {row.alerts_per_bucket:.1f} | "
                f"{row.precision:.1%} | {row.median_at:.2f} |"
            )
        lines += [
            "",
            "precision: surge = bucket total above the forecast's p90; stall = below its p10 or 0.",
            f"Recommended TRENDCAST_ALERT_PROBABILITY: {self.recommended_probability:g}",
        ]
        return "\n".join(lines) + "\n"


def recommend_threshold(alerts: pd.DataFrame, min_precision: float = MIN_SURGE_PRECISION) -> float:
    """The most sensitive threshold whose surges were mostly real.

    The largest threshold at which at least ``min_precision`` of the surges were followed by a
    bucket total above the forecast's p90 (a surge that the close confirms); the strictest
    threshold if none is.

    >>> a = pd.DataFrame({"kind": ["surge"] * 3, "threshold": [0.05, 0.01, 0.001],
    ...     "precision": [0.3, 0.6, 0.8]})
    >>> recommend_threshold(a), recommend_threshold(a, min_precision=0.5)
    (0.001, 0.01)
    """
    surges = alerts[alerts["kind"] == "surge"].sort_values("threshold", ascending=False)
    good = surges[surges["precision"] >= min_precision]
    if good.empty:
        return float(surges["threshold"].min())
    return float(good["threshold"].iloc[0])


def _forecasts(
    panel: Panel, forecaster: Forecaster, window: int, starts: Sequence[pd.Timestamp], items: F64
) -> dict[str, F64]:
    """Step-1 forecasts ``[items, buckets]`` made with the window ending before each bucket."""
    item_list = list(items)
    out = {k: np.zeros((len(item_list), len(starts))) for k in ("mean", "p10", "p50", "p90")}
    position = {item: k for k, item in enumerate(item_list)}
    for j, start in enumerate(starts):
        batch = windows_from_panel(panel, window, cutoff=start)
        keep = np.array([i in position for i in batch.item_ids])
        batch = batch.take(np.flatnonzero(keep))
        result: ForecastBatch = forecaster.predict(batch)
        rows = np.array([position[i] for i in batch.item_ids], dtype=np.int64)
        for key in out:
            out[key][rows, j] = getattr(result, key)[:, 0]
    return out


def _scores(y: F64, mean: F64, p10: F64, p50: F64, p90: F64, scale_sq: F64) -> dict[str, float]:
    return {
        "wape": wape_score(y, p50),
        "rmsse": float(np.nanmean(rmsse(y, mean, scale_sq))),
        "coverage": float(((y >= p10) & (y <= p90)).mean()),
    }


def evaluate_intraday(
    panel: Panel,
    bundle: Bundle,
    out_dir: Path | str | None = None,
    *,
    buckets: int = 28,
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
    kappa: float = DEFAULT_KAPPA,
    profile: IntradayProfile | None = None,
    forecaster: Forecaster | None = None,
    on_bucket: Callable[[int, int], None] | None = None,
) -> IntradayEvaluation:
    """Replay the last ``buckets`` buckets of ``panel`` with ``bundle`` (see the module doc).

    Args:
        panel: Bucketed data with its sales lines (:attr:`Panel.lines`).
        bundle: The model; it should be trained on data before the test period.
        out_dir: Where to write ``intraday.md``, ``intraday_accuracy.csv`` and
            ``intraday_alerts.csv`` (nothing written if ``None``).
        buckets: Test buckets at the end of the data.
        fractions: Points in the bucket (share of its duration) where nowcasts are scored.
        thresholds: ``TRENDCAST_ALERT_PROBABILITY`` values to replay alerts with.
        kappa: Prior strength of the nowcast's rate update.
        profile: Intraday profile (default: the bundle's).
        forecaster: Forecaster (default: the bundle's ONNX model).
        on_bucket: Called with ``(done, total)`` after each test bucket's forecasts.

    Raises:
        DataError: The panel has no sales lines, or too few buckets or items.
        ConfigError: The bundle's frequency differs from the panel's, or bad fractions.
    """
    if panel.lines is None:
        raise DataError(
            "the intraday replay needs the sales lines with their timestamps "
            "(load the data with trendcast.data.load_sales)"
        )
    if bundle.meta.freq != panel.freq.name:
        raise ConfigError(
            f"bundle was trained on {bundle.meta.freq} buckets, data is bucketed by "
            f"{panel.freq.name} (pass --freq {bundle.meta.freq})"
        )
    if not all(0.0 < f < 1.0 for f in fractions):
        raise ConfigError(f"expected fractions strictly between 0 and 1, got {list(fractions)}")
    if buckets < 1 or buckets >= panel.n_buckets:
        raise DataError(f"expected 1 <= buckets < {panel.n_buckets} (the data's), got {buckets}")
    freq = panel.freq
    step = freq.step_ms
    if forecaster is None:
        from trendcast.forecasting.onnx import OnnxForecaster  # onnxruntime: only when needed

        forecaster = OnnxForecaster(bundle)
    profile = profile or IntradayProfile.from_bundle(bundle)
    first = panel.end - (buckets - 1) * freq.timedelta
    starts = list(freq.range(first, panel.end))
    frame = panel.frame
    first_seen = frame.groupby("item_id")["ts"].min()
    items = np.asarray(sorted(first_seen[first_seen < first].index), dtype=object)
    if items.size == 0:
        raise DataError(f"no item has history before the test period ({freq.label(first)})")
    n, m = len(items), len(starts)
    # Actual totals [items, buckets] and the naive scales of the history before the test.
    test = frame[(frame["ts"] >= first) & frame["item_id"].isin(items)]
    y = test.pivot(index="item_id", columns="ts", values="quantity").reindex(items).to_numpy()
    y = np.nan_to_num(y.astype(np.float64))
    history = frame[(frame["ts"] < first) & frame["item_id"].isin(items)]
    wide = history.pivot(index="item_id", columns="ts", values="quantity").reindex(items)
    scale_sq, _ = naive_scales(wide.to_numpy(dtype=np.float64))

    fc: dict[str, F64] = {k: np.zeros((n, m)) for k in ("mean", "p10", "p50", "p90")}
    chunk = max(1, m // 4)
    for lo in range(0, m, chunk):
        part = _forecasts(panel, forecaster, bundle.meta.window, starts[lo : lo + chunk], items)
        for key in fc:
            fc[key][:, lo : lo + chunk] = part[key]
        if on_bucket is not None:
            on_bucket(min(lo + chunk, m), m)

    # Sales lines of the test period, located in their bucket.
    lines = panel.lines
    lines = lines[(lines["ts"] >= first) & lines["item_id"].isin(items)]
    ts_ms = lines["ts"].to_numpy().astype("datetime64[ms]").astype(np.int64)
    bucket_ms = freq.floor_ms_array(ts_ms)
    first_ms = int(pd.Timestamp(first).value // 1_000_000)
    col = ((bucket_ms - first_ms) // step).astype(np.int64)
    index = {item: k for k, item in enumerate(items)}
    row = np.array([index[i] for i in lines["item_id"]], dtype=np.int64)
    qty = lines["quantity"].to_numpy(dtype=np.float64)
    elapsed = (ts_ms - bucket_ms) / step
    starts_ms = first_ms + np.arange(m, dtype=np.int64) * step
    item_grid = np.repeat(items, m).tolist()
    start_grid = np.tile(starts_ms, n)

    def flat(key: str) -> F64:
        return fc[key].ravel()

    rows_acc = [
        {"forecast": "start of bucket", "mean_share": 0.0}
        | _scores(y, fc["mean"], fc["p10"], fc["p50"], fc["p90"], scale_sq)
    ]
    for fraction in fractions:
        sold = np.zeros((n, m))
        before = elapsed < fraction
        np.add.at(sold, (row[before], col[before]), qty[before])
        sold = np.maximum(sold, 0.0)
        share = profile.cumulative_share(
            item_grid, start_grid, start_grid + int(round(fraction * step))
        )
        now = nowcast(
            flat("mean"), flat("p10"), flat("p50"), flat("p90"), share, sold.ravel(), kappa=kappa
        )
        rows_acc.append(
            {"forecast": f"nowcast at {fraction:.0%}", "mean_share": float(share.mean())}
            | _scores(
                y,
                now.nowcast.reshape(n, m),
                now.p10.reshape(n, m),
                now.p50.reshape(n, m),
                now.p90.reshape(n, m),
                scale_sq,
            )
        )
    accuracy = pd.DataFrame(rows_acc).set_index("forecast")
    accuracy["rows"] = n * m
    alerts = _replay_alerts(
        fc, y, profile, items, starts_ms, step, (row, col, qty, ts_ms), thresholds
    )
    recommended = recommend_threshold(alerts)
    alerts["alerts_per_bucket"] = alerts["alerts"] / m
    result = IntradayEvaluation(
        accuracy=accuracy,
        alerts=alerts.set_index(["kind", "threshold"]),
        recommended_probability=recommended,
        n_items=n,
        n_buckets=m,
        files={},
    )
    if out_dir is None:
        return result
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = {
        "markdown": out / "intraday.md",
        "accuracy_csv": out / "intraday_accuracy.csv",
        "alerts_csv": out / "intraday_alerts.csv",
    }
    files["markdown"].write_text(result.markdown())
    result.accuracy.to_csv(files["accuracy_csv"])
    result.alerts.to_csv(files["alerts_csv"])
    logger.info("wrote intraday report to %s", out)
    return IntradayEvaluation(
        accuracy=result.accuracy,
        alerts=result.alerts,
        recommended_probability=recommended,
        n_items=n,
        n_buckets=m,
        files=files,
    )


def _replay_alerts(
    fc: dict[str, F64],
    y: F64,
    profile: IntradayProfile,
    items: npt.NDArray[np.object_],
    starts_ms: npt.NDArray[np.int64],
    step: int,
    sales: tuple[npt.NDArray[np.int64], npt.NDArray[np.int64], F64, npt.NDArray[np.int64]],
    thresholds: Sequence[float],
) -> pd.DataFrame:
    """Surge and stall alerts at each threshold, as the stream would raise them."""
    row, col, qty, ts_ms = sales
    n, m = y.shape
    records: list[dict[str, float | str]] = []
    # Surges: at every sale, the units so far in its bucket (this line included).
    order = np.lexsort((ts_ms, col, row))
    row, col, qty, ts_ms = row[order], col[order], qty[order], ts_ms[order]
    key = row * m + col
    cum = np.cumsum(qty)
    group_start = np.r_[True, key[1:] != key[:-1]]
    base = np.maximum.accumulate(np.where(group_start, np.arange(len(key)), 0))
    so_far = np.maximum(cum - np.r_[0.0, cum][base], 0.0)
    start_ms = starts_ms[col]
    share = profile.cumulative_share(items[row].tolist(), start_ms, ts_ms)
    probs = alert_probabilities(
        fc["mean"][row, col], fc["p10"][row, col], fc["p90"][row, col], share, so_far
    )
    at = (ts_ms - start_ms) / step
    above_p90 = y > fc["p90"]
    below_p10 = (y < fc["p10"]) | (y <= 0)
    for threshold in thresholds:
        hit = probs.surges(so_far, threshold)
        first_hit = pd.Series(at[hit]).groupby(key[hit]).min()
        keys = first_hit.index.to_numpy(dtype=np.int64)
        records.append(
            {
                "kind": "surge",
                "threshold": threshold,
                "alerts": float(len(keys)),
                "precision": float(above_p90.ravel()[keys].mean()) if len(keys) else np.nan,
                "median_at": float(first_hit.median()) if len(keys) else np.nan,
            }
        )
    # Stalls: on a grid of checks, the first check at which nothing has sold although
    # selling nothing by then had a probability below the threshold.
    first_sale = np.full(n * m, np.inf)
    np.minimum.at(first_sale, key, at)
    checks = (np.arange(1, STALL_CHECKS + 1) / STALL_CHECKS)[:-1]
    flat_items = np.repeat(items, m).tolist()
    flat_starts = np.tile(starts_ms, n)
    p_zero = np.empty((n * m, len(checks)))
    for k, frac in enumerate(checks):
        shares = profile.cumulative_share(
            flat_items, flat_starts, flat_starts + int(round(frac * step))
        )
        p_zero[:, k] = alert_probabilities(
            fc["mean"].ravel(), fc["p10"].ravel(), fc["p90"].ravel(), shares, np.zeros(n * m)
        ).stall
    for threshold in thresholds:
        below = p_zero < threshold
        has = below.any(axis=1)
        first_check = np.where(has, checks[np.argmax(below, axis=1)], np.inf)
        raised = has & (first_sale > first_check)
        records.append(
            {
                "kind": "stall",
                "threshold": threshold,
                "alerts": float(raised.sum()),
                "precision": float(below_p10.ravel()[raised].mean()) if raised.any() else np.nan,
                "median_at": float(np.median(first_check[raised])) if raised.any() else np.nan,
            }
        )
    return pd.DataFrame(records)
