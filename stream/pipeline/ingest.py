"""Ingest: validate a partition's messages, sum them per item and bucket, dead-letter the rest.

Why apart from staging and commits: this is the per-event hot path and the only part that
judges events (invalid, late, re-delivered), so it is kept free of I/O but one clock load, and
its result is a plan (:class:`Plan`: the store writes of one partition's batch and the buckets
it closes) that staging carries out. The per-event loop (:func:`_aggregate`) touches no state,
which is what lets the worker validate and sum a fetched batch ahead of its turn
(:meth:`Ingest.parse_ahead`) while the batch before it awaits Redis, with exactly the outcome of
doing it in turn.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from operator import attrgetter
from typing import NamedTuple

from stream.inference.model_info import ModelInfo
from stream.monitoring.telemetry import DEAD_LETTERS, EVENTS, LATE_BY
from stream.pipeline.commits import Commits
from stream.pipeline.edges import PROCESSOR_LOGGER, BatchStats, OnLate, RawMessage, Record
from stream.pipeline.events import SaleEvent, dead_letter_value, parse_events
from stream.pipeline.model_slot import ModelSlot
from stream.pipeline.watermark import PartitionClock
from stream.state.base import BucketDelta, ItemUpdate, PartitionId, PartitionState, PartitionUpdate
from trendcast.exceptions import EventError

__all__ = ["Ingest", "Plan"]

# The processor's logger, not this module's (see PROCESSOR_LOGGER): dead-letter lines keep
# the name operators filter on.
logger = logging.getLogger(PROCESSOR_LOGGER)

_VALUE = attrgetter("value")


@dataclass
class Plan:
    """One partition's share of a batch, between validation and forecasting."""

    pid: PartitionId
    clock: PartitionClock
    emitted_before: int | None
    due: list[int]
    items: list[ItemUpdate]
    #: First offset after the batch (``None``: no message, the wall clock moved the clock).
    next_offset: int | None
    partition: PartitionUpdate


class Ingest:
    """Validates, sums and dead-letters each partition's messages, advancing its clock.

    Args:
        commits: Where the partitions' clocks are cached, and which of them are stored.
        slot: The model the batch is planned with (its freq and window; the kept window).
        max_message_bytes: Size limit of a message value.
        max_future_ms: How far ahead of the wall clock an event may be.
        state_ttl_ms: TTL of item keys.
        on_late: Hook called for every late event (after counting it).
        clock_ms: Wall clock.
    """

    def __init__(
        self,
        commits: Commits,
        slot: ModelSlot,
        *,
        max_message_bytes: int,
        max_future_ms: int | None,
        state_ttl_ms: int,
        on_late: OnLate | None,
        clock_ms: Callable[[], int],
    ) -> None:
        self._commits = commits
        self._slot = slot
        self.max_message_bytes = max_message_bytes
        self.max_future_ms = max_future_ms
        self.state_ttl_ms = state_ttl_ms
        self.on_late = on_late
        self.clock_ms = clock_ms
        # Messages validated ahead of their batch (parse_ahead), by id() of their sequence.
        self._parsed: dict[int, _Parsed] = {}
        self._parsed_before: dict[int, _Parsed] = {}

    async def parse_ahead(self, batches: Mapping[PartitionId, Sequence[Record]]) -> None:
        """Validate a fetched batch's messages before its turn (:meth:`SalesProcessor.parse_ahead`).

        Why: a batch spends a good part of its time awaiting Redis, whose server works on
        another core meanwhile, and validating a message needs nothing but its bytes and the
        wall clock (no partition clock, no store). :meth:`ingest` then takes these results,
        found by the identity of each partition's record sequence, instead of validating
        again. Results of the last two calls are kept: a batch never processed (dropped at a
        rebalance) leaves nothing behind for long, and one that is processed without them is
        validated as usual.
        """
        now_ms = self.clock_ms()
        parsed: dict[int, _Parsed] = {}
        for pid, msgs in batches.items():
            events: list[SaleEvent | EventError] = []
            for start in range(0, len(msgs), _PARSE_CHUNK):
                events += _parse_all(
                    msgs[start : start + _PARSE_CHUNK],
                    self.max_message_bytes,
                    now_ms,
                    self.max_future_ms,
                )
                await asyncio.sleep(0)  # let the batch in flight go on when Redis answers
            ahead = _Parsed(msgs, events)
            clock = self._commits.clocks.get(pid)
            if clock is not None:
                # Summed per item too, from the partition's clock as it is now: usually
                # already past the batch in flight (its events are counted before it awaits
                # Redis). Used only if the clock and the model are unchanged at its turn.
                ahead = ahead._replace(
                    aggregate=self._aggregate(pid, msgs, events, clock),
                    from_max_event_ms=clock.state.max_event_ms,
                    model=self._slot.model,
                )
                await asyncio.sleep(0)
            parsed[id(msgs)] = ahead
        self._parsed_before, self._parsed = self._parsed, parsed

    def _take_parsed(self, msgs: Sequence[Record]) -> _Parsed | None:
        """What :meth:`parse_ahead` made of exactly ``msgs`` (the same object), if anything."""
        for store in (self._parsed, self._parsed_before):
            found = store.pop(id(msgs), None)
            if found is not None and found.msgs is msgs:
                return found
        return None

    def _aggregate(
        self,
        pid: PartitionId,
        msgs: Sequence[Record],
        events: Sequence[SaleEvent | EventError],
        clock: PartitionClock,
    ) -> _Aggregate:
        """:func:`_aggregate` of a partition's batch, from ``clock`` as it is now."""
        model = self._slot.model
        freq = model.freq
        return _aggregate(
            msgs,
            events,
            max_event_ms=clock.state.max_event_ms,
            late_before_ms=clock.late_before_ms,
            late_before_for=clock.late_before_for,
            origin_ms=freq.origin_ms,
            step_ms=freq.step_ms,
            uses_prices=model.uses_prices,
            offset_key=f"o:{pid.topic}:{pid.partition}:",
        )

    def _dead_letter(
        self,
        pid: PartitionId,
        msg: Record,
        reason: str,
        detail: str,
        now_ms: int,
        **extra: object,
    ) -> tuple[bytes | None, bytes]:
        logger.warning(
            "dead-lettering %s[%d]@%d: %s (%s)",
            pid.topic,
            pid.partition,
            msg.offset,
            reason,
            detail,
            # Structured context for JSON logs (stream.monitoring.telemetry.JsonFormatter).
            extra={
                "topic": pid.topic,
                "partition": pid.partition,
                "offset": msg.offset,
                "reason": reason,
            },
        )
        DEAD_LETTERS.labels(reason).inc()
        value = dead_letter_value(
            msg.value,
            reason=reason,
            detail=detail,
            topic=pid.topic,
            partition=pid.partition,
            offset=msg.offset,
            key=msg.key,
            timestamp_ms=msg.timestamp,
            dead_lettered_at_ms=now_ms,
            extra=dict(extra) or None,
        )
        return msg.key, value

    def _reject(
        self,
        pid: PartitionId,
        msg: Record,
        event: SaleEvent,
        clock: PartitionClock,
        now_ms: int,
        stats: BatchStats,
        dead: list[tuple[bytes | None, bytes]],
    ) -> None:
        """Count a valid event that falls before its partition's late bound."""
        if clock.is_redelivered(msg.offset):
            # Counted before a crash or rebalance, re-delivered because its offset was not
            # committed yet; the clock moved past it because it was counted.
            stats.redelivered += 1
            EVENTS.labels("duplicate").inc()
            return
        late_by = clock.late_by_ms(event.ts_ms)
        stats.late += 1
        EVENTS.labels("late").inc()
        LATE_BY.observe(late_by)
        detail = (
            f"event at {event.ts_ms} is {late_by} ms behind the watermark of "
            f"{pid.topic}[{pid.partition}]"
        )
        dead.append(
            self._dead_letter(
                pid,
                msg,
                "late",
                detail,
                now_ms,
                item_id=event.item_id,
                event_ts_ms=event.ts_ms,
                late_by_ms=late_by,
            )
        )
        if self.on_late is not None:
            raw = RawMessage(
                pid.topic, pid.partition, msg.offset, msg.key, msg.value, msg.timestamp
            )
            self.on_late(event, raw, late_by)

    async def ingest(
        self,
        pid: PartitionId,
        msgs: Sequence[Record],
        now_ms: int,
        stats: BatchStats,
        dead: list[tuple[bytes | None, bytes]],
    ) -> Plan | None:
        """Validate a partition's messages in offset order, advancing its clock.

        The per-event work is :func:`_aggregate`, which touches no state: it sums the valid
        events per item and lists the rejected ones, which are dead-lettered here, in
        offset order, with the clock advanced to where it stood at each of them. So the
        outcome is that of judging the events one by one, and the sums can be made ahead
        of the batch's turn (:meth:`parse_ahead`) whenever the clock has not moved since.
        """
        clock = await self._commits.clock(pid)
        bounds = self._bounds(pid, clock)
        ahead = self._take_parsed(msgs)
        aggregate: _Aggregate | None = None
        if ahead is None:
            events = _parse_all(msgs, self.max_message_bytes, now_ms, self.max_future_ms)
        else:
            events = ahead.events
            if (
                ahead.model is self._slot.model
                and ahead.from_max_event_ms == clock.state.max_event_ms
            ):
                aggregate = ahead.aggregate
        if aggregate is None:
            aggregate = self._aggregate(pid, msgs, events, clock)
        if aggregate.first_ms is not None:  # the first event ever fixes where forecasts start
            clock.observe(aggregate.first_ms)
        for msg, event, max_event in aggregate.rejects:
            if isinstance(event, EventError):
                if clock.is_redelivered(msg.offset):  # dead-lettered before (a rebuild)
                    stats.redelivered += 1
                    continue
                stats.invalid += 1
                EVENTS.labels("invalid").inc()
                dead.append(self._dead_letter(pid, msg, event.reason, event.detail, now_ms))
            else:
                clock.observe(max_event)  # the late event is judged from where it came
                self._reject(pid, msg, event, clock, now_ms, stats, dead)
        stats.valid += aggregate.valid
        if aggregate.max_event_ms is not None:
            clock.observe(aggregate.max_event_ms)  # once per batch, not at every newer event
        return self._plan(
            pid,
            clock,
            bounds,
            aggregate.deltas,
            aggregate.last_sale,
            next_offset=msgs[-1].offset + 1,  # offset order
        )

    async def advance(self, pid: PartitionId, now_ms: int) -> Plan | None:
        """Move a caught-up live partition's clock to the wall clock, if that closes a bucket.

        Why: a partition that receives no later event would otherwise never close its last
        bucket. The wall clock stands in for the event that did not come, exactly as an
        event at ``now_ms`` would (the largest event time moves, nothing is counted), so the
        plan is that of an empty batch: no store writes, the buckets it closes, and the
        clock stored once their forecasts are delivered. Only for a live partition (see
        :meth:`~stream.pipeline.watermark.PartitionClock.is_live`; the caller decides what
        live means): a replay or a catch-up keeps closing by event time alone, so its
        output does not depend on when it runs. Returns None when nothing would close (the
        clock still follows the wall clock, so the partition stays live).
        """
        clock = await self._commits.clock(pid)
        if not clock.closes_at(now_ms):
            clock.observe(now_ms)  # within the open bucket: nothing to plan or to store
            return None
        bounds = self._bounds(pid, clock)
        clock.observe(now_ms)
        return self._plan(pid, clock, bounds, {}, {}, next_offset=None)

    def _bounds(self, pid: PartitionId, clock: PartitionClock) -> _Bounds:
        """Where the clock stood before a batch, and the late bound of the stored clock."""
        # The late bound of the clock known to be stored: dedupe keys older than it can go
        # (see ItemUpdate.dedupe_from_ms), and no older ones. A worker that takes over after
        # a crash judges re-delivered events by the stored clock, which lags this one by
        # the batches whose forecasts are still on their way (submit): an event it accepts
        # must still find its key, or it would be counted twice.
        stored = self._commits.stored_states.get(pid)
        return _Bounds(
            emitted_before=clock.state.emitted_to_ms,
            # The late bound before this batch: every event accepted is at or after it.
            late_before_start=clock.late_before_ms,
            late_before_stored=None
            if stored is None or stored.max_event_ms is None
            else clock.late_before_for(stored.max_event_ms),
        )

    def _plan(
        self,
        pid: PartitionId,
        clock: PartitionClock,
        bounds: _Bounds,
        deltas: Mapping[str, list[BucketDelta]],
        last_sale: Mapping[str, int],
        *,
        next_offset: int | None,
    ) -> Plan | None:
        """The store writes and closed buckets of a partition whose clock has moved."""
        model = self._slot.model
        step = model.freq.step_ms
        open_from, late_before = clock.open_from_ms, clock.late_before_ms
        if open_from is None or late_before is None:
            return None  # nothing valid ever seen on this partition
        due = clock.due_buckets()
        # Oldest bucket a later forecast can end with: the first not yet forecast, the last
        # closed one (re-forecasts after late events) or the oldest still writable one.
        candidates = (
            clock.state.emitted_to_ms,
            open_from - step,
            late_before,
            bounds.late_before_start,
            bounds.late_before_stored,
        )
        oldest_end = min(x for x in candidates if x is not None)
        keep_from = oldest_end - (self._slot.state_window - 1) * step
        stored_bound = bounds.late_before_stored
        dedupe_from = keep_from if stored_bound is None else stored_bound
        return Plan(
            pid=pid,
            clock=clock,
            emitted_before=bounds.emitted_before,
            due=due,
            items=[
                ItemUpdate(
                    item_id,
                    ds,
                    keep_from_ms=keep_from,
                    dedupe_from_ms=dedupe_from,
                    ttl_ms=self.state_ttl_ms,
                )
                for item_id, ds in deltas.items()
            ],
            next_offset=next_offset,
            partition=PartitionUpdate(
                pid,
                # The clock itself is stored after the outputs were delivered (step 4).
                PartitionState(),
                last_sale_ms=last_sale,
                forget_before_ms=keep_from,
                active_from_ms=due[0] - (model.window - 1) * step if due else None,
            ),
        )


class _Bounds(NamedTuple):
    """Where a partition's clock stood before a batch (:meth:`Ingest._bounds`)."""

    emitted_before: int | None
    late_before_start: int | None
    late_before_stored: int | None


class _Aggregate(NamedTuple):
    """A partition's batch summed per item (:func:`_aggregate`)."""

    deltas: dict[str, list[BucketDelta]]
    last_sale: dict[str, int]  # item -> start of its latest bucket with a sale
    valid: int
    max_event_ms: int | None  # the partition's largest event time after the batch
    first_ms: int | None  # the partition's first event ever, if in this batch
    #: Invalid events (their EventError) and late ones (their SaleEvent, with the largest
    #: event time before them), in offset order.
    rejects: list[tuple[Record, SaleEvent | EventError, int]]


def _aggregate(
    msgs: Sequence[Record],
    events: Sequence[SaleEvent | EventError],
    *,
    max_event_ms: int | None,
    late_before_ms: int | None,
    late_before_for: Callable[[int], int],
    origin_ms: int,
    step_ms: int,
    uses_prices: bool,
    offset_key: str,
) -> _Aggregate:
    """Sum a partition's validated events per item and bucket, and set the rejects apart.

    This loop runs once per event, so it keeps to locals and changes nothing outside: the
    late bound only moves when the partition's largest event time does, which in a
    time-ordered stream is at almost every event, so it is computed here
    (``late_before_for``) rather than by the clock, which the caller advances once.

    Args:
        msgs: The partition's records, in offset order.
        events: What validating each record gave.
        max_event_ms: The partition's largest event time before the batch.
        late_before_ms: Events of buckets before this are late (the clock's bound).
        late_before_for: The late bound for a largest event time.
        origin_ms: Bucket origin.
        step_ms: Bucket length.
        uses_prices: Sum ``price * quantity`` of priced sales too.
        offset_key: Dedupe key prefix of events without an ``event_id``.
    """
    late_before_now, max_event = late_before_ms, max_event_ms
    first_ms: int | None = None
    deltas: dict[str, list[BucketDelta]] = {}
    last_sale: dict[str, int] = {}
    rejects: list[tuple[Record, SaleEvent | EventError, int]] = []
    valid = 0
    for msg, event in zip(msgs, events, strict=True):
        if isinstance(event, EventError):
            rejects.append((msg, event, 0))
            continue
        ts_ms = event.ts_ms
        bucket = ts_ms - (ts_ms - origin_ms) % step_ms  # freq.floor_ms, inlined
        if late_before_now is not None and bucket < late_before_now:
            # A late bound comes with a largest event time: max_event is set.
            rejects.append((msg, event, max_event or 0))
            continue
        valid += 1
        if max_event is None or ts_ms > max_event:
            if max_event is None:
                first_ms = ts_ms
            max_event, late_before_now = ts_ms, late_before_for(ts_ms)
        quantity, price = event.quantity, event.price
        event_id = event.event_id
        dedupe_key = f"e:{event_id}" if event_id is not None else f"{offset_key}{msg.offset}"
        if uses_prices and price is not None and quantity > 0:
            delta = BucketDelta(bucket, dedupe_key, quantity, price * quantity, quantity)
        else:
            delta = BucketDelta(bucket, dedupe_key, quantity)
        item_id = event.item_id
        item_deltas = deltas.get(item_id)
        if item_deltas is None:
            deltas[item_id] = [delta]
            last_sale[item_id] = bucket
        else:
            item_deltas.append(delta)
            if bucket > last_sale[item_id]:
                last_sale[item_id] = bucket
    return _Aggregate(deltas, last_sale, valid, max_event, first_ms, rejects)


#: Messages validated per step of :meth:`SalesProcessor.parse_ahead` before it yields to the
#: event loop (about half a millisecond of work).
_PARSE_CHUNK = 500


class _Parsed(NamedTuple):
    """A partition's messages and what validating them gave, one result per message.

    With the partition's clock loaded, also the batch summed per item, valid while the
    clock's largest event time is still ``from_max_event_ms`` and the model ``model``.
    """

    msgs: Sequence[Record]
    events: list[SaleEvent | EventError]
    aggregate: _Aggregate | None = None
    from_max_event_ms: int | None = None
    model: ModelInfo | None = None


def _parse_all(
    msgs: Sequence[Record], max_bytes: int, now_ms: int, max_future_ms: int | None
) -> list[SaleEvent | EventError]:
    """:func:`~stream.pipeline.events.parse_events` of the messages' values."""
    return parse_events(
        map(_VALUE, msgs), max_bytes=max_bytes, now_ms=now_ms, max_future_ms=max_future_ms
    )
