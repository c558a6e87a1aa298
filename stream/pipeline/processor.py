"""One batch of raw sale messages through the worker: validate, store, close buckets, forecast.

This is the worker's logic without Faust, so it can be unit-tested with the in-memory store
and a fake sink, and so the Faust app (:mod:`stream.worker.app`) stays pure wiring. Per batch:

1. every message is validated (:func:`stream.pipeline.events.parse_events`); invalid ones,
   and events older than their partition's grace (``late``), become dead-letter records;
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

The work is split along its seams, one module each, and this class is the facade that wires
them and keeps the worker's API:

* :mod:`stream.pipeline.ingest`: step 1, per partition (validate, sum per item and bucket,
  dead-letter, advance the clock), also ahead of a batch's turn
  (:meth:`SalesProcessor.parse_ahead`);
* :mod:`stream.pipeline.staging`: steps 2-4 and their order (store, plan, read; forecast and
  deliver, in the background; failed batches again first);
* :mod:`stream.pipeline.commits`: the clocks as cached, delivered and stored, and the offsets
  that may be committed;
* :mod:`stream.pipeline.model_slot`: the live model and its swaps, the shadow model, the
  observers;
* :mod:`stream.pipeline.edges`: the types at the edge (:class:`Record`, :class:`RawMessage`,
  :class:`Sink`, :class:`BatchStats`, :data:`OnLate`), re-exported here.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Literal

from stream.inference.model_info import ModelInfo
from stream.inference.observers import ForecastObserver
from stream.pipeline.commits import Commits
from stream.pipeline.edges import BatchStats, OnLate, RawMessage, Record, Sink
from stream.pipeline.ingest import Ingest
from stream.pipeline.model_slot import ModelSlot
from stream.pipeline.realtime import OpenBuckets
from stream.pipeline.recovery import Recovery
from stream.pipeline.staging import Staging
from stream.pipeline.watermark import PartitionClock
from stream.state.base import PartitionId, WindowStore
from trendcast.forecasting.base import Forecaster

__all__ = ["BatchStats", "OnLate", "RawMessage", "Record", "SalesProcessor", "Sink"]

logger = logging.getLogger(__name__)


class SalesProcessor:
    """The worker's batch logic.

    The model can be replaced while the worker runs (:meth:`swap_model`); the window state
    keeps the layout of the model given here (its window, whether it has prices), which is
    what bounds the models that can be swapped in.

    A facade: the work is done by its parts (see the module docstring), which share the
    store, the clocks (:class:`~stream.pipeline.commits.Commits`) and the model slot
    (:class:`~stream.pipeline.model_slot.ModelSlot`); the attributes below read through to them.

    Args:
        store: Window state.
        forecaster: Turns windows into forecasts.
        model: Window, horizon, freq and version of the model.
        sink: Output topics.
        allowed_lateness_ms: The watermark's lag behind the largest event time (see
            :class:`~stream.pipeline.watermark.PartitionClock`): a bucket closes that long
            after its end.
        grace_buckets: Closed buckets still accepting events.
        live_window_ms: A partition whose largest event time is at most this far behind the
            wall clock is *live*: once caught up, its clock follows the wall clock
            (:meth:`advance`).
        catchup: When one batch closes several buckets of a partition: ``latest`` forecasts
            each item only as of the newest of them (subscribers want the newest forecast,
            not one per stale bucket), ``every`` as of each (backfills).
        refresh_ms: Least time between two ``refresh`` forecasts of an item with new sales in
            a live partition's open bucket; 0: none (see :mod:`stream.pipeline.realtime`).
        alert_probability: Surge and stall alerts below this tail probability.
        stall_every_ms: How often live partitions are checked for stalls.
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
        allowed_lateness_ms: int = 60_000,
        grace_buckets: int = 1,
        live_window_ms: int = 300_000,
        catchup: Literal["latest", "every"] = "latest",
        refresh_ms: int = 60_000,
        alert_probability: float = 0.001,
        stall_every_ms: int = 60_000,
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
        step = model.freq.step_ms
        lateness_buckets = -(-allowed_lateness_ms // step)  # buckets the lateness reaches into
        span = (model.window + lateness_buckets + grace_buckets + 1) * step
        self.live_window_ms = live_window_ms
        self._slot = ModelSlot(
            forecaster, model, observers=observers, inference_batch_size=inference_batch_size
        )
        if shadow is not None:
            self.set_shadow(*shadow)
        self._commits = Commits(
            store, model.freq, lateness_ms=allowed_lateness_ms, grace_buckets=grace_buckets
        )
        # Lost state is rebuilt from the log: every clock update is checked (the store below).
        self._recovery = Recovery(self._commits, window_buckets=span // step)
        store = self._commits.store = self._recovery.store
        self._ingest = Ingest(
            self._commits,
            self._slot,
            max_message_bytes=max_message_bytes,
            max_future_ms=max_future_ms,
            state_ttl_ms=state_ttl_ms if state_ttl_ms is not None else 2 * span,
            on_late=on_late,
            clock_ms=clock_ms,
        )
        self._staging = Staging(
            store,
            sink,
            self._ingest,
            self._commits,
            self._slot,
            inference_batch_size=inference_batch_size,
            clock_ms=clock_ms,
            catchup=catchup,
            realtime=OpenBuckets(
                refresh_ms=refresh_ms,
                alert_probability=alert_probability,
                stall_every_ms=stall_every_ms,
                live_window_ms=live_window_ms,
            ),
            hold=self._recovery.hold,
            mark=self._recovery.mark,
        )

    # --- what the parts hold, read (and for the sink, set) through the facade ----------------

    @property
    def store(self) -> WindowStore:
        """Window state (as given; the parts use it through the recovery's checks)."""
        return self._recovery.store.inner

    @property
    def sink(self) -> Sink:
        """Output topics."""
        return self._staging.sink

    @sink.setter
    def sink(self, sink: Sink) -> None:
        self._staging.sink = sink

    @property
    def recovery(self) -> Recovery:
        """Rebuilds of lost partition state from the log (:mod:`stream.pipeline.recovery`)."""
        return self._recovery

    @property
    def forecaster(self) -> Forecaster:
        """The live model's forecaster (changed by :meth:`swap_model`)."""
        return self._slot.forecaster

    @property
    def model(self) -> ModelInfo:
        """The live model (changed by :meth:`swap_model`)."""
        return self._slot.model

    @property
    def shadow(self) -> tuple[Forecaster, ModelInfo] | None:
        """The shadow model, if any (:meth:`set_shadow`)."""
        return self._slot.shadow

    @property
    def observers(self) -> list[ForecastObserver]:
        """Shown every forecast micro-batch once delivered (a list: may be appended to)."""
        return self._slot.observers

    @property
    def state_window(self) -> int:
        """Buckets the stored windows keep (the first model's window, for good)."""
        return self._slot.state_window

    @property
    def state_uses_prices(self) -> bool:
        """Whether the stored windows keep prices (the first model's choice, for good)."""
        return self._slot.state_uses_prices

    @property
    def allowed_lateness_ms(self) -> int:
        """The watermark's lag behind the largest event time."""
        return self._commits.lateness_ms

    @property
    def grace_buckets(self) -> int:
        """Closed buckets still accepting events."""
        return self._commits.grace_buckets

    @property
    def inference_batch_size(self) -> int:
        """Windows per ``predict`` call."""
        return self._staging.inference_batch_size

    @property
    def max_message_bytes(self) -> int:
        """Size limit of a message value."""
        return self._ingest.max_message_bytes

    @property
    def max_future_ms(self) -> int | None:
        """How far ahead of the wall clock an event may be."""
        return self._ingest.max_future_ms

    @property
    def state_ttl_ms(self) -> int:
        """TTL of item keys."""
        return self._ingest.state_ttl_ms

    @property
    def on_late(self) -> OnLate | None:
        """Hook called for every late event."""
        return self._ingest.on_late

    @property
    def clock_ms(self) -> Callable[[], int]:
        """Wall clock."""
        return self._ingest.clock_ms

    @property
    def _clocks(self) -> dict[PartitionId, PartitionClock]:
        """The cached partition clocks (for tests and inspection)."""
        return self._commits.clocks

    # --- the model slot ---------------------------------------------------------------------

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
        self._slot.swap(forecaster, model)

    def set_shadow(self, forecaster: Forecaster | None, model: ModelInfo | None = None) -> None:
        """Score ``forecaster`` on the live model's windows from the next batch on (None: stop).

        A shadow model's forecasts only reach the observers (role ``shadow``): it is how a
        candidate is compared with the live model on the same traffic before promoting it.

        Raises:
            BundleError: The window state cannot feed ``model`` (see :meth:`swap_model`).
        """
        self._slot.set_shadow(forecaster, model)

    # --- batches ------------------------------------------------------------------------------

    async def parse_ahead(self, batches: Mapping[PartitionId, Sequence[Record]]) -> None:
        """Validate a fetched batch's messages before its turn, while another batch runs.

        Why: a batch spends a good part of its time awaiting Redis, whose server works on
        another core meanwhile, and validating a message needs nothing but its bytes and the
        wall clock (no partition clock, no store). The worker calls this on the batch it
        fetched ahead (:mod:`stream.worker.batch_consumer`), in chunks that yield to the event
        loop, so the batch being processed resumes as soon as its reply arrives.
        :meth:`process_partitions` then takes these results, found by the identity of each
        partition's record sequence, instead of validating again. Results of the last two
        calls are kept: a batch never processed (dropped at a rebalance) leaves nothing
        behind for long, and one that is processed without them is validated as usual.
        """
        await self._ingest.parse_ahead(batches)

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
        return await self._staging.process(batches)

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
        return await self._staging.submit(batches)

    async def advance(
        self, partitions: Iterable[PartitionId], now_ms: int | None = None
    ) -> BatchStats | None:
        """Let caught-up live partitions follow the wall clock; close what that closes.

        Also where stalls are looked for (every ``stall_every_ms`` per live partition,
        busy or quiet: the worker calls this between batches, with or without caught-up
        partitions).

        The worker calls this with the partitions that have nothing left to read. Each one
        that is live (its largest event time at most :attr:`live_window_ms` behind
        ``now_ms``) has its clock moved to ``now_ms`` as if an event had come then: a
        bucket therefore closes ``allowed_lateness_ms`` after its end even when no later
        event arrives, and its forecasts go out like any batch's (:meth:`submit`: in the
        background, clocks stored after delivery). A partition replaying or catching up on
        history is never live, so its output depends on the events alone.

        Returns:
            The stats of the batch that closed buckets, or None when none closed.

        Raises:
            StateStoreError, BrokerError, ForecastError: As :meth:`submit`; the clocks stay
                where they were, and the next call tries again.
        """
        now = self.clock_ms() if now_ms is None else now_ms
        closing: dict[PartitionId, Sequence[Record]] = {}
        realtime = self._staging.realtime
        for pid in partitions:
            clock = await self._commits.clock(pid)
            if not clock.is_live(now, self.live_window_ms):
                continue
            if clock.closes_at(now):
                closing[pid] = ()
            else:
                clock.observe(now)  # still live next time; nothing to plan or store
            if realtime is not None:
                realtime.follow(pid, clock.freq.floor_ms(now), now, now)
        stats = await self._staging.submit(closing, advance_ms=now) if closing else None
        await self._staging.check_stalls(now)
        return stats

    async def drain(self) -> None:
        """Deliver the forecasts of every batch before: the one in the background
        (:meth:`submit`), then any whose forecasting failed.

        Raises:
            Exception: A batch's forecasting failed (again). It is kept, and made again by
                the next call, unless :meth:`release` gives its partitions away.
        """
        await self._staging.drain()

    # --- commits ---------------------------------------------------------------------------

    async def flush(self) -> None:
        """Store the clocks of delivered batches now (at revoke, at stop, on a timer).

        Batches before are delivered first (:meth:`drain`), so that their clocks are stored
        too; if one's forecasting fails (again), that is logged, its clocks are not stored,
        and it is kept for the next call.

        Raises:
            StateStoreError: The store failed; the clocks stay pending.
        """
        if self._slot.busy:
            return  # a running batch stores them with its own round trip
        try:
            await self.drain()
        except Exception as exc:  # kept: sent again by the next call (a second from now)
            logger.warning("could not send a batch's forecasts (%s); they are kept", exc)
        if self._slot.busy or not self._commits.unsaved:
            return
        await self._commits.store_unsaved()

    def take_committable(self) -> dict[PartitionId, int]:
        """Offsets safe to commit now, per partition: those whose clock is stored.

        Committing only these keeps the invariant the recovery relies on: whoever continues
        a partition from its committed offset finds a stored clock at least that far (so it
        neither skips forecasts of buckets closed before nor mistakes its events for late
        ones). A batch's offsets therefore become committable with the round trip of the
        first batch staged after its forecasts were delivered, or the next :meth:`flush`:
        one or two batches, or one second, after the batch.
        """
        return self._commits.take_committable()

    def forget(self, partitions: Iterable[PartitionId] | None = None) -> None:
        """Drop cached clocks (all, or of ``partitions``), e.g. when partitions are assigned.

        The next batch of such a partition reloads its clock from the store, which is how a
        worker continues a partition another worker had.
        """
        self._commits.forget(partitions)

    def release(self, partitions: Iterable[PartitionId]) -> None:
        """Forget revoked partitions entirely: clocks, unstored clocks, committable offsets.

        A batch of theirs whose forecasts failed keeps its requests (they are sent again,
        harmless duplicates if the next owner makes them too) but not its clocks.

        Call after :meth:`flush` and committing: what is left belongs to the next owner,
        which reloads the stored clock and restarts from the committed offset.
        """
        for p in partitions:
            self._commits.release(p)
            self._staging.release(p)  # the next owner plans these from its clocks
            if self._staging.realtime is not None:
                self._staging.realtime.release(p)
