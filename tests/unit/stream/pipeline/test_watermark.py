"""The per-partition event-time clock."""

from __future__ import annotations

import pytest

from stream.pipeline.watermark import PartitionClock
from stream.state.base import PartitionState
from trendcast.freq import parse_freq

DAY = 86_400_000
HOUR = 3_600_000


def clock(
    lateness: int = 1, grace: int = 1, state: PartitionState | None = None, freq: str = "1D"
) -> PartitionClock:
    f = parse_freq(freq)
    return PartitionClock(f, lateness_ms=lateness * f.step_ms, grace_buckets=grace, state=state)


def test_empty_clock_closes_nothing_and_nothing_is_late() -> None:
    c = clock()
    assert (c.watermark_ms, c.open_from_ms, c.late_before_ms) == (None, None, None)
    assert c.due_buckets() == []
    assert not c.is_late(0)
    assert c.late_by_ms(0) == 0


def test_first_event_fixes_where_forecasting_starts() -> None:
    c = clock()
    c.observe(10 * DAY + 3 * HOUR)
    assert c.state == PartitionState(max_event_ms=10 * DAY + 3 * HOUR, emitted_to_ms=9 * DAY)
    assert c.due_buckets() == []


def test_buckets_close_when_the_watermark_passes_their_end() -> None:
    c = clock()
    c.observe(10 * DAY)
    c.observe(11 * DAY - 1)  # watermark 10d - 1ms: day 9 still open
    assert c.due_buckets() == []
    c.observe(11 * DAY)  # watermark exactly 10d: day 9 closed
    assert c.due_buckets() == [9 * DAY]
    c.observe(14 * DAY + 5)
    assert c.due_buckets() == [9 * DAY, 10 * DAY, 11 * DAY, 12 * DAY]
    c.mark_emitted()
    assert c.due_buckets() == []
    assert c.state.emitted_to_ms == 13 * DAY


def test_watermark_never_moves_back() -> None:
    c = clock()
    c.observe(20 * DAY)
    c.observe(5 * DAY)
    assert c.state.max_event_ms == 20 * DAY
    assert c.watermark_ms == 19 * DAY


@pytest.mark.parametrize(("grace", "first_ok_day"), [(0, 19), (1, 18), (3, 16)])
def test_grace_decides_what_is_late(grace: int, first_ok_day: int) -> None:
    c = clock(grace=grace)
    c.observe(20 * DAY)  # open from day 19
    assert not c.is_late(first_ok_day * DAY)
    assert c.is_late(first_ok_day * DAY - 1)
    assert c.late_by_ms(first_ok_day * DAY - 1) == 19 * DAY - (first_ok_day * DAY - 1)


def test_zero_lateness_closes_the_previous_bucket_at_once() -> None:
    c = clock(lateness=0, grace=0)
    c.observe(10 * DAY)
    c.observe(11 * DAY)
    assert c.due_buckets() == [10 * DAY]


def test_restored_state_continues() -> None:
    c = clock(state=PartitionState(max_event_ms=20 * DAY, emitted_to_ms=17 * DAY))
    assert c.due_buckets() == [17 * DAY, 18 * DAY]
    c.observe(21 * DAY)
    assert c.due_buckets() == [17 * DAY, 18 * DAY, 19 * DAY]


def test_hourly_buckets() -> None:
    c = clock(freq="6h")
    c.observe(100 * HOUR)  # bucket 96h; watermark 94h -> open from 90h
    c.observe(113 * HOUR)  # watermark 107h -> open from 102h
    assert c.due_buckets() == [90 * HOUR, 96 * HOUR]
