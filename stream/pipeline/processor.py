"""One batch of raw sale messages through the worker: validate, store, close buckets, forecast.

This is the worker's logic without Faust, so it can be unit-tested with the in-memory store
and a fake sink, and so the Faust app (:mod:`stream.worker.app`) stays pure wiring. Per batch:

1. every message is validated (:func:`stream.pipeline.events.parse_events`); invalid ones, and
events
   older than their partition's grace (``late``), become dead-letter records;
2. valid events are summed into their items' buckets in ONE store round trip, idempotently
   (dedupe key = ``event_id``, else ``topic/partition/offset``), which also advances the
   partition clock and returns the partition's recently selling items;
3. for each bucket the watermark closed, every item with a sale in that bucket's window gets
   a forecast; items whose already-forecast buckets received late (in-grace) events get a new
   forecast as of the last closed bucket; one ``predict`` per micro-batch;
4. dead letters and forecasts are sent and their delivery awaited; only then may the
   partition's clock be stored (largest event time, "forecast up to" mark, next offset — all
   three together, so the stored clock never counts events whose outputs may be missing; a
   re-delivered message below the stored next offset that now looks late was counted
   before and is dropped as a duplicate instead of being dead-lettered as ``late``). The
   clock is stored with the *next* batch's round trip (or by :meth:`flush` at revoke, at
   stop and every second), so a batch costs one round trip, plus one window read when
   buckets close. The caller commits only :meth:`take_committable` offsets: those whose
   clock is stored, i.e. whose state and outputs are stored too. So a worker that continues
   a partition from its committed offset always finds a clock at least that far (the
   invariant recovery needs); commits trail by a batch or two or one second, and a crash
   re-delivers at most that much, which dedupe absorbs.

The worker overlaps step 4 of a batch with steps 1-3 of the next (:meth:`submit`): the
cached clock moves at step 3 (the due buckets are *claimed*, so the next batch plans after
them), while the state to store is set aside until step 4 delivered. A batch whose step 4
fails keeps its forecast requests and windows and sends them again before anything else;
the claims stay, so nothing is planned twice meanwhile. A failure in steps 1-3 puts the
cached clocks back where they were before the batch and leaves it un-acked; re-processing
it is safe because every store write is idempotent and clocks only move forward. Forecasts
are therefore at-least-once across crashes and exactly-once in a clean run.
"""

from __future__ import annotations

import asyncio
import logging
import time
from bisect import bisect_left
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from operator import attrgetter
from typing import NamedTuple, Protocol

from stream.inference.batching import ForecastRequest, forecast
from stream.inference.model_info import ModelInfo
from stream.inference.observers import ForecastObserver, ScoredBatch, notify
from stream.monitoring.telemetry import (
    BATCH_SECONDS,
    DEAD_LETTERS,
    EVENTS,
    FORECASTS,
    LATE_BY,
    SHADOW_FAILURES,
    WATERMARK,
)
from stream.pipeline.events import SaleEvent, dead_letter_value, parse_events
from stream.pipeline.watermark import PartitionClock
from stream.state.base import (
    ApplyResult,
    BucketDelta,
    ItemUpdate,
    ItemWindow,
    PartitionId,
    PartitionState,
    PartitionUpdate,
    WindowStore,
)
from trendcast.exceptions import BundleError, EventError
from trendcast.forecasting.base import Forecaster

__all__ = ["BatchStats", "RawMessage", "Record", "SalesProcessor", "Sink"]

logger = logging.getLogger(__name__)

_VALUE = attrgetter("value")


class Record(Protocol):
    """What the processor reads of one Kafka record of a known partition.

    aiokafka's ``ConsumerRecord`` has exactly these attributes, so the worker's fast path
    (:mod:`stream.worker.batch_consumer`) hands fetched records over as they are, without building a
    Python object per event; tests use :class:`RawMessage`.
    """

    @property
    def offset(self) -> int: ...  # noqa: D102

    @property
    def key(self) -> bytes | None: ...  # noqa: D102

    @property
    def value(self) -> bytes | None: ...  # noqa: D102

    @property
    def timestamp(self) -> int | None:  # noqa: D102
        """Broker or producer timestamp, epoch ms."""
        ...


@dataclass(frozen=True, slots=True)
class RawMessage:
    """A Kafka record as the processor needs it (decoupled from Faust's types)."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    timestamp_ms: int | None = None

    @property
    def source(self) -> PartitionId:
        """The partition the record came from."""
        return PartitionId(self.topic, self.partition)

    @property
    def timestamp(self) -> int | None:
        """:class:`Record`'s name for ``timestamp_ms``."""
        return self.timestamp_ms


class Sink(Protocol):
    """Where the processor's output goes; each call returns once the broker has it."""

    async def send_forecasts(self, records: Sequence[tuple[str, bytes]]) -> None:
        """Send ``(item_id, JSON value)`` records to the forecasts topic."""
        ...

    async def send_dead_letters(self, records: Sequence[tuple[bytes | None, bytes]]) -> None:
        """Send ``(original key, JSON value)`` records to the dead-letter topic."""
        ...


@dataclass
class BatchStats:
    """What one batch did (for logs and tests)."""

    valid: int = 0
    invalid: int = 0
    late: int = 0
    duplicates: int = 0
    redelivered: int = 0
    forecasts: int = 0
    reforecasts: int = 0
    closed_buckets: dict[PartitionId, list[int]] = field(default_factory=dict)
    #: Wall seconds of the batch's steps (ingest, apply, read, forecast, send), for logs.
    timings: dict[str, float] = field(default_factory=dict)


#: Called for each late event with the event, its message and how far behind it was (ms).
OnLate = Callable[[SaleEvent, RawMessage, int], None]


class SalesProcessor:
    """The worker's batch logic.

    The model can be replaced while the worker runs (:meth:`swap_model`); the window state
    keeps the layout of the model given here (its window, whether it has prices), which is
    what bounds the models that can be swapped in.

    Args:
        store: Window state.
        forecaster: Turns windows into forecasts.
        model: Window, horizon, freq and version of the model.
        sink: Output topics.
        lateness_buckets: Watermark lag (see :class:`~stream.pipeline.watermark.PartitionClock`).
        grace_buckets: Closed buckets still accepting events.
        inference_batch_size: Windows per ``predict`` call.
        max_message_bytes: Size limit of a message value.
        max_future_ms: How far ahead of the wall clock an event may be.
        state_ttl_ms: TTL of item keys; ``None`` derives it from the kept span.
        on_late: Hook called for every late event (after counting it).
        observers: Shown every forecast micro-batch (online accuracy, trends), once the
            batch's forecasts are delivered.
        shadow: A second model scored on the same windows, never emitted.
        clock_ms: Wall clock (injectable for tests).
    """

    def __init__(
        self,
        store: WindowStore,
        forecaster: Forecaster,
        model: ModelInfo,
        sink: Sink,
        *,
        lateness_buckets: int = 1,
        grace_buckets: int = 1,
        inference_batch_size: int = 256,
        max_message_bytes: int = 64 * 1024,
        max_future_ms: int | None = 86_400_000,
        state_ttl_ms: int | None = None,
        on_late: OnLate | None = None,
        observers: Sequence[ForecastObserver] = (),
        shadow: tuple[Forecaster, ModelInfo] | None = None,
        clock_ms: Callable[[], int] = lambda: int(time.time() * 1000),
    ) -> None:
        if store.freq != model.freq:
            raise ValueError(f"expected a store of freq {model.freq.name}, got {store.freq.name}")
        self.store = store
        self.forecaster = forecaster
        self.model = model
        self.sink = sink
        self.lateness_buckets = lateness_buckets
        self.grace_buckets = grace_buckets
        self.inference_batch_size = inference_batch_size
        self.max_message_bytes = max_message_bytes
        self.max_future_ms = max_future_ms
        span = (model.window + lateness_buckets + grace_buckets + 1) * model.freq.step_ms
        self.state_ttl_ms = state_ttl_ms if state_ttl_ms is not None else 2 * span
        self.on_late = on_late
        self.clock_ms = clock_ms
        self._clocks: dict[PartitionId, PartitionClock] = {}
        # What the stored windows hold, fixed for the life of the processor: a swapped-in
        # model with a smaller window must not trim history a rollback would need again.
        self.state_window = model.window
        self.state_uses_prices = model.uses_prices
        self._busy = False
        self._pending: tuple[Forecaster, ModelInfo] | None = None
        self.observers = list(observers)
        self.shadow: tuple[Forecaster, ModelInfo] | None = None
        if shadow is not None:
            self.set_shadow(*shadow)
        # Clocks whose outputs were delivered but which are not stored yet: they ride along
        # with the next batch's round trip (or :meth:`flush`), see step 4.
        self._unsaved: dict[PartitionId, PartitionState] = {}
        # Next offsets whose clocks are stored: what may be committed (take_committable).
        self._committable: dict[PartitionId, int] = {}
        # The clocks known to be stored (loaded, or stored by a round trip that returned):
        # what a worker taking over would start from, which bounds what may be forgotten.
        self._stored_states: dict[PartitionId, PartitionState] = {}
        # Messages validated ahead of their batch (parse_ahead), by id() of their sequence.
        self._parsed: dict[int, _Parsed] = {}
        self._parsed_before: dict[int, _Parsed] = {}
        # The batch forecasting in the background (submit), and batches whose forecasting
        # failed, in batch order: their forecasts are made and sent again before anything.
        self._tail: asyncio.Future[BatchStats] | None = None
        self._tail_staged: _Staged | None = None
        self._failed: list[_Staged] = []
        self._resending = asyncio.Lock()
        # Observers being told about the last delivered batch (_observe).
        self._observing: asyncio.Future[None] | None = None

    def swap_model(self, forecaster: Forecaster, model: ModelInfo) -> None:
        """Serve ``model`` from the next batch on (now, when no batch is in progress).

        A batch plans with the model it started with and is forecast with it too (also in
        the background, see :meth:`submit`), so a swap requested while one is planned (e.g.
        by a timer while the batch awaits Redis) waits for the planning to finish: one
        batch never mixes two models. Offsets and window state are untouched, so no event is
        lost or counted twice; a batch that failed and is retried after a swap is forecast
        with the new model (forecasts are at-least-once anyway).

        Raises:
            BundleError: The window state cannot feed ``model``: another freq, a window
                longer than the kept one, or prices the state does not keep.
        """
        self._check_feedable(model)
        if self._busy:
            self._pending = (forecaster, model)
        else:
            self._pending = None
            self.forecaster, self.model = forecaster, model

    def _check_feedable(self, model: ModelInfo) -> None:
        if model.freq != self.model.freq:
            raise BundleError(
                f"model {model.model_version}: expected freq {self.model.freq.name} "
                f"(the stored windows'), got {model.freq.name}"
            )
        if model.window > self.state_window:
            raise BundleError(
                f"model {model.model_version}: expected a window of at most "
                f"{self.state_window} buckets (what the stored windows keep), got {model.window}"
            )
        if model.uses_prices and not self.state_uses_prices:
            raise BundleError(
                f"model {model.model_version}: expected a model without a price feature "
                "(the stored windows keep no prices), got one with prices"
            )

    def set_shadow(self, forecaster: Forecaster | None, model: ModelInfo | None = None) -> None:
        """Score ``forecaster`` on the live model's windows from the next batch on (None: stop).

        A shadow model's forecasts only reach the observers (role ``shadow``): it is how a
        candidate is compared with the live model on the same traffic before promoting it.

        Raises:
            BundleError: The window state cannot feed ``model`` (see :meth:`swap_model`).
        """
        if forecaster is None or model is None:
            self.shadow = None
            return
        self._check_feedable(model)
        self.shadow = (forecaster, model)

    async def _observe(
        self,
        scored: Sequence[ScoredBatch],
        shadow: tuple[Forecaster, ModelInfo] | None,
        requests: Sequence[ForecastRequest],
        windows: Mapping[str, ItemWindow],
    ) -> None:
        """Tell the observers about a delivered batch, then score the shadow model on it.

        Why in the background: online accuracy and trends cost a tenth of the worker's
        time (``bench/ab_worker.py`` with them switched off), and none of it needs to hold
        up delivering forecasts or storing clocks; run after delivery, it fills the time
        the next batch awaits Redis. Batches are told in order (one is told before the next
        batch forecasts, :meth:`_observed`), exactly what they would have been told inline.
        """
        for one in scored:
            notify(self.observers, one)
        await self._score_shadow(shadow, requests, windows)

    async def _observed(self) -> None:
        """Wait until the observers have been told about every delivered batch."""
        observing = self._observing
        if observing is not None:
            await asyncio.wait([observing])
            if self._observing is observing:
                self._observing = None
                if not observing.cancelled() and observing.exception() is not None:
                    logger.warning("telling the observers failed: %s", observing.exception())

    async def _score_shadow(
        self,
        shadow: tuple[Forecaster, ModelInfo] | None,
        requests: Sequence[ForecastRequest],
        windows: Mapping[str, ItemWindow],
    ) -> None:
        if shadow is None:
            return
        forecaster, model = shadow
        try:
            await forecast(
                forecaster,
                requests,
                windows,
                model,
                self.inference_batch_size,
                observers=self.observers,
                role="shadow",
                emit=False,
            )
        except Exception as exc:  # a broken candidate must never hold up live forecasts
            SHADOW_FAILURES.inc()
            logger.warning("shadow model %s failed: %s", model.model_version, exc)

    async def flush(self) -> None:
        """Store the clocks of delivered batches now (at revoke, at stop, on a timer).

        Batches before are delivered first (:meth:`drain`), so that their clocks are stored
        too; if one's forecasting fails (again), that is logged, its clocks are not stored,
        and it is kept for the next call.

        Raises:
            StateStoreError: The store failed; the clocks stay pending.
        """
        if self._busy:
            return  # a running batch stores them with its own round trip
        try:
            await self.drain()
        except Exception as exc:  # kept: sent again by the next call (a second from now)
            logger.warning("could not send a batch's forecasts (%s); they are kept", exc)
        if self._busy or not self._unsaved:
            return
        unsaved = dict(self._unsaved)
        await self.store.apply([], [PartitionUpdate(pid, st) for pid, st in unsaved.items()])
        for pid, state in unsaved.items():
            if self._unsaved.get(pid) is state:
                del self._unsaved[pid]
        self._stored(unsaved)

    def _stored(self, states: Mapping[PartitionId, PartitionState]) -> None:
        for pid, state in states.items():
            known_state = self._stored_states.get(pid)
            self._stored_states[pid] = state if known_state is None else known_state.merged(state)
            if state.next_offset is not None:
                known = self._committable.get(pid)
                if known is None or state.next_offset > known:
                    self._committable[pid] = state.next_offset

    def take_committable(self) -> dict[PartitionId, int]:
        """Offsets safe to commit now, per partition: those whose clock is stored.

        Committing only these keeps the invariant the recovery relies on: whoever continues
        a partition from its committed offset finds a stored clock at least that far (so it
        neither skips forecasts of buckets closed before nor mistakes its events for late
        ones). A batch's offsets therefore become committable with the round trip of the
        first batch staged after its forecasts were delivered, or the next :meth:`flush`:
        one or two batches, or one second, after the batch.
        """
        out, self._committable = self._committable, {}
        return out

    def forget(self, partitions: Iterable[PartitionId] | None = None) -> None:
        """Drop cached clocks (all, or of ``partitions``), e.g. when partitions are assigned.

        The next batch of such a partition reloads its clock from the store, which is how a
        worker continues a partition another worker had.
        """
        if partitions is None:
            self._clocks.clear()
        else:
            for p in partitions:
                self._clocks.pop(p, None)

    def release(self, partitions: Iterable[PartitionId]) -> None:
        """Forget revoked partitions entirely: clocks, unstored clocks, committable offsets.

        A batch of theirs whose forecasts failed keeps its requests (they are sent again,
        harmless duplicates if the next owner makes them too) but not its clocks.

        Call after :meth:`flush` and committing: what is left belongs to the next owner,
        which reloads the stored clock and restarts from the committed offset.
        """
        for p in partitions:
            self._clocks.pop(p, None)
            self._unsaved.pop(p, None)
            self._committable.pop(p, None)
            self._stored_states.pop(p, None)
            for staged in self._failed:  # the next owner plans these from its clocks
                staged.states.pop(p, None)

    async def _clock(self, partition: PartitionId) -> PartitionClock:
        clock = self._clocks.get(partition)
        if clock is None:
            state = await self.store.load_partition(partition)
            self._stored_states[partition] = state
            unsaved = self._unsaved.get(partition)
            if unsaved is not None:  # delivered, not stored yet: ahead of the stored clock
                state = state.merged(unsaved)
            clock = PartitionClock(
                self.model.freq,
                lateness_buckets=self.lateness_buckets,
                grace_buckets=self.grace_buckets,
                state=state,
            )
            self._clocks[partition] = clock
        return clock

    async def parse_ahead(self, batches: Mapping[PartitionId, Sequence[Record]]) -> None:
        """Validate a fetched batch's messages before its turn, while another batch runs.

        Why: a batch spends a good part of its time awaiting Redis, whose server works on
        another core meanwhile, and validating a message needs nothing but its bytes and the
        wall clock (no partition clock, no store). The worker calls this on the batch it
        fetched ahead (:mod:`stream.worker.batch_consumer`), in chunks that yield to the event
        loop, so
        the batch being processed resumes as soon as its reply arrives.
        :meth:`process_partitions` then takes these results, found by the identity of each
        partition's record sequence, instead of validating again. Results of the last two
        calls are kept: a batch never processed (dropped at a rebalance) leaves nothing
        behind for long, and one that is processed without them is validated as usual.
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
            clock = self._clocks.get(pid)
            if clock is not None:
                # Summed per item too, from the partition's clock as it is now: usually
                # already past the batch in flight (its events are counted before it awaits
                # Redis). Used only if the clock and the model are unchanged at its turn.
                ahead = ahead._replace(
                    aggregate=self._aggregate(pid, msgs, events, clock),
                    from_max_event_ms=clock.state.max_event_ms,
                    model=self.model,
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
        freq = self.model.freq
        return _aggregate(
            msgs,
            events,
            max_event_ms=clock.state.max_event_ms,
            late_before_ms=clock.late_before_ms,
            late_before_for=clock.late_before_for,
            origin_ms=freq.origin_ms,
            step_ms=freq.step_ms,
            uses_prices=self.model.uses_prices,
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

    async def process(self, messages: Sequence[RawMessage]) -> BatchStats:
        """Process one batch (any mix of partitions, each in offset order).

        Raises:
            StateStoreError: The store failed; nothing was acked, retry the same batch.
            BrokerError: Sending output failed; retry the same batch.
            ForecastError: The forecaster failed; retry the same batch.
        """
        by_partition: dict[PartitionId, list[RawMessage]] = {}
        for msg in messages:
            by_partition.setdefault(msg.source, []).append(msg)
        return await self.process_partitions(by_partition)

    async def process_partitions(
        self, batches: Mapping[PartitionId, Sequence[Record]]
    ) -> BatchStats:
        """Process one batch given as records per partition, each in offset order.

        Returns once the batch is done: its state stored, its dead letters and forecasts
        delivered (:meth:`submit` returns before the forecasts). Batches submitted before
        are finished first. :meth:`process` is the same for a flat list of
        :class:`RawMessage`.

        Raises:
            StateStoreError: The store failed; nothing was acked, retry the same batch.
            BrokerError: Sending output failed; retry the same batch (its forecasts are
                kept and sent again first).
            ForecastError: The forecaster failed; retry the same batch.
        """
        await self.drain()
        staged = await self._staged(batches)
        try:
            stats = await self._emit(staged)
        except BaseException:
            self._failed.append(staged)
            raise
        await self._observed()
        return stats

    async def submit(self, batches: Mapping[PartitionId, Sequence[Record]]) -> BatchStats:
        """Process a batch like :meth:`process_partitions`, forecasting it in the background.

        Returns once the batch's state is stored and its forecast windows are read; its
        forecasts are made and sent while the caller fetches and submits the next batch,
        whose Redis work (on the server's core) then overlaps this batch's inference and
        delivery (ONNX Runtime in a thread, the broker's acks). Why this is safe:

        * Redis sees the same commands in the same order as without overlap (this batch's
          window read comes before the next batch's writes), so forecasts are identical.
        * The next batch plans from the clocks as this batch left them (its due buckets
          claimed), but a batch's clocks reach :meth:`take_committable` only once its
          forecasts are delivered, in batch order. The caller commits only those offsets.
        * A batch whose forecasting fails is kept with its requests and windows and made
          again, before anything else, by the next call (:meth:`submit`,
          :meth:`process_partitions`, :meth:`drain`, :meth:`flush`), which also raises the
          failure; the clocks keep their claims, so nothing is planned twice meanwhile.

        Raises:
            StateStoreError, BrokerError, ForecastError: This batch failed, or a batch
                before it failed to deliver its forecasts: retry this batch (one that was
                already staged is not staged again).
        """
        again = next((f for f in self._failed if f.batches is batches), None)
        await self._resend()
        if again is not None:
            return again.stats  # staged before, its forecasts delivered just now
        staged = await self._staged(batches)
        try:
            await self._collect_tail()  # not the observers: they run on in the background
            await self._resend()
        except BaseException:
            self._failed.append(staged)  # after the failed one: delivered in batch order
            raise
        self._tail = asyncio.ensure_future(self._emit(staged))
        self._tail_staged = staged
        return staged.stats

    async def drain(self) -> None:
        """Deliver the forecasts of every batch before: the one in the background
        (:meth:`submit`), then any whose forecasting failed.

        Raises:
            Exception: A batch's forecasting failed (again). It is kept, and made again by
                the next call, unless :meth:`release` gives its partitions away.
        """
        await self._collect_tail()
        await self._resend()
        await self._observed()

    async def _collect_tail(self) -> None:
        """Wait for the batch in the background; keep it, first in line, if it failed."""
        tail, staged = self._tail, self._tail_staged
        if tail is None or staged is None:
            return
        await asyncio.wait([tail])  # a cancelled caller leaves the tail running
        if self._tail is tail:  # else another caller collected it
            self._tail = self._tail_staged = None
            if tail.cancelled() or tail.exception() is not None:
                # Older than any batch kept so far: one is scheduled only when none is kept.
                self._failed.insert(0, staged)

    async def _resend(self) -> None:
        """Make and send again the forecasts of batches whose delivery failed, in order."""
        if not self._failed:
            return
        await self._collect_tail()  # kept while one ran (a cancelled submit): it goes first
        async with self._resending:  # the batch loop and the flush timer may both get here
            while self._failed:
                staged = self._failed[0]
                logger.warning(
                    "sending again the forecasts of a batch of %d events",
                    sum(len(m) for m in staged.batches.values()),
                )
                await self._emit(staged)
                self._failed.pop(0)

    async def _staged(self, batches: Mapping[PartitionId, Sequence[Record]]) -> _Staged:
        """:meth:`_stage`, with the model fixed for the batch and the clocks put back on failure.

        Why put back rather than reload: the cached clocks hold the claims of batches whose
        forecasts are still on their way (not stored yet), and a batch staged again after a
        failure must be judged exactly as the first time.
        """
        started = time.perf_counter()
        before = {
            pid: (self._clocks[pid], self._clocks[pid].state)
            for pid in batches
            if pid in self._clocks
        }
        self._busy = True
        try:
            staged = await self._stage(batches)
        except BaseException:
            for pid in batches:
                clock = self._clocks.get(pid)
                if pid not in before:
                    self._clocks.pop(pid, None)  # loaded by this batch: load it again
                elif clock is before[pid][0]:  # (not forgotten meanwhile, e.g. reassigned)
                    clock.restore(before[pid][1])
            raise
        finally:
            self._busy = False
            if self._pending is not None:  # swapped while this batch ran: serve it from now
                (self.forecaster, self.model), self._pending = self._pending, None
        staged.started = started
        return staged

    async def _stage(self, by_partition: Mapping[PartitionId, Sequence[Record]]) -> _Staged:
        """Steps 1-3 up to inference: validate, store, plan forecasts and read their windows.

        The cached clocks are advanced here (due buckets claimed, offsets marked), so the
        next batch plans after this one; the states to store are kept apart and stored only
        once :meth:`_emit` delivered the forecasts.
        """
        stats = BatchStats()
        now_ms = self.clock_ms()
        forecaster, model, shadow = self.forecaster, self.model, self.shadow

        started = time.perf_counter()
        # 1. Validate and classify; plan the store writes of each partition.
        dead: list[tuple[bytes | None, bytes]] = []
        plans: list[_Plan] = []
        for pid, msgs in by_partition.items():
            if not msgs:
                continue
            plan = await self._ingest(pid, msgs, now_ms, stats, dead)
            if plan is not None:
                plans.append(plan)
                stats.closed_buckets[pid] = plan.due
        if dead:
            await self.sink.send_dead_letters(dead)

        # 2. One round trip: sums, dedupe, clocks, recent sellers.
        updates = [plan.partition for plan in plans]
        pending, self._unsaved = self._unsaved, {}
        updates += [PartitionUpdate(pid, state) for pid, state in pending.items()]
        stats.timings["ingest"] = time.perf_counter() - started
        started = time.perf_counter()
        try:
            result = await self.store.apply([u for plan in plans for u in plan.items], updates)
        except BaseException:
            self._unsaved = {**pending, **self._unsaved}  # still delivered; store them later
            raise
        self._stored(pending)
        stats.timings["apply"] = time.perf_counter() - started
        stats.duplicates = result.duplicates
        EVENTS.labels("valid").inc(stats.valid - result.duplicates - result.refused)
        EVENTS.labels("duplicate").inc(result.duplicates)

        # 3. Who to forecast (closed buckets, items whose forecast buckets changed) and
        #    their windows, read before any later batch writes.
        started = time.perf_counter()
        requests, windows = await self._forecast_requests(plans, result, stats)
        stats.timings["read"] = time.perf_counter() - started
        states: dict[PartitionId, PartitionState] = {}
        for plan in plans:
            watermark = plan.clock.watermark_ms
            if watermark is not None:
                WATERMARK.labels(plan.pid.topic, str(plan.pid.partition)).set(watermark)
            if plan.due:
                plan.clock.mark_emitted()  # claimed: the next batch plans the buckets after
            plan.clock.mark_processed(plan.next_offset)
            states[plan.pid] = plan.clock.state
        return _Staged(
            batches=by_partition,
            stats=stats,
            states=states,
            requests=requests,
            windows=windows,
            forecaster=forecaster,
            model=model,
            shadow=shadow,
        )

    async def _emit(self, staged: _Staged) -> BatchStats:
        """Step 4: forecast, deliver, and only then let the batch's clocks be stored."""
        stats, requests, windows = staged.stats, staged.requests, staged.windows
        scored: list[ScoredBatch] = []
        # The observers of the batch before are told in the background (see _observe); at
        # most one batch waits to be told, so they can never fall behind by more.
        await self._observed()
        if requests:
            started = time.perf_counter()
            records = await forecast(
                staged.forecaster,
                requests,
                windows,
                staged.model,
                self.inference_batch_size,
                scored=scored,
            )
            stats.timings["forecast"] = time.perf_counter() - started
            started = time.perf_counter()
            await self.sink.send_forecasts(records)
            stats.timings["send"] = time.perf_counter() - started
            stats.forecasts = len(records)
            FORECASTS.labels("closed").inc(len(records) - stats.reforecasts)
            FORECASTS.labels("late").inc(stats.reforecasts)
        # Once per batch, when its forecasts are delivered: a batch whose delivery failed is
        # timed when it is sent again, from its first staging (what it really took).
        BATCH_SECONDS.observe(time.perf_counter() - staged.started)
        # Only now, with the forecasts delivered: the states ride along with the next
        # batch's round trip (or flush(), at revoke, at stop and every second). A failure
        # before this line leaves the stored clocks where they were, so the forecasts are
        # made again (at-least-once), never skipped.
        self._unsaved.update(staged.states)
        if scored or (requests and staged.shadow is not None):
            self._observing = asyncio.ensure_future(
                self._observe(scored, staged.shadow, requests, windows)
            )
        if stats.invalid or stats.late or stats.forecasts:
            logger.info(
                "batch: %d valid, %d invalid, %d late, %d duplicate, %d forecasts "
                "(%d re-forecasts); seconds: %s",
                stats.valid,
                stats.invalid,
                stats.late,
                stats.duplicates,
                stats.forecasts,
                stats.reforecasts,
                ", ".join(f"{k} {v:.3f}" for k, v in stats.timings.items()),
            )
        return stats

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

    async def _ingest(
        self,
        pid: PartitionId,
        msgs: Sequence[Record],
        now_ms: int,
        stats: BatchStats,
        dead: list[tuple[bytes | None, bytes]],
    ) -> _Plan | None:
        """Validate a partition's messages in offset order, advancing its clock.

        The per-event work is :func:`_aggregate`, which touches no state: it sums the valid
        events per item and lists the rejected ones, which are dead-lettered here, in
        offset order, with the clock advanced to where it stood at each of them. So the
        outcome is that of judging the events one by one, and the sums can be made ahead
        of the batch's turn (:meth:`parse_ahead`) whenever the clock has not moved since.
        """
        clock = await self._clock(pid)
        step = self.model.freq.step_ms
        emitted_before = clock.state.emitted_to_ms
        # The late bound before this batch: every event accepted below is at or after it.
        late_before_start = clock.late_before_ms
        # The late bound of the clock known to be stored: dedupe keys older than it can go
        # (see ItemUpdate.dedupe_from_ms), and no older ones. A worker that takes over after
        # a crash judges re-delivered events by the stored clock, which lags this one by
        # the batches whose forecasts are still on their way (submit): an event it accepts
        # must still find its key, or it would be counted twice.
        stored = self._stored_states.get(pid)
        late_before_stored = (
            None
            if stored is None or stored.max_event_ms is None
            else clock.late_before_for(stored.max_event_ms)
        )
        ahead = self._take_parsed(msgs)
        aggregate: _Aggregate | None = None
        if ahead is None:
            events = _parse_all(msgs, self.max_message_bytes, now_ms, self.max_future_ms)
        else:
            events = ahead.events
            if ahead.model is self.model and ahead.from_max_event_ms == clock.state.max_event_ms:
                aggregate = ahead.aggregate
        if aggregate is None:
            aggregate = self._aggregate(pid, msgs, events, clock)
        if aggregate.first_ms is not None:  # the first event ever fixes where forecasts start
            clock.observe(aggregate.first_ms)
        for msg, event, max_event in aggregate.rejects:
            if isinstance(event, EventError):
                stats.invalid += 1
                EVENTS.labels("invalid").inc()
                dead.append(self._dead_letter(pid, msg, event.reason, event.detail, now_ms))
            else:
                clock.observe(max_event)  # the late event is judged from where it came
                self._reject(pid, msg, event, clock, now_ms, stats, dead)
        stats.valid += aggregate.valid
        if aggregate.max_event_ms is not None:
            clock.observe(aggregate.max_event_ms)  # once per batch, not at every newer event
        deltas, last_sale = aggregate.deltas, aggregate.last_sale

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
            late_before_start,
            late_before_stored,
        )
        oldest_end = min(x for x in candidates if x is not None)
        keep_from = oldest_end - (self.state_window - 1) * step
        dedupe_from = keep_from if late_before_stored is None else late_before_stored
        return _Plan(
            pid=pid,
            clock=clock,
            emitted_before=emitted_before,
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
            next_offset=msgs[-1].offset + 1,  # offset order
            partition=PartitionUpdate(
                pid,
                # The clock itself is stored after the outputs were delivered (step 4).
                PartitionState(),
                last_sale_ms=last_sale,
                forget_before_ms=keep_from,
                active_from_ms=due[0] - (self.model.window - 1) * step if due else None,
            ),
        )

    async def _forecast_requests(
        self, plans: Sequence[_Plan], result: ApplyResult, stats: BatchStats
    ) -> tuple[list[ForecastRequest], dict[str, ItemWindow]]:
        """Who to forecast as of which bucket, and the windows of every candidate.

        Every item with a sale in the window of a newly closed bucket, for that bucket; and
        every item whose already-forecast buckets changed (in-grace late events), as of the
        last closed bucket, unless that forecast is being made anyway. The candidates'
        windows are read in one round trip and reused for inference.
        """
        step, window = self.model.freq.step_ms, self.model.window
        regrace: dict[PartitionId, list[str]] = {}
        for plan in plans:
            before = plan.emitted_before
            if before is None:
                continue  # nothing was forecast before this batch
            own = {u.item_id for u in plan.items} & result.changed.keys()
            regrace[plan.pid] = sorted(i for i in own if any(b < before for b in result.changed[i]))
        candidates = {item for plan in plans for item in result.active.get(plan.pid, [])}
        candidates.update(item for items in regrace.values() for item in items)
        windows = await self.store.read(sorted(candidates)) if candidates else {}
        sold = {item: sorted(w.buckets) for item, w in windows.items()}
        requests: list[ForecastRequest] = []
        for plan in plans:
            planned: set[tuple[str, int]] = set()
            for bucket in plan.due:
                lo = bucket - (window - 1) * step
                for item in result.active.get(plan.pid, []):
                    buckets = sold[item]
                    i = bisect_left(buckets, lo)
                    if i < len(buckets) and buckets[i] <= bucket:  # a sale in [lo, bucket]
                        requests.append(ForecastRequest(item, bucket))
                        planned.add((item, bucket))
            open_from = plan.clock.open_from_ms
            if open_from is None:
                continue
            last_closed = open_from - step
            for item in regrace.get(plan.pid, []):
                if (item, last_closed) not in planned:
                    requests.append(ForecastRequest(item, last_closed))
                    stats.reforecasts += 1
        return requests, windows


@dataclass
class _Staged:
    """A batch whose state is stored and whose forecasts are planned (:meth:`_stage`)."""

    batches: Mapping[PartitionId, Sequence[Record]]
    stats: BatchStats
    #: The clocks as the batch leaves them: stored once its forecasts are delivered.
    states: dict[PartitionId, PartitionState]
    requests: list[ForecastRequest]
    windows: dict[str, ItemWindow]
    #: The model of the whole batch (a swap takes effect from the next batch).
    forecaster: Forecaster
    model: ModelInfo
    shadow: tuple[Forecaster, ModelInfo] | None
    started: float = 0.0


@dataclass
class _Plan:
    """One partition's share of a batch, between validation and forecasting."""

    pid: PartitionId
    clock: PartitionClock
    emitted_before: int | None
    due: list[int]
    items: list[ItemUpdate]
    next_offset: int
    partition: PartitionUpdate


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
