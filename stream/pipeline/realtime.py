"""The open bucket in real time: refresh forecasts with nowcasts, surge and stall alerts.

Why apart from staging: a close forecast says what a bucket will sell; this module watches
the bucket while it is open, so that subscribers see a sale move something within seconds,
not a bucket later. It keeps, per live partition (the partition's newest event within the
live window of the wall clock; a replay never is: history gets no refreshes and no alerts):

* what each item sold so far in the open bucket (summed from the deltas the worker stored;
  raised to the stored sum whenever the item's window is read, so a restart or a take-over
  catches up at the next refresh);
* each item's forecast of the open bucket (step 1 of its last close or refresh forecast);
* when each item was last refreshed, and which alerts each item already had this bucket.

From these, per batch: items with new sales in the open bucket get a ``refresh`` forecast (at
most once per ``refresh_ms``; its ``open_bucket`` object holds the nowcast of the bucket's
total), and a ``surge`` alert when what sold so far is implausibly high under their forecast
(a tail probability below ``alert_probability``, :func:`trendcast.forecasting.nowcast.\
alert_probabilities`), in the batch that carries the crossing event. Every ``stall_every_ms``,
items expected to have sold a meaningful amount by now that sold nothing get a ``stall``
alert. At most one alert per item, kind and bucket in a worker's life; at-least-once across
crashes, like the forecasts (a new owner may raise one again).

"By now" is the partition's event time (its newest event, or the wall clock the clock
follows), read through the bundle's intraday profile as the share of the bucket's units
normally sold by then (:class:`~trendcast.forecasting.profile.IntradayProfile`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import orjson

from stream.inference.batching import ForecastRequest, OpenBucketSales
from stream.inference.model_info import ModelInfo, iso_utc
from stream.inference.observers import ScoredBatch
from stream.pipeline.edges import PROCESSOR_LOGGER
from stream.pipeline.ingest import Plan
from stream.state.base import ItemWindow, PartitionId
from trendcast.forecasting.nowcast import alert_probabilities, nowcast
from trendcast.forecasting.profile import IntradayProfile

__all__ = ["OpenBuckets", "open_bucket_record"]

logger = logging.getLogger(PROCESSOR_LOGGER)

_DAY_MS = 86_400_000
#: A stall needs the forecast to have expected at least this many units by now (below it,
#: selling nothing is no news), and a surge a forecast of at least this many for the whole
#: bucket: against a forecast of nothing (a new item, no history yet) every first sale would
#: be "improbable".
_MIN_EXPECTED = 0.5


@dataclass
class _Partition:
    """One live partition's open bucket."""

    bucket_ms: int
    #: Event time the bucket is read at (the partition's newest event time).
    now_event_ms: int
    so_far: dict[str, float] = field(default_factory=dict)
    alerted: set[tuple[str, str]] = field(default_factory=set)
    stall_checked_ms: int = 0


@dataclass(frozen=True, slots=True)
class Alert:
    """One alert record, keyed by its item."""

    item_id: str
    value: bytes


class OpenBuckets:
    """Open-bucket bookkeeping of the live partitions (see the module docstring).

    Args:
        refresh_ms: Least time between two refreshes of an item; 0: no refresh forecasts.
        alert_probability: Tail probability below which an alert is raised.
        stall_every_ms: How often stalls are looked for, per partition.
        live_window_ms: How far behind the wall clock a live partition's events may be.
    """

    def __init__(
        self,
        *,
        refresh_ms: int,
        alert_probability: float,
        stall_every_ms: int,
        live_window_ms: int,
    ) -> None:
        self.refresh_ms = refresh_ms
        self.alert_probability = alert_probability
        self.stall_every_ms = stall_every_ms
        self.live_window_ms = live_window_ms
        self._parts: dict[PartitionId, _Partition] = {}
        # Step-1 forecast of each item's open bucket: bucket start, mean, p10, p50, p90.
        self._forecasts: dict[str, tuple[int, float, float, float, float]] = {}
        self._refreshed_ms: dict[str, int] = {}
        self._item_partition: dict[str, PartitionId] = {}
        # The items of each partition (the inverse of _item_partition): stall checks and
        # releases look at one partition's items, not the whole catalogue.
        self._members: dict[PartitionId, set[str]] = {}

    # --- per batch --------------------------------------------------------------------

    def observe(
        self, plans: Sequence[Plan], changed: Mapping[str, Sequence[int]], now_ms: int
    ) -> dict[PartitionId, list[str]]:
        """Count a stored batch's open-bucket sales; the items whose bucket sold, per partition.

        ``changed`` is what the store reports as new (per item, the buckets that received
        an event not seen before): a re-delivered or retried batch is not counted twice. Only live
        partitions whose open bucket is the one holding their newest event are watched: in
        the first seconds of a bucket the one before is still open (allowed lateness), and
        its close forecast, which refreshes build on, is not made yet.
        """
        sold: dict[PartitionId, list[str]] = {}
        for plan in plans:
            found = self._part(plan, now_ms)
            if found is None:
                continue
            part, judged = found
            bucket = part.bucket_ms
            items = []
            for update in plan.items:
                item = update.item_id
                if bucket not in changed.get(item, ()):
                    continue
                qty = sum(d.quantity for d in update.deltas if d.bucket_ms == bucket)
                part.so_far[item] = part.so_far.get(item, 0.0) + qty
                self._assign(item, plan.pid)
                items.append(item)
            if items and judged:
                sold[plan.pid] = items
        return sold

    def watch(self, pid: PartitionId, items: Iterable[str]) -> None:
        """Items a live partition's close forecast: their forecasts are kept (and their
        stalls looked for); those of other partitions (replays, catch-ups) are not."""
        if pid in self._parts:
            for item in items:
                self._assign(item, pid)

    def refresh_due(self, sold: Mapping[PartitionId, Sequence[str]], wall_ms: int) -> list[str]:
        """The items of ``sold`` due for a refresh forecast (marked refreshed now)."""
        if self.refresh_ms <= 0:
            return []
        due = []
        for items in sold.values():
            for item in items:
                last = self._refreshed_ms.get(item)
                if last is None or wall_ms - last >= self.refresh_ms:
                    self._refreshed_ms[item] = wall_ms
                    due.append(item)
        return due

    def refresh_requests(
        self,
        items: Sequence[str],
        windows: Mapping[str, ItemWindow],
        model: ModelInfo,
        profile: IntradayProfile,
    ) -> list[ForecastRequest]:
        """``refresh`` requests of ``items`` (their windows read), with their open buckets."""
        step = model.freq.step_ms
        rows = []
        for item in items:
            part = self._parts.get(self._item_partition.get(item, _NOWHERE))
            if part is None:
                continue
            window = windows.get(item)
            stored = window.buckets.get(part.bucket_ms) if window is not None else None
            if stored is not None:  # the stored sum is the truth (restarts, take-overs)
                part.so_far[item] = max(part.so_far.get(item, 0.0), stored.quantity)
            rows.append((item, part))
        if not rows:
            return []
        shares = profile.cumulative_share(
            [item for item, _ in rows],
            np.array([p.bucket_ms for _, p in rows], dtype=np.int64),
            np.array([p.now_event_ms for _, p in rows], dtype=np.int64),
        )
        return [
            ForecastRequest(
                item,
                part.bucket_ms - step,
                "refresh",
                OpenBucketSales(part.bucket_ms, part.so_far.get(item, 0.0), float(share)),
            )
            for (item, part), share in zip(rows, shares.tolist(), strict=True)
        ]

    def remember(self, scored: Iterable[ScoredBatch], wall_ms: int) -> None:
        """Keep step 1 of every live forecast made (close, late or refresh): the open
        bucket's forecast that nowcasts and alerts judge its sales by."""
        if not self._item_partition:
            return  # no live partition: a replay or a catch-up keeps no forecasts
        for one in scored:
            if one.role != "live":
                continue
            step = one.model.freq.step_ms
            starts = (one.batch.last_start_ms + step).tolist()
            res = one.result
            cols = zip(
                res.mean[:, 0].tolist(),
                res.p10[:, 0].tolist(),
                res.p50[:, 0].tolist(),
                res.p90[:, 0].tolist(),
                strict=True,
            )
            for item, start, (m, lo, mid, hi) in zip(one.batch.item_ids, starts, cols, strict=True):
                if item not in self._item_partition:
                    continue  # not in a live partition: no open bucket to judge
                known = self._forecasts.get(item)
                if known is None or known[0] <= start:
                    self._forecasts[item] = (start, m, lo, mid, hi)

    def surges(
        self,
        sold: Mapping[PartitionId, Sequence[str]],
        model: ModelInfo,
        profile: IntradayProfile,
        wall_ms: int,
    ) -> list[Alert]:
        """``surge`` alerts of the items whose open-bucket sales are implausibly high."""
        out: list[Alert] = []
        for pid, items in sold.items():
            part = self._parts.get(pid)
            if part is not None:
                out += self._judge(part, items, "surge", model, profile, wall_ms)
        return out

    def stalls(
        self, model: ModelInfo, profile: IntradayProfile, wall_ms: int
    ) -> dict[PartitionId, list[str]]:
        """Items that may have stalled (forecast to sell by now, nothing counted), per live
        partition whose check is due; confirm with their stored windows (:meth:`confirm_stalls`)."""
        out: dict[PartitionId, list[str]] = {}
        for pid, part in self._parts.items():
            if wall_ms - part.stall_checked_ms < self.stall_every_ms:
                continue
            part.stall_checked_ms = wall_ms
            if wall_ms - part.now_event_ms > self.live_window_ms:
                continue  # no longer live: nothing to say
            quiet = [
                item
                for item in self._members.get(pid, ())
                if (f := self._forecasts.get(item)) is not None
                and f[0] == part.bucket_ms
                and part.so_far.get(item, 0.0) <= 0.0
                and (item, "stall") not in part.alerted
            ]
            if quiet:
                probs = self._probabilities(part, quiet, profile)
                flagged = [
                    item
                    for item, p in zip(quiet, probs, strict=True)
                    if p[1] < self.alert_probability and p[2] >= _MIN_EXPECTED
                ]
                if flagged:
                    out[pid] = flagged
        return out

    def confirm_stalls(
        self,
        candidates: Mapping[PartitionId, Sequence[str]],
        windows: Mapping[str, ItemWindow],
        model: ModelInfo,
        profile: IntradayProfile,
        wall_ms: int,
    ) -> list[Alert]:
        """``stall`` alerts of the candidates whose stored open bucket is still empty."""
        out: list[Alert] = []
        for pid, items in candidates.items():
            part = self._parts.get(pid)
            if part is None:
                continue
            still = []
            for item in items:
                window = windows.get(item)
                stored = window.buckets.get(part.bucket_ms) if window is not None else None
                if stored is not None and stored.quantity > 0:
                    part.so_far[item] = max(part.so_far.get(item, 0.0), stored.quantity)
                else:
                    still.append(item)
            out += self._judge(part, still, "stall", model, profile, wall_ms)
        return out

    def items_of(self, pid: PartitionId) -> list[str]:
        """Items watched in ``pid``'s open bucket (those with a forecast of it)."""
        part = self._parts.get(pid)
        if part is None:
            return []
        return [
            item
            for item in self._members.get(pid, ())
            if (f := self._forecasts.get(item)) is not None and f[0] == part.bucket_ms
        ]

    def follow(self, pid: PartitionId, bucket_ms: int, now_event_ms: int, wall_ms: int) -> None:
        """A live partition's clock moved without a batch (the wall clock): track it too."""
        if wall_ms - now_event_ms > self.live_window_ms:
            return
        self._move(pid, bucket_ms, now_event_ms)

    def release(self, pid: PartitionId) -> None:
        """Forget a revoked partition (its next owner watches it)."""
        self._parts.pop(pid, None)
        for item in self._members.pop(pid, set()):
            if self._item_partition.get(item) == pid:
                del self._item_partition[item]
                self._forecasts.pop(item, None)
                self._refreshed_ms.pop(item, None)

    def _assign(self, item: str, pid: PartitionId) -> None:
        before = self._item_partition.get(item)
        if before != pid:
            if before is not None:
                self._members.get(before, set()).discard(item)
            self._item_partition[item] = pid
            self._members.setdefault(pid, set()).add(item)

    # --- inside ---------------------------------------------------------------------------

    def _part(self, plan: Plan, wall_ms: int) -> tuple[_Partition, bool] | None:
        """The partition's open-bucket state, moved to its current bucket (None unless live),
        and whether its sales can be judged yet: not while the bucket before is still open
        (allowed lateness), whose close forecast refreshes and alerts build on."""
        clock = plan.clock
        newest = clock.state.max_event_ms
        open_from = clock.open_from_ms
        if newest is None or open_from is None or wall_ms - newest > self.live_window_ms:
            return None
        bucket = clock.freq.floor_ms(newest)
        return self._move(plan.pid, bucket, newest), bucket == open_from

    def _move(self, pid: PartitionId, bucket_ms: int, now_event_ms: int) -> _Partition:
        part = self._parts.get(pid)
        if part is None or part.bucket_ms != bucket_ms:
            if part is not None and bucket_ms < part.bucket_ms:
                part.now_event_ms = max(part.now_event_ms, now_event_ms)
                return part
            part = self._parts[pid] = _Partition(bucket_ms, now_event_ms)
            stale = [i for i, f in self._forecasts.items() if f[0] < bucket_ms]
            if len(stale) > len(self._forecasts) // 2:  # amortised: drop old buckets' forecasts
                for item in stale:
                    del self._forecasts[item]
        part.now_event_ms = max(part.now_event_ms, now_event_ms)
        return part

    def _probabilities(
        self, part: _Partition, items: Sequence[str], profile: IntradayProfile
    ) -> list[tuple[float, float, float, float]]:
        """(surge, stall, expected so far, share) of each item with a forecast of the bucket."""
        fc = np.array([self._forecasts[i][1:] for i in items], dtype=np.float64)
        n = len(items)
        share = profile.cumulative_share(
            items, np.full(n, part.bucket_ms, dtype=np.int64), np.full(n, part.now_event_ms)
        )
        so_far = np.array([part.so_far.get(i, 0.0) for i in items])
        probs = alert_probabilities(fc[:, 0], fc[:, 1], fc[:, 3], share, so_far)
        return list(
            zip(
                probs.surge.tolist(),
                probs.stall.tolist(),
                probs.expected_so_far.tolist(),
                share.tolist(),
                strict=True,
            )
        )

    def _judge(
        self,
        part: _Partition,
        items: Sequence[str],
        kind: str,
        model: ModelInfo,
        profile: IntradayProfile,
        wall_ms: int,
    ) -> list[Alert]:
        known = [
            i
            for i in items
            if (i, kind) not in part.alerted
            and (f := self._forecasts.get(i)) is not None
            and f[0] == part.bucket_ms
        ]
        if not known:
            return []
        out = []
        for item, (surge, stall, expected, share) in zip(
            known, self._probabilities(part, known, profile), strict=True
        ):
            probability = surge if kind == "surge" else stall
            if probability >= self.alert_probability:
                continue
            if kind == "stall" and expected < _MIN_EXPECTED:
                continue  # nothing meaningful was expected: selling nothing is no news
            if kind == "surge" and (
                part.so_far.get(item, 0.0) <= max(expected, 0.0)
                or self._forecasts[item][1] < _MIN_EXPECTED
            ):
                continue  # more than expected, and of an item the forecast expects to sell
            part.alerted.add((item, kind))
            out.append(
                Alert(item, self._record(part, item, kind, probability, share, model, wall_ms))
            )
        return out

    def _record(
        self,
        part: _Partition,
        item: str,
        kind: str,
        probability: float,
        share: float,
        model: ModelInfo,
        wall_ms: int,
    ) -> bytes:
        _bucket, mean, p10, p50, p90 = self._forecasts[item]
        so_far = part.so_far.get(item, 0.0)
        now = nowcast([mean], [p10], [p50], [p90], [share], [so_far])
        date_only = model.freq.step_ms % _DAY_MS == 0
        return orjson.dumps(
            {
                "kind": kind,
                "item_id": item,
                "freq": model.freq.name,
                "bucket_start": iso_utc(part.bucket_ms, date_only=date_only),
                "bucket_start_ms": part.bucket_ms,
                "so_far": _round(so_far),
                "expected_so_far": _round(max(mean, 0.0) * share),
                "expected_total": _round(max(mean, 0.0)),
                "p10": _round(max(p10, 0.0)),
                "p90": _round(max(p90, 0.0)),
                "nowcast": _round(float(now.nowcast[0])),
                "probability": float(f"{probability:.6g}"),
                "threshold": self.alert_probability,
                "as_of": iso_utc(part.bucket_ms),
                "model_version": model.model_version,
                "event_ms": part.now_event_ms,
                "detected_at_ms": wall_ms,
            }
        )


_NOWHERE = PartitionId("", -1)


def _round(value: float) -> float:
    return round(float(value), 4)


def open_bucket_record(
    sales: OpenBucketSales, mean: float, p10: float, p50: float, p90: float, *, daily: bool
) -> dict[str, object]:
    """A refresh record's ``open_bucket`` object: what sold so far, what the forecast
    expected by now, and the nowcast of the bucket's total with its p10-p90 band.

    >>> ob = open_bucket_record(OpenBucketSales(0, 6.0, 0.5), 8.0, 2.0, 7.0, 15.0, daily=True)
    >>> ob["start"], ob["so_far"], ob["expected_so_far"], ob["p10"] <= ob["nowcast"] <= ob["p90"]
    ('1970-01-01', 6.0, 4.0, True)
    """
    now = nowcast([mean], [p10], [p50], [p90], [sales.share], [sales.so_far])
    return {
        "start": iso_utc(sales.start_ms, date_only=daily),
        "so_far": _round(sales.so_far),
        "expected_so_far": _round(max(float(now.expected_so_far[0]), 0.0)),
        "nowcast": _round(float(now.nowcast[0])),
        "p10": _round(float(now.p10[0])),
        "p90": _round(float(now.p90[0])),
    }
