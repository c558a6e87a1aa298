"""Validating a fetched batch ahead of its turn (``SalesProcessor.parse_ahead``).

The worker validates the batch it fetched ahead while the batch before it awaits Redis, and
sums it per item when the partition's clock is loaded. The outcome must be exactly that of
doing both in turn (late and invalid events included), the sums must be redone when the
clock or the model changed since, the results must be used only for the very records they
were made from, and dropped batches must not pile up.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Sequence
from typing import Any

import pytest

import stream.pipeline.ingest as ingest_module
from stream.inference.model_info import ModelInfo
from stream.pipeline.processor import RawMessage, Record
from stream.state.base import PartitionId
from stream.state.memory import MemoryWindowStore
from trendcast.testkit.doubles import FREQ, FakeForecaster, Feed, ListSink, processor, sale

P0, P1 = PartitionId("sales", 0), PartitionId("sales", 1)


def _batch(feed: Feed, first_day: float) -> dict[PartitionId, list[RawMessage]]:
    return {
        P0: feed(
            sale("a", first_day, 2),
            b"\xffnot utf8",
            sale("b", first_day + 0.5, 1, price=2.5, event_id="b-1"),
            b'{"item_id": "a", "quantity": 1}',
            partition=0,
        ),
        P1: feed(sale("c", first_day + 1.2), b"[1, 2]", partition=1),
    }


@pytest.fixture
def parse_calls(monkeypatch: pytest.MonkeyPatch) -> list[bytes | None]:
    """Every message the processor validates, in order."""
    calls: list[bytes | None] = []
    real = ingest_module.parse_events

    def counting(raws: Iterable[bytes | None], **kwargs: Any) -> Any:
        raws = list(raws)
        calls.extend(raws)
        return real(raws, **kwargs)

    monkeypatch.setattr(ingest_module, "parse_events", counting)
    return calls


def _run(batches: Sequence[dict[PartitionId, list[RawMessage]]], *, ahead: bool) -> Any:
    sink, store = ListSink(), MemoryWindowStore(FREQ)
    proc = processor(store=store, sink=sink)

    async def scenario() -> list[Any]:
        stats = []
        for batch in batches:
            if ahead:
                await proc.parse_ahead(batch)
            stats.append(await proc.process_partitions(batch))
        windows = await store.read(["a", "b", "c"])
        return [
            [(s.valid, s.invalid, s.late, s.forecasts) for s in stats],
            [(d["reason"], d["source"]) for d in sink.dead],
            sorted(sink.pairs()),
            {i: w.buckets for i, w in windows.items()},
        ]

    return asyncio.run(scenario())


def test_validating_ahead_gives_exactly_the_outcome_of_validating_in_turn(
    parse_calls: list[bytes | None],
) -> None:
    feed_a, feed_b = Feed(), Feed()
    batches_a = [_batch(feed_a, day) for day in (0, 2, 4)]
    batches_b = [_batch(feed_b, day) for day in (0, 2, 4)]
    in_turn = _run(batches_a, ahead=False)
    calls_in_turn = len(parse_calls)
    ahead = _run(batches_b, ahead=True)
    assert ahead == in_turn
    assert in_turn[1][0][0] == "not_utf8" and in_turn[0][0][1] == 3
    # Each message was validated once either way: ahead, the processor did not do it again.
    assert len(parse_calls) == 2 * calls_in_turn == 2 * 18


def test_results_serve_only_the_records_they_were_made_from(
    parse_calls: list[bytes | None],
) -> None:
    proc = processor()
    feed = Feed()
    fetched = _batch(feed, 0)
    # Equal records in other lists (a fetch read again after a seek back): validated anew.
    again: dict[PartitionId, Sequence[Record]] = {p: list(m) for p, m in fetched.items()}

    async def scenario() -> None:
        await proc.parse_ahead(fetched)
        assert len(parse_calls) == 6
        await proc.process_partitions(again)
        assert len(parse_calls) == 12

    asyncio.run(scenario())


def test_results_of_batches_never_processed_do_not_pile_up(
    parse_calls: list[bytes | None],
) -> None:
    proc = processor()
    feed = Feed()
    dropped, kept_1, kept_2 = _batch(feed, 0), _batch(feed, 2), _batch(feed, 4)

    async def scenario() -> None:
        for batch in (dropped, kept_1, kept_2):  # the first one was dropped at a rebalance
            await proc.parse_ahead(batch)
        assert len(parse_calls) == 18
        await proc.process_partitions(kept_1)  # the last two calls' results are kept...
        await proc.process_partitions(kept_2)
        assert len(parse_calls) == 18
        await proc.process_partitions(dropped)  # ...older ones are gone
        assert len(parse_calls) == 24

    asyncio.run(scenario())


def test_validating_ahead_yields_to_the_batch_in_flight() -> None:
    """Long batches are validated in steps, so a Redis reply is not kept waiting."""
    proc = processor()
    feed = Feed()
    batch = {P0: feed(*(sale("a", i / 10_000) for i in range(2_000)), partition=0)}
    steps = 0

    async def ticker() -> None:
        nonlocal steps
        while True:
            steps += 1
            await asyncio.sleep(0)

    async def scenario() -> None:
        task = asyncio.ensure_future(ticker())
        await asyncio.sleep(0)
        before = steps
        await proc.parse_ahead(batch)
        task.cancel()
        assert steps - before >= 4  # 2,000 messages in steps of 500

    asyncio.run(scenario())


def _mixed(feed: Feed, day: float) -> dict[PartitionId, list[RawMessage]]:
    """Valid, priced, id-less, invalid, in-grace late and too-late events, in one batch."""
    return {
        P0: feed(
            b"{not json",
            # Judged against the clock the batch starts from: late after a jump in time.
            sale("c", day - 6, 1, event_id=f"old-{day}"),
            sale("a", day, 2, event_id=f"a-{day}"),
            sale("b", day + 0.25, 1, price=2.5, event_id=f"b-{day}"),
            sale("a", day - 1.5, 4, event_id=f"late-{day}"),  # in grace, or late
            sale("b", day + 0.5, -1),  # a return, keyed by its offset
            b'{"item_id": "a", "ts": 1, "quantity": 1}',
            partition=0,
        ),
        P1: feed(sale("c", day + 0.75, 3), sale("a", day - 4, 1), partition=1),
    }


@pytest.fixture
def aggregate_calls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Where each batch was summed per item: "ahead" or "in turn"."""
    calls: list[str] = []
    real = ingest_module._aggregate

    def counting(*args: Any, **kwargs: Any) -> Any:
        import inspect

        caller = inspect.stack()[2].function  # through Ingest._aggregate
        calls.append("ahead" if caller == "parse_ahead" else "in turn")
        return real(*args, **kwargs)

    monkeypatch.setattr(ingest_module, "_aggregate", counting)
    return calls


def _run_mixed(
    days: Sequence[float], *, ahead: bool, before: int = 0, swap_at: int | None = None
) -> Any:
    """Process ``_mixed`` batches; with ``ahead``, each is prepared ``before`` batches early
    (0: right before its turn), and the model is swapped before batch ``swap_at``."""
    feed, sink, store = Feed(), ListSink(), MemoryWindowStore(FREQ)
    batches = [_mixed(feed, day) for day in days]
    proc = processor(store=store, sink=sink)

    async def scenario() -> list[Any]:
        stats = []
        for i, batch in enumerate(batches):
            if ahead:
                await proc.parse_ahead(batches[min(i + before, len(batches) - 1)])
            if i == swap_at:
                proc.swap_model(FakeForecaster(), ModelInfo(FREQ, 7, 3, "fake-2"))
            stats.append(await proc.process_partitions(batch))
        windows = await store.read(["a", "b", "c"])
        return [
            [(s.valid, s.invalid, s.late, s.redelivered, s.forecasts) for s in stats],
            [(d["reason"], d["source"], d.get("late_by_ms")) for d in sink.dead],
            sorted(sink.pairs()),
            {i: w.buckets for i, w in windows.items()},
        ]

    return asyncio.run(scenario())


def test_sums_made_ahead_give_exactly_the_outcome_of_summing_in_turn(
    aggregate_calls: list[str],
) -> None:
    days = [0.5, 1.5, 3.25, 4.5, 11.5]
    in_turn = _run_mixed(days, ahead=False)
    assert aggregate_calls == ["in turn"] * 10
    aggregate_calls.clear()
    assert _run_mixed(days, ahead=True) == in_turn
    # The first batch of each partition loads its clock; every later one was summed ahead.
    assert aggregate_calls.count("in turn") == 2
    assert aggregate_calls.count("ahead") == 8
    reasons = {reason for reason, _, _ in in_turn[1]}
    assert reasons == {"not_json", "bad_timestamp", "late"}
    assert any(s[2] for s in in_turn[0])  # late events were judged on the way


@pytest.mark.parametrize(("before", "swap_at"), [(1, None), (0, 2)])
def test_sums_made_ahead_are_redone_when_the_clock_or_the_model_changed(
    aggregate_calls: list[str], before: int, swap_at: int | None
) -> None:
    """Prepared a batch early (its partition's clock moves meanwhile), or across a model
    swap: the sums are made again in turn, and the outcome is still that of in-turn."""
    # A jump in time: the third batch's first sale (P0, offset 15) is late after the second
    # batch, not before it, so sums made before the second batch would count it.
    days = [0.5, 7.5, 8.5, 9.5]
    in_turn = _run_mixed(days, ahead=False)
    assert ("late", {"topic": "sales", "partition": 0, "offset": 15}) in [
        (reason, source) for reason, source, _ in in_turn[1]
    ]
    aggregate_calls.clear()
    assert _run_mixed(days, ahead=True, before=before, swap_at=swap_at) == in_turn
    assert aggregate_calls.count("in turn") > 2
