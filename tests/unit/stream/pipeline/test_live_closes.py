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
    kw.setdefault("refresh_ms", 0)  # closes only: refreshes have tests of their own
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


# --- the open bucket: refresh forecasts, surges, stalls ------------------------------------


HOUR = 3_600_000


def _yesterday_then_close(proc: SalesProcessor, wall: WallClock, feed: Feed, qty: float) -> None:
    """Item ``a`` sells ``qty`` late on day 0 (live), and day 0 closes by the wall clock."""

    async def run() -> None:
        wall.now_ms = at(0.999)
        await proc.process(feed(sale("a", 0.998, qty), sale("z", 0.998, 1.0)))
        wall.now_ms = at(1) + 2 * MINUTE
        await proc.advance([PID])
        await proc.drain()

    asyncio.run(run())


def test_a_sale_in_the_open_bucket_brings_a_refresh_with_its_nowcast() -> None:
    wall = WallClock(at(0.999))
    sink = ListSink()
    proc = live_processor(wall, sink=sink, refresh_ms=60_000)
    feed = Feed()
    _yesterday_then_close(proc, wall, feed, 8.0)
    closes = len(sink.forecasts)

    async def today() -> None:
        wall.now_ms = at(1.5)  # noon: half of a uniform day
        await proc.process(feed(sale("a", 1.5 - 1 / 1440, 3.0)))
        await proc.drain()
        wall.now_ms += 30_000  # within the refresh interval: no second refresh
        await proc.process(feed(sale("a", 1.5, 1.0)))
        await proc.drain()
        wall.now_ms += 60_000
        await proc.process(feed(sale("a", 1.5 + 1 / 1440, 1.0)))
        await proc.drain()

    asyncio.run(today())
    refreshes = [v for _, v in sink.forecasts[closes:]]
    assert [v["kind"] for v in refreshes] == ["refresh", "refresh"]
    first, second = refreshes
    assert first["as_of"] == day_iso(1)  # as the close of day 0: step 1 is the open bucket
    assert first["horizon"][0]["date"] == "2011-01-02"
    ob = first["open_bucket"]
    assert ob["start"] == "2011-01-02" and ob["so_far"] == 3.0
    assert 3.9 <= ob["expected_so_far"] <= 4.0  # 8 a day, half the day gone
    assert ob["so_far"] <= ob["p10"] <= ob["nowcast"] <= ob["p90"]
    assert second["open_bucket"]["so_far"] == 5.0
    from trendcast import contract

    for _, value in sink.forecasts:
        contract.validate("forecasts", value)


def test_a_surge_raises_one_alert_in_the_batch_that_crosses_the_line() -> None:
    wall = WallClock(at(0.999))
    sink = ListSink()
    proc = live_processor(wall, sink=sink, refresh_ms=60_000, alert_probability=0.001)
    feed = Feed()
    _yesterday_then_close(proc, wall, feed, 2.0)

    async def today() -> None:
        wall.now_ms = at(1) + 10 * HOUR
        await proc.process(feed(sale("a", 1 + 10 / 24 - 0.001, 1.0)))  # ordinary
        await proc.drain()
        assert sink.alerts == []
        await proc.process(feed(sale("a", 1 + 10 / 24, 60.0)))  # a surge
        await proc.drain()
        assert [a["kind"] for a in sink.alerts] == ["surge"]
        await proc.process(feed(sale("a", 1 + 10 / 24 + 0.001, 60.0)))  # still surging
        await proc.drain()

    asyncio.run(today())
    (alert,) = sink.alerts  # one per item, kind and bucket
    assert alert["item_id"] == "a" and alert["so_far"] == 61.0
    assert alert["expected_total"] == 2.0 and alert["probability"] < 0.001
    assert alert["bucket_start"] == "2011-01-02" and alert["nowcast"] > 61.0
    from trendcast import contract

    contract.validate("alerts", alert)


def test_an_item_expected_to_sell_that_sold_nothing_stalls() -> None:
    wall = WallClock(at(0.999))
    sink = ListSink()
    proc = live_processor(
        wall, sink=sink, refresh_ms=60_000, alert_probability=0.001, stall_every_ms=60_000
    )
    feed = Feed()
    _yesterday_then_close(proc, wall, feed, 200.0)  # "a" sells 200 a day, "z" one

    async def today() -> None:
        for tick in range(1, 18 * 15):  # nothing sells till 18:00; the worker ticks
            wall.now_ms = at(1) + 2 * MINUTE + tick * 4 * MINUTE
            await proc.advance([PID])
        await proc.drain()

    asyncio.run(today())
    assert [(a["kind"], a["item_id"]) for a in sink.alerts] == [("stall", "a")]
    assert sink.alerts[0]["so_far"] == 0.0 and sink.alerts[0]["expected_so_far"] > 10


def test_a_replay_gets_no_refreshes_and_no_alerts() -> None:
    wall = WallClock(at(400))
    sink = ListSink()
    proc = live_processor(wall, sink=sink, refresh_ms=60_000)
    feed = Feed()

    async def run() -> None:
        await proc.process(feed(sale("a", 0.5, 2.0), sale("a", 1.2, 500.0), sale("a", 2.5)))
        await proc.advance([PID])
        await proc.drain()

    asyncio.run(run())
    assert {v["kind"] for _, v in sink.forecasts} == {"close"}
    assert sink.alerts == []
