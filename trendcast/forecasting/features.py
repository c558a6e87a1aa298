"""The one definition of the model's inputs, shared by training and inference.

Training (``training``) and every inference path (``trendcast forecast``, the stream worker
through :class:`~trendcast.forecasting.onnx.OnnxForecaster`) call :func:`build_inputs` on a
:class:`~trendcast.forecasting.base.WindowBatch`, so the two sides cannot drift: the training
windows are literally WindowBatches cut from the panel. The feature *names* are stored in
``bundle.json`` and fully determine the transform, so a bundle always gets the inputs it was
trained on.

Features, per input bucket, in this order:

=================  ===========================================================================
``qty``            quantity / item scale (``qty_log1p``: ``log1p`` of it, tames sales spikes)
``dow_sin/cos``    day of week of the bucket start (Monday = 0), on the unit circle
``dom_sin/cos``    day of month (1..31)
``month_sin/cos``  month of year
``price``          price / the item's mean training price; unknown (NaN) -> 1.0 ("usual
                   price"); only when the data has prices
=================  ===========================================================================

Daily, weekly and hourly models get the calendar above (an hourly model sees no hour of day:
that is the feature set its bundles were trained with, kept as it is). Minute models
(``freq.is_sub_hourly``) read a window of minutes to hours, in which day of month and month
are constant; they get instead, in this order after the quantity:

=================  ===========================================================================
``moh_sin/cos``    minute of the hour of the bucket start (0..59)
``hod_sin/cos``    hour of the day, with its minutes (0..24), so buckets before and after
                   noon differ and 23:59 is close to 00:00
``dow_sin/cos``    day of week, as above
=================  ===========================================================================

Scaling: an item's scale is the mean of its training history plus ``epsilon`` (stored in
``scales.json``); the model sees and predicts quantities divided by it, which lets one global
model serve items selling 1 or 1,000 units a day. Items unknown to the bundle use the mean of
their window's real (non-padded) history instead. Training windows use the item mean *as known
at the window's end* (from the first sale to the last input bucket), which is what the stored
scale is at inference time; the full-history mean would tell the model each window's future
level.

Training windows (:func:`make_training_windows`) hold ``window`` inputs and ``horizon`` targets,
lie fully inside an item's history, and never reach into the last ``horizon`` buckets of a
series: those are the validation targets (a time-based split). Items shorter than
``window + horizon`` buckets get no window at all; at inference they get the seasonal-naive
fallback.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import pandas as pd

from trendcast.data import Panel
from trendcast.exceptions import ConfigError, DataError
from trendcast.forecasting.base import WindowBatch
from trendcast.freq import Freq

__all__ = [
    "CALENDAR_FEATURES",
    "MINUTE_CALENDAR_FEATURES",
    "DEFAULT_EPSILON",
    "KNOWN_FEATURES",
    "TrainingWindows",
    "build_inputs",
    "bucket_starts_ms",
    "calendar_columns",
    "calendar_features",
    "feature_names",
    "item_prices",
    "item_scales",
    "make_training_windows",
    "training_starts",
    "window_scales",
]

logger = logging.getLogger(__name__)

F32 = npt.NDArray[np.float32]
I64 = npt.NDArray[np.int64]

DEFAULT_EPSILON = 1e-3
CALENDAR_FEATURES = ("dow_sin", "dow_cos", "dom_sin", "dom_cos", "month_sin", "month_cos")
MINUTE_CALENDAR_FEATURES = ("moh_sin", "moh_cos", "hod_sin", "hod_cos", "dow_sin", "dow_cos")
QTY_FEATURES = ("qty", "qty_log1p")
_ALL_CALENDAR = frozenset((*CALENDAR_FEATURES, *MINUTE_CALENDAR_FEATURES))
KNOWN_FEATURES = frozenset((*QTY_FEATURES, *_ALL_CALENDAR, "price"))

_MINUTE_MS = 60_000
_HOUR_MS = 3_600_000
_DAY_MS = 86_400_000
# 1970-01-01 was a Thursday: with Monday = 0 its weekday is 3.
_EPOCH_WEEKDAY = 3


def feature_names(has_price: bool, *, log1p: bool = False, freq: Freq | None = None) -> list[str]:
    """The model's input features, in order (stored in ``bundle.json``).

    ``freq`` picks the calendar: minute buckets get :data:`MINUTE_CALENDAR_FEATURES`, every
    other frequency (or none given) :data:`CALENDAR_FEATURES`.

    >>> feature_names(False)
    ['qty', 'dow_sin', 'dow_cos', 'dom_sin', 'dom_cos', 'month_sin', 'month_cos']
    >>> feature_names(True, log1p=True)[0], feature_names(True)[-1]
    ('qty_log1p', 'price')
    >>> from trendcast.freq import parse_freq
    >>> feature_names(False, freq=parse_freq("5min"))[1:5]
    ['moh_sin', 'moh_cos', 'hod_sin', 'hod_cos']
    """
    minutes = freq is not None and freq.is_sub_hourly
    calendar = MINUTE_CALENDAR_FEATURES if minutes else CALENDAR_FEATURES
    names = ["qty_log1p" if log1p else "qty", *calendar]
    if has_price:
        names.append("price")
    return names


def _check_features(features: Sequence[str]) -> None:
    unknown = [f for f in features if f not in KNOWN_FEATURES]
    if unknown:
        raise ConfigError(
            f"expected features among {sorted(KNOWN_FEATURES)}, got unknown {unknown}"
        )
    if sum(f in QTY_FEATURES for f in features) != 1:
        raise ConfigError(f"expected exactly one of {QTY_FEATURES} in features, got {features}")


def bucket_starts_ms(last_start_ms: I64, window: int, step_ms: int) -> I64:
    """Start (epoch ms) of every bucket of each window, oldest first: ``[n, window]``.

    >>> bucket_starts_ms(np.array([10_000]), 3, 1_000).tolist()
    [[8000, 9000, 10000]]
    """
    offsets = (np.arange(window, dtype=np.int64) - (window - 1)) * np.int64(step_ms)
    return (last_start_ms.astype(np.int64)[:, None] + offsets[None, :]).astype(np.int64)


def calendar_features(starts_ms: I64) -> F32:
    """Cyclic calendar encoding of bucket starts: ``[..., 6]`` (see :data:`CALENDAR_FEATURES`).

    Sine/cosine pairs make Sunday close to Monday and December close to January.

    >>> ms = np.array([0, 4 * 86_400_000])  # Thu 1970-01-01, Mon 1970-01-05
    >>> np.round(calendar_features(ms), 3).tolist()[1][:2]  # Monday: angle 0
    [0.0, 1.0]
    >>> calendar_features(ms).shape
    (2, 6)
    """
    starts_ms = np.asarray(starts_ms, dtype=np.int64)
    days = np.floor_divide(starts_ms, _DAY_MS)
    dow = (days + _EPOCH_WEEKDAY) % 7
    dt = starts_ms.astype("datetime64[ms]")
    month_start = dt.astype("datetime64[M]")
    month = month_start.astype(np.int64) % 12  # 0 = January
    dom = (dt.astype("datetime64[D]") - month_start.astype("datetime64[D]")).astype(np.int64)
    angles = (
        2 * np.pi * dow / 7.0,
        2 * np.pi * dom / 31.0,
        2 * np.pi * month / 12.0,
    )
    parts: list[npt.NDArray[np.float64]] = []
    for angle in angles:
        parts.extend((np.sin(angle), np.cos(angle)))
    return np.stack(parts, axis=-1).astype(np.float32)


def calendar_columns(starts_ms: I64, names: Sequence[str]) -> dict[str, F32]:
    """The calendar features ``names`` of bucket starts, each of the shape of ``starts_ms``.

    Computes only what is asked, so a daily model pays nothing for the minute features.

    >>> ms = np.array([[0, 6 * 3_600_000 + 15 * 60_000]])  # 00:00 and 06:15 on 1970-01-01
    >>> cols = calendar_columns(ms, ["hod_sin", "moh_cos"])
    >>> np.round(cols["hod_sin"], 2).tolist(), np.round(cols["moh_cos"], 2).tolist()
    ([[0.0, 1.0]], [[1.0, 0.0]])
    """
    starts_ms = np.asarray(starts_ms, dtype=np.int64)
    wanted = set(names)
    columns: dict[str, F32] = {}
    if wanted & set(CALENDAR_FEATURES):
        calendar = calendar_features(starts_ms)
        for k, name in enumerate(CALENDAR_FEATURES):
            columns[name] = calendar[..., k]
    minute_angles = {
        "moh": 2 * np.pi * (np.mod(starts_ms, _HOUR_MS) // _MINUTE_MS) / 60.0,
        "hod": 2 * np.pi * (np.mod(starts_ms, _DAY_MS) // _MINUTE_MS) / 1440.0,
    }
    for prefix, angle in minute_angles.items():
        if f"{prefix}_sin" in wanted or f"{prefix}_cos" in wanted:
            columns[f"{prefix}_sin"] = np.sin(angle).astype(np.float32)
            columns[f"{prefix}_cos"] = np.cos(angle).astype(np.float32)
    return {name: columns[name] for name in names if name in columns}


def window_scales(quantities: F32, history_len: I64, epsilon: float = DEFAULT_EPSILON) -> F32:
    """Mean of each window's real (non-padded) history plus ``epsilon``: scales of new items.

    >>> q = np.array([[0, 0, 2, 4], [1, 1, 1, 1]], dtype=np.float32)
    >>> window_scales(q, np.array([2, 4]), 0.0).tolist()
    [3.0, 1.0]
    """
    sums = quantities.astype(np.float64).sum(axis=1)
    means: npt.NDArray[np.float64] = sums / np.maximum(history_len, 1) + epsilon
    return means.astype(np.float32)


def item_scales(
    panel: Panel, *, until: pd.Timestamp | None = None, epsilon: float = DEFAULT_EPSILON
) -> dict[str, float]:
    """Per-item scale: mean quantity over buckets before ``until`` (default all) + ``epsilon``.

    Training passes the validation cutoff as ``until`` so validation targets never shape the
    scale the model is judged with.
    """
    frame = panel.frame if until is None else panel.frame[panel.frame["ts"] < until]
    means = frame.groupby("item_id", sort=True)["quantity"].mean()
    return {str(k): float(v) + epsilon for k, v in means.items()}


def item_prices(panel: Panel, *, until: pd.Timestamp | None = None) -> dict[str, float]:
    """Per-item mean unit price over buckets before ``until``; empty without prices.

    Items without any known positive price are left out (their price feature is then
    normalised by their window's own mean price).
    """
    if not panel.has_price:
        return {}
    frame = panel.frame if until is None else panel.frame[panel.frame["ts"] < until]
    means = frame.groupby("item_id", sort=True)["price"].mean()
    return {str(k): float(v) for k, v in means.items() if np.isfinite(v) and v > 0}


def _price_feature(batch: WindowBatch, prices: Mapping[str, float]) -> F32:
    if batch.prices is None:
        # No price stream: every bucket is at the "usual" price, as for unknown prices.
        return np.ones(batch.quantities.shape, dtype=np.float32)
    raw = batch.prices.astype(np.float64)
    known = np.array([prices.get(i, np.nan) for i in batch.item_ids], dtype=np.float64)
    missing = ~np.isfinite(known) | (known <= 0)
    if missing.any():
        with np.errstate(invalid="ignore", divide="ignore"):
            valid = np.where(np.isfinite(raw[missing]) & (raw[missing] > 0), raw[missing], 0.0)
            count = (valid > 0).sum(axis=1)
            known[missing] = np.where(count > 0, valid.sum(axis=1) / np.maximum(count, 1), 1.0)
    ratio = raw / known[:, None]
    return np.where(np.isfinite(ratio), ratio, 1.0).astype(np.float32)


def build_inputs(
    batch: WindowBatch,
    features: Sequence[str],
    scales: Mapping[str, float],
    prices: Mapping[str, float],
    freq: Freq,
    epsilon: float = DEFAULT_EPSILON,
    *,
    row_scales: F32 | None = None,
) -> tuple[F32, F32]:
    """Model inputs of a batch: ``x [n, window, len(features)]`` and ``scale [n]`` (float32).

    Multiply the model's (scaled) outputs by ``scale`` to get quantities.

    Args:
        batch: Raw windows (quantities and optional prices), oldest bucket first.
        features: Feature names, as stored in the bundle (see :func:`feature_names`).
        scales: Item scales from ``scales.json``; items missing here use their window mean.
        prices: Item mean prices from ``scales.json``.
        freq: Bucket frequency (calendar features need bucket starts).
        epsilon: Added to window means of unknown items (as in :func:`item_scales`).
        row_scales: Explicit ``[n]`` scales overriding ``scales`` (training windows: the item
            mean as it was known at each window's end, see :func:`make_training_windows`).

    Raises:
        ConfigError: Unknown feature names.
    """
    _check_features(features)
    n, window = batch.quantities.shape
    scale = window_scales(batch.quantities, batch.history_len, epsilon)
    known = np.array([scales.get(i, np.nan) for i in batch.item_ids], dtype=np.float64)
    use_known = np.isfinite(known) & (known > 0)
    scale = np.where(use_known, known, scale).astype(np.float32)
    if row_scales is not None:
        scale = np.asarray(row_scales, dtype=np.float32).reshape(n)
    columns: dict[str, F32] = {}
    qty = batch.quantities.astype(np.float32) / scale[:, None]
    columns["qty"] = qty
    columns["qty_log1p"] = np.log1p(np.maximum(qty, 0.0)).astype(np.float32)
    calendar_names = [f for f in features if f in _ALL_CALENDAR]
    if calendar_names:
        starts = bucket_starts_ms(batch.last_start_ms, window, freq.step_ms)
        columns.update(calendar_columns(starts, calendar_names))
    if "price" in features:
        columns["price"] = _price_feature(batch, prices)
    x = np.stack([columns[f] for f in features], axis=-1).astype(np.float32)
    return x.reshape(n, window, len(features)), scale


def training_starts(length: int, window: int, horizon: int, stride: int = 1) -> I64:
    """Start offsets of the training windows of one series of ``length`` buckets.

    A window is ``window`` inputs then ``horizon`` targets. The last ``horizon`` buckets are
    the validation targets, so training targets end before them; the grid is aligned on the
    most recent possible window so the newest data is always used.

    >>> training_starts(12, 3, 2, stride=2).tolist()  # targets end by bucket 9 (of 0..11)
    [1, 3, 5]
    >>> training_starts(8, 3, 2).tolist()  # validation: inputs 3..5, targets 6..7
    [0, 1]
    >>> training_starts(6, 3, 2).tolist()  # one window needs window + 2 * horizon = 7
    []
    """
    last = length - horizon - window - horizon
    if last < 0:
        return np.zeros(0, dtype=np.int64)
    return np.arange(last, -1, -stride, dtype=np.int64)[::-1].copy()


@dataclass(frozen=True)
class TrainingWindows:
    """Scaled training and validation arrays cut from a panel.

    Attributes:
        x_train: ``[n_train, window, F]`` inputs.
        y_train: ``[n_train, horizon]`` targets divided by the item scale.
        scale_train: ``[n_train]`` item scale of each training window.
        x_val: ``[n_val, window, F]`` inputs of each item's last window before its last
            ``horizon`` buckets.
        y_val: ``[n_val, horizon]`` scaled validation targets (the last ``horizon`` buckets).
        scale_val: ``[n_val]`` item scales of the validation rows.
        val_batch: The validation inputs as raw windows (for baselines and metrics).
        val_scale_sq: ``[n_val]`` mean squared one-step change of each validation item's
            history before its targets: the RMSSE denominator (as
            :func:`trendcast.metrics.naive_scales`).
        val_scale_abs: ``[n_val]`` the same, mean absolute: the MASE/pinball denominator.
        n_items: Items with at least one training window.
        n_available: Training windows before sampling down to ``max_windows``.
    """

    x_train: F32
    y_train: F32
    scale_train: F32
    x_val: F32
    y_val: F32
    scale_val: F32
    val_batch: WindowBatch
    val_scale_sq: npt.NDArray[np.float64]
    val_scale_abs: npt.NDArray[np.float64]
    n_items: int
    n_available: int


def _gather_batch(
    item_ids: list[str],
    q: F32,
    p: F32 | None,
    rows: I64,
    first_ms: I64,
    step_ms: int,
    window: int,
) -> WindowBatch:
    """WindowBatch of full windows starting at global positions ``rows`` of the flat arrays."""
    idx = rows[:, None] + np.arange(window, dtype=np.int64)[None, :]
    return WindowBatch(
        item_ids=item_ids,
        quantities=q[idx],
        prices=None if p is None else p[idx],
        last_start_ms=first_ms + np.int64(step_ms) * (window - 1),
        history_len=np.full(len(item_ids), window, dtype=np.int64),
    )


def make_training_windows(
    panel: Panel,
    *,
    window: int,
    horizon: int,
    features: Sequence[str],
    scales: Mapping[str, float],
    prices: Mapping[str, float],
    epsilon: float = DEFAULT_EPSILON,
    stride: int = 1,
    max_windows: int | None = None,
    seed: int = 0,
    causal_scales: bool = False,
    max_age: int | None = None,
) -> TrainingWindows:
    """Cut scaled training and validation windows from every item of a panel.

    Per item of ``L`` buckets: the validation row uses buckets ``L-horizon-window..L-horizon``
    as inputs and the last ``horizon`` as targets; training windows (see
    :func:`training_starts`) have targets strictly before those. When more than
    ``max_windows`` training windows exist, a uniform random sample (``seed``) is kept, which
    bounds training time on large catalogues without dropping any item systematically.

    ``max_age`` keeps only windows whose targets end at most that many buckets before the
    validation targets (recent behaviour matters more when a catalogue grows or shifts).

    ``causal_scales`` scales each training window by the item mean known at its
    end; ``False`` (default) uses the stored ``scales`` for every window (simpler, but leaks each
    window's future level into its scale).

    Raises:
        ConfigError: Non-positive window, horizon or stride.
        DataError: No item is long enough for a single training window.
    """
    if window <= 0 or horizon <= 0 or stride <= 0:
        raise ConfigError(
            f"expected positive window, horizon and stride, got {window}, {horizon}, {stride}"
        )
    frame = panel.frame
    items = frame["item_id"].to_numpy()
    n_rows = len(items)
    change = np.flatnonzero(np.r_[True, items[1:] != items[:-1]]) if n_rows else np.zeros(0, int)
    lengths = np.diff(np.r_[change, n_rows]).astype(np.int64)
    q = frame["quantity"].to_numpy(dtype=np.float32)
    p = frame["price"].to_numpy(dtype=np.float32) if panel.has_price else None
    ts_ms = frame["ts"].to_numpy().astype("datetime64[ms]").astype(np.int64)
    step = panel.freq.step_ms

    starts_per_item = [training_starts(int(n), window, horizon, stride) for n in lengths]
    if max_age is not None:
        # Target end of a window at s is s + window + horizon; validation targets start at
        # n - horizon.
        starts_per_item = [
            st[(int(n) - horizon) - (st + window + horizon) < max_age]
            for st, n in zip(starts_per_item, lengths, strict=True)
        ]
    counts = np.array([len(s) for s in starts_per_item], dtype=np.int64)
    n_available = int(counts.sum())
    if n_available == 0:
        raise DataError(
            f"no item has the {window + 2 * horizon} buckets needed for one training window "
            f"(window {window} + horizon {horizon} + {horizon} validation buckets); "
            "use a smaller --window/--horizon or more data"
        )
    owner = np.repeat(np.arange(len(change)), counts)
    local = np.concatenate(starts_per_item)
    if max_windows is not None and n_available > max_windows:
        rng = np.random.default_rng(seed)
        keep = np.sort(rng.choice(n_available, size=max_windows, replace=False))
        owner, local = owner[keep], local[keep]
    rows = change[owner] + local
    train_ids = [str(i) for i in items[change[owner]]]
    batch = _gather_batch(train_ids, q, p, rows, ts_ms[rows], step, window)
    # The item mean *as known at each window's end* (history from the first sale up to the
    # last input bucket), i.e. the scale a bundle trained at that time would have stored.
    # The stored scale (mean of all training history) would leak each window's future level:
    # the model would learn that demand reverts to scale 1.0 and over-forecast every
    # declining item at inference, where the scale holds no future.
    csum = np.concatenate([[0.0], np.cumsum(q, dtype=np.float64)])
    seen = (rows + window - change[owner]).astype(np.float64)
    known_mean = (csum[rows + window] - csum[change[owner]]) / seen + epsilon
    x_train, scale_train = build_inputs(
        batch,
        features,
        scales,
        prices,
        panel.freq,
        epsilon,
        row_scales=known_mean.astype(np.float32) if causal_scales else None,
    )
    target_idx = (rows + window)[:, None] + np.arange(horizon, dtype=np.int64)[None, :]
    y_train = (q[target_idx] / scale_train[:, None]).astype(np.float32)

    val_items = np.flatnonzero(lengths >= window + horizon)
    val_rows = change[val_items] + lengths[val_items] - horizon - window
    val_ids = [str(i) for i in items[change[val_items]]]
    val_batch = _gather_batch(val_ids, q, p, val_rows, ts_ms[val_rows], step, window)
    x_val, scale_val = build_inputs(val_batch, features, scales, prices, panel.freq, epsilon)
    val_idx = (val_rows + window)[:, None] + np.arange(horizon, dtype=np.int64)[None, :]
    y_val = (q[val_idx] / scale_val[:, None]).astype(np.float32)
    naive = np.array(
        [_naive_errors(q[change[i] : change[i] + lengths[i] - horizon]) for i in val_items],
        dtype=np.float64,
    ).reshape(-1, 2)
    logger.info(
        "training windows: %d of %d available from %d items; %d validation rows",
        len(rows),
        n_available,
        int((counts > 0).sum()),
        len(val_ids),
    )
    return TrainingWindows(
        x_train=x_train,
        y_train=y_train,
        scale_train=scale_train,
        x_val=x_val,
        y_val=y_val,
        scale_val=scale_val,
        val_batch=val_batch,
        val_scale_sq=naive[:, 0].copy(),
        val_scale_abs=naive[:, 1].copy(),
        n_items=int((counts > 0).sum()),
        n_available=n_available,
    )


def _naive_errors(history: F32) -> tuple[float, float]:
    """Mean squared and mean absolute one-step change of a history (NaN below 2 buckets)."""
    if len(history) < 2:
        return float("nan"), float("nan")
    diffs = np.diff(history.astype(np.float64))
    return float(np.mean(diffs**2)), float(np.mean(np.abs(diffs)))
