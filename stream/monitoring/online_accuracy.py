"""Online accuracy: score the worker's forecasts against the actuals that later windows carry.

The worker forecasts an item every time a bucket closes while the item has a sale in its
window, so the next window of the item already holds the actual of the bucket that earlier
forecasts targeted. :class:`AccuracyTracker` keeps each forecast until its steps come true,
scores them when a later window of the item arrives (from a live *or* a shadow batch: both
carry the same actuals), and keeps rolling metrics per ``(role, model_version)`` and horizon
step over the last ``rolling_buckets`` target buckets. No state is read: the tracker only sees
:class:`~stream.inference.observers.ScoredBatch` es.

Metrics (one definition with :mod:`trendcast.metrics`, so online and ``trendcast evaluate``
numbers compare):

* ``rmsse`` at step ``h``: the mean over scaled forecasts of ``|y - mean| / sqrt(scale)``,
  exactly :func:`trendcast.metrics.rmsse_by_step` (a one-step RMSSE). The overall value is the
  same mean over every scored (forecast, step) pair: the count-weighted mean of the by-step
  curve. It is *not* ``evaluate``'s headline ``rmsse`` (the mean over rows of the root of the
  mean squared scaled error over the whole horizon), which is at least as large, because a
  forecast's steps come true over ``horizon`` buckets and the rolling window cuts through them.
  ``scale`` is :func:`trendcast.metrics.naive_scales`' mean squared one-step difference of the
  forecast's own input window, over its real (non-padded) buckets only; forecasts with a zero
  or undefined scale are left out of RMSSE (``n_unscaled``) but kept in WAPE and coverage.
* ``wape``: ``sum |y - p50| / sum |y|`` (of the median, like :func:`trendcast.metrics.wape`).
* ``coverage``: share of actuals inside ``[p10, p90]``, bounds included (target 0.8).

Every (item, origin, step) is scored exactly once: an origin's resolved steps are a prefix
(targets come true in order), tracked as a counter, so a batch that is retried or a shadow
batch carrying the same windows scores nothing twice. A re-forecast for the same origin
(a late event changed the window) replaces the pending values; steps already scored stay.

Memory. Per ``(role, model_version)`` and tracked item the tracker keeps a ring of
``horizon`` origins (a new origin overwrites the one ``horizon`` buckets older, whose steps
have all come true by then): ``16 * horizon**2 + 24 * horizon`` bytes, 13 KB at horizon 28.
``max_items`` (default 10,000: about 130 MB at horizon 28, a quarter of that at 14) caps the
items tracked over all streams together. The arrays are sized for that budget at once (when
it is at most 512 MB); the forecasts' pages are zero pages until an item uses them, so
resident memory follows the items tracked. Beyond the budget new items are not tracked
(counted in :attr:`AccuracyTracker.untracked`, a warning is logged once) until items free
their slots.
An item not forecast for longer than its window is dropped, and rolling sums keep one
``[6, horizon]`` array per target bucket, ``rolling_buckets`` of them.

Limits (by design, for an operational signal, not an audit):

* State lives in the worker's memory. A restart or a rebalance that moves a partition
  restarts that partition's accuracy (pending forecasts are lost, the rolling window refills
  over ``rolling_buckets`` buckets); with several workers each one reports its own items,
  and records carry ``instance`` and the raw ``sums`` so that readers can pool them
  (:mod:`trendcast.report` does).
* Actuals are as known when the next forecast of the item is made. Late events accepted
  within the grace period after that are not reflected in the already-scored steps.
* An item that stops selling is forecast until its window holds no sale; the buckets after
  its last forecast (actual 0) are never seen, so those last steps are not scored.
* Time is bucket time: the newest bucket of any batch is "now" for the rolling window and
  for expiry, so a partition lagging more than a window behind the others loses tracking.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from collections.abc import Iterable
from dataclasses import dataclass
from itertools import repeat
from typing import Any

import numpy as np
import numpy.typing as npt
import orjson
from prometheus_client import Gauge

from stream.inference.model_info import ModelInfo, iso_utc
from stream.inference.observers import Role, ScoredBatch
from stream.monitoring.telemetry import METRICS_REGISTRY
from trendcast.forecasting.base import ForecastBatch, WindowBatch
from trendcast.metrics import valid_scale

__all__ = [
    "ONLINE_COVERAGE",
    "ONLINE_RMSSE",
    "ONLINE_WAPE",
    "Accuracy",
    "AccuracyTracker",
    "StepAccuracy",
    "window_scales",
]

logger = logging.getLogger(__name__)

ONLINE_RMSSE = Gauge(
    "trendcast_online_rmsse",
    "Rolling online RMSSE (mean scaled absolute error over all steps) of recent target buckets",
    ["model_version", "role"],
    registry=METRICS_REGISTRY,
)
ONLINE_WAPE = Gauge(
    "trendcast_online_wape",
    "Rolling online WAPE of the median over all steps of recent target buckets",
    ["model_version", "role"],
    registry=METRICS_REGISTRY,
)
ONLINE_COVERAGE = Gauge(
    "trendcast_online_coverage",
    "Rolling share of actuals inside [p10, p90] over recent target buckets (target 0.8)",
    ["model_version", "role"],
    registry=METRICS_REGISTRY,
)

_DAY_MS = 86_400_000
_EMPTY = np.iinfo(np.int64).min  # origin of an unused ring slot
# Rows of the per-target-bucket sums.
_N, _N_SCALED, _SAE, _ABS_ERR, _ABS_ACTUAL, _COVERED = range(6)
_SUM_NAMES = ("n", "n_scaled", "sae", "abs_err", "abs_actual", "covered")
_INITIAL_BLOCKS = 64
#: Largest budget (bytes of the arrays at ``max_items`` blocks) reserved at the first growth
#: instead of grown into: 10,000 items at horizon 28 take about 130 MB.
_RESERVE_BYTES = 512 * 1024 * 1024

I64 = npt.NDArray[np.int64]
F64 = npt.NDArray[np.float64]


def window_scales(quantities: npt.ArrayLike, history_len: npt.ArrayLike) -> F64:
    """Per-row mean squared one-step difference over the real (non-padded) buckets.

    The RMSSE denominator of :func:`trendcast.metrics.naive_scales`, for left-padded windows:
    only differences between two real buckets count; fewer than two real buckets gives NaN.

    >>> window_scales([[0.0, 1.0, 3.0, 2.0], [9.0, 5.0, 5.0, 5.0], [0.0, 0.0, 0.0, 4.0]],
    ...               [3, 3, 1]).tolist()
    [2.5, 0.0, nan]
    """
    q = np.asarray(quantities, dtype=np.float64)
    hist = np.asarray(history_len, dtype=np.int64)
    width = q.shape[1]
    diffs = np.diff(q, axis=1)  # column j: q[j + 1] - q[j], real when q[j] is real
    real = np.arange(width - 1)[None, :] >= (width - hist)[:, None]
    count = np.maximum(hist - 1, 0)
    sq = np.where(real, diffs * diffs, 0.0).sum(axis=1)
    out = np.full(q.shape[0], np.nan)
    np.divide(sq, count, out=out, where=count > 0)
    return out


@dataclass(frozen=True, slots=True)
class StepAccuracy:
    """Rolling metrics of one horizon step (NaN when undefined, e.g. no actual sold)."""

    step: int
    n: int
    rmsse: float
    wape: float
    coverage: float


@dataclass(frozen=True, slots=True)
class Accuracy:
    """Rolling metrics of one ``(role, model_version)`` over its recent target buckets.

    Attributes:
        model_version: The model scored.
        role: ``live`` or ``shadow``.
        freq: Bucket frequency name.
        target_from_ms: Start of the oldest target bucket with a scored step.
        target_to_ms: Start of the newest one.
        n: Scored (forecast, step) pairs.
        n_unscaled: Pairs left out of RMSSE (zero or undefined scale).
        rmsse: Mean scaled absolute error over all scored pairs (see the module docstring).
        wape: WAPE of the median over all pairs.
        coverage: Share of actuals inside ``[p10, p90]``.
        by_step: The same per horizon step.
        sums: The raw sums (``n, n_scaled, sae, abs_err, abs_actual, covered``) the overall
            metrics come from, so that readers can pool several workers.
    """

    model_version: str
    role: Role
    freq: str
    target_from_ms: int
    target_to_ms: int
    n: int
    n_unscaled: int
    rmsse: float
    wape: float
    coverage: float
    by_step: tuple[StepAccuracy, ...]
    sums: dict[str, float]


def _ratio(num: F64 | float, den: F64 | float) -> F64:
    num_a, den_a = np.asarray(num, dtype=np.float64), np.asarray(den, dtype=np.float64)
    out = np.full(np.broadcast(num_a, den_a).shape, np.nan)
    np.divide(num_a, den_a, out=out, where=den_a > 0)
    return out


def _none_if_nan(value: float) -> float | None:
    return None if not np.isfinite(value) else round(value, 6)


class _Stream:
    """Pending forecasts and rolling sums of one ``(role, model_version)``.

    Pending forecasts live in blocks, one per item: ``horizon`` ring slots of origins, slot
    ``(origin // step) % horizon``. When full, the arrays are sized for the whole budget at
    once if that is at most :data:`_RESERVE_BYTES` (the zero-filled ones, the forecasts
    above all, take memory only as blocks are used), else they grow by half (never beyond
    the budget); they do not shrink, and freed blocks are reused.
    """

    def __init__(self, role: Role, model: ModelInfo) -> None:
        self.role = role
        self.model = model
        self.step = model.freq.step_ms
        self.horizon = model.horizon
        self.index: dict[str, int] = {}
        self.items: list[str | None] = []
        self.free: list[int] = []
        self.origin: I64 = np.empty((0, self.horizon), dtype=np.int64)
        self.done = np.empty((0, self.horizon), dtype=np.int16)
        self.scale: F64 = np.empty((0, self.horizon), dtype=np.float64)
        # Slot-major: the forecasts made at one bucket close all go to one slot, so that the
        # rows they write lie together (new items touch a few pages, not one page each).
        self.fc = np.empty((self.horizon, 0, self.horizon, 4), dtype=np.float32)
        self.last_seen: I64 = np.empty(0, dtype=np.int64)  # newest origin kept
        self.seen_to: I64 = np.empty(0, dtype=np.int64)  # newest window scored against
        self.buckets: dict[int, F64] = {}
        self.dirty = False  # changed since the last drain
        self.gauges_stale = False

    def lookup(self, item_ids: list[str]) -> I64:
        # map() with repeat() calls dict.get from C: no Python frame per item.
        found = map(self.index.get, item_ids, repeat(-1))
        return np.fromiter(found, dtype=np.int64, count=len(item_ids))

    @property
    def block_bytes(self) -> int:
        """Bytes one item block takes in the arrays."""
        arrays = (self.origin, self.done, self.scale, self.last_seen, self.seen_to)
        fc = self.fc.itemsize * self.horizon * int(np.prod(self.fc.shape[2:]))
        return fc + sum(a.itemsize * int(np.prod(a.shape[1:])) for a in arrays)

    def _grow(self, need: int, limit: int) -> None:
        """Room for ``need`` more blocks: grow by half (at least ``need``), at most ``limit``."""
        old = len(self.items)
        new = max(_INITIAL_BLOCKS, old + max(need, old // 2))
        if limit * self.block_bytes <= _RESERVE_BYTES:
            # Growing copies every array: a bucket close that brings thousands of new
            # items paid hundreds of milliseconds for copies of 100 MB near the budget.
            new = limit
        new = max(old + need, min(new, limit))
        extra = new - old

        def grown(array: npt.NDArray[Any], fill: float | int) -> npt.NDArray[Any]:
            if fill == 0:
                # calloc: large zeroed arrays come from the OS as pages zeroed when first
                # touched, so blocks not used yet cost no memory and no time.
                out = np.zeros((new, *array.shape[1:]), dtype=array.dtype)
            else:
                out = np.empty((new, *array.shape[1:]), dtype=array.dtype)
                out[old:] = fill
            out[:old] = array
            return out

        self.origin = grown(self.origin, _EMPTY)
        self.done = grown(self.done, 0)
        self.scale = grown(self.scale, np.nan)
        fc = np.zeros((self.horizon, new, *self.fc.shape[2:]), dtype=self.fc.dtype)
        fc[:, :old] = self.fc
        self.fc = fc
        self.last_seen = grown(self.last_seen, _EMPTY)
        self.seen_to = grown(self.seen_to, _EMPTY)
        self.items.extend([None] * extra)
        self.free.extend(range(new - 1, old - 1, -1))  # pop() hands out low blocks first

    def allocate(self, item_ids: list[str], limit: int) -> list[int]:
        """Blocks for new items (the arrays hold at most ``limit`` blocks in all)."""
        if len(self.free) < len(item_ids):
            self._grow(len(item_ids) - len(self.free), limit)
        blocks = []
        for item_id in item_ids:
            block = self.free.pop()
            self.index[item_id] = block
            self.items[block] = item_id
            blocks.append(block)
        return blocks

    def release(self, blocks: Iterable[int]) -> None:
        for block in blocks:
            item = self.items[block]
            if item is not None:
                del self.index[item]
            self.items[block] = None
            self.origin[block] = _EMPTY
            self.done[block] = 0
            self.last_seen[block] = _EMPTY
            self.seen_to[block] = _EMPTY
            self.free.append(block)

    @property
    def tracked(self) -> int:
        return len(self.index)

    def resolve(self, blocks: I64, batch: WindowBatch, cutoff_ms: int) -> None:
        """Score every pending step whose target bucket is closed and inside ``batch``."""
        rows = np.flatnonzero(blocks >= 0)
        if rows.size == 0:
            return
        # Rows whose window is not newer than one already scored against hold nothing new
        # (the shadow batch of a bucket after the live one, a retried batch).
        rows = rows[batch.last_start_ms[rows] > self.seen_to[blocks[rows]]]
        if rows.size == 0:
            return
        b = blocks[rows]
        last = batch.last_start_ms[rows]
        self.seen_to[b] = last
        origin = self.origin[b]  # [m, K]
        live = origin != _EMPTY
        old = self.done[b].astype(np.int64)
        reach = np.where(live, (last[:, None] - np.where(live, origin, 0)) // self.step, 0)
        new = np.maximum(old, np.minimum(reach, self.horizon))
        count = (new - old).ravel()
        total = int(count.sum())
        if total == 0:
            return
        self.done[b] = new  # blocks are unique within a batch (deduplicated by the tracker)
        # Expand (row, slot) pairs into one element per newly resolved step.
        pair = np.repeat(np.arange(count.size), count)
        first = np.cumsum(count) - count
        step = old.ravel()[pair] + (np.arange(total) - first[pair]) + 1  # 1-based
        member, slot = np.divmod(pair, self.horizon)
        target = origin.ravel()[pair] + step * self.step
        row = rows[member]
        window = batch.window
        col = window - 1 - (last[member] - target) // self.step
        # Steps before the item's real history (or outside the window) can never be scored
        # by a later window either: they count as passed, unscored.
        ok = (col >= 0) & (col >= window - batch.history_len[row]) & (target > cutoff_ms)
        if not ok.any():
            return
        row, col, target, step = row[ok], col[ok], target[ok], step[ok]
        blk, slot = b[member[ok]], slot[ok]
        actual = batch.quantities[row, col].astype(np.float64)
        forecast = self.fc[slot, blk, step - 1].astype(np.float64)  # [t, 4]
        self._accumulate(target, step, actual, forecast, self.scale[blk, slot])

    def _accumulate(self, target: I64, step: I64, y: F64, fc: F64, scale: F64) -> None:
        mean, p10, p50, p90 = fc.T
        ok = valid_scale(scale)
        root = np.sqrt(np.where(ok, scale, 1.0))
        values = (
            np.ones_like(y),
            ok.astype(np.float64),
            np.where(ok, np.abs(y - mean) / root, 0.0),
            np.abs(y - p50),
            np.abs(y),
            ((y >= p10) & (y <= p90)).astype(np.float64),
        )
        targets, inverse = np.unique(target, return_inverse=True)
        key = inverse * self.horizon + (step - 1)
        size = targets.size * self.horizon
        sums: F64 = np.stack([np.bincount(key, weights=v, minlength=size) for v in values])
        sums = sums.reshape(len(values), targets.size, self.horizon)
        for i, t in enumerate(targets.tolist()):
            acc = self.buckets.get(t)
            if acc is None:
                self.buckets[t] = sums[:, i].copy()
            else:
                acc += sums[:, i]
        self.dirty = self.gauges_stale = True

    def insert(self, blocks: I64, batch: WindowBatch, result: ForecastBatch) -> None:
        """Keep the batch's forecasts (rows with a block) until their steps come true."""
        rows = np.flatnonzero(blocks >= 0)
        if rows.size == 0:
            return
        b = blocks[rows]
        last = batch.last_start_ms[rows]
        slot = (last // self.step) % self.horizon
        current = self.origin[b, slot]
        # A re-forecast of an origin older than the slot's (by a whole horizon) is stale.
        keep = current <= last
        rows, b, last, slot = rows[keep], b[keep], last[keep], slot[keep]
        fresh = current[keep] != last  # same origin: a re-forecast, scored steps stay scored
        self.done[b[fresh], slot[fresh]] = 0
        self.origin[b, slot] = last
        self.scale[b, slot] = window_scales(batch.quantities[rows], batch.history_len[rows])
        self.fc[slot, b] = np.stack(
            [result.mean[rows], result.p10[rows], result.p50[rows], result.p90[rows]], axis=-1
        )
        self.last_seen[b] = np.maximum(self.last_seen[b], last)

    def sweep(self, newest_ms: int, rolling_buckets: int) -> None:
        """Drop items not forecast for a window and target buckets out of the rolling window."""
        used = self.last_seen != _EMPTY
        stale = np.flatnonzero(used & (self.last_seen < newest_ms - self.model.window * self.step))
        if stale.size:
            self.release(stale.tolist())
        cutoff = newest_ms - rolling_buckets * self.step
        old = [t for t in self.buckets if t <= cutoff]
        for t in old:
            del self.buckets[t]
        if old:
            self.dirty = self.gauges_stale = True

    def _sums(self) -> F64 | None:
        """The rolling sums ``[6, H]`` over target buckets, None before a scored step."""
        if not self.buckets:
            return None
        sums: F64 = np.sum(list(self.buckets.values()), axis=0)
        # Counts are never negative: some bucket scored a step iff the total count is > 0.
        return sums if sums[_N].sum() > 0 else None

    def overall(self) -> tuple[float, float, float] | None:
        """``(rmsse, wape, coverage)`` over all steps, as :meth:`accuracy` has them.

        The gauges need only these after every batch; building the whole
        :class:`Accuracy` (a :class:`StepAccuracy` per step) each time cost more than
        the scoring itself.
        """
        sums = self._sums()
        if sums is None:
            return None
        total = sums.sum(axis=1)
        return (
            float(_ratio(total[_SAE], total[_N_SCALED])),
            float(_ratio(total[_ABS_ERR], total[_ABS_ACTUAL])),
            float(_ratio(total[_COVERED], total[_N])),
        )

    def accuracy(self) -> Accuracy | None:
        sums = self._sums()
        if sums is None:
            return None
        scored = [t for t, s in self.buckets.items() if s[_N].sum() > 0]
        total = sums.sum(axis=1)
        rmsse = _ratio(sums[_SAE], sums[_N_SCALED])
        wape = _ratio(sums[_ABS_ERR], sums[_ABS_ACTUAL])
        coverage = _ratio(sums[_COVERED], sums[_N])
        steps = tuple(
            StepAccuracy(h + 1, int(sums[_N, h]), float(rmsse[h]), float(wape[h]), float(cov))
            for h, cov in enumerate(coverage)
        )
        return Accuracy(
            model_version=self.model.model_version,
            role=self.role,
            freq=self.model.freq.name,
            target_from_ms=min(scored),
            target_to_ms=max(scored),
            n=int(total[_N]),
            n_unscaled=int(total[_N] - total[_N_SCALED]),
            rmsse=float(_ratio(total[_SAE], total[_N_SCALED])),
            wape=float(_ratio(total[_ABS_ERR], total[_ABS_ACTUAL])),
            coverage=float(_ratio(total[_COVERED], total[_N])),
            by_step=steps,
            sums={name: float(v) for name, v in zip(_SUM_NAMES, total, strict=True)},
        )


class AccuracyTracker:
    """Online RMSSE, WAPE and coverage per ``(role, model_version)`` (a ForecastObserver).

    Args:
        rolling_buckets: Metrics cover the target buckets of the last this-many buckets.
        max_items: Items tracked over all streams together (see the module docstring).
        instance: Written into every record so readers can pool several workers; default
            ``host:pid``.

    Wiring: call :meth:`on_forecasts` after every ``predict`` (live and shadow), and
    :meth:`drain_records` when a bucket closes to publish to the ``forecast-accuracy`` topic.
    """

    def __init__(
        self, *, rolling_buckets: int = 28, max_items: int = 10_000, instance: str | None = None
    ) -> None:
        if rolling_buckets < 1:
            raise ValueError(f"expected rolling_buckets >= 1, got {rolling_buckets}")
        if max_items < 0:
            raise ValueError(f"expected max_items >= 0, got {max_items}")
        self.rolling_buckets = rolling_buckets
        self.max_items = max_items
        self.instance = instance or f"{socket.gethostname()}:{os.getpid()}"
        self.untracked = 0  # forecasts not kept because max_items was reached
        self._streams: dict[tuple[Role, str], _Stream] = {}
        self._newest_ms: int | None = None
        self._warned_full = False

    @property
    def tracked_items(self) -> int:
        """Item blocks held over all streams (bounded by ``max_items``)."""
        return sum(s.tracked for s in self._streams.values())

    def on_forecasts(self, scored: ScoredBatch) -> None:
        """Score pending forecasts against the batch's windows, then keep the batch's own."""
        batch, result = _unique_items(scored.batch, scored.result)
        if len(batch) == 0:
            return
        model = scored.model
        newest = int(batch.last_start_ms.max())
        if self._newest_ms is None or newest > self._newest_ms:
            self._newest_ms = newest
            self._sweep(newest)  # first: frees the blocks of quiet items before new ones come
        else:
            newest = self._newest_ms  # a lagging partition: "now" is still the newest bucket
        key = (scored.role, model.model_version)
        own = self._streams.get(key)
        if own is None:
            own = self._streams[key] = _Stream(scored.role, model)
        own_blocks = own.lookup(batch.item_ids)
        for stream in self._streams.values():
            if stream.step == model.freq.step_ms:
                blocks = own_blocks if stream is own else stream.lookup(batch.item_ids)
                stream.resolve(blocks, batch, newest - self.rolling_buckets * stream.step)
        self._admit(own, own_blocks, batch.item_ids)
        own.insert(own_blocks, batch, result)
        self._refresh_gauges()

    def _admit(self, stream: _Stream, blocks: I64, item_ids: list[str]) -> None:
        """Give new items a block while the budget allows (``blocks`` is updated in place)."""
        new_rows = np.flatnonzero(blocks < 0)
        if new_rows.size == 0:
            return
        tracked = self.tracked_items
        room = max(0, self.max_items - tracked)
        admitted = new_rows[:room]
        if admitted.size:
            limit = self.max_items - tracked + stream.tracked
            blocks[admitted] = stream.allocate([item_ids[r] for r in admitted.tolist()], limit)
        skipped = int(new_rows.size - min(room, new_rows.size))
        if skipped:
            self.untracked += skipped
            if not self._warned_full:
                self._warned_full = True
                logger.warning(
                    "online accuracy tracks at most %d items; newer items are not scored "
                    "until tracked ones stop selling (raise max_items to track more)",
                    self.max_items,
                )

    def _sweep(self, newest_ms: int) -> None:
        for key, stream in list(self._streams.items()):
            stream.sweep(newest_ms, self.rolling_buckets)
            if stream.tracked == 0 and not stream.buckets:
                del self._streams[key]
                self._remove_gauges(stream)

    def _refresh_gauges(self) -> None:
        for stream in self._streams.values():
            if not stream.gauges_stale:
                continue
            stream.gauges_stale = False
            overall = stream.overall()
            labels = (stream.model.model_version, stream.role)
            if overall is None:
                self._remove_gauges(stream)
                continue
            rmsse, wape, coverage = overall
            ONLINE_RMSSE.labels(*labels).set(rmsse)
            ONLINE_WAPE.labels(*labels).set(wape)
            ONLINE_COVERAGE.labels(*labels).set(coverage)

    @staticmethod
    def _remove_gauges(stream: _Stream) -> None:
        labels = (stream.model.model_version, stream.role)
        for gauge in (ONLINE_RMSSE, ONLINE_WAPE, ONLINE_COVERAGE):
            with contextlib.suppress(KeyError):  # never set
                gauge.remove(*labels)

    def accuracy(self, role: Role, model_version: str) -> Accuracy | None:
        """Current rolling metrics of one stream (None before its first scored step)."""
        stream = self._streams.get((role, model_version))
        return None if stream is None else stream.accuracy()

    def drain_records(self, now_ms: int) -> list[tuple[str, bytes]]:
        """``(model_version, JSON)`` for each stream whose metrics changed since the last drain.

        Value (NaN metrics are ``null``)::

            {"model_version", "role", "freq", "instance", "rolling_buckets",
             "target_from", "target_to", "target_from_ms", "target_to_ms",
             "n", "n_unscaled", "rmsse", "wape", "coverage",
             "steps": [{"step", "n", "rmsse", "wape", "coverage"}, ...],
             "sums": {"n", "n_scaled", "sae", "abs_err", "abs_actual", "covered"},
             "emitted_at_ms"}
        """
        out: list[tuple[str, bytes]] = []
        for stream in self._streams.values():
            if not stream.dirty:
                continue
            stream.dirty = False
            acc = stream.accuracy()
            if acc is not None:
                value = self._record(acc, stream, now_ms)
                out.append((acc.model_version, orjson.dumps(value)))
        return out

    def _record(self, acc: Accuracy, stream: _Stream, now_ms: int) -> dict[str, Any]:
        date_only = stream.step % _DAY_MS == 0
        return {
            "model_version": acc.model_version,
            "role": acc.role,
            "freq": acc.freq,
            "instance": self.instance,
            "rolling_buckets": self.rolling_buckets,
            "target_from": iso_utc(acc.target_from_ms, date_only=date_only),
            "target_to": iso_utc(acc.target_to_ms, date_only=date_only),
            "target_from_ms": acc.target_from_ms,
            "target_to_ms": acc.target_to_ms,
            "n": acc.n,
            "n_unscaled": acc.n_unscaled,
            "rmsse": _none_if_nan(acc.rmsse),
            "wape": _none_if_nan(acc.wape),
            "coverage": _none_if_nan(acc.coverage),
            "steps": [
                {
                    "step": s.step,
                    "n": s.n,
                    "rmsse": _none_if_nan(s.rmsse),
                    "wape": _none_if_nan(s.wape),
                    "coverage": _none_if_nan(s.coverage),
                }
                for s in acc.by_step
            ],
            "sums": acc.sums,
            "emitted_at_ms": now_ms,
        }


def _unique_items(batch: WindowBatch, result: ForecastBatch) -> tuple[WindowBatch, ForecastBatch]:
    """The batch with one row per item: the newest window, the later row on a tie.

    The worker sends each item once per batch; this guard keeps exactly-once scoring true
    even if it did not (two rows of one item would both score the same steps).
    """
    n = len(batch)
    if len(set(batch.item_ids)) == n:
        return batch, result
    order = np.argsort(batch.last_start_ms, kind="stable").tolist()
    keep_by_item = {batch.item_ids[row]: row for row in order}
    keep = np.array(sorted(keep_by_item.values()), dtype=np.int64)
    return batch.take(keep), result.take(keep)
