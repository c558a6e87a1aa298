"""Batches whose forecasts are made in the background (``SalesProcessor.submit``).

The worker stages batch N+1 (validation, Redis writes, window reads) while batch N's
forecasts are made and delivered. These tests hold it to what the sequential path
(``process``) guarantees: the same forecasts, dead letters and state; offsets committable
only once a batch's forecasts are delivered; a failed background batch raised by the next
call and processed again, with no forecast lost.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Sequence
from typing import Any

import pytest
from prometheus_client import REGISTRY

from stream.inference.observers import ScoredBatch
from stream.pipeline.processor import RawMessage, SalesProcessor
from stream.state.base import ApplyResult, ItemUpdate, PartitionId, PartitionUpdate
from stream.state.memory import MemoryWindowStore
from trendcast.exceptions import BrokerError, StateStoreError
from trendcast.testkit.doubles import (
    DAY,
    FREQ,
    T0,
    Feed,
    ListSink,
    day_iso,
    processor,
    sale,
)

P0, P1 = PartitionId("sales", 0), PartitionId("sales", 1)


class FlakyStore(MemoryWindowStore):
    """Fails the n-th apply once."""

    def __init__(self, fail_at: int) -> None:
        super().__init__(FREQ)
        self.applies = 0
        self.fail_at = fail_at

    async def apply(
        self, items: Sequence[ItemUpdate], partitions: Sequence[PartitionUpdate]
    ) -> ApplyResult:
        self.applies += 1
        if self.applies == self.fail_at:
            raise StateStoreError("Redis down")
        return await super().apply(items, partitions)


def scenario_batches(seed: int) -> list[list[RawMessage]]:
    """Batches over two partitions: time mostly forward, some late, in-grace and bad events,
    and events produced twice (the same bytes again, a little later in the stream). Items
    are keyed, as the worker's producers must key them: each lives in one partition."""
    rng = random.Random(seed)
    feed = Feed()
    batches: list[list[RawMessage]] = []
    day = {0: 0.0, 1: 0.0}
    sent: dict[int, list[bytes]] = {0: [], 1: []}
    for _ in range(rng.randint(4, 9)):
        batch: list[RawMessage] = []
        for partition in rng.sample([0, 1], rng.randint(1, 2)):
            values: list[bytes] = []
            for _ in range(rng.randint(1, 12)):
                day[partition] += rng.choice([0.0, 0.1, 0.3, 0.7, 1.2])
                roll = rng.random()
                when = day[partition]
                if roll < 0.1:
                    when -= rng.choice([1.0, 2.5, 4.0])  # in grace or late
                if roll > 0.95:
                    values.append(b'{"item_id": "bad"}')
                    continue
                if roll > 0.9 and sent[partition]:  # a producer retry: the same event again
                    values.append(rng.choice(sent[partition][-6:]))
                    continue
                item = rng.choice("abc" if partition == 0 else "def")  # keyed by item
                extra = {"event_id": f"e{rng.getrandbits(32)}"} if rng.random() < 0.3 else {}
                values.append(sale(item, when, rng.choice([1.0, 2.0, -1.0, 3.0]), **extra))
                sent[partition].append(values[-1])
            batch += feed(*values, partition=partition)
        batches.append(batch)
    return batches


def by_partition(batch: Sequence[RawMessage]) -> dict[PartitionId, list[RawMessage]]:
    out: dict[PartitionId, list[RawMessage]] = {}
    for msg in batch:
        out.setdefault(msg.source, []).append(msg)
    return out


def outputs(sink: ListSink) -> tuple[list[Any], list[Any]]:
    """Forecasts and dead letters without the wall-clock stamps."""
    forecasts = [(k, {**v, "emitted_at_ms": 0}) for k, v in sink.forecasts]
    dead = [{**d, "dead_lettered_at_ms": 0} for d in sink.dead]
    return forecasts, dead


async def state(store: MemoryWindowStore) -> tuple[Any, ...]:
    windows = await store.read(list("abcdef"))
    return (
        {i: (w.first_ms, dict(w.buckets)) for i, w in windows.items()},
        await store.load_partition(P0),
        await store.load_partition(P1),
    )


class Told:
    """An observer noting what it is told, in order."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []
        self.seen = 0

    def on_forecasts(self, scored: ScoredBatch) -> None:
        batch, result = scored.batch, scored.result
        self.seen += len(batch.item_ids)
        self.calls.append(
            (
                scored.role,
                scored.model.model_version,
                list(batch.item_ids),
                batch.last_start_ms.tolist(),
                batch.quantities.tolist(),
                result.mean.tolist(),
            )
        )


@pytest.mark.parametrize("seed", range(12))
def test_submitted_batches_give_what_processed_batches_give(seed: int) -> None:
    batches = scenario_batches(seed)

    async def run(submit: bool) -> tuple[Any, ...]:
        store, sink, told = MemoryWindowStore(FREQ), ListSink(), Told()
        proc = processor(store=store, sink=sink, observers=[told])
        committed: dict[PartitionId, int] = {}
        for batch in batches:
            if submit:
                await proc.submit(by_partition(batch))
            else:
                await proc.process(batch)
                assert told.seen == len(sink.forecasts)  # told before process returns
            committed |= proc.take_committable()
        await proc.flush()
        committed |= proc.take_committable()
        return (*outputs(sink), *await state(store)), committed, told.calls

    (forecasts, dead, windows, *clocks), committed, told = asyncio.run(run(submit=True))
    sequential = asyncio.run(run(submit=False))
    (forecasts_seq, dead_seq, windows_seq, *clocks_seq), committed_seq, told_seq = sequential
    assert forecasts == forecasts_seq and dead == dead_seq and told == told_seq
    assert clocks == clocks_seq and committed == committed_seq
    # The same sums in every bucket; a bucket that processing one by one has trimmed may
    # still be kept (old buckets and dedupe keys go one or two batches later when batches
    # overlap: they go only up to the clock known to be stored).
    for item, (first, buckets) in windows_seq.items():
        first_sub, buckets_sub = windows[item]
        assert first_sub == first
        assert {b: buckets_sub[b] for b in buckets} == buckets
        assert all(b < min(buckets, default=b + 1) for b in buckets_sub.keys() - buckets)


class GatedSink(ListSink):
    """Holds every forecast send until the test opens the gate."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = asyncio.Event()

    async def send_forecasts(self, records: Sequence[tuple[str, bytes]]) -> None:
        await self.gate.wait()
        await super().send_forecasts(records)


def test_a_submitted_batch_becomes_committable_only_once_its_forecasts_are_delivered() -> None:
    feed = Feed()

    async def scenario() -> None:
        sink = GatedSink()
        proc = processor(sink=sink)
        await proc.submit({P0: feed(sale("a", 0), sale("a", 3))})  # days 0, 1 close
        assert sink.forecasts == []  # still forecasting in the background
        # The next batch is staged (its round trip stores nothing of the first) and then
        # waits for the first batch's delivery.
        second = asyncio.ensure_future(proc.submit({P0: feed(sale("a", 3.5))}))
        await asyncio.sleep(0.01)
        assert not second.done()
        assert proc.take_committable() == {}
        flushed = asyncio.ensure_future(proc.flush())  # waits for the delivery too
        await asyncio.sleep(0.01)
        assert not flushed.done()
        sink.gate.set()
        await flushed
        await second
        assert sink.pairs() == [("a", day_iso(1)), ("a", day_iso(2))]
        await proc.flush()  # both batches delivered: both clocks stored
        assert proc.take_committable() == {P0: 3}

    asyncio.run(scenario())


def test_a_failed_background_batch_is_raised_by_the_next_call_and_processed_again() -> None:
    feed = Feed()
    store, sink = FlakyStore(fail_at=0), ListSink(fail_forecasts=2)
    proc = processor(store=store, sink=sink)
    first = {P0: feed(sale("a", 0), sale("b", 1), sale("a", 3))}
    second = {P0: feed(sale("a", 4), sale("b", 4.5))}

    async def scenario() -> None:
        await proc.submit(first)  # its forecasts fail in the background
        with pytest.raises(BrokerError):
            await proc.submit(second)  # staged, then the first's forecasts fail again
        assert proc.take_committable() == {}
        applies = store.applies
        await proc.submit(second)  # the retry: the first batch's forecasts, then this one's
        assert store.applies == applies  # not staged again
        await proc.flush()
        assert proc.take_committable() == {P0: 5}

    timed = REGISTRY.get_sample_value("trendcast_batch_seconds_count") or 0.0
    asyncio.run(scenario())
    # Two batches, timed once each when delivered (not at each failed delivery).
    assert REGISTRY.get_sample_value("trendcast_batch_seconds_count") == timed + 2
    # Every closed day forecast, none twice; every sale counted once.
    assert sink.pairs() == [
        ("a", day_iso(1)),
        ("a", day_iso(2)),
        ("b", day_iso(2)),
        ("a", day_iso(3)),
        ("b", day_iso(3)),
    ]
    window = asyncio.run(store.read(["a", "b"]))
    assert sum(s.quantity for w in window.values() for s in w.buckets.values()) == 5


def test_flush_waits_for_the_background_batch_and_keeps_a_failed_one_for_later() -> None:
    feed = Feed()
    sink = ListSink(fail_forecasts=2)  # in the background, then sent again by flush
    proc = processor(sink=sink)

    async def scenario() -> None:
        await proc.submit({P0: feed(sale("a", 0), sale("a", 3))})
        await proc.flush()  # the failure is logged, not raised: the timer goes on
        assert proc.take_committable() == {}
        assert sink.pairs() == []
        await proc.process(feed(sale("a", 3.2)))  # processes the failed batch first
        assert sink.pairs() == [("a", day_iso(1)), ("a", day_iso(2))]
        await proc.flush()
        assert proc.take_committable() == {P0: 3}

    asyncio.run(scenario())


def test_a_failed_background_batch_of_revoked_partitions_leaves_their_clocks_alone() -> None:
    feed = Feed()
    sink = ListSink(fail_forecasts=2)
    proc = processor(sink=sink)

    async def scenario() -> None:
        await proc.submit({P0: feed(sale("a", 0), sale("a", 3))})
        await proc.flush()  # at revoke: the batch's forecasts failed twice
        proc.release([P0])
        assert proc.take_committable() == {}
        await proc.submit({P1: feed(sale("b", 0), partition=1)})
        await proc.flush()
        # Its forecasts went out after all (the next owner may make them too), but its
        # clock is the next owner's to store: nothing of partition 0 is committed here.
        assert proc.take_committable() == {P1: 1}

    asyncio.run(scenario())
    assert sink.pairs() == [("a", day_iso(1)), ("a", day_iso(2))]


def test_a_retried_batch_plans_from_the_delivered_clock_and_repeats_no_forecast() -> None:
    feed = Feed()
    sink = ListSink()
    proc = processor(store=FlakyStore(fail_at=2), sink=sink)
    second = {P0: feed(sale("a", 4))}

    async def scenario() -> None:
        await proc.submit({P0: feed(sale("a", 0), sale("a", 3))})  # days 0, 1 close
        with pytest.raises(StateStoreError):
            await proc.submit(second)
        await proc.submit(second)  # day 2 closes
        await proc.drain()

    asyncio.run(scenario())
    assert sink.pairs() == [("a", day_iso(1)), ("a", day_iso(2)), ("a", day_iso(3))]


def test_a_swap_while_a_batch_forecasts_in_the_background_serves_the_next_batch() -> None:
    from stream.inference.model_info import ModelInfo
    from trendcast.testkit.doubles import MODEL, FakeForecaster

    feed = Feed()
    sink = GatedSink()
    proc: SalesProcessor = processor(sink=sink)
    new = ModelInfo(freq=FREQ, window=MODEL.window, horizon=3, model_version="fake-2")

    async def scenario() -> None:
        await proc.submit({P0: feed(sale("a", 0), sale("a", 3))})
        proc.swap_model(FakeForecaster(), new)  # while the first batch forecasts
        sink.gate.set()
        await proc.submit({P0: feed(sale("a", 4))})
        await proc.drain()

    asyncio.run(scenario())
    assert [v["model_version"] for _, v in sink.forecasts] == ["fake-1", "fake-1", "fake-2"]
    assert sink.pairs() == [("a", day_iso(1)), ("a", day_iso(2)), ("a", day_iso(3))]


def test_a_submit_cancelled_while_the_batch_before_forecasts_keeps_batch_order() -> None:
    feed = Feed()
    sink = GatedSink()
    proc = processor(sink=sink)

    async def scenario() -> None:
        await proc.submit({P0: feed(sale("a", 0), sale("a", 3))})  # days 0, 1 close
        second = asyncio.ensure_future(proc.submit({P0: feed(sale("a", 4))}))  # day 2
        await asyncio.sleep(0.01)
        second.cancel()  # staged, waiting for the first batch's delivery
        with pytest.raises(asyncio.CancelledError):
            await second
        sink.gate.set()
        await proc.flush()  # the first batch's forecasts, then the second's, then clocks
        assert proc.take_committable() == {P0: 3}

    asyncio.run(scenario())
    assert sink.pairs() == [("a", day_iso(1)), ("a", day_iso(2)), ("a", day_iso(3))]


@pytest.mark.parametrize("gated", [True, False])
def test_a_crash_while_batches_overlap_counts_nothing_twice_on_take_over(gated: bool) -> None:
    """The next owner judges re-delivered events by the stored clock, which lags the cached
    one while forecasts are on their way: the dedupe keys it needs must still be there.

    (The bug this catches: a batch staged while the one before was still delivering forgot
    the keys of buckets that batch had made late, by the cached clock; after a crash, the
    next owner, from the stored clock, counted those events again.)
    """
    feed = Feed()
    store = MemoryWindowStore(FREQ)
    first = {P0: feed(sale("a", 0), sale("a", 0.5), sale("a", 5))}  # day 0, then day 5
    second = {P0: feed(sale("a", 6))}  # staged while the first delivers (gated)
    third = {P0: feed(sale("a", 6.5))}

    async def scenario() -> None:
        sink = GatedSink()
        if not gated:
            sink.gate.set()
        crashed = processor(store=store, sink=sink)
        await crashed.submit(first)
        waiting = asyncio.ensure_future(crashed.submit(second))
        await asyncio.sleep(0.01)
        if not gated:
            await waiting
            await crashed.submit(third)
        # Crash: nothing flushed, nothing committed; the batches in flight are lost.
        waiting.cancel()
        taker = processor(store=store, sink=ListSink())
        committed = crashed.take_committable().get(P0, 0)
        everything = [m for b in (first, second, third) for m in b[P0]]
        await taker.process([m for m in everything if m.offset >= committed])
        await taker.flush()

    asyncio.run(scenario())
    window = asyncio.run(store.read(["a"]))["a"]
    assert {(b - T0) // DAY: s.quantity for b, s in window.buckets.items()} == {0: 2, 5: 1, 6: 2}
