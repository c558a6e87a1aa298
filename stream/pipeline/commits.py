"""Commit bookkeeping: the partitions' clocks, which of them are stored, what may be committed.

Why apart from the batch logic: this is the part that carries the recovery invariant, and it
is easiest to check when it stands alone. A partition's clock (largest event time, "forecast
up to" mark, next offset) lives in three places: cached (:attr:`Commits.clocks`, moved by
every batch as it is planned), delivered but not stored (:attr:`Commits.unsaved`: the batch's
dead letters and forecasts are delivered, the clock rides along with the next round trip or a
flush), and stored (:attr:`Commits.stored_states`). Only offsets whose clock is stored become
committable (:meth:`Commits.take_committable`), so whoever continues a partition from its
committed offset finds a stored clock at least that far; and dedupe keys are forgotten only
up to the stored clock, never the cached one, so a worker taking over still finds the key of
every event it would accept.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from stream.pipeline.edges import PROCESSOR_LOGGER
from stream.pipeline.watermark import PartitionClock
from stream.state.base import PartitionId, PartitionState, PartitionUpdate, WindowStore
from trendcast.freq import Freq

__all__ = ["Commits", "Rebuild"]

# The processor's logger, not this module's (see PROCESSOR_LOGGER).
logger = logging.getLogger(PROCESSOR_LOGGER)


@dataclass
class Rebuild:
    """A partition whose state is being rebuilt from the log (:mod:`stream.pipeline.recovery`).

    Attributes:
        reached_offset: The offset the partition had reached before its state was lost: the
            rebuild ends with the batch that reaches it again. Events before it were judged
            before the loss (their dead letters were sent), so they are never dead-lettered
            again.
        reason: Why: ``missing`` (no stored clock), ``older`` (a stored clock behind the
            committed offset) or ``lost`` (a round trip found the clock gone).
        started_s: Monotonic time the rebuild started.
        emitted_to_ms: The lost clock's first bucket not yet forecast (``None``: unknown):
            the replay's closes before it were forecast before the loss, the others are
            held until the rebuild ends.
        replaying: The consumer was sought back to where the replay starts: the batches of the
            partition are the replay.
        from_offset: Where the replay starts (the oldest kept bucket, found by time; else
            the log start), once known.
        first_bucket_ms: The oldest bucket of the replayed events, once seen.
        events: Events replayed so far.
    """

    reached_offset: int
    reason: str
    started_s: float
    emitted_to_ms: int | None = None
    replaying: bool = False
    from_offset: int | None = None
    first_bucket_ms: int | None = None
    events: int = 0


class Commits:
    """The partition clocks as cached, delivered and stored, and the offsets safe to commit.

    Args:
        store: Window state, where clocks are loaded from and stored to.
        freq: Bucket frequency of the clocks (that of the stored windows, which no model
            swap changes).
        lateness_ms: Allowed lateness (see :class:`~stream.pipeline.watermark.PartitionClock`).
        grace_buckets: Closed buckets still accepting events.
    """

    def __init__(
        self, store: WindowStore, freq: Freq, *, lateness_ms: int, grace_buckets: int
    ) -> None:
        self.store = store
        self.freq = freq
        self.lateness_ms = lateness_ms
        self.grace_buckets = grace_buckets
        self.clocks: dict[PartitionId, PartitionClock] = {}
        # Clocks whose outputs were delivered but which are not stored yet: they ride along
        # with the next batch's round trip (or SalesProcessor.flush).
        self.unsaved: dict[PartitionId, PartitionState] = {}
        # Next offsets whose clocks are stored: what may be committed (take_committable).
        self._committable: dict[PartitionId, int] = {}
        # The clocks known to be stored (loaded, or stored by a round trip that returned):
        # what a worker taking over would start from, which bounds what may be forgotten.
        self.stored_states: dict[PartitionId, PartitionState] = {}
        # Partitions whose state is being rebuilt from the log (stream.pipeline.recovery):
        # no clock of theirs is stored or committed until the rebuild ends, so a clock never
        # vouches for windows that are only partly rebuilt.
        self.rebuilding: dict[PartitionId, Rebuild] = {}
        #: Told of partitions a round trip found lost (set by the recovery).
        self.on_lost: Callable[[Iterable[PartitionId]], None] | None = None
        #: Told of a rebuild given up because its partition was revoked (set by the recovery).
        self.on_dropped: Callable[[PartitionId], None] | None = None

    async def clock(self, partition: PartitionId) -> PartitionClock:
        """The partition's cached clock, loaded from the store (plus what is unsaved) if none."""
        clock = self.clocks.get(partition)
        if clock is None:
            state = await self.store.load_partition(partition)
            self.stored_states[partition] = state
            unsaved = self.unsaved.get(partition)
            if unsaved is not None:  # delivered, not stored yet: ahead of the stored clock
                state = state.merged(unsaved)
            clock = PartitionClock(
                self.freq,
                lateness_ms=self.lateness_ms,
                grace_buckets=self.grace_buckets,
                state=state,
            )
            self.clocks[partition] = clock
        return clock

    def delivered(self, states: Mapping[PartitionId, PartitionState]) -> None:
        """A batch's outputs are delivered: its clocks may be stored from now on.

        Not those of rebuilding partitions: stored, they would claim windows that are not
        rebuilt yet (the clock is stored with the batch that ends the rebuild).
        """
        if self.rebuilding:
            states = {p: s for p, s in states.items() if p not in self.rebuilding}
        self.unsaved.update(states)

    def expect_offset(self, partition: PartitionId) -> int | None:
        """The next offset of the partition's clock known to be stored (``None``: none).

        Sent with every clock update (:attr:`PartitionUpdate.expect_offset`): a stored clock
        that is missing or older means the state was lost.
        """
        known = self.stored_states.get(partition)
        return None if known is None else known.next_offset

    def reset(self, partition: PartitionId, clock: PartitionClock) -> None:
        """Start a partition over with ``clock`` (a rebuild): nothing of it is known stored,
        nothing is pending or committable (its stored state is gone)."""
        self.clocks[partition] = clock
        self.unsaved.pop(partition, None)
        self._committable.pop(partition, None)
        self.stored_states[partition] = PartitionState()

    def take_unsaved(self) -> dict[PartitionId, PartitionState]:
        """The delivered clocks, to store with a batch's round trip (:meth:`keep_unsaved`
        puts them back if it fails, :meth:`stored` records them if it returns)."""
        pending, self.unsaved = self.unsaved, {}
        return pending

    def keep_unsaved(self, pending: Mapping[PartitionId, PartitionState]) -> None:
        """The round trip that was to store ``pending`` failed: they are still delivered,
        so they are stored later (clocks delivered meanwhile are newer and win)."""
        self.unsaved = {**pending, **self.unsaved}

    async def store_unsaved(self) -> None:
        """Store the delivered clocks in a round trip of their own (the end of a flush).

        Raises:
            StateStoreError: The store failed; the clocks stay pending.
        """
        unsaved = dict(self.unsaved)
        result = await self.store.apply(
            [],
            [
                PartitionUpdate(pid, st, expect_offset=self.expect_offset(pid))
                for pid, st in unsaved.items()
            ],
        )
        if result.lost and self.on_lost is not None:
            self.on_lost(result.lost)
        for pid, state in unsaved.items():
            if self.unsaved.get(pid) is state:
                del self.unsaved[pid]
        self.stored(unsaved)

    def stored(self, states: Mapping[PartitionId, PartitionState]) -> None:
        """A round trip stored ``states``: their offsets become committable."""
        for pid, state in states.items():
            if pid in self.rebuilding:
                continue  # not stored: the round trip found its state lost
            known_state = self.stored_states.get(pid)
            self.stored_states[pid] = state if known_state is None else known_state.merged(state)
            if state.next_offset is not None:
                known = self._committable.get(pid)
                if known is None or state.next_offset > known:
                    self._committable[pid] = state.next_offset

    def take_committable(self) -> dict[PartitionId, int]:
        """Offsets safe to commit now (:meth:`SalesProcessor.take_committable`)."""
        out, self._committable = self._committable, {}
        return out

    def forget(self, partitions: Iterable[PartitionId] | None = None) -> None:
        """Drop cached clocks (all, or of ``partitions``): the next batch reloads them."""
        if partitions is None:
            self.clocks.clear()
        else:
            for p in partitions:
                self.clocks.pop(p, None)

    def release(self, partition: PartitionId) -> None:
        """Forget a revoked partition entirely: clock, unstored clock, committable offset."""
        self.clocks.pop(partition, None)
        self.unsaved.pop(partition, None)
        self._committable.pop(partition, None)
        self.stored_states.pop(partition, None)
        if self.rebuilding.pop(partition, None) is not None and self.on_dropped is not None:
            self.on_dropped(partition)  # the next owner finds the state lost and rebuilds it
