"""What makes the Redis window store cheap, checked against what it must keep doing.

* The asyncio clients pack commands with hiredis (:mod:`stream.state.redis_clients`): the bytes
  must be exactly redis-py's, for every connection class a URL can select.
* The item script skips trimming while its markers say nothing is old enough, reads and
  writes all of an item's buckets and keys in one call each, and must still behave exactly
  like the in-memory store, also on data written before the markers existed (a rolling
  upgrade) and when an older worker removes them.
* ``read`` shares parsed bucket sums between windows.
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterator
from typing import Any, TypeVar

import pytest
import redis
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster
from redis.asyncio.connection import Connection, SSLConnection, UnixDomainSocketConnection
from redis.exceptions import DataError

import stream.state.redis_store as redis_store
from stream.state.base import BucketDelta, ItemUpdate, WindowStore
from stream.state.memory import MemoryWindowStore
from stream.state.redis_clients import _hiredis_class, _HiredisPacking, async_client
from stream.state.redis_store import RedisWindowStore, item_keys
from trendcast.freq import parse_freq
from trendcast.testkit.stores import run

T = TypeVar("T")
DAY = 86_400_000
FREQ = parse_freq("1D")
BASE = 15_000 * DAY
W_LOW, D_LOW = b"\x1e", b"\x1f"

ARGS: list[tuple[Any, ...]] = [
    ("PING",),
    ("SCRIPT LOAD", "return 1"),
    (b"CONFIG GET", b"maxmemory"),
    (
        "EVALSHA",
        "abc",
        2,
        "k:{x}:w",
        "k:{x}:d",
        1,
        -3,
        2.95,
        0.1 + 0.2,
        1e300,
        "ünï 商品",
        b"\x00\xff",
    ),
    ("SET", "k", bytearray(b"ba"), memoryview(b"mv")),
    ("ZADD", "z", 3, "a" * 10_000, 7, "b"),
]


@pytest.mark.parametrize("base", [Connection, SSLConnection, UnixDomainSocketConnection])
def test_hiredis_packing_sends_the_same_bytes(base: type[Connection]) -> None:
    fast_class = _hiredis_class(base)
    assert issubclass(fast_class, base)
    assert _hiredis_class(base) is fast_class  # one class per base
    assert _hiredis_class(fast_class) is fast_class
    plain, fast = base(), fast_class()
    for args in ARGS:
        assert b"".join(fast.pack_command(*args)) == b"".join(plain.pack_command(*args)), args
    assert b"".join(fast.pack_commands(ARGS)) == b"".join(plain.pack_commands(ARGS))
    for bad in (None, True, object()):
        with pytest.raises(DataError):
            plain.pack_command("SET", "k", bad)
        with pytest.raises(DataError):
            fast.pack_command("SET", "k", bad)


def test_hiredis_packing_keeps_other_encodings_to_redis_py() -> None:
    plain = Connection(encoding="latin-1")
    fast = _hiredis_class(Connection)(encoding="latin-1")
    assert fast.pack_command("SET", "k", "ü") == plain.pack_command("SET", "k", "ü")
    assert b"\xfc" in b"".join(fast.pack_command("SET", "k", "ü"))


@pytest.mark.parametrize(
    ("url", "base"),
    [
        ("redis://127.0.0.1:1/0", Connection),
        ("rediss://127.0.0.1:1/0", SSLConnection),
        ("unix:///tmp/none.sock", UnixDomainSocketConnection),
    ],
)
def test_async_clients_pack_with_hiredis(url: str, base: type[Connection]) -> None:
    client = async_client(url)
    assert isinstance(client, aioredis.Redis)
    pool_class = client.connection_pool.connection_class
    assert issubclass(pool_class, _HiredisPacking)
    assert issubclass(pool_class, base)


@pytest.mark.parametrize(("url", "base"), [("redis://", Connection), ("rediss://", SSLConnection)])
def test_async_cluster_clients_pack_with_hiredis(url: str, base: type[Connection]) -> None:
    client = async_client(f"{url}127.0.0.1:1", cluster=True)
    assert isinstance(client, AsyncRedisCluster)
    # Nodes discovered later are built from the shared keywords, the seed nodes already were.
    shared = client.get_connection_kwargs()["connection_class"]
    assert issubclass(shared, _HiredisPacking)
    assert issubclass(shared, base)
    assert all(node.connection_class is shared for node in client.startup_nodes)


@pytest.fixture
def store(redis_url: str, redis_prefix: str) -> Iterator[RedisWindowStore]:
    yield RedisWindowStore.from_url(redis_url, FREQ, redis_prefix)


def upd(
    item: str,
    *deltas: tuple[int, str, float],
    keep_from: int = 0,
    dedupe_from: int = 0,
    ttl_ms: int = 3_600_000,
) -> ItemUpdate:
    return ItemUpdate(
        item,
        [BucketDelta(BASE + day * DAY, key, q) for day, key, q in deltas],
        keep_from_ms=BASE + keep_from * DAY,
        dedupe_from_ms=BASE + dedupe_from * DAY,
        ttl_ms=ttl_ms,
    )


def days(window: Any) -> dict[int, float]:
    return {(b - BASE) // DAY: s.quantity for b, s in window.buckets.items()}


def markers(client: redis.Redis, store: RedisWindowStore, item: str) -> tuple[Any, Any]:
    d = item_keys(store._prefix, item)[1]
    w_low, d_low = client.zmscore(d, [W_LOW, D_LOW])
    origin = (BASE - FREQ.origin_ms) // FREQ.step_ms
    return (
        None if w_low is None else int(w_low) - origin,
        None if d_low is None else int(d_low) - origin,
    )


def test_markers_follow_trimming(store: RedisWindowStore, redis_client: redis.Redis) -> None:
    async def scenario(s: WindowStore) -> None:
        await s.apply([upd("a", (3, "e3", 1), (5, "e5", 1), (9, "e9", 1))], [])
        assert markers(redis_client, store, "a") == (3, 0)
        # A late event creates a bucket below the lowest: the marker follows it down.
        await s.apply([upd("a", (2, "e2", 1), keep_from=1, dedupe_from=1)], [])
        assert markers(redis_client, store, "a") == (2, 1)
        # keep_from passes the marker: trimmed, and the marker is the lowest bucket left.
        await s.apply([upd("a", (9, "e9b", 1), keep_from=4, dedupe_from=6)], [])
        assert days((await s.read(["a"]))["a"]) == {5: 1.0, 9: 2.0}
        assert markers(redis_client, store, "a") == (5, 6)
        dedupe = redis_client.zrange(item_keys(store._prefix, "a")[1], 0, -1)
        assert [k for k in dedupe if k not in (W_LOW, D_LOW)] == [b"e9", b"e9b"]
        # Nothing below the markers: no trim, and nothing else changes either.
        result = await s.apply([upd("a", (9, "e9", 1), keep_from=5, dedupe_from=6)], [])
        assert (result.duplicates, result.changed) == (1, {})
        assert days((await s.read(["a"]))["a"]) == {5: 1.0, 9: 2.0}
        await s.apply([upd("a", keep_from=9, dedupe_from=9)], [])
        assert days((await s.read(["a"]))["a"]) == {9: 2.0}
        assert markers(redis_client, store, "a") == (9, 9)
        assert (await s.read(["a"]))["a"].first_ms == BASE + 2 * DAY

    run(store, scenario)


def test_data_without_markers_is_trimmed_and_deduped(
    store: RedisWindowStore, redis_client: redis.Redis
) -> None:
    """A rolling upgrade: the keys of an older version (no markers) work as before, and a
    zset whose markers an older worker's trim removed is trimmed the full way again."""
    w, d = item_keys(store._prefix, "old")
    origin = (BASE - FREQ.origin_ms) // FREQ.step_ms
    redis_client.hset(
        w, mapping={"f": origin + 1, origin + 1: "2", origin + 4: "3,6", origin + 8: "1"}
    )
    redis_client.zadd(d, {"k1": origin + 1, "k4": origin + 4, "k8": origin + 8})

    async def scenario(s: WindowStore) -> None:
        result = await s.apply(
            [upd("old", (8, "k8", 5), (8, "k8b", 5), keep_from=3, dedupe_from=4)], []
        )
        assert (result.duplicates, result.changed) == (1, {"old": [BASE + 8 * DAY]})
        got = (await s.read(["old"]))["old"]
        assert days(got) == {4: 3.0, 8: 6.0}
        assert got.buckets[BASE + 4 * DAY].price == 2.0
        assert got.first_ms == BASE + DAY
        assert redis_client.zrange(d, 0, -1) == [W_LOW, D_LOW, b"k4", b"k8", b"k8b"]
        assert markers(redis_client, store, "old") == (4, 4)
        # An older worker trims the dedupe keys (and with them the markers below its bound)
        # and adds a bucket below the window's lowest.
        redis_client.zremrangebyscore(d, "-inf", f"({origin + 5}")
        redis_client.hset(w, str(origin + 3), "7")
        await s.apply([upd("old", (9, "k9", 1), keep_from=5, dedupe_from=6)], [])
        assert days((await s.read(["old"]))["old"]) == {8: 6.0, 9: 1.0}
        assert markers(redis_client, store, "old") == (8, 6)

    run(store, scenario)


def test_no_keys_for_an_update_without_events(
    store: RedisWindowStore, redis_client: redis.Redis
) -> None:
    async def scenario(s: WindowStore) -> None:
        result = await s.apply([upd("none", (1, "late", 1), keep_from=2, dedupe_from=3)], [])
        assert (result.refused, result.changed) == (1, {})

    run(store, scenario)
    assert redis_client.exists(*item_keys(store._prefix, "none")) == 0


def test_more_keys_than_one_call_takes(store: RedisWindowStore) -> None:
    """ZMSCORE, ZADD and HMGET take at most 1000 keys (or fields) per call."""
    n = 2_500
    many = [(day % 3, f"k{day}", 1.0) for day in range(n)]
    spread = [(day, f"s{day}", 1.0) for day in range(1_200)]

    async def scenario(s: WindowStore) -> None:
        result = await s.apply([upd("sum", *many), upd("wide", *spread)], [])
        assert result.duplicates == 0
        # A key twice in the batch: the events path, again over more than 1000 keys.
        again = await s.apply([upd("sum", *many, (1, "new", 1.0), (1, "new", 1.0))], [])
        assert (again.duplicates, again.changed) == (n + 1, {"sum": [BASE + DAY]})
        got = await s.read(["sum", "wide"])
        assert days(got["sum"]) == {0: 834.0, 1: 834.0, 2: 833.0}
        assert days(got["wide"]) == {day: 1.0 for day in range(1_200)}
        assert list(got["wide"].buckets) == sorted(got["wide"].buckets)

    run(store, scenario)


def test_read_shares_parsed_sums_and_sorts_buckets(
    store: RedisWindowStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(redis_store, "_SUMS_CACHED", 2)

    async def scenario(s: WindowStore) -> None:
        # Day 1 arrives after day 5: the hash lists it last.
        await s.apply([upd("a", (5, "a5", 2)), upd("b", (5, "b5", 2), (6, "b6", 3))], [])
        await s.apply([upd("a", (1, "a1", 4), (7, "a7", 3))], [])
        got = await s.read(["a", "b"])
        assert list(got["a"].buckets) == [BASE + DAY, BASE + 5 * DAY, BASE + 7 * DAY]
        assert days(got["a"]) == {1: 4.0, 5: 2.0, 7: 3.0}
        assert days(got["b"]) == {5: 2.0, 6: 3.0}
        assert len(store._sums) <= 2

    run(store, scenario)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_random_batches_match_the_memory_store(store: RedisWindowStore, seed: int) -> None:
    """Re-deliveries, keys twice in a batch, late and refused events, bounds that move (and
    differ between the items of a batch), buckets that interleave, keys with the separators
    Lua splits on: every result and window as in memory. (Quantities are exact in binary:
    Redis adds a batch's sum to the stored one, memory each event in turn, and with other
    numbers the last bit may differ.)"""
    rng = random.Random(seed)
    items = [f"i{n}" for n in range(30)]
    sent: list[tuple[int, str, float]] = []
    batches = []
    for day in range(12):
        for _ in range(2):
            updates = []
            for item in rng.sample(items, 12):
                deltas = []
                for _ in range(rng.randint(1, 6)):
                    roll = rng.random()
                    if roll < 0.15 and sent:
                        deltas.append(rng.choice(sent))  # re-delivered
                    elif roll < 0.2 and deltas:
                        deltas.append(deltas[-1])  # twice in the batch
                    else:
                        key = f"{item}/{len(sent)}" + ("\x1e" if rng.random() < 0.1 else "")
                        event = (
                            max(0, day - rng.choice([0, 0, 0, 1, 3, 6])),
                            key,
                            rng.choice([1.0, 2.0, -1.0, 0.5, 0.25, 0.125]),
                        )
                        sent.append(event)
                        deltas.append(event)
                lag = rng.choice([0, 0, 1])
                updates.append(
                    upd(
                        item,
                        *deltas,
                        keep_from=max(0, day - 5 - lag),
                        dedupe_from=max(0, day - 2 - lag),
                    )
                )
            batches.append(updates)

    async def both(s: WindowStore) -> list[Any]:
        out = []
        for updates in batches:
            r = await s.apply(updates, [])
            out.append((r.changed, r.duplicates, r.refused))
            out.append({i: (w.first_ms, days(w)) for i, w in (await s.read(items)).items()})
        return out

    expected = run(MemoryWindowStore(FREQ), both)
    assert sum(r[1] for r in expected[::2]) > 0  # the scenario has duplicates...
    assert sum(r[2] for r in expected[::2]) > 0  # ... and refused events
    assert run(store, both) == expected


def _many(n: int, day: int = 1) -> list[ItemUpdate]:
    return [upd(f"m{i:04d}", (day, f"m{i}-{day}", 1.0)) for i in range(n)]


def test_a_batch_is_written_call_by_call_while_the_next_calls_are_built(
    store: RedisWindowStore, redis_client: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Redis runs the first multi-item call while the worker still builds the later ones."""
    items = _many(2 * redis_store._ITEMS_PER_CALL + 50)  # three calls
    first_key = item_keys(store._prefix, items[0].item_id)[0]
    seen_early: list[bool] = []
    real = RedisWindowStore._item_args

    def watching(self: RedisWindowStore, u: ItemUpdate, *, summed: bool) -> Any:
        if u is items[-1]:  # building the last call: the first one was sent and ran
            deadline = time.monotonic() + 5
            while not redis_client.exists(first_key) and time.monotonic() < deadline:
                time.sleep(0.005)
            seen_early.append(bool(redis_client.exists(first_key)))
        return real(self, u, summed=summed)

    monkeypatch.setattr(RedisWindowStore, "_item_args", watching)

    async def scenario(st: RedisWindowStore) -> None:
        result = await st.apply(items, [])
        assert len(result.changed) == len(items)
        pool = st._client.connection_pool  # type: ignore[union-attr]
        assert not pool._in_use_connections  # handed back

    run(store, scenario)
    assert seen_early == [True]


def test_a_failure_while_writing_leaves_nothing_unread_on_a_pooled_connection(
    store: RedisWindowStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    items = _many(redis_store._ITEMS_PER_CALL + 10)
    real = RedisWindowStore._item_args
    fail = [True]

    def failing(self: RedisWindowStore, u: ItemUpdate, *, summed: bool) -> Any:
        if u is items[-1] and fail[0]:
            fail[0] = False
            raise RuntimeError("boom while building the second call")
        return real(self, u, summed=summed)

    monkeypatch.setattr(RedisWindowStore, "_item_args", failing)

    async def scenario(st: RedisWindowStore) -> None:
        with pytest.raises(RuntimeError, match="boom"):
            await st.apply(items, [])
        # The first call was sent (and applied); its reply was never read. The retry gets
        # a clean connection, re-applies idempotently and reads its own replies.
        result = await st.apply(items, [])
        assert (result.duplicates, len(result.changed)) == (200, len(items) - 200)
        windows = await st.read([u.item_id for u in items])
        assert {days(w)[1] for w in windows.values()} == {1.0}

    run(store, scenario)


def test_reads_reload_lost_scripts(store: RedisWindowStore, redis_client: redis.Redis) -> None:
    async def scenario(st: RedisWindowStore) -> None:
        await st.apply([upd("a", (1, "e1", 2.0))], [])
        redis_client.script_flush()
        assert days((await st.read(["a"]))["a"]) == {1: 2.0}

    run(store, scenario)


def _summed_args_one_by_one(u: ItemUpdate) -> list[Any]:
    """The summed arguments, added up event by event in a Python loop (the reference)."""
    sums: dict[int, list[Any]] = {}
    for d in u.deltas:
        acc = sums.get(d.bucket_ms)
        if acc is None:
            sums[d.bucket_ms] = [d.quantity, d.price_qty, d.priced_qty, [d.dedupe_key]]
        else:
            acc[0] += d.quantity
            acc[1] += d.price_qty
            acc[2] += d.priced_qty
            acc[3].append(d.dedupe_key)
    blocks, keys = ["s"], []
    for bucket, (q, pq, pn, bucket_keys) in sums.items():
        idx = (bucket - FREQ.origin_ms) // FREQ.step_ms
        blocks.append(f"{idx},{float(q)!r},{float(pq)!r},{float(pn)!r},{len(bucket_keys)};")
        keys += bucket_keys
    return ["".join(blocks), *keys]


@pytest.mark.parametrize("seed", range(5))
def test_summed_arguments_add_up_in_offset_order_exactly(seed: int) -> None:
    """The sums sent for a batch are those of adding its events one by one, to the last bit
    (sums in C, per run of a bucket), with buckets that interleave and the keys in order."""
    rng = random.Random(seed)
    store = RedisWindowStore(None, FREQ, "p")  # type: ignore[arg-type]  # no I/O here
    for n in (1, 2, 7, 40):
        deltas = []
        for i in range(n):
            q = rng.choice([0.1, 0.7, 1e-3, 3.0, -0.2, -0.0, 2.5e7])
            price = rng.choice([0.0, 0.35, 1.1])
            bucket = BASE + DAY * rng.choice([0, 0, 0, 1, 1, 2])
            deltas.append(BucketDelta(bucket, f"k{i}", q, price * q, q if price else 0.0))
        u = ItemUpdate("a", deltas, keep_from_ms=0, dedupe_from_ms=0, ttl_ms=1)
        assert store._item_args(u, summed=True) == (_summed_args_one_by_one(u), 0)
