"""Recovery: rebuild a partition's window state from the ``sales`` log when Redis lost it.

Why: Redis is a cache of the ``sales`` log, as Kafka Streams' state stores are of their
changelog. A ``FLUSHALL``, a failover to a replica that had not caught up, a restart without
persistence: the worker would otherwise carry on with empty or partial windows, and every
forecast after would be silently wrong. Kafka still holds the events, and every store write
is idempotent (the dedupe sets), so reading a partition again and applying it through the
normal path rebuilds exactly the windows the events make, wherever the reading starts.

Detect, per partition:

* at assignment (:meth:`Recovery.check_assigned`): the stored clock is missing or behind the
  group's committed offset. The committed offset is the marker that tells a loss from a
  first start: it lives in Kafka, which outlives Redis, and the worker commits only offsets
  whose clock is stored, so a stored clock is always at least that far unless it was lost.
  A first start has no committed offset;
* on every round trip (:class:`RecoveringStore`): each clock update carries the next offset
  this worker knows stored (``expect_offset``); the script finds the clock missing or older,
  leaves it unwritten and reports the partition lost (:attr:`ApplyResult.lost`).

Rebuild: the partition's clock starts over (nothing seen, the buckets claimed before kept
claimed, the offset reached before kept as ``next_offset``), its consumer is sought back
(:meth:`Recovery.take_rewinds`, done by the worker), and its batches go through the normal
path until they reach the offset reached before. Meanwhile:

* no forecast of the partition is made (:meth:`Recovery.hold`): its closes are not claimed,
  so the batch that ends the rebuild finds them due and forecasts them from whole windows;
* events before the offset reached are never dead-lettered again (they were, before the
  loss: the clock's ``next_offset`` calls them re-delivered);
* no clock of the partition is stored or committed (:class:`~stream.pipeline.commits.Commits`),
  so a crash mid-rebuild leaves the clock missing and the next owner rebuilds again;
* the other partitions run as usual.

Where the replay starts. Not at the start of the log, which may hold months: at the first
record stamped at or after the oldest kept bucket less a margin (:attr:`Recovery.seek_back_ms`
before the partition's newest event time), which the broker finds with ListOffsets by time
(aiokafka ``offsets_for_times``). The newest event time is the cached clock's (a loss found
mid-run), the stored clock's (one found behind the committed offset), or, when no clock is
left at all, the oldest record timestamp of the batch at hand (records are stamped by their
producers, after the events they carry). No time known, or a broker that cannot answer or
answers nonsense (an offset outside the log or past the offset reached, a timestamp before the
one asked): the start of the log, said in the log. Tansu 0.6 answers every such query with the
log start, which is always right, only slower.

The answer is then checked against the events found there, because a broker's timestamps are
producer clocks, not event times. An event accepted at offset ``o`` had a time no older than
``newest(before o) - lateness - grace - one bucket`` (else it was late), so when the oldest
bucket of the first replayed batch plus ``lateness + grace + one bucket`` is at most the oldest
bucket the rebuilt windows need, no record before the start held a needed event, and any event
the fresh clock accepts there that the old clock called late is older than every needed bucket
too. Otherwise the rebuild reads again from the start of the log before it ends (dedupe makes
the second pass count nothing twice). Why not a per-bucket offset index stored with the clock:
it would live in the store whose loss it is meant to repair, and be lost with it; the broker's
time index lives with the log.

If the log no longer reaches back far enough (retention), the windows hold what it has; the
end of the rebuild says so in the log and in ``/health`` (``partial_history``), and the
partition's forecasts are marked ``partial_history`` (:meth:`Recovery.mark`) until the oldest
bucket of their window is newer than the first event the log still had.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import replace
from typing import Any, NamedTuple

from stream.inference.batching import ForecastRequest
from stream.inference.model_info import ModelInfo
from stream.monitoring.telemetry import REBUILDING_PARTITIONS, REBUILDS
from stream.pipeline.commits import Commits, Rebuild
from stream.pipeline.ingest import Plan
from stream.pipeline.watermark import PartitionClock
from stream.state.base import (
    ApplyResult,
    ItemUpdate,
    ItemWindow,
    PartitionId,
    PartitionState,
    PartitionUpdate,
    StateLostError,
    WindowStore,
)
from trendcast.freq import Freq

__all__ = ["RecoveringStore", "Recovery", "Rewind"]

logger = logging.getLogger(__name__)

#: Told when a partition starts (detail) or stops (None) rebuilding: ``/health`` shows it.
OnChange = Callable[[PartitionId, dict[str, Any] | None], None]


class Rewind(NamedTuple):
    """Where to read a rebuilding partition again from (:meth:`Recovery.take_rewinds`).

    Attributes:
        from_ms: The first record timestamp to read (ListOffsets by time); ``None``: the
            start of the log.
        reached_offset: The offset the partition had reached: a start past it is nonsense.
    """

    from_ms: int | None
    reached_offset: int


class Recovery:
    """Detects lost partition state and rebuilds it from the log (see the module docstring).

    Args:
        commits: The partitions' clocks; its ``rebuilding`` map is the rebuilds in progress.
        window_buckets: Buckets a rebuilt window must reach back (the kept window plus
            lateness and grace), to judge whether the log still held them.
        clock_s: Monotonic seconds (injectable for tests).
    """

    def __init__(
        self,
        commits: Commits,
        *,
        window_buckets: int,
        clock_s: Callable[[], float] = time.monotonic,
    ) -> None:
        self._commits = commits
        self.window_buckets = window_buckets
        self._clock_s = clock_s
        self._rewinds: dict[PartitionId, Rewind] = {}
        self._fresh: set[PartitionId] = set()  # lost in the round trip of the batch at hand
        step = commits.freq.step_ms
        grace_ms = commits.grace_buckets * step
        #: How far an accepted event can be older than the newest event before it: an
        #: older one was late (see the module docstring).
        self._skew_ms = commits.lateness_ms + grace_ms + step
        #: How far before the newest event time a replay starts: the kept buckets, the skew
        #: the check of the start needs (:meth:`_started_too_late`), and the skew again, for
        #: record timestamps that lag the event times they carry.
        self.seek_back_ms = window_buckets * step + 2 * self._skew_ms
        # Per rebuilding partition, the start of the log (once sought back): tells a replay
        # started by time from one started at the start of the log.
        self._log_start: dict[PartitionId, int] = {}
        #: Partitions rebuilt from a log that no longer reached back a whole window, with
        #: the bucket of the first event the log still held: their forecasts are marked.
        self.partial: dict[PartitionId, int] = {}
        self.on_change: OnChange | None = None
        commits.on_lost = self.lost
        commits.on_dropped = self._dropped
        self.store = RecoveringStore(commits.store, self)

    @property
    def rebuilding(self) -> Mapping[PartitionId, Rebuild]:
        """The rebuilds in progress."""
        return self._commits.rebuilding

    # --- detect ---------------------------------------------------------------------------

    async def check_assigned(
        self, partition: PartitionId, committed: int | None, newest_ms: int | None = None
    ) -> bool:
        """Whether a newly assigned partition's state is lost; if so, start its rebuild.

        Called with the first batch of a partition whose clock is not cached (assigned, or
        the worker started): the clock is loaded here. Returns True when the rebuild starts
        now: the batch's records of the partition must not be processed (they come again
        in the replay, :meth:`take_rewinds`). ``newest_ms`` (the oldest record timestamp of
        the batch) stands for the partition's newest event time when no clock is left.

        Raises:
            StateStoreError: Loading the clock failed.
        """
        commits = self._commits
        if partition in commits.clocks or not committed:
            return False
        await commits.clock(partition)
        stored = commits.stored_states.get(partition, PartitionState())
        if stored.next_offset is not None and stored.next_offset >= committed:
            return False
        reason = "missing" if stored.next_offset is None else "older"
        if stored.max_event_ms is not None:  # an older clock: older still than the loss
            newest_ms = stored.max_event_ms
        self._begin(partition, committed, stored.emitted_to_ms, reason, newest_ms)
        return True

    def lost(self, partitions: Iterable[PartitionId]) -> None:
        """A round trip found these partitions' stored clocks missing or older: rebuild them."""
        for pid in partitions:
            if pid in self._commits.rebuilding:
                continue
            clock = self._commits.clocks.get(pid)
            state = PartitionState() if clock is None else clock.state
            # The clock's claims stand (their forecasts were made from whole windows); the
            # batch at hand's claims are not made yet (see hold).
            reached = state.next_offset or 0
            self._begin(pid, reached, state.emitted_to_ms, "lost", state.max_event_ms)
            self._fresh.add(pid)

    async def verify(self, partitions: Iterable[PartitionId]) -> list[PartitionId]:
        """Check that idle partitions' stored clocks are still there; rebuild those lost.

        Why: a partition with nothing to read makes no round trip, so a loss would go
        unnoticed until its next event. The worker calls this with its caught-up partitions
        between batches (every few seconds). The stored clock only grows, so one behind the
        clock known stored means a loss. Returns the partitions found lost.

        Raises:
            StateStoreError: Loading a clock failed.
        """
        commits = self._commits
        found: list[PartitionId] = []
        for pid in partitions:
            known = commits.expect_offset(pid)
            if known is None or pid in commits.rebuilding:
                continue
            state = await commits.store.load_partition(pid)
            if state.next_offset is None or state.next_offset < known:
                found.append(pid)
        self.lost(found)
        return found

    def _begin(
        self,
        pid: PartitionId,
        reached: int,
        emitted_to_ms: int | None,
        reason: str,
        newest_ms: int | None,
    ) -> None:
        commits = self._commits
        clock = PartitionClock(
            commits.freq,
            lateness_ms=commits.lateness_ms,
            grace_buckets=commits.grace_buckets,
            state=PartitionState(next_offset=reached or None),
        )
        commits.reset(pid, clock)
        commits.rebuilding[pid] = Rebuild(reached, reason, self._clock_s(), emitted_to_ms)
        from_ms = None if newest_ms is None else newest_ms - self.seek_back_ms
        self._rewinds[pid] = Rewind(from_ms, reached)
        self.partial.pop(pid, None)  # judged again at the end of this rebuild
        REBUILDS.inc()
        REBUILDING_PARTITIONS.set(len(commits.rebuilding))
        logger.warning(
            "state of %s[%d] lost in the store (%s): rebuilding it from the log (%s) up to "
            "offset %d; its forecasts are held until then",
            pid.topic,
            pid.partition,
            reason,
            "from the start" if from_ms is None else f"from the records of time {from_ms} on",
            reached,
            extra={"topic": pid.topic, "partition": pid.partition, "reason": reason},
        )
        self._changed(pid)

    def _dropped(self, pid: PartitionId) -> None:
        self._rewinds.pop(pid, None)
        self._log_start.pop(pid, None)
        REBUILDING_PARTITIONS.set(len(self._commits.rebuilding))
        logger.info("%s[%d] revoked while rebuilding; its next owner rebuilds it", *pid)
        if self.on_change is not None:
            self.on_change(pid, None)

    # --- rebuild --------------------------------------------------------------------------

    def take_rewinds(self) -> dict[PartitionId, Rewind]:
        """Partitions to read again, with where from (:class:`Rewind`).

        The worker seeks each one back and reports where the replay starts
        (:meth:`rewound`); from then on the partition's batches are the replay.
        """
        out, self._rewinds = self._rewinds, {}
        self._fresh.difference_update(out)  # found lost by a flush: no batch at hand
        for pid in out:
            rebuild = self._commits.rebuilding.get(pid)
            if rebuild is not None:
                rebuild.replaying = True
        return out

    def rewound(
        self, partition: PartitionId, from_offset: int, log_start: int | None = None
    ) -> None:
        """The replay of ``partition`` starts at ``from_offset``; the log at ``log_start``
        (``None``: the same: the replay starts at the start of the log)."""
        rebuild = self._commits.rebuilding.get(partition)
        if rebuild is not None:
            rebuild.from_offset = from_offset
            self._log_start[partition] = from_offset if log_start is None else log_start
            self._changed(partition)

    def hold(self, plans: Sequence[Plan]) -> list[Plan]:
        """The plans whose forecasts may be made: none of a rebuilding partition.

        Called by staging with the plans of a staged batch, after its round trip. A
        rebuilding partition's closes are left unclaimed (``due`` emptied), so they are due
        again at the batch that ends the rebuild, which is forecast as usual, from whole
        windows.
        """
        if self.partial:
            self._forget_whole(plans)
        rebuilding = self._commits.rebuilding
        if not rebuilding:
            return list(plans)
        kept: list[Plan] = []
        for plan in plans:
            rebuild = rebuilding.get(plan.pid)
            if rebuild is None:
                kept.append(plan)
                continue
            if plan.pid in self._fresh:
                # The batch that found the loss: its events are stored (dedupe skips them
                # in the replay), its offsets were judged: the rebuild reaches past them.
                # The rebuilding clock starts from nothing but that offset, even if this
                # batch was judged with it (staged again after StateLostError): the replay
                # must not find its events late.
                if plan.next_offset is not None and plan.next_offset > rebuild.reached_offset:
                    rebuild.reached_offset = plan.next_offset
                reached = rebuild.reached_offset
                self._commits.clocks[plan.pid].restore(PartitionState(next_offset=reached or None))
                plan.due = []
                continue
            if not rebuild.replaying:
                plan.due = []  # fetched before the seek back (the consumer drops these)
                continue
            rebuild.events += sum(len(u.deltas) for u in plan.items)
            if rebuild.first_bucket_ms is None and plan.items:
                rebuild.first_bucket_ms = min(d.bucket_ms for u in plan.items for d in u.deltas)
            if plan.next_offset is not None and plan.next_offset >= rebuild.reached_offset:
                if self._started_too_late(plan, rebuild):
                    self._read_whole_log(plan, rebuild)
                    continue
                self._end(plan)
                kept.append(plan)  # its due buckets: every close held during the rebuild
            else:
                self._hold_closes(plan, rebuild)
        self._fresh.clear()
        return kept

    def _needed_from_ms(self, plan: Plan) -> int | None:
        """The oldest bucket the partition's windows keep (``None``: no event yet)."""
        open_from = plan.clock.open_from_ms
        if open_from is None:
            return None
        return open_from - self.window_buckets * self._commits.freq.step_ms

    def _started_too_late(self, plan: Plan, rebuild: Rebuild) -> bool:
        """Whether a replay started by time may have skipped events the windows need.

        See the module docstring: the first replayed events must be older than the oldest
        needed bucket by the skew at least. A replay from the start of the log skipped
        nothing the log still holds.
        """
        log_start = self._log_start.get(plan.pid)
        if log_start is None or rebuild.from_offset is None or rebuild.from_offset <= log_start:
            return False
        needed_from = self._needed_from_ms(plan)
        first = rebuild.first_bucket_ms
        if needed_from is None or first is None:
            return first is None  # nothing replayed up to the offset reached: suspicious
        return first + self._skew_ms > needed_from

    def _read_whole_log(self, plan: Plan, rebuild: Rebuild) -> None:
        """Start the replay again, from the start of the log (see :meth:`_started_too_late`)."""
        pid = plan.pid
        logger.warning(
            "%s[%d]: the replay from offset %s (found by time) starts with events of bucket "
            "%s, too close to the oldest bucket the windows need (%s): reading again from "
            "the start of the log",
            pid.topic,
            pid.partition,
            rebuild.from_offset,
            rebuild.first_bucket_ms,
            self._needed_from_ms(plan),
            extra={"topic": pid.topic, "partition": pid.partition},
        )
        plan.due = []
        # As at the start of the rebuild: nothing seen, the offset reached kept (the events
        # before it were judged before the loss), the claims of the lost clock kept.
        reached = rebuild.reached_offset
        plan.clock.restore(PartitionState(next_offset=reached or None))
        rebuild.first_bucket_ms = None
        rebuild.replaying = False
        self._log_start.pop(pid, None)
        self._rewinds[pid] = Rewind(None, reached)

    def _forget_whole(self, plans: Sequence[Plan]) -> None:
        """Stop marking partitions whose kept buckets are all newer than the log's first event."""
        for plan in plans:
            first = self.partial.get(plan.pid)
            needed_from = self._needed_from_ms(plan)
            if first is not None and needed_from is not None and needed_from > first:
                del self.partial[plan.pid]
                logger.info(
                    "%s[%d]: forecasts no longer use partial history",
                    *plan.pid,
                    extra={"topic": plan.pid.topic, "partition": plan.pid.partition},
                )

    def mark(
        self,
        requests: list[ForecastRequest],
        active: Mapping[PartitionId, Sequence[str]],
        model: ModelInfo,
    ) -> list[ForecastRequest]:
        """``requests`` with those made from partial history marked ``partial_history``.

        Called by staging with the batch's requests and the partitions' recent sellers
        (which tell an item's partition). Marked: items of a partition rebuilt from a log
        that no longer reached back a whole window, while the oldest bucket of the window
        is not newer than the first event the log still held.
        """
        if not self.partial:
            return requests
        partition_first = {
            item: first for pid, first in self.partial.items() for item in active.get(pid, ())
        }
        reach_ms = (model.window - 1) * model.freq.step_ms
        out = []
        for request in requests:
            first = partition_first.get(request.item_id)
            if first is not None and request.last_start_ms - reach_ms <= first:
                request = replace(request, partial_history=True)
            out.append(request)
        return out

    def _hold_closes(self, plan: Plan, rebuild: Rebuild) -> None:
        """Claim the replay's closes that were forecast before the loss; hold the others.

        Held closes stay due (unclaimed), so the batch that ends the rebuild forecasts them.
        Those before the claims of the lost clock were forecast before, from whole windows:
        claimed now, so that the windows are trimmed as the replay goes (holding every
        close would keep the whole replayed history). Without a lost clock to go by (a
        clock missing at assignment), the newest closed bucket is held.
        """
        plan.due = []  # staging claims nothing of this batch
        clock = plan.clock
        open_from = clock.open_from_ms
        if open_from is None:
            return
        hold_from = rebuild.emitted_to_ms
        if hold_from is None:
            hold_from = open_from - self._commits.freq.step_ms
        claim_to = min(hold_from, open_from)
        emitted = clock.state.emitted_to_ms
        if emitted is None or claim_to > emitted:
            clock.restore(replace(clock.state, emitted_to_ms=claim_to))

    def _end(self, plan: Plan) -> None:
        pid = plan.pid
        rebuild = self._commits.rebuilding.pop(pid)
        REBUILDING_PARTITIONS.set(len(self._commits.rebuilding))
        partial = self._partial(plan, rebuild)
        self._log_start.pop(pid, None)
        if partial and rebuild.first_bucket_ms is not None:
            self.partial[pid] = rebuild.first_bucket_ms
        logger.warning(
            "state of %s[%d] rebuilt from the log in %.1fs: %d events from offset %s to %d%s",
            pid.topic,
            pid.partition,
            self._clock_s() - rebuild.started_s,
            rebuild.events,
            rebuild.from_offset,
            rebuild.reached_offset,
            "; the log no longer reaches back a whole window (retention): forecasts of the "
            "next buckets use partial history and are marked partial_history"
            if partial
            else "",
            extra={"topic": pid.topic, "partition": pid.partition, "partial_history": partial},
        )
        if self.on_change is not None:
            self.on_change(pid, None)

    def _partial(self, plan: Plan, rebuild: Rebuild) -> bool:
        """Whether the log lacked events the rebuilt windows need (retention).

        Only a replay from the start of the log can tell (one started by time passed
        :meth:`_started_too_late`). The log is whole if it starts at offset 0; otherwise it
        is partial when the oldest replayed event lies after the oldest bucket the windows
        reach back to.
        """
        from_offset = rebuild.from_offset
        if not from_offset or rebuild.first_bucket_ms is None:
            return False
        if from_offset > self._log_start.get(plan.pid, from_offset):
            return False
        needed_from = self._needed_from_ms(plan)
        return needed_from is not None and rebuild.first_bucket_ms > needed_from

    def status(self) -> dict[str, dict[str, Any]]:
        """The rebuilds in progress, JSON-ready (``/health`` detail)."""
        now = self._clock_s()
        return {
            f"{pid.topic}[{pid.partition}]": {
                "reason": r.reason,
                "from_offset": r.from_offset,
                "to_offset": r.reached_offset,
                "events": r.events,
                "for_s": round(now - r.started_s, 3),
            }
            for pid, r in sorted(self._commits.rebuilding.items())
        }

    def _changed(self, pid: PartitionId) -> None:
        rebuild = self._commits.rebuilding.get(pid)
        if self.on_change is not None and rebuild is not None:
            self.on_change(
                pid,
                {
                    "reason": rebuild.reason,
                    "from_offset": rebuild.from_offset,
                    "to_offset": rebuild.reached_offset,
                },
            )


class RecoveringStore:
    """The window store, with every clock update checked against the clock known stored.

    Adds ``expect_offset`` to each :class:`PartitionUpdate` (the script then refuses to
    write a clock over a lost one) and starts the rebuild of every partition a round trip
    finds lost, before the caller sees the result.
    """

    def __init__(self, inner: WindowStore, recovery: Recovery) -> None:
        self.inner = inner
        self._recovery = recovery
        # item -> partition, of the sellers the last round trip listed (see read).
        self._sellers: dict[str, PartitionId] = {}

    @property
    def freq(self) -> Freq:
        """Bucket frequency of the wrapped store."""
        return self.inner.freq

    @property
    def remote(self) -> bool:
        """Whether the wrapped store is remote."""
        return self.inner.remote

    async def ping(self) -> None:
        """The wrapped store's ``ping``."""
        await self.inner.ping()

    async def apply(
        self, items: Sequence[ItemUpdate], partitions: Sequence[PartitionUpdate]
    ) -> ApplyResult:
        """See :meth:`stream.state.base.WindowStore.apply`; lost partitions start rebuilding."""
        expect = self._recovery._commits.expect_offset
        checked = [
            p if p.expect_offset is not None else replace(p, expect_offset=expect(p.partition))
            for p in partitions
        ]
        result = await self.inner.apply(items, checked)
        if result.lost:
            self._recovery.lost(result.lost)
        self._sellers = {i: pid for pid, sold in result.active.items() for i in sold}
        return result

    async def read(self, item_ids: Sequence[str]) -> dict[str, ItemWindow]:
        """See :meth:`stream.state.base.WindowStore.read`; a seller without a window is a loss.

        The round trip before listed the partition's recent sellers; one whose window comes
        back empty lost its bookkeeping between the two (a ``FLUSHALL`` in between, an
        eviction). Its forecasts must not be skipped silently while the close is claimed:
        the partition starts rebuilding and the batch fails with :class:`StateLostError`,
        so that it is staged again, its closes held until the rebuild ends.

        Raises:
            StateLostError: Sellers of a partition have no stored window.
        """
        windows = await self.inner.read(item_ids)
        sellers, rebuilding = self._sellers, self._recovery.rebuilding
        lost = {
            sellers[i]
            for i in item_ids
            if i in sellers and windows[i].first_ms is None and sellers[i] not in rebuilding
        }
        if lost:
            self._recovery.lost(lost)
            raise StateLostError(
                "the window of a recent seller is gone from the store; rebuilding "
                + ", ".join(f"{p.topic}[{p.partition}]" for p in sorted(lost))
            )
        return windows

    async def load_partition(self, partition: PartitionId) -> PartitionState:
        """See :meth:`stream.state.base.WindowStore.load_partition`."""
        return await self.inner.load_partition(partition)

    async def save_partition(self, partition: PartitionId, state: PartitionState) -> None:
        """See :meth:`stream.state.base.WindowStore.save_partition`."""
        await self.apply([], [PartitionUpdate(partition, state)])

    async def aclose(self) -> None:
        """Release the wrapped store's connections."""
        await self.inner.aclose()

    def __getattr__(self, name: str) -> Any:
        # Anything beyond the protocol (memory_usage, flush in tests) is the wrapped store's.
        return getattr(self.inner, name)
