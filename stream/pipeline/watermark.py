"""Per-partition event time: the watermark, which buckets are closed, which events are late.

Each partition has its own clock because Kafka orders events only within a partition. The
watermark is the largest event time seen on the partition minus an allowed lateness; a bucket
``[start, start + step)`` is *closed* once the watermark reaches its end, and each closed
bucket is forecast exactly once. Closed buckets stay writable for ``grace`` more buckets
(the item is re-forecast); events for older buckets are *late* and go to the dead-letter
topic, because their buckets have been trimmed from the window store or forecast long ago.

Three numbers are persisted per partition (:class:`~stream.state.base.PartitionState`): the largest
event
time, the first bucket not yet forecast and the first offset not yet fully processed, so a
worker taking the partition over continues from them. All only grow, which makes their
updates idempotent.
"""

from __future__ import annotations

import logging
from dataclasses import replace

from stream.state.base import PartitionState
from trendcast.freq import Freq

__all__ = ["PartitionClock"]

logger = logging.getLogger(__name__)


class PartitionClock:
    """Event-time clock of one partition (pure logic, no I/O).

    Args:
        freq: Bucket frequency of the model.
        lateness_ms: Allowed lateness: the watermark lags the largest event time by this
            much, so a bucket closes (and is forecast) that long after its end in event time.
        grace_buckets: Closed buckets that still accept events.
        state: Where to start from (persisted state, or empty).

    >>> from trendcast.freq import parse_freq
    >>> day, minute = 86_400_000, 60_000
    >>> clock = PartitionClock(parse_freq("1D"), lateness_ms=minute, grace_buckets=1)
    >>> clock.observe(10 * day + 7_200_000)    # first event: day 10, 02:00
    >>> clock.open_from_ms // day, clock.due_buckets()   # day 10 open: nothing closed
    (10, [])
    >>> clock.observe(11 * day + minute - 1)   # 00:00:59.999 on day 11: not yet
    >>> clock.due_buckets()
    []
    >>> clock.observe(11 * day + minute)       # a minute into day 11: day 10 closes
    >>> [b // day for b in clock.due_buckets()]
    [10]
    >>> clock.mark_emitted(); clock.due_buckets()
    []
    >>> clock.is_late(10 * day), clock.is_late(9 * day + 1)  # grace: 1 closed bucket (day 10)
    (False, True)
    """

    def __init__(
        self,
        freq: Freq,
        *,
        lateness_ms: int,
        grace_buckets: int,
        state: PartitionState | None = None,
    ) -> None:
        if lateness_ms < 0:
            raise ValueError(f"expected lateness_ms >= 0, got {lateness_ms}")
        self.freq = freq
        self.lateness_ms = lateness_ms
        self.grace_ms = grace_buckets * freq.step_ms
        self._state = state or PartitionState()

    @property
    def state(self) -> PartitionState:
        """The persistable state."""
        return self._state

    @property
    def watermark_ms(self) -> int | None:
        """Largest event time minus the allowed lateness (``None`` before the first event)."""
        if self._state.max_event_ms is None:
            return None
        return self._state.max_event_ms - self.lateness_ms

    @property
    def open_from_ms(self) -> int | None:
        """Start of the oldest open bucket: every bucket before it is closed.

        A bucket is closed when the watermark reaches its end, i.e. when it starts before the
        bucket holding the watermark.
        """
        watermark = self.watermark_ms
        return None if watermark is None else self.freq.floor_ms(watermark)

    @property
    def late_before_ms(self) -> int | None:
        """Events in buckets starting before this are late (closed and out of grace)."""
        max_event = self._state.max_event_ms
        return None if max_event is None else self.late_before_for(max_event)

    def late_before_for(self, max_event_ms: int) -> int:
        """:attr:`late_before_ms` once the largest event time is ``max_event_ms`` (no change):
        the start of the bucket holding that watermark (:attr:`open_from_ms`) less the grace.

        >>> from trendcast.freq import parse_freq
        >>> day = 86_400_000
        >>> clock = PartitionClock(parse_freq("1D"), lateness_ms=day, grace_buckets=1)
        >>> clock.late_before_for(12 * day + 5) // day  # watermark day 11: day 10 in grace
        10
        >>> clock.observe(12 * day + 5); clock.late_before_ms // day
        10
        """
        return self.freq.floor_ms(max_event_ms - self.lateness_ms) - self.grace_ms

    def is_late(self, ts_ms: int) -> bool:
        """Whether an event at ``ts_ms`` is too late to be counted."""
        late_before = self.late_before_ms
        return late_before is not None and self.freq.floor_ms(ts_ms) < late_before

    def late_by_ms(self, ts_ms: int) -> int:
        """How far ``ts_ms`` lies behind the watermark (0 if not behind)."""
        watermark = self.watermark_ms
        return 0 if watermark is None else max(0, watermark - ts_ms)

    def observe(self, ts_ms: int) -> None:
        """Advance the clock with an accepted event's time.

        The first event of a partition also fixes where forecasting starts: buckets already
        closed by then were never seen open, so they are not forecast.
        """
        current = self._state.max_event_ms
        if current is not None and ts_ms <= current:
            return
        self._state = replace(self._state, max_event_ms=ts_ms)
        if self._state.emitted_to_ms is None:
            self._state = replace(self._state, emitted_to_ms=self.open_from_ms)

    def is_live(self, now_ms: int, within_ms: int) -> bool:
        """Whether the partition follows the wall clock: its newest event time is at most
        ``within_ms`` behind ``now_ms`` (a replay or a catch-up of history is not live).
        """
        max_event = self._state.max_event_ms
        return max_event is not None and now_ms - max_event <= within_ms

    def closes_at(self, now_ms: int) -> bool:
        """Whether moving the largest event time to ``now_ms`` would close a bucket.

        >>> from trendcast.freq import parse_freq
        >>> clock = PartitionClock(parse_freq("1h"), lateness_ms=1_000, grace_buckets=0)
        >>> clock.observe(1_800_000)                # half past midnight: hour 0 open
        >>> clock.closes_at(3_600_999), clock.closes_at(3_601_000)  # 1 s after its end
        (False, True)
        """
        open_from = self.open_from_ms
        return open_from is not None and self.freq.floor_ms(now_ms - self.lateness_ms) > open_from

    def restore(self, state: PartitionState) -> None:
        """Put the clock back to ``state``, taken from it before a batch that then failed.

        The only way a clock goes back: the failed batch is judged again from where the
        clock stood, exactly as the first time.
        """
        self._state = state

    def due_buckets(self) -> list[int]:
        """Starts of the buckets closed but not yet forecast, oldest first."""
        start, end = self._state.emitted_to_ms, self.open_from_ms
        if start is None or end is None:
            return []
        return list(range(start, end, self.freq.step_ms))

    def mark_processed(self, next_offset: int) -> None:
        """Record that every message before ``next_offset`` was fully processed."""
        current = self._state.next_offset
        if current is None or next_offset > current:
            self._state = replace(self._state, next_offset=next_offset)

    def is_redelivered(self, offset: int) -> bool:
        """Whether the message at ``offset`` was fully processed before (see ``next_offset``)."""
        next_offset = self._state.next_offset
        return next_offset is not None and offset < next_offset

    def mark_emitted(self) -> None:
        """Record that the forecasts of every due bucket have been sent."""
        open_from = self.open_from_ms
        if open_from is not None:
            self._state = replace(self._state, emitted_to_ms=open_from)
