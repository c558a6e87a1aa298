"""Closes on time: seconds of lateness, and live partitions whose clock follows the wall clock.

A bucket closes ``allowed_lateness_ms`` after its end in event time; a partition that is live
(its newest event at most ``live_window_ms`` behind the wall clock) and has nothing left to
read closes its buckets by the wall clock (``SalesProcessor.advance``), through the same path
as a batch: forecasts delivered first, clock stored after. Replays are never live.
"""

from __future__ import annotations

import asyncio
from typing import Any

from stream.pipeline.processor import SalesProcessor
from stream.state.base import PartitionId
from stream.state.memory import MemoryWindowStore
from trendcast.testkit.doubles import DAY, FREQ, T0, Feed, ListSink, day_iso, processor, sale

MINUTE = 60_000
PID = PartitionId("sales", 0)


class WallClock:
    """An injectable wall clock (epoch ms), moved by the test."""

    def __init__(self, now_ms: int) -> None:
        self.now_ms = now_ms

    def __call__(self) -> int:
        return self.now_ms


def live_processor(
    wall: WallClock, store: MemoryWindowStore | None = None, sink: ListSink | None = None, **kw: Any
) -> SalesProcessor:
    return processor(store, sink, allowed_lateness_ms=MINUTE, clock_ms=wall, **kw)


def at(day: float) -> int:
    return int(T0 + day * DAY)


def test_a_daily_bucket_closes_a_minute_after_midnight_by_event_time() -> None:
    wall = WallClock(at(10))
    sink = ListSink()
    proc = live_processor(wall, sink=sink)
    feed = Feed()

    async def scenario() -> None:
        await proc.process(feed(sale("a", 0.5), sale("b", 0.9)))
        assert sink.forecasts == []  # day 0 still open
        await proc.process(feed(sale("a", 1 + 59 / 86_400)))  # 00:00:59: within the lateness
        assert sink.forecasts == []
        await proc.process(feed(sale("b", 1 + 1.5 / 1440)))  # 00:01:30 on day 1: day 0 closes

    asyncio.run(scenario())
    assert sorted(sink.pairs()) == [("a", day_iso(1)), ("b", day_iso(1))]
    assert {v["kind"] for _, v in sink.forecasts} == {"close"}
    assert all(v["open_bucket"] is None for _, v in sink.forecasts)


def test_a_live_partition_closes_its_last_bucket_without_a_later_event() -> None:
    wall = WallClock(at(0.999))
    store = MemoryWindowStore(FREQ)
    sink = ListSink()
    proc = live_processor(wall, store, sink)
    feed = Feed()

    async def scenario() -> None:
        await proc.process(feed(sale("a", 0.998), sale("b", 0.999)))  # 23:57, 23:58
        wall.now_ms = at(1) + 30_000  # 30 s after midnight: within the allowed lateness
        assert await proc.advance([PID]) is None
        assert sink.forecasts == []
        wall.now_ms = at(1) + MINUTE + 500  # lateness passed: day 0 closes by the wall clock
        stats = await proc.advance([PID])
        assert stats is not None and stats.closed_buckets[PID] == [at(0)]
        await proc.drain()
        await proc.flush()

    asyncio.run(scenario())
    assert sorted(sink.pairs()) == [("a", day_iso(1)), ("b", day_iso(1))]
    state = asyncio.run(store.load_partition(PID))
    # Stored only after delivery, with the wall-clock time standing in for an event.
    assert state.max_event_ms == at(1) + MINUTE + 500
    assert state.emitted_to_ms == at(1)
    assert state.next_offset == 2  # no message was read: offsets untouched


def test_a_replay_is_never_live_and_closes_by_event_time_only() -> None:
    wall = WallClock(at(400))  # the events are a year behind the wall clock
    sink = ListSink()
    proc = live_processor(wall, sink=sink)
    feed = Feed()

    async def scenario() -> None:
        await proc.process(feed(sale("a", 0.5)))
        assert await proc.advance([PID]) is None
        await proc.drain()

    asyncio.run(scenario())
    assert sink.forecasts == []
    assert proc._clocks[PID].state.max_event_ms == at(0.5)  # untouched by the wall clock


def test_the_clock_follows_the_wall_clock_so_a_quiet_partition_stays_live() -> None:
    wall = WallClock(at(0.5))
    sink = ListSink()
    proc = live_processor(wall, sink=sink)
    feed = Feed()

    async def scenario() -> None:
        await proc.process(feed(sale("a", 0.5)))
        for tick in range(1, 181):  # no event all afternoon and night; the worker ticks
            wall.now_ms = at(0.5) + tick * 4 * MINUTE
            assert await proc.advance([PID]) is None
        wall.now_ms = at(1) + 2 * MINUTE
        assert await proc.advance([PID]) is not None
        await proc.drain()

    asyncio.run(scenario())
    assert sink.pairs() == [("a", day_iso(1))]


def test_unknown_and_empty_partitions_are_left_alone() -> None:
    wall = WallClock(at(1))
    proc = live_processor(wall)
    assert asyncio.run(proc.advance([PID, PartitionId("sales", 7)])) is None


def test_forecasts_of_a_wall_clock_close_are_sent_again_when_delivery_fails() -> None:
    wall = WallClock(at(0.999))
    sink = ListSink(fail_forecasts=1)
    store = MemoryWindowStore(FREQ)
    proc = live_processor(wall, store, sink)
    feed = Feed()

    async def scenario() -> None:
        await proc.process(feed(sale("a", 0.999)))
        wall.now_ms = at(1) + 2 * MINUTE
        await proc.advance([PID])  # its forecasts fail in the background: kept
        assert (await store.load_partition(PID)).emitted_to_ms == at(0)  # not stored yet
        await proc.drain()  # sent again, first
        await proc.flush()

    asyncio.run(scenario())
    assert sink.pairs() == [("a", day_iso(1))]
    assert asyncio.run(store.load_partition(PID)).emitted_to_ms == at(1)


def test_a_take_over_continues_from_the_wall_clock_close() -> None:
    wall = WallClock(at(0.999))
    store = MemoryWindowStore(FREQ)
    first = live_processor(wall, store, ListSink())
    feed = Feed()

    async def before() -> None:
        await first.process(feed(sale("a", 0.999)))
        wall.now_ms = at(1) + 2 * MINUTE
        await first.advance([PID])
        await first.drain()
        await first.flush()

    asyncio.run(before())
    sink = ListSink()
    second = live_processor(wall, store, sink)

    async def after() -> None:
        # Day 0 is closed but in grace: counted, and re-forecast as a late update.
        await second.process(feed(sale("a", 0.99), sale("b", 1.01)))
        # Day -1 is out of grace: dead-lettered as late.
        await second.process(feed(sale("c", -0.5)))
        await second.drain()

    asyncio.run(after())
    assert [(k, v["kind"]) for k, v in sink.forecasts] == [("a", "late")]
    assert [d["reason"] for d in sink.dead] == ["late"]
    window = asyncio.run(store.read(["a"]))["a"]
    assert window.buckets[at(0)].quantity == 2.0  # both day-0 sales, each once


def test_catch_up_latest_forecasts_only_the_newest_closed_bucket() -> None:
    """One batch closing days 0..3 (a catch-up): one forecast per item, as of day 3."""
    sinks = {}
    for mode in ("latest", "every"):
        sink = sinks[mode] = ListSink()
        proc = processor(sink=sink, catchup=mode)
        feed = Feed()
        events = [sale("a", 0.5), sale("b", 2.5), sale("a", 3.2), sale("c", 5.1)]
        asyncio.run(proc.process(feed(*events)))
    assert sorted(sinks["latest"].pairs()) == [
        ("a", day_iso(4)),
        ("b", day_iso(4)),
    ]
    assert sorted(sinks["every"].pairs()) == [
        ("a", day_iso(1)),
        ("a", day_iso(2)),
        ("a", day_iso(3)),
        ("a", day_iso(4)),
        ("b", day_iso(3)),
        ("b", day_iso(4)),
    ]


def test_catch_up_latest_still_forecasts_an_item_whose_sales_left_the_newest_window() -> None:
    """An item sold only in the oldest closed bucket, outside the newest one's window."""
    sink = ListSink()
    proc = processor(sink=sink, catchup="latest")  # the fake model's window is 7 days
    feed = Feed()
    asyncio.run(proc.process(feed(sale("old", 0.5), sale("new", 12.5))))
    # Closed: days 0..10 (lateness one day); "old" sold on day 0, outside day 10's window,
    # but a close of day 0 would have forecast it: it gets the newest forecast all the same.
    assert sorted(sink.pairs()) == [("old", day_iso(11))]
