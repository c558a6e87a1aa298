"""The Redis window store and the worker's batch logic on a real 3-primary Redis Cluster.

The contract tests prove the store on one server; what a cluster adds is routing: each
script's keys must share a slot, the batch pipeline is split per node, the scripts must exist
on every primary, and items must really spread over the nodes. The same batches also run
through an in-memory store, which is the oracle for sums and forecasts.
"""

from __future__ import annotations

import logging
import random
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import orjson
import pytest
import redis
from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster
from redis.cluster import RedisCluster
from redis.crc import key_slot

from stream.inference.model_info import ModelInfo
from stream.pipeline.processor import RawMessage, SalesProcessor
from stream.settings.worker import WorkerSettings
from stream.state.base import (
    BucketDelta,
    ItemUpdate,
    ItemWindow,
    PartitionId,
    PartitionState,
    PartitionUpdate,
    WindowStore,
)
from stream.state.memory import MemoryWindowStore
from stream.state.redis_store import RedisWindowStore, item_keys, partition_keys
from stream.worker.runner import _check_redis, inspect_items
from trendcast.devtools.embedded import free_port
from trendcast.exceptions import ConfigError, StateStoreError
from trendcast.forecasting.base import ForecastBatch, WindowBatch
from trendcast.freq import parse_freq
from trendcast.testkit.stores import run

pytestmark = pytest.mark.integration

T = TypeVar("T")
S = TypeVar("S", bound=WindowStore)

DAY = 86_400_000
FREQ = parse_freq("1D")
BASE = 15_000 * DAY  # 2011-01-26
ODD_IDS = ["a}b", "{x}", "ünïcödé 商品", "with:colon", "x" * 128]
ITEMS = [f"SKU-{n:04d}" for n in range(400)] + ODD_IDS
PARTITIONS = [PartitionId("sales", n) for n in range(4)]


@pytest.fixture
def cluster_prefix(redis_cluster_url: str) -> Iterator[str]:
    """A key prefix unique to the test; its keys are deleted from every node afterwards."""
    prefix = f"tccl-{uuid.uuid4().hex[:12]}"
    yield prefix
    client = RedisCluster.from_url(redis_cluster_url)
    try:
        keys = list(client.scan_iter(match=f"*{prefix}*", count=1000))
        if keys:
            client.delete(*keys)  # redis-py splits a multi-key DEL per slot
    finally:
        client.close()


@pytest.fixture
def cluster_client(redis_cluster_url: str) -> Iterator[RedisCluster]:
    """A synchronous cluster client (bytes responses)."""
    client = RedisCluster.from_url(redis_cluster_url)
    try:
        yield client
    finally:
        client.close()


def _primaries(client: RedisCluster) -> list[tuple[str, int]]:
    """``(host, port)`` of every primary, to look at one node directly."""
    nodes: list[Any] = client.get_primaries()  # type: ignore[no-untyped-call]
    return [(n.host, n.port) for n in nodes]


def _store(url: str, prefix: str) -> RedisWindowStore:
    return RedisWindowStore.from_url(url, FREQ, prefix, cluster=True)


def _batch(seed: int, days: range) -> list[ItemUpdate]:
    """Every item, 1-3 events a day with random quantities (some returns) and prices."""
    rng = random.Random(seed)
    updates = []
    for item in ITEMS:
        deltas = []
        for day in days:
            for n in range(rng.randint(1, 3)):
                qty = float(rng.choice([-1, 1, 2, 3, 0.5]))
                price = rng.choice([0.0, 2.95, 1.25])
                priced = price > 0 and qty > 0
                deltas.append(
                    BucketDelta(
                        BASE + day * DAY,
                        f"{item}/{day}/{n}",
                        qty,
                        price_qty=price * qty if priced else 0.0,
                        priced_qty=qty if priced else 0.0,
                    )
                )
        updates.append(ItemUpdate(item, deltas, BASE, BASE, ttl_ms=3_600_000))
    return updates


def _partition_updates(active_from_ms: int | None = None) -> list[PartitionUpdate]:
    return [
        PartitionUpdate(
            p,
            PartitionState(BASE + 5 * DAY + p.partition, BASE + 2 * DAY),
            last_sale_ms={i: BASE + (n % 6) * DAY for n, i in enumerate(ITEMS) if n % 4 == k},
            active_from_ms=active_from_ms,
        )
        for k, p in enumerate(PARTITIONS)
    ]


def _sums(windows: dict[str, ItemWindow]) -> dict[str, Any]:
    return {
        i: (
            w.first_ms,
            {b: (s.quantity, round(s.price_qty, 6), s.priced_qty) for b, s in w.buckets.items()},
        )
        for i, w in windows.items()
    }


def test_every_script_touches_one_slot_and_items_spread_over_slots() -> None:
    slots = set()
    for item in ITEMS:
        w, d = item_keys("trendcast", item)
        assert key_slot(w.encode()) == key_slot(d.encode()), item
        slots.add(key_slot(w.encode()))
    for p in PARTITIONS:
        s, a = partition_keys("trendcast", p)
        assert key_slot(s.encode()) == key_slot(a.encode()), p
    assert len(slots) > len(ITEMS) * 0.9  # one slot per item, not one slot for everything


def test_batch_over_many_items_sums_like_memory_and_is_idempotent(
    redis_cluster_url: str,
    cluster_prefix: str,
) -> None:
    first, second = _batch(1, range(4)), _batch(2, range(3, 6))

    async def scenario(s: WindowStore) -> list[Any]:
        r1 = await s.apply(first, _partition_updates())
        r2 = await s.apply(second, _partition_updates(active_from_ms=BASE + 4 * DAY))
        again = await s.apply(second, _partition_updates(active_from_ms=BASE + 4 * DAY))
        return [r1, r2, again, await s.read(ITEMS + ["unknown"])]

    cluster = run(_store(redis_cluster_url, cluster_prefix), scenario)
    memory = run(MemoryWindowStore(FREQ), scenario)
    r1, r2, again, windows = cluster
    assert len(r1.changed) == len(ITEMS)
    assert (r1.changed, r2.changed) == (memory[0].changed, memory[1].changed)
    assert r2.active == memory[1].active
    assert sum(map(len, r2.active.values())) > 0
    # Re-applying the same batch changes nothing and counts every event as a duplicate.
    assert (again.changed, again.refused) == ({}, 0)
    assert again.duplicates == sum(len(u.deltas) for u in second)
    assert again.active == r2.active
    assert _sums(windows) == _sums(memory[3])
    assert windows["unknown"].first_ms is None


def test_items_land_on_every_primary(
    redis_cluster_url: str,
    cluster_prefix: str,
    cluster_client: RedisCluster,
) -> None:
    run(_store(redis_cluster_url, cluster_prefix), lambda s: s.apply(_batch(3, range(1)), []))
    primaries = _primaries(cluster_client)
    assert len(primaries) == 3
    per_node = {}
    for host, port in primaries:
        client = redis.Redis(host=host, port=port)
        try:
            per_node[port] = sum(1 for _ in client.scan_iter(f"{cluster_prefix}:*", 1000))
        finally:
            client.close()
    assert sum(per_node.values()) == 2 * len(ITEMS)  # window hash + dedupe zset per item
    # 16384 slots split in 3 ranges: each node gets roughly a third of the items.
    assert all(n > 2 * len(ITEMS) / 6 for n in per_node.values()), per_node


def test_partition_state_only_moves_forward(
    redis_cluster_url: str,
    cluster_prefix: str,
) -> None:
    async def scenario(s: WindowStore) -> list[PartitionState]:
        for p in PARTITIONS:
            await s.save_partition(p, PartitionState(100 + p.partition, 50))
            await s.save_partition(p, PartitionState(90, 60 + p.partition))
        return [await s.load_partition(p) for p in [*PARTITIONS, PartitionId("other", 0)]]

    got = run(_store(redis_cluster_url, cluster_prefix), scenario)
    assert got == [PartitionState(100 + n, 60 + n) for n in range(4)] + [PartitionState()]


def test_scripts_are_reloaded_when_one_primary_lost_them(
    redis_cluster_url: str,
    cluster_prefix: str,
    cluster_client: RedisCluster,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """As after a failover: one node answers NOSCRIPT, the others already applied their part."""
    first, second = _batch(4, range(2)), _batch(5, range(2, 3))

    async def scenario(s: WindowStore) -> dict[str, ItemWindow]:
        await s.apply(first, _partition_updates())
        host, port = _primaries(cluster_client)[1]
        client = redis.Redis(host=host, port=port)
        try:
            client.script_flush()
        finally:
            client.close()
        with caplog.at_level(logging.WARNING, logger="stream.state.redis_store"):
            await s.apply(second, _partition_updates())
        return await s.read(ITEMS)

    got = run(_store(redis_cluster_url, cluster_prefix), scenario)
    expected = run(MemoryWindowStore(FREQ), lambda s: _apply_and_read(s, first, second))
    assert "lost the window scripts" in caplog.text
    assert _sums(got) == _sums(expected)


async def _apply_and_read(s: WindowStore, *batches: list[ItemUpdate]) -> dict[str, ItemWindow]:
    for batch in batches:
        await s.apply(batch, _partition_updates())
    return await s.read(ITEMS)


def test_listpack_check_asks_every_primary(
    redis_cluster_url: str,
    cluster_client: RedisCluster,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The smallest limit of any primary counts: items live on all of them."""
    host, port = _primaries(cluster_client)[2]
    client = redis.Redis(host=host, port=port, decode_responses=True)
    try:
        old = client.config_get("hash-max-listpack-entries").get("hash-max-listpack-entries")
        if old is None:
            pytest.skip("Redis < 7 has no hash-max-listpack-entries (the check is skipped too)")
        client.config_set("hash-max-listpack-entries", 33)
        try:
            with caplog.at_level(logging.WARNING, logger="stream.worker.runner"):
                _check_redis(redis_cluster_url, 30, cluster=True)
                assert "hash-max-listpack-entries" not in caplog.text
                _check_redis(redis_cluster_url, 34, cluster=True)
            assert "hash-max-listpack-entries is 33 but items keep up to 34" in caplog.text
        finally:
            client.config_set("hash-max-listpack-entries", old)
    finally:
        client.close()


def test_inspect_reads_windows_from_the_cluster(
    redis_cluster_url: str,
    cluster_prefix: str,
) -> None:
    run(_store(redis_cluster_url, cluster_prefix), lambda s: s.apply(_batch(6, range(2)), []))
    settings = WorkerSettings(
        redis_url=redis_cluster_url, redis_cluster=True, state_prefix=cluster_prefix
    )
    shown = {w["item_id"]: w for w in inspect_items(settings, ITEMS[:50], freq="1D")}
    assert all(len(w["buckets"]) == 2 for w in shown.values())


def test_unusable_cluster_configuration_fails_with_one_clear_error() -> None:
    nobody = f"redis://127.0.0.1:{free_port()}"
    with pytest.raises(StateStoreError, match="unavailable"):
        _check_redis(nobody, 10, cluster=True)
    with pytest.raises(StateStoreError, match="unavailable"):
        run(_store(nobody, "p"), lambda s: s.ping())
    with pytest.raises(ConfigError, match="expected database 0"):
        _store(nobody + "/3", "p")


# --- the worker's batch logic on the cluster ------------------------------------------------

MODEL = ModelInfo(freq=FREQ, window=7, horizon=3, model_version="fake-1")


class LastValueForecaster:
    """Forecasts the last window value for every step (like
    tests/unit/stream/worker/test_app.py)."""

    name = "last-value"
    horizon = MODEL.horizon

    def predict(self, batch: WindowBatch) -> ForecastBatch:
        last = np.repeat(batch.quantities[:, -1:], self.horizon, axis=1)
        return ForecastBatch(
            mean=last, p10=last * 0.5, p50=last, p90=last * 2, fallback=batch.history_len < 7
        )


class ListSink:
    def __init__(self) -> None:
        self.forecasts: list[tuple[str, str, list[float]]] = []
        self.dead: list[dict[str, Any]] = []

    async def send_forecasts(self, records: Any) -> None:
        for key, value in records:
            v = orjson.loads(value)
            self.forecasts.append((key, v["as_of"], [h["mean"] for h in v["horizon"]]))

    async def send_dead_letters(self, records: Any) -> None:
        self.dead += [orjson.loads(v) for _, v in records]


def _messages() -> list[list[RawMessage]]:
    """Ten days of sales for 60 items on 2 partitions, cut into batches of 50 messages."""
    rng = random.Random(7)
    offsets = [0, 0]
    msgs = []
    for day in range(10):
        for _ in range(60):
            item = f"item-{rng.randrange(60):02d}"
            partition = int(item[-2:]) % 2
            value = {
                "item_id": item,
                "ts": BASE + day * DAY + rng.randrange(DAY),
                "quantity": rng.choice([1, 2, 5]),
                "event_id": f"e-{day}-{offsets[partition]}-{partition}",
            }
            msgs.append(
                RawMessage(
                    "sales", partition, offsets[partition], item.encode(), orjson.dumps(value)
                )
            )
            offsets[partition] += 1
    msgs.append(RawMessage("sales", 0, offsets[0], b"x", b"not json"))
    return [msgs[i : i + 50] for i in range(0, len(msgs), 50)]


def test_processor_on_the_cluster_forecasts_like_on_memory(
    redis_cluster_url: str,
    cluster_prefix: str,
) -> None:
    batches = _messages()

    async def scenario(store: WindowStore) -> tuple[ListSink, dict[str, ItemWindow]]:
        sink = ListSink()
        proc = SalesProcessor(
            store,
            LastValueForecaster(),
            MODEL,
            sink,
            max_future_ms=None,
            allowed_lateness_ms=86_400_000,
        )
        for batch in batches:
            await proc.process(batch)
        forecasts = len(sink.forecasts)
        await proc.process(batches[-3])  # a re-delivered batch changes nothing
        assert len(sink.forecasts) == forecasts
        return sink, await store.read([f"item-{n:02d}" for n in range(60)])

    sink, windows = run(_store(redis_cluster_url, cluster_prefix), scenario)
    oracle, expected = run(MemoryWindowStore(FREQ), scenario)
    assert len(sink.forecasts) > 300
    assert sorted(sink.forecasts) == sorted(oracle.forecasts)
    assert len(sink.dead) == 1
    assert _sums(windows) == _sums(expected)


def test_worker_app_gets_a_cluster_store_from_the_environment(
    redis_cluster_url: str,
    cluster_prefix: str,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    import stream.worker.app
    from stream.worker.runner import build_worker_app

    monkeypatch.setenv("TRENDCAST_REDIS_URL", redis_cluster_url)
    monkeypatch.setenv("TRENDCAST_REDIS_CLUSTER", "true")
    monkeypatch.setenv("TRENDCAST_STATE_PREFIX", cluster_prefix)
    settings = WorkerSettings(web_enabled=False, data_dir=tmp_path)
    assert settings.redis_cluster
    built: dict[str, Any] = {}
    monkeypatch.setattr(
        stream.worker.app, "create_app", lambda *a, **kw: built.setdefault("args", a)
    )
    build_worker_app(settings, LastValueForecaster(), MODEL)
    store = built["args"][2]
    assert isinstance(store, RedisWindowStore)
    assert isinstance(store._client, AsyncRedisCluster)
    assert run(store, lambda s: s.apply(_batch(8, range(1)), [])).duplicates == 0
