"""One trends ranking from two worker runtimes sharing one real Redis.

Each runtime consumes its own partition (disjoint items) and keeps its windows in the same
Redis under the same prefix, as two worker processes do; their trend candidates meet in that
Redis (``stream.state.candidates``), and the one holding the lease publishes the merged
ranking. It must equal the ranking of one runtime that consumed both partitions.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import orjson
import pytest

from stream.monitoring.trends import TRENDS_KEY
from stream.settings.worker import WorkerSettings
from stream.state.candidates import candidate_keys
from stream.state.memory import MemoryWindowStore
from stream.state.redis_store import RedisWindowStore
from stream.worker.app import create_app
from tests.unit.stream.monitoring.test_global_trends import feed, fetches, without_time
from trendcast.testkit.doubles import FREQ, MODEL, FakeForecaster, ListSink

pytestmark = pytest.mark.integration


def runtime(store: Any, tmp_path: Path) -> tuple[Any, list[tuple[bytes | None, bytes]]]:
    published: list[tuple[bytes | None, bytes]] = []
    settings = WorkerSettings(
        web_enabled=False, data_dir=tmp_path, publish_interval_s=0, trends_top_k=4
    )

    async def publish(topic: str, records: Sequence[tuple[bytes | None, bytes]]) -> None:
        if topic == settings.trends_topic:
            published.extend(records)

    app = create_app(settings, FakeForecaster(), store, MODEL, sink=ListSink(), publish=publish)
    return app, published


def test_two_runtimes_on_one_redis_publish_one_ranking_of_all_items(
    redis_url: str, redis_prefix: str, redis_client: Any, tmp_path: Path
) -> None:
    p0 = fetches(12, 0, [f"left-{j}" for j in range(30)], seed=3)
    p1 = fetches(12, 1, [f"right-{j}" for j in range(30)], seed=4)
    first = RedisWindowStore.from_url(redis_url, FREQ, redis_prefix)
    second = RedisWindowStore.from_url(redis_url, FREQ, redis_prefix)
    (a, by_a), (b, by_b) = runtime(first, tmp_path), runtime(second, tmp_path)
    alone, by_alone = runtime(MemoryWindowStore(FREQ), tmp_path)

    async def scenario() -> None:
        try:
            await asyncio.gather(feed(a, p0), feed(b, p1))
            await feed(alone, p0)
            await feed(alone, p1)
            await b.trendcast_publish()  # b leads from now on
            await a.trendcast_publish()
            await b.trendcast_publish()
            await alone.trendcast_publish()
        finally:
            await first.aclose()
            await second.aclose()

    asyncio.run(scenario())
    assert by_a == []
    assert [key for key, _ in by_b] == [TRENDS_KEY, TRENDS_KEY]
    merged = orjson.loads(by_b[-1][1])
    assert (merged["workers"], merged["items_considered"]) == (2, 60)
    assert without_time(by_b[-1][1]) == without_time(by_alone[-1][1])
    sides = {e["item_id"].split("-")[0] for e in merged["rising"] + merged["falling"]}
    assert sides == {"left", "right"}
    candidates, expiry, leader = candidate_keys(redis_prefix)
    assert redis_client.hlen(candidates) == 2
    assert 0 < redis_client.pttl(leader) <= 30_000
    assert redis_client.get(leader).decode().endswith(f":{id(b.trendcast_runtime):x}")
