"""The worker's fast path: each fetched batch goes to the processor as one unit.

Why this exists: Faust hands every message one by one from its fetcher to an agent's stream
(``Consumer._drain_messages`` -> ``Conductor.on_message`` -> a queue -> ``Stream`` -> an
``Event`` and an ack per message, with a ``wait_first`` and task creation per message). On
two cores that machinery alone capped a plain agent at a few thousand events/s, while the
same topic read with aiokafka's ``getmany`` decodes at a hundred thousand and more
(``bench/throughput.py`` measures both in one run). The worker's work is per batch anyway
(one Redis round trip, one ONNX Runtime call per micro-batch), so per-event framework
objects buy nothing.

What changes, and what does not:

* :class:`BatchConsumer` is Faust's own aiokafka consumer with one method replaced,
  ``_drain_messages`` (the loop of Faust's ``Fetcher`` service). It still waits through
  Faust's flow control (``_wait_next_records``: paused during rebalances, only active
  partitions), still drops a fetch that straddles a generation change, as Faust's
  ``getmany`` does, and passes the raw aiokafka records of each partition, in offset
  order, to a :data:`BatchHandler`.
* Offsets are committed through Faust (``Consumer._commit_offsets``: only assigned
  partitions, producer flushed first, ``committed_offset`` bookkeeping kept) after the
  handler returned, and only the offsets it hands back: those of events whose state,
  outputs and partition clock are stored (they trail the batch by one or two batches or one
  second; :meth:`BatchConsumer.commit_processed` also runs on a timer, at revoke and at
  stop). Faust's own periodic commit finds nothing acked and stays idle.
* Faust still owns the worker's lifecycle, the consumer group and rebalances, the producer,
  timers and the web server. Topics stay subscribed through the app's conductor.
* Stop (SIGTERM): Faust cancels the fetcher; the batch in flight is shielded from that
  cancellation, finishes (or gives up its retries, uncommitted); the flusher delivers the
  forecasts still on their way and stores the clocks, the offsets they cover are committed,
  and only then does the fetcher stop — so a clean stop re-delivers nothing.
* Rebalance: :meth:`BatchConsumer.wait_idle` lets the revoke handler wait until the batch
  in flight has stored its effects, so partitions change hands between batches.
* Fetch ahead: the next fetch runs while a batch is processed (Faust's consumer thread
  fetches and decodes while the batch awaits Redis; ~20% more events/s in
  ``bench/throughput.py``). It carries the group generation it was fetched in and is
  handed over only if that is still current; otherwise its partitions are sought back to
  it, so a rebalance between fetch and hand-over loses nothing.
* Validate ahead: a fetched batch goes to an optional :data:`BatchPreparer` as soon as it
  is fetched, so its messages are validated while the batch before it awaits Redis (whose
  server runs on another core); the handler then finds them validated.
* C records: the worker's aiokafka consumer hands over the records its C batch iterator
  made, not a ``ConsumerRecord`` dataclass built in Python per record in Faust's consumer
  thread, which competes with the batch loop for the GIL (``_RawPartitionRecords``; 11%
  more events/s in ``bench/ab_worker.py``). Other consumers are unaffected.

The private Faust names this module touches (``_drain_messages``, ``_wait_next_records``,
``_commit_offsets``, ``_stopped``, ``_buffered_partitions``, ``_new_consumer_thread``,
``_create_worker_consumer``, ``_thread`` and its ``_ensure_consumer``, and aiokafka's
``_fetch_max_wait_ms``, ``_value_deserializer``, ``fetcher.PartitionRecords`` and its
``_consumer_record``) are checked by ``tests/unit/stream/worker/test_batch_consumer.py``
against the installed Faust, so an upgrade that renames or re-shapes them fails the tests
instead of the worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, NamedTuple, cast

from aiokafka.consumer import fetcher as fetcher_module
from faust.transport.drivers.aiokafka import AIOKafkaConsumerThread
from faust.transport.drivers.aiokafka import Consumer as AIOKafkaConsumer
from faust.types import TP

__all__ = ["Advancer", "BatchConsumer", "BatchHandler", "BatchPreparer", "Flusher", "install"]

logger = logging.getLogger(__name__)

#: Receives the records of one fetch per partition (aiokafka ``ConsumerRecord`` objects, in
#: offset order) and returns once their state is stored (their forecasts may still be on
#: their way: ``SalesProcessor.submit``), with the offsets that may be committed now (they
#: trail the batch: only those whose outputs are delivered and clocks stored), or None: the
#: worker is stopping and gave the batch up; it will be re-delivered.
BatchHandler = Callable[[Mapping[TP, Sequence[Any]]], Awaitable[Mapping[TP, int] | None]]
#: Gets each fetched batch as soon as it is fetched, while the batch before it is still
#: processed (validation ahead of time, see ``SalesProcessor.parse_ahead``); the same
#: batch goes to the :data:`BatchHandler` later, or never (dropped at a rebalance).
BatchPreparer = Callable[[Mapping[TP, Sequence[Any]]], Awaitable[None]]
#: Stores what can be stored without a batch (idle, revoke, stop) and returns the offsets
#: that may be committed now.
Flusher = Callable[[], Awaitable[Mapping[TP, int]]]
#: Gets the assigned partitions that have nothing left to read (their fetch position at
#: the high watermark), between batches and at most every ``advance_interval_s``: their
#: clocks may follow the wall clock (``SalesProcessor.advance``).
Advancer = Callable[[Sequence[TP]], Awaitable[None]]


class _Fetched(NamedTuple):
    """One fetch, per partition, and the group generation it was fetched in."""

    generation: int
    batch: dict[TP, list[Any]]


def _raw_value(value: bytes | None) -> bytes | None:
    """The value deserializer that marks a consumer whose records stay aiokafka's C records.

    Never called: :class:`_RawPartitionRecords` returns the record before deserializing.
    """
    return value


class _RawPartitionRecords(fetcher_module.PartitionRecords):  # type: ignore[misc]
    """aiokafka's per-fetch record iterator, handing over the C records of marked consumers.

    Why: for every record aiokafka builds a ``ConsumerRecord`` dataclass in Python (eleven
    fields, two ``len``, the headers copied into a tuple) in Faust's consumer thread, which
    competes with the batch loop for the GIL; that was a third of the thread's time. The C
    record that the batch iterator already made has every attribute the worker reads
    (``offset``, ``key``, ``value``, ``timestamp``; also ``timestamp_type``, ``headers``,
    ``checksum``). Everything else of aiokafka's iteration (CRC check, control batches,
    aborted transactions, the next fetch offset) is unchanged: only ``_consumer_record`` is
    replaced, and only for a consumer whose value deserializer is :func:`_raw_value`.
    """

    def _consumer_record(self, tp: Any, record: Any) -> Any:
        if self._value_deserializer is _raw_value:
            return record
        return super()._consumer_record(tp, record)


class _ConsumerThread(AIOKafkaConsumerThread):
    """Faust's consumer thread: the Kafka fetch wait Faust hard-codes (1500 ms) set, and
    records handed over as aiokafka's C records (:class:`_RawPartitionRecords`)."""

    fetch_max_wait_ms: int | None = None

    async def offsets_for_times(self, timestamps: Mapping[TP, int]) -> Mapping[TP, Any]:
        """aiokafka's ``offsets_for_times`` (ListOffsets by time), on the consumer thread."""
        return cast(
            Mapping[TP, Any],
            await self.call_thread(self._ensure_consumer().offsets_for_times, timestamps),
        )

    def _create_worker_consumer(self, transport: Any) -> Any:
        consumer = super()._create_worker_consumer(transport)
        if self.fetch_max_wait_ms is not None:
            # aiokafka keeps the constructor argument here and hands it to its fetcher at
            # start(); Faust passes a constant, so this is the only place to change it.
            consumer._fetch_max_wait_ms = self.fetch_max_wait_ms
        if consumer._value_deserializer is None and consumer._key_deserializer is None:
            # Handed to the fetcher at start() too, which passes it to every
            # PartitionRecords it makes: the mark that this consumer takes C records.
            consumer._value_deserializer = _raw_value
            _install_raw_records()
        return consumer


def _install_raw_records() -> None:
    """Make aiokafka's fetcher build :class:`_RawPartitionRecords` (once per process).

    The fetcher looks the class up in its module at every fetch; consumers without the mark
    (:func:`_raw_value`) get exactly what they got before.
    """
    if fetcher_module.PartitionRecords is not _RawPartitionRecords:
        fetcher_module.PartitionRecords = _RawPartitionRecords


class BatchConsumer(AIOKafkaConsumer):
    """Faust's aiokafka consumer, draining fetched batches into a :data:`BatchHandler`."""

    batch_handler: BatchHandler | None = None
    batch_preparer: BatchPreparer | None = None
    flusher: Flusher | None = None
    advancer: Advancer | None = None
    #: How often caught-up partitions are handed to the advancer (closes land within this
    #: plus a fetch wait of the bucket's end plus the allowed lateness).
    advance_interval_s: float = 0.5
    _last_advance: float = 0.0
    _commit_lock: asyncio.Lock | None = None
    #: Longest wait of one fetch; short, so that a stop or rebalance is noticed quickly.
    fetch_timeout_s: float = 1.0
    #: Kafka ``fetch_max_wait_ms`` (``None``: Faust's 1500). Apache Kafka answers a fetch
    #: as soon as data arrives, so this only bounds idle polls there; Tansu waits it out.
    fetch_max_wait_ms: int | None = None

    def _new_consumer_thread(self) -> Any:
        thread = _ConsumerThread(self, loop=self.loop, beacon=self.beacon)
        thread.fetch_max_wait_ms = self.fetch_max_wait_ms
        return thread

    _idle: asyncio.Event | None = None

    @property
    def _expected(self) -> dict[TP, int]:
        """Per partition, the offset after the last record handed over (this generation)."""
        expected: dict[TP, int] | None = self.__dict__.get("_expected_offsets")
        if expected is None:
            expected = self.__dict__["_expected_offsets"] = {}
        return expected

    @property
    def _rewound(self) -> set[TP]:
        rewound: set[TP] | None = self.__dict__.get("_rewound_partitions")
        if rewound is None:
            rewound = self.__dict__["_rewound_partitions"] = set()
        return rewound

    @property
    def _rewinding(self) -> dict[TP, int]:
        """Partitions sought back to the start of the log (:meth:`rewind`), each with the
        offset from which records fetched before that seek start."""
        rewinding: dict[TP, int] | None = self.__dict__.get("_rewinding_partitions")
        if rewinding is None:
            rewinding = self.__dict__["_rewinding_partitions"] = {}
        return rewinding

    @property
    def _handed(self) -> dict[TP, int]:
        """Per partition, the offset after the last record handed to the handler."""
        handed: dict[TP, int] | None = self.__dict__.get("_handed_offsets")
        if handed is None:
            handed = self.__dict__["_handed_offsets"] = {}
        return handed

    def forget_positions(self) -> None:
        """Drop the expected offsets (on assignment: Faust seeks to the committed ones)."""
        self._expected.clear()
        self._rewound.clear()
        self._rewinding.clear()
        self._handed.clear()

    async def rewind(
        self, tp: TP, from_ms: int | None = None, not_after: int | None = None
    ) -> tuple[int, int]:
        """Read ``tp`` again (its state is rebuilt); returns where from, and the log start.

        From the first record stamped ``from_ms`` or later when given (the broker's
        ListOffsets by time, :meth:`_offset_for_time`), else from the start of the log.
        Records of ``tp`` fetched before the seek (the fetch ahead) are not handed over:
        the replay must come first (:meth:`_skip_rewinding`).
        """
        log_start = (await self.earliest_offsets(tp))[tp]
        start = log_start
        if from_ms is not None:
            start = await self._offset_for_time(tp, from_ms, log_start, not_after)
        # Not _expected: the fetch ahead may have moved that past records not handed over.
        stale_from = self._handed.get(tp)
        await self.seek(tp, start)
        self._expected[tp] = start
        if stale_from is not None and stale_from > start:
            self._rewinding[tp] = stale_from
        logger.info(
            "%s[%d]: reading again from offset %d (log start %d)",
            tp.topic,
            tp.partition,
            start,
            log_start,
        )
        return start, log_start

    async def _offset_for_time(
        self, tp: TP, from_ms: int, log_start: int, not_after: int | None
    ) -> int:
        """The broker's first offset stamped ``from_ms`` or later; the log start if it cannot
        answer or answers nonsense (said in the log).

        Nonsense: an offset outside ``[log_start, not_after]`` (the replay must reach the
        offset reached before the loss), or a record timestamp before the one asked for.
        No answer (every record is older than ``from_ms``: the producers' clocks lag the
        event times) is treated the same way. The rebuild checks the answer again against
        the events it finds there (:mod:`stream.pipeline.recovery`).
        """
        where = f"{tp.topic}[{tp.partition}]"
        try:
            thread = cast(_ConsumerThread, self._thread)
            found = (await thread.offsets_for_times({tp: from_ms})).get(tp)
        except Exception as exc:  # an old broker, a timeout: the whole log is always right
            logger.warning(
                "%s: the broker could not find the offset of time %d (%s: %s); reading again "
                "from the log start",
                where,
                from_ms,
                type(exc).__name__,
                exc,
            )
            return log_start
        offset = None if found is None else int(found.offset)
        stamp = None if found is None else found.timestamp
        if (
            offset is None
            or offset < log_start
            or (not_after is not None and offset > not_after)
            or (stamp is not None and 0 <= stamp < from_ms)
        ):
            logger.warning(
                "%s: the broker answered offset %s (timestamp %s) for time %d, which cannot "
                "be right (log start %d, reached %s); reading again from the log start",
                where,
                offset,
                stamp,
                from_ms,
                log_start,
                not_after,
            )
            return log_start
        return offset

    def _skip_rewinding(self, batch: dict[TP, list[Any]]) -> dict[TP, list[Any]]:
        """``batch`` without records fetched before a :meth:`rewind` of their partition."""
        rewinding = self._rewinding
        if not rewinding:
            return batch
        out: dict[TP, list[Any]] = {}
        for tp, recs in batch.items():
            stale_from = rewinding.get(tp)
            if stale_from is not None:
                if recs[0].offset >= stale_from:
                    continue  # fetched before the seek back: the replay comes first
                del rewinding[tp]
            out[tp] = recs
        return out

    def _idle_event(self) -> asyncio.Event:
        if self._idle is None:
            self._idle = asyncio.Event()
            self._idle.set()
        return self._idle

    async def wait_idle(self, timeout_s: float | None = None) -> bool:
        """Wait until no batch is being processed; False if ``timeout_s`` passed first."""
        try:
            await asyncio.wait_for(self._idle_event().wait(), timeout=timeout_s)
        except TimeoutError:
            return False
        return True

    async def _drain_messages(self, fetcher: Any) -> None:
        handler = self.batch_handler
        if handler is None:  # not installed: plain Faust
            await super()._drain_messages(fetcher)
            return
        consumer_should_stop = self._stopped.is_set
        fetcher_should_stop = fetcher._stopped.is_set
        idle = self._idle_event()
        # The next fetch runs while a batch is processed: getmany and the decoding of its
        # records happen in Faust's consumer thread, which would otherwise wait idle while
        # the batch awaits Redis, and the batch loop would wait for it in turn.
        ahead: asyncio.Future[_Fetched] | None = None
        try:
            while not (consumer_should_stop() or fetcher_should_stop()):
                if ahead is None:
                    ahead = asyncio.ensure_future(self._next_batch())
                fetched = await ahead
                ahead = None
                batch = self._skip_rewinding(fetched.batch)
                if not batch:
                    await self._advance_idle(idle)
                    continue
                if not self._still_current(fetched.generation):
                    # A rebalance came between the fetch and now: hand nothing over, and
                    # read these records again if the partitions are still ours.
                    await self._drop(batch)
                    continue
                ahead = asyncio.ensure_future(self._next_batch())
                idle.clear()
                # Shielded: a stop cancels this loop, but the batch in flight must either
                # store and commit everything or nothing of its own choosing.
                work = asyncio.ensure_future(self._run(handler, batch))
                try:
                    await asyncio.shield(work)
                except asyncio.CancelledError:
                    # Faust's fetcher re-cancels every second while it waits: keep
                    # shielding until the batch is done (its retries give up on stop).
                    while not work.done():
                        with contextlib.suppress(asyncio.CancelledError):
                            await asyncio.shield(work)
                    raise
                finally:
                    if work.done():
                        idle.set()
                await self._advance_idle(idle)
            if ahead is not None:  # stopped: a fetch not handed over is simply read again
                ahead.cancel()
        except self.consumer_stopped_errors:
            if self.transport.app.should_stop:
                logger.info("broker stopped the consumer; shutting down")
                return
            raise
        except asyncio.CancelledError:
            if ahead is not None:  # stopping: a fetch not handed over is simply read again
                ahead.cancel()
            # Stopping (in a batch or between two): store what is pending and commit it
            # while the consumer still belongs to the group, so a clean stop re-delivers
            # nothing.
            final = asyncio.ensure_future(self.commit_processed())
            while not final.done():
                with contextlib.suppress(asyncio.CancelledError):
                    await asyncio.shield(final)
            if self.transport.app.should_stop:
                return
            raise

    async def _advance_idle(self, idle: asyncio.Event) -> None:
        """Hand the caught-up partitions to the advancer, between batches, now and then.

        Run like a batch (the revoke handler waits for it, a stop lets it finish): it may
        stage the forecasts of buckets the wall clock closed.
        """
        if self.advancer is None:
            return
        now = asyncio.get_running_loop().time()
        if now - self._last_advance < self.advance_interval_s:
            return
        self._last_advance = now
        caught_up = self.caught_up()  # may be none: the advancer also looks for stalls
        idle.clear()
        work = asyncio.ensure_future(self.advancer(caught_up))
        try:
            while not work.done():
                with contextlib.suppress(asyncio.CancelledError):
                    await asyncio.shield(work)
            work.result()
        except Exception as exc:  # the next interval tries again
            logger.warning("could not advance idle partitions (%s)", exc)
        finally:
            idle.set()

    def caught_up(self) -> list[TP]:
        """Assigned partitions whose records up to the high watermark were all handed over.

        The high watermark is the one the last fetch response reported (right on Tansu too,
        unlike ListOffsets); the position is the offset after the last record handed over
        in this generation or, for a partition that got none yet, its committed offset.
        A partition with either unknown is not caught up.
        """
        out: list[TP] = []
        committed: Mapping[TP, int | None] = getattr(self, "_committed_offset", {})
        try:
            assignment = self.assignment()
        except Exception:  # not started
            return out
        for tp in assignment:
            try:
                high = self.highwater(tp)
            except Exception:  # consumer thread not started
                return []
            position = self._expected.get(tp)
            if position is None:
                position = committed.get(tp)
            if high is not None and high >= 0 and position is not None and position >= high:
                out.append(tp)
        return out

    def _still_current(self, generation: int) -> bool:
        """Whether records fetched in ``generation`` may still be handed over."""
        return self.flow_active and self.app.consumer_generation_id == generation

    async def _drop(self, batch: Mapping[TP, Sequence[Any]]) -> None:
        """Give up a fetched batch without losing it: seek its partitions back to it."""
        self._expected.clear()
        await self._seek_back({tp: recs[0].offset for tp, recs in batch.items() if recs})
        if not self.flow_active:
            await self.perform_seek()

    async def _next_batch(self) -> _Fetched:
        """The next fetch per active partition, maybe empty (nothing, paused, or rebalanced).

        Records are never dropped without seeking their partition back to them. Faust's
        per-message path can drop a fetch that straddles a rebalance because it commits
        only contiguous acked offsets; this path commits a batch's last offset, so a
        silently dropped fetch would be committed over and lost (the chaos bench caught
        exactly that). For the same reason a batch that does not start where the
        partition's previous one ended is refused once, with a seek back to the gap.
        The batch comes with the group generation it was fetched in: it runs ahead of the
        batch being processed, and is checked again when it is handed over.
        """
        generation = self.app.consumer_generation_id
        records, active = await self._wait_next_records(self.fetch_timeout_s)
        if not records or self.should_stop:
            await asyncio.sleep(0)  # never spin without yielding
            return _Fetched(generation, {})
        if not self._still_current(generation):
            # Fetched across a rebalance: hand nothing over, and make sure these records
            # come again whatever order the recovery's seek and this fetch happened in.
            await self._drop(records)
            return _Fetched(generation, {})
        buffered = self._buffered_partitions
        batch: dict[TP, list[Any]] = {}
        rewind: dict[TP, int] = {}
        for tp, recs in records.items():
            if not recs:
                continue
            if not (active is None or tp in active or tp in buffered):
                rewind[tp] = recs[0].offset
                continue
            expected = self._expected.get(tp)
            if expected is not None and recs[0].offset > expected and tp not in self._rewound:
                logger.warning(
                    "%s[%d]: fetch starts at %d, expected %d; reading the gap again",
                    tp.topic,
                    tp.partition,
                    recs[0].offset,
                    expected,
                )
                self._rewound.add(tp)
                rewind[tp] = expected
                continue
            self._rewound.discard(tp)  # a gap that persists is real (compaction, markers)
            self._expected[tp] = recs[-1].offset + 1
            batch[tp] = recs
            self.app.monitor.track_tp_end_offset(tp, self.highwater(tp))
        await self._seek_back(rewind)
        if batch and self.batch_preparer is not None:
            try:
                await self.batch_preparer(batch)
            except Exception as exc:  # only a head start: the handler validates anyway
                logger.warning("could not prepare a fetched batch ahead (%s)", exc)
        return _Fetched(generation, batch)

    async def _seek_back(self, offsets: Mapping[TP, int]) -> None:
        assignment = self.assignment()
        for tp, offset in offsets.items():
            if tp in assignment:
                try:
                    await self.seek(tp, offset)
                except Exception as exc:  # revoked meanwhile: the next owner reads it
                    logger.info("could not seek %s back to %d: %s", tp, offset, exc)

    async def _run(self, handler: BatchHandler, batch: Mapping[TP, Sequence[Any]]) -> None:
        handed = self._handed
        for tp, recs in batch.items():
            handed[tp] = recs[-1].offset + 1
        offsets = await handler(batch)
        for tp, recs in batch.items():
            self._read_offset[tp] = recs[-1].offset
        if offsets:
            await self._commit_processed_offsets(offsets)

    async def _commit_processed_offsets(self, offsets: Mapping[TP, int]) -> None:
        if self._commit_lock is None:
            self._commit_lock = asyncio.Lock()
        async with self._commit_lock:  # the batch loop and the flush timer both commit
            await self._commit_offsets(dict(offsets))

    async def commit_processed(self) -> None:
        """Flush what is pending (idle partitions, revoke, stop) and commit what that allows.

        Errors are logged, not raised: an uncommitted offset is re-delivered, never lost.
        """
        if self.flusher is None:
            return
        try:
            offsets = await self.flusher()
            if offsets:
                await self._commit_processed_offsets(offsets)
        except Exception as exc:
            logger.warning("could not commit processed offsets (%s); they come again", exc)


def install(
    app: Any,
    handler: BatchHandler,
    flusher: Flusher,
    *,
    fetch_timeout_s: float = 1.0,
    fetch_max_wait_ms: int | None = None,
    preparer: BatchPreparer | None = None,
    advancer: Advancer | None = None,
) -> None:
    """Make ``app`` consume through :class:`BatchConsumer` with ``handler``.

    Must run before the app creates its consumer (i.e. before the worker starts).
    """
    transport = app.transport
    consumer_class = type(
        "TrendcastBatchConsumer",
        (BatchConsumer,),
        {
            "batch_handler": staticmethod(handler),
            "flusher": staticmethod(flusher),
            "batch_preparer": None if preparer is None else staticmethod(preparer),
            "advancer": None if advancer is None else staticmethod(advancer),
            "fetch_timeout_s": fetch_timeout_s,
            "fetch_max_wait_ms": fetch_max_wait_ms,
        },
    )
    transport.Consumer = cast(Any, consumer_class)
