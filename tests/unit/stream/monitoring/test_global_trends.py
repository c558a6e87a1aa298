"""One trends ranking for all workers: candidates, their merge, the lease, the runtime.

The per-item figures are tested in ``test_trends.py``; here several trackers (workers) share
an in-memory candidate store, and the merged ranking must equal the ranking one tracker
holding every item makes. The same over a real Redis with two worker runtimes:
``tests/integration/test_global_trends.py``.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiokafka.structs import ConsumerRecord
from faust.types import TP

from stream.monitoring.trends import TRENDS_KEY, GlobalTrends, TrendTracker, merge_candidates
from stream.settings.worker import WorkerSettings
from stream.state.candidates import MemoryCandidateStore
from stream.state.memory import MemoryWindowStore
from stream.worker.app import create_app
from tests.unit.stream.monitoring.test_trends import DAY, model, scored
from trendcast import contract
from trendcast.testkit.doubles import FREQ, MODEL, FakeForecaster, ListSink, sale


def rows(n: int, seed: int) -> list[tuple[str, float, float]]:
    """(item, sold per bucket, forecast per bucket) with ties and both directions."""
    rng = random.Random(seed)
    return [(f"i{j:03d}", rng.randint(0, 6), rng.randint(0, 6)) for j in range(n)]


def without_time(record: bytes | None) -> dict[str, Any]:
    assert record is not None
    contract.validate("trends", record)
    value: dict[str, Any] = orjson.loads(record)
    value.pop("emitted_at_ms")
    value.pop("workers")
    return value


@pytest.mark.parametrize("k", [1, 3, 50])
def test_merged_candidates_rank_like_one_tracker_over_all_items(k: int) -> None:
    items = rows(90, seed=k)
    whole = TrendTracker()
    whole.on_forecasts(scored(model(), items))
    parts = [TrendTracker() for _ in range(3)]
    for j, row in enumerate(items):
        parts[j % 3].on_forecasts(scored(model(), [row]))
    own = [p.candidates(k, now_ms=5) for p in parts]
    merged = merge_candidates([c for c in own if c is not None], k, now_ms=7)
    assert without_time(merged) == without_time(whole.snapshot(k, now_ms=7))
    assert orjson.loads(merged or b"")["workers"] == 3


def test_an_item_on_two_workers_counts_once_with_its_newest_forecast() -> None:
    old_owner, new_owner = TrendTracker(), TrendTracker()
    old_owner.on_forecasts(scored(model(), [("moved", 1.0, 5.0), ("a", 1.0, 2.0)]))
    new_owner.on_forecasts(scored(model(), [("moved", 5.0, 1.0)], last_start_ms=21 * DAY))
    own = [t.candidates(5, now_ms=1) for t in (old_owner, new_owner)]
    value = orjson.loads(merge_candidates([c for c in own if c is not None], 5, now_ms=2) or b"")
    assert [e["item_id"] for e in value["rising"]] == ["a"]
    assert [(e["item_id"], e["as_of"]) for e in value["falling"]] == [
        ("moved", "1970-01-23T00:00:00Z")
    ]
    assert "rank" not in value["falling"][0]


def test_candidates_of_another_frequency_wait_until_replaced() -> None:
    daily, hourly = TrendTracker(), TrendTracker()
    daily.on_forecasts(scored(model(), [("d", 1.0, 2.0)]))
    hourly.on_forecasts(scored(model("1h", window=24, horizon=24), [("h", 1.0, 2.0)]))
    old = daily.candidates(5, now_ms=1)
    new = hourly.candidates(5, now_ms=2)
    assert old is not None and new is not None
    value = orjson.loads(merge_candidates([old, new], 5, now_ms=3) or b"")
    assert (value["freq"], value["workers"], [e["item_id"] for e in value["rising"]]) == (
        "1h",
        1,
        ["h"],
    )
    assert merge_candidates([], 5, now_ms=3) is None
    assert merge_candidates([b"not json", old], 5, now_ms=3) is not None


def test_after_a_handover_items_not_forecast_at_the_next_close_are_dropped() -> None:
    tracker = TrendTracker()
    tracker.on_forecasts(scored(model(), [("kept", 1.0, 2.0), ("gone", 1.0, 3.0)]))
    tracker.handover()
    value = orjson.loads(tracker.candidates(5, now_ms=1) or b"")
    assert {e["item_id"] for e in value["rising"]} == {"kept", "gone"}  # still the latest
    tracker.on_forecasts(scored(model(), [("kept", 1.0, 2.0)], last_start_ms=21 * DAY))
    value = orjson.loads(tracker.candidates(5, now_ms=2) or b"")
    assert [e["item_id"] for e in value["rising"]] == ["kept"]
    assert value["items_considered"] == 1
    # Without a handover, an item not forecast at a close stays (it may be quiet for a while).
    tracker.on_forecasts(scored(model(), [("new", 1.0, 2.0)], last_start_ms=22 * DAY))
    value = orjson.loads(tracker.candidates(5, now_ms=3) or b"")
    assert {e["item_id"] for e in value["rising"]} == {"kept", "new"}


class Clock:
    def __init__(self) -> None:
        self.now_ms = 0

    def __call__(self) -> int:
        return self.now_ms


def test_one_worker_leads_and_a_dead_one_is_replaced_and_forgotten() -> None:
    clock = Clock()
    store = MemoryCandidateStore(clock_ms=clock)
    trackers = [TrendTracker(), TrendTracker()]
    trackers[0].on_forecasts(scored(model(), [("a", 1.0, 4.0)]))
    trackers[1].on_forecasts(scored(model(), [("b", 1.0, 2.0), ("c", 2.0, 1.0)]))
    a, b = (
        GlobalTrends(t, store, worker=f"w{i}", top_k=5, ttl_ms=30_000)
        for i, t in enumerate(trackers)
    )

    async def scenario() -> list[bytes | None]:
        out = [await a.publish(1), await b.publish(2), await a.publish(3)]
        clock.now_ms = 31_000  # a died: its lease and candidates expire
        out.append(await b.publish(4))
        return out

    first, by_b, merged, after = asyncio.run(scenario())
    assert by_b is None
    assert orjson.loads(first or b"")["workers"] == 1
    value = orjson.loads(merged or b"")
    assert (value["workers"], value["items_considered"]) == (2, 3)
    assert [e["item_id"] for e in value["rising"]] == ["a", "b"]
    value = orjson.loads(after or b"")
    assert (value["workers"], [e["item_id"] for e in value["rising"]]) == (1, ["b"])


def test_a_lost_partition_hands_its_items_over() -> None:
    tracker = TrendTracker()
    tracker.on_forecasts(scored(model(), [("mine", 1.0, 2.0), ("moved", 1.0, 3.0)]))
    trends = GlobalTrends(tracker, MemoryCandidateStore(), worker="w", top_k=5, ttl_ms=1_000)

    async def scenario() -> bytes | None:
        await trends.publish(1, frozenset({0, 1}))
        await trends.publish(2, frozenset({0, 1, 2}))  # gained one: nothing to hand over
        await trends.publish(3, frozenset({0}))
        tracker.on_forecasts(scored(model(), [("mine", 1.0, 2.0)], last_start_ms=21 * DAY))
        return await trends.publish(4, frozenset({0}))

    value = orjson.loads(asyncio.run(scenario()) or b"")
    assert [e["item_id"] for e in value["rising"]] == ["mine"]


def fetches(days: int, partition: int, items: Sequence[str], seed: int) -> list[ConsumerRecord]:
    rng = random.Random(seed)
    values = [sale(item, day + 0.5, rng.randint(1, 9)) for day in range(days) for item in items]
    return [
        ConsumerRecord("sales", partition, offset, 0, 0, b"k", value, None, 1, len(value), ())
        for offset, value in enumerate(values)
    ]


def worker(
    store: MemoryWindowStore, tmp_path: Path
) -> tuple[Any, list[tuple[bytes | None, bytes]]]:
    published: list[tuple[bytes | None, bytes]] = []
    settings = WorkerSettings(
        web_enabled=False, data_dir=tmp_path, publish_interval_s=0, trends_top_k=3
    )

    async def publish(topic: str, records: Sequence[tuple[bytes | None, bytes]]) -> None:
        if topic == settings.trends_topic:
            published.extend(records)

    app = create_app(settings, FakeForecaster(), store, MODEL, sink=ListSink(), publish=publish)
    return app, published


async def feed(app: Any, records: list[ConsumerRecord]) -> None:
    for start in range(0, len(records), 16):
        tp = TP("sales", records[start].partition)
        assert await app.trendcast_handle_fetch({tp: records[start : start + 16]}) is not None


def test_two_workers_publish_one_ranking_of_all_their_items(tmp_path: Path) -> None:
    """Two runtimes sharing window state: one record, keyed global, equal to one worker's."""
    left = [f"L{j}" for j in range(12)]
    right = [f"R{j}" for j in range(12)]
    p0, p1 = fetches(10, 0, left, seed=1), fetches(10, 1, right, seed=2)
    shared = MemoryWindowStore(FREQ)
    (a, by_a), (b, by_b) = worker(shared, tmp_path), worker(shared, tmp_path)
    alone, by_alone = worker(MemoryWindowStore(FREQ), tmp_path)

    async def scenario() -> None:
        await feed(a, p0)
        await feed(b, p1)
        await feed(alone, p0)
        await feed(alone, p1)
        for app in (a, b, a, alone):
            await app.trendcast_publish()

    asyncio.run(scenario())
    assert by_b == []  # a leads
    assert [key for key, _ in by_a] == [TRENDS_KEY, TRENDS_KEY]
    merged = orjson.loads(by_a[-1][1])
    assert merged["workers"] == 2 and merged["items_considered"] == 24
    assert len(merged["rising"]) == len(merged["falling"]) == 3
    assert without_time(by_a[-1][1]) == without_time(by_alone[-1][1])
