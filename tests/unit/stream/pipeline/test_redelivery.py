"""Re-delivered messages after a crash or rebalance are duplicates, never ``late`` dead letters.

Found by bench/chaos.py: Kafka offsets are committed a commit interval after a batch, so a
worker killed in between hands its last batches to the next worker again. The stored clock
had already moved past those events — *because* they were counted — so they looked late and
were dead-lettered although their sales were in the windows. The partition clock is now
stored after the batch's outputs, together with the next offset to process, and a message
below that offset is a known duplicate.
"""

from __future__ import annotations

import asyncio

import pytest

from stream.state.base import PartitionId
from stream.state.memory import MemoryWindowStore
from trendcast.exceptions import BrokerError
from trendcast.testkit.doubles import FREQ, Feed, ListSink, processor, sale


def _windows(store: MemoryWindowStore, items: list[str]) -> dict[str, dict[int, float]]:
    read = asyncio.run(store.read(items))
    return {i: {b: s.quantity for b, s in w.buckets.items()} for i, w in read.items()}


def test_redelivered_batches_after_a_crash_are_not_dead_lettered() -> None:
    store = MemoryWindowStore(FREQ)
    feed = Feed()
    # Eight days of sales; batches of 4 events, so the clock passes day 0 long before the end.
    messages = feed(*[sale(f"i{n % 3}", day / 2) for n, day in enumerate(range(16))])
    first = processor(store=store, sink=ListSink())

    async def run_first() -> None:
        for i in range(0, len(messages), 4):
            await first.process(messages[i : i + 4])
        await first.flush()

    asyncio.run(run_first())
    before = _windows(store, ["i0", "i1", "i2"])
    state = asyncio.run(store.load_partition(PartitionId("sales", 0)))
    assert state.next_offset == len(messages)

    # The worker died before committing anything: a new one gets every message again.
    sink = ListSink()
    second = processor(store=store, sink=sink)
    stats = asyncio.run(second.process(messages))
    assert sink.dead == []
    assert stats.late == 0
    assert stats.redelivered > 0  # the early days are behind the clock now
    assert stats.redelivered + stats.duplicates == len(messages)
    assert _windows(store, ["i0", "i1", "i2"]) == before


def test_a_genuinely_late_event_after_the_processed_offsets_is_still_dead_lettered() -> None:
    store = MemoryWindowStore(FREQ)
    feed = Feed()
    sink = ListSink()
    proc = processor(store=store, sink=sink)
    asyncio.run(proc.process(feed(sale("a", 0), sale("a", 5))))
    asyncio.run(proc.process(feed(sale("a", 1))))  # new offset, 4 days behind: late
    assert [d["reason"] for d in sink.dead] == ["late"]


def test_the_clock_is_stored_only_after_the_outputs() -> None:
    """A batch whose forecasts fail leaves the stored clock where it was; its forecasts are
    sent again, and its retry is known as processed (nothing late, nothing counted twice)."""
    store = MemoryWindowStore(FREQ)
    sink = ListSink(fail_forecasts=2)
    proc = processor(store=store, sink=sink)
    feed = Feed()
    batch = feed(sale("a", 0), sale("a", 3), sale("b", 6))
    with pytest.raises(BrokerError):
        asyncio.run(proc.process(batch))
    asyncio.run(proc.flush())  # sends the forecasts again, which fail again: nothing stored
    state = asyncio.run(store.load_partition(PartitionId("sales", 0)))
    assert state.max_event_ms is None and state.next_offset is None
    stats = asyncio.run(proc.process(batch))  # the retry
    assert sink.dead == [] and stats.late == 0 and stats.duplicates + stats.redelivered == 3
    assert _windows(store, ["a"])["a"] != {}
    assert sink.forecasts
