"""One contract, two window stores: the in-memory one and Redis (a real server).

Every test runs against both (``store`` is parametrized indirectly, quix-streams style); the
Redis ones use the session Redis of :mod:`tests.services` and a unique key prefix.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import orjson
import pytest

from stream.state.base import (
    BucketDelta,
    ItemUpdate,
    LatestForecast,
    PartitionId,
    PartitionState,
    PartitionUpdate,
    WindowStore,
)
from stream.state.memory import MemoryWindowStore
from stream.state.redis_store import RedisWindowStore, item_keys, latest_key, partition_keys
from trendcast import contract
from trendcast.freq import parse_freq
from trendcast.testkit.stores import run

DAY = 86_400_000
FREQ = parse_freq("1D")
P0 = PartitionId("sales", 0)
P1 = PartitionId("sales", 1)
BASE = 15_000 * DAY  # 2011-01-26


@pytest.fixture
def store(request: pytest.FixtureRequest) -> Iterator[WindowStore]:
    if request.param == "memory":
        yield MemoryWindowStore(FREQ)
    else:
        url = request.getfixturevalue("redis_url")
        prefix = request.getfixturevalue("redis_prefix")
        yield RedisWindowStore.from_url(url, FREQ, prefix)


both = pytest.mark.parametrize("store", ["memory", "redis"], indirect=True)


def upd(
    item: str,
    *deltas: tuple[int, str, float],
    keep_from: int = 0,
    dedupe_from: int = 0,
    price: float | None = None,
) -> ItemUpdate:
    return ItemUpdate(
        item,
        [
            BucketDelta(
                BASE + day * DAY,
                key,
                q,
                price_qty=(price or 0.0) * q,
                priced_qty=q if price else 0.0,
            )
            for day, key, q in deltas
        ],
        keep_from_ms=BASE + keep_from * DAY,
        dedupe_from_ms=BASE + dedupe_from * DAY,
        ttl_ms=3_600_000,
    )


def quantities(window: Any) -> dict[int, float]:
    return {(b - BASE) // DAY: s.quantity for b, s in window.buckets.items()}


@both
def test_apply_sums_events_into_buckets(store: WindowStore) -> None:
    async def scenario(s: WindowStore) -> None:
        result = await s.apply(
            [upd("a", (1, "e1", 2), (1, "e2", 3.5), (3, "e3", -1)), upd("b", (2, "e4", 1))], []
        )
        assert result.changed == {"a": [BASE + DAY, BASE + 3 * DAY], "b": [BASE + 2 * DAY]}
        assert (result.duplicates, result.refused) == (0, 0)
        got = await s.read(["a", "b", "unknown"])
        assert quantities(got["a"]) == {1: 5.5, 3: -1.0}
        assert got["a"].first_ms == BASE + DAY
        assert quantities(got["b"]) == {2: 1.0}
        assert got["unknown"].first_ms is None
        assert got["unknown"].buckets == {}

    run(store, scenario)


@both
def test_float_sums_are_exact_doubles(store: WindowStore) -> None:
    async def scenario(s: WindowStore) -> None:
        await s.apply([upd("a", (0, "x", 0.1), (0, "y", 0.2), (0, "z", 1e-7))], [])
        await s.apply([upd("b", (0, "x", 9), price=2.95), upd("b", (0, "y", 1 / 3))], [])
        got = await s.read(["a", "b"])
        assert got["a"].buckets[BASE].quantity == 0.1 + 0.2 + 1e-7
        assert got["b"].buckets[BASE].price_qty == pytest.approx(2.95 * 9, rel=1e-12)
        assert got["b"].buckets[BASE].quantity == 9 + 1 / 3

    run(store, scenario)


@both
def test_redelivered_events_are_not_counted_twice(store: WindowStore) -> None:
    async def scenario(s: WindowStore) -> None:
        batch = [upd("a", (1, "e1", 2), (1, "e1", 2), (2, "e2", 1))]
        first = await s.apply(batch, [])
        assert first.duplicates == 1
        again = await s.apply(batch, [])
        assert (again.duplicates, again.changed) == (3, {})
        got = await s.read(["a"])
        assert quantities(got["a"]) == {1: 2.0, 2: 1.0}

    run(store, scenario)


@both
def test_dedupe_keys_are_per_item(store: WindowStore) -> None:
    async def scenario(s: WindowStore) -> None:
        await s.apply([upd("a", (1, "same", 1)), upd("b", (1, "same", 1))], [])
        got = await s.read(["a", "b"])
        assert quantities(got["a"]) == quantities(got["b"]) == {1: 1.0}

    run(store, scenario)


@both
def test_retention_trims_old_buckets_and_forgets_old_dedupe_keys(store: WindowStore) -> None:
    async def scenario(s: WindowStore) -> None:
        await s.apply([upd("a", (0, "e0", 1), (5, "e5", 1), (9, "e9", 1))], [])
        await s.apply([upd("a", (10, "e10", 1), keep_from=5, dedupe_from=9)], [])
        got = await s.read(["a"])
        assert quantities(got["a"]) == {5: 1.0, 9: 1.0, 10: 1.0}
        assert got["a"].first_ms == BASE  # history length survives trimming
        # Buckets before dedupe_from are refused (their keys were forgotten)...
        refused = await s.apply([upd("a", (5, "e5", 1), keep_from=5, dedupe_from=9)], [])
        assert (refused.refused, refused.duplicates, refused.changed) == (1, 0, {})
        # ... while keys at or after it are still remembered.
        dup = await s.apply([upd("a", (9, "e9", 1), keep_from=5, dedupe_from=9)], [])
        assert dup.duplicates == 1
        assert quantities((await s.read(["a"]))["a"]) == {5: 1.0, 9: 1.0, 10: 1.0}

    run(store, scenario)


@both
def test_prices_are_quantity_weighted(store: WindowStore) -> None:
    async def scenario(s: WindowStore) -> None:
        await s.apply(
            [
                upd("a", (1, "e1", 1), price=2.0),
                upd("a", (1, "e2", 3), price=4.0),
                upd("a", (2, "e3", 1)),
            ],
            [],
        )
        got = (await s.read(["a"]))["a"]
        assert got.buckets[BASE + DAY].price == pytest.approx((2.0 + 12.0) / 4)
        assert got.buckets[BASE + DAY].quantity == 4.0
        assert got.buckets[BASE + 2 * DAY].price != got.buckets[BASE + 2 * DAY].price  # NaN

    run(store, scenario)


@both
def test_price_sums_survive_mixed_updates(store: WindowStore) -> None:
    async def scenario(s: WindowStore) -> None:
        # priced == quantity, then a return (unpriced), then priced again.
        await s.apply([upd("a", (1, "e1", 2), price=1.5)], [])
        await s.apply([upd("a", (1, "e2", -1))], [])
        await s.apply([upd("a", (1, "e3", 2), price=3.0)], [])
        got = (await s.read(["a"]))["a"].buckets[BASE + DAY]
        assert (got.quantity, got.priced_qty) == (3.0, 4.0)
        assert got.price_qty == pytest.approx(9.0, rel=1e-12)

    run(store, scenario)


@both
def test_partition_state_only_moves_forward(store: WindowStore) -> None:
    async def scenario(s: WindowStore) -> None:
        assert await s.load_partition(P0) == PartitionState()
        await s.apply([], [PartitionUpdate(P0, PartitionState(100, 50))])
        await s.apply([], [PartitionUpdate(P0, PartitionState(90, 60))])
        await s.save_partition(P0, PartitionState(None, 40))
        assert await s.load_partition(P0) == PartitionState(100, 60)
        assert await s.load_partition(P1) == PartitionState()

    run(store, scenario)


@both
def test_recent_sellers_per_partition(store: WindowStore) -> None:
    async def scenario(s: WindowStore) -> None:
        await s.apply(
            [],
            [
                PartitionUpdate(P0, PartitionState(1, 1), last_sale_ms={"a": 5, "b": 9, "c": 2}),
                PartitionUpdate(P1, PartitionState(1, 1), last_sale_ms={"z": 9}),
            ],
        )
        result = await s.apply(
            [],
            [
                PartitionUpdate(
                    P0,
                    PartitionState(1, 1),
                    last_sale_ms={"a": 3, "c": 10},
                    forget_before_ms=3,
                    active_from_ms=5,
                )
            ],
        )
        assert result.active == {P0: ["a", "b", "c"]}
        result = await s.apply([], [PartitionUpdate(P0, PartitionState(1, 1), active_from_ms=6)])
        assert result.active == {P0: ["b", "c"]}
        result = await s.apply([], [PartitionUpdate(P1, PartitionState(1, 1), active_from_ms=0)])
        assert result.active == {P1: ["z"]}

    run(store, scenario)


@both
def test_odd_item_ids(store: WindowStore) -> None:
    ids = ["a}b", "{x}", "ünïcödé 商品", "with:colon", "x" * 128]

    async def scenario(s: WindowStore) -> None:
        await s.apply([upd(i, (1, "e", n + 1)) for n, i in enumerate(ids)], [])
        got = await s.read(ids)
        assert [quantities(got[i]) for i in ids] == [{1: n + 1.0} for n in range(len(ids))]

    run(store, scenario)


# --- latest forecasts (the lookup API) -------------------------------------------------------


def fc(item: str, day: int, emitted: int, kind: str = "close") -> LatestForecast:
    """A forecast record as the worker writes it (compact JSON, keys in the contract's order)."""
    as_of = f"2011-01-{day:02d}T00:00:00Z"
    record = (
        b'{"item_id":%s,"as_of":"%s","freq":"1D","horizon":[{"date":"2011-01-%02d","mean":1.0,'
        b'"p10":0.5,"p50":1.0,"p90":2.0}],"model_version":"m","fallback":false,'
        b'"emitted_at_ms":%d,"kind":"%s","open_bucket":null}'
        % (orjson.dumps(item), as_of.encode(), day, emitted, kind.encode())
    )
    parsed = LatestForecast.of(item, record)
    assert parsed.order == (as_of, emitted)
    return parsed


@both
def test_latest_forecast_is_the_record_byte_for_byte(store: WindowStore) -> None:
    ids = ["a", "a}b", "ünïcödé 商品", "x" * 128]
    records = [fc(i, 10, 1_300_000_000_000 + n) for n, i in enumerate(ids)]

    async def scenario(s: WindowStore) -> dict[str, bytes | None]:
        assert await s.save_latest(records, ttl_ms=3_600_000) == len(ids)
        return await s.read_latest([*ids, "unknown"])

    got = run(store, scenario)
    assert got == {**{r.item_id: r.record for r in records}, "unknown": None}
    for record in got.values():
        if record is not None:
            contract.validate("forecasts", record)


@both
def test_an_older_forecast_never_replaces_a_newer_one(store: WindowStore) -> None:
    async def scenario(s: WindowStore) -> list[Any]:
        seen = []
        # One call, in batch order: the later as_of wins, then a late re-forecast of the
        # older bucket (emitted later) must not replace it.
        kept = await s.save_latest(
            [fc("a", 10, 100), fc("a", 11, 100), fc("a", 10, 200, "late")], 1000
        )
        seen.append((kept, (await s.read_latest(["a"]))["a"]))
        # Across calls: a re-send of an older record, then a refresh of the same as_of
        # (later emitted_at_ms wins), then an earlier emission of that as_of (loses).
        await s.save_latest([fc("a", 9, 999)], 1000)
        seen.append((await s.read_latest(["a"]))["a"])
        await s.save_latest([fc("a", 11, 300, "refresh")], 1000)
        seen.append((await s.read_latest(["a"]))["a"])
        kept = await s.save_latest([fc("a", 11, 250, "refresh")], 1000)
        seen.append((kept, (await s.read_latest(["a"]))["a"]))
        return seen

    first, after_resend, after_refresh, after_earlier = run(store, scenario)
    assert first == (2, fc("a", 11, 100).record)
    assert after_resend == fc("a", 11, 100).record
    assert after_refresh == fc("a", 11, 300, "refresh").record
    assert after_earlier == (0, fc("a", 11, 300, "refresh").record)


@both
def test_latest_forecasts_of_many_items_and_nothing(store: WindowStore) -> None:
    ids = [f"item-{n}" for n in range(450)]  # more than one script call and MGET chunk

    async def scenario(s: WindowStore) -> dict[str, bytes | None]:
        assert await s.save_latest([], 1000) == 0
        assert await s.read_latest([]) == {}
        assert await s.save_latest([fc(i, 12, 1) for i in ids], 60_000) == len(ids)
        return await s.read_latest(ids)

    got = run(store, scenario)
    assert got == {i: fc(i, 12, 1).record for i in ids}


def test_latest_forecast_of_a_record_needs_its_order() -> None:
    spaced = b'{"item_id": "a", "as_of": "2011-01-10T00:00:00Z", "emitted_at_ms": 7}'
    assert LatestForecast.of("a", spaced).order == ("2011-01-10T00:00:00Z", 7)
    for bad in (b"{}", b"not json", b'{"as_of": "2011-01-10", "emitted_at_ms": 7}'):
        with pytest.raises(ValueError, match="expected"):
            LatestForecast.of("a", bad)


@pytest.mark.parametrize("store", ["redis"], indirect=True)
def test_redis_latest_forecast_shares_the_item_slot_expires_and_survives_a_script_flush(
    store: RedisWindowStore, request: pytest.FixtureRequest
) -> None:
    client = request.getfixturevalue("redis_client")
    from redis.crc import key_slot

    for item in ["85123A", "a}b", "{x}"]:
        assert key_slot(latest_key("p", item).encode()) == key_slot(
            item_keys("p", item)[0].encode()
        )

    async def scenario(st: RedisWindowStore) -> bytes | None:
        await st.save_latest([fc("a", 10, 1)], ttl_ms=3_600_000)
        client.script_flush()
        await st.save_latest([fc("a", 11, 1)], ttl_ms=3_600_000)
        return (await st.read_latest(["a"]))["a"]

    assert run(store, scenario) == fc("a", 11, 1).record
    assert 0 < client.pttl(latest_key(store._prefix, "a")) <= 3_600_000


@both
def test_ping_answers_while_the_store_can_serve(store: WindowStore) -> None:
    async def scenario(s: WindowStore) -> Any:
        await s.ping()  # on Redis: PING and load the scripts
        await s.apply([upd("a", (1, "e1", 2))], [])
        await s.ping()  # again, with state stored: changes nothing
        return (await s.read(["a"]))["a"]

    assert quantities(run(store, scenario)) == {1: 2.0}


@both
def test_remote_is_true_for_redis_only(store: WindowStore) -> None:
    # The worker times a remote store's operations as Redis round trips
    # (trendcast_redis_seconds); an in-process store must not feed that histogram.
    assert store.remote is isinstance(store, RedisWindowStore)
    run(store, lambda s: s.aclose())


@pytest.mark.parametrize("store", ["redis"], indirect=True)
def test_redis_keys_share_one_slot_and_expire(
    store: RedisWindowStore, request: pytest.FixtureRequest
) -> None:
    client = request.getfixturevalue("redis_client")
    from redis.crc import key_slot

    for item in ["85123A", "a}b", "{x}"]:
        w, d = item_keys(store._prefix, item)
        assert key_slot(w.encode()) == key_slot(d.encode())
    s, a = partition_keys(store._prefix, P0)
    assert key_slot(s.encode()) == key_slot(a.encode())

    async def scenario(st: WindowStore) -> None:
        await st.apply([upd("a", (1, "e", 1))], [])

    run(store, scenario)
    for key in item_keys(store._prefix, "a"):
        assert 0 < client.pttl(key) <= 3_600_000


@pytest.mark.parametrize("store", ["redis"], indirect=True)
def test_redis_reloads_lost_scripts(
    store: RedisWindowStore, request: pytest.FixtureRequest
) -> None:
    client = request.getfixturevalue("redis_client")

    async def scenario(st: RedisWindowStore) -> None:
        await st.apply([upd("a", (1, "e1", 1))], [])
        client.script_flush()
        await st.apply([upd("a", (1, "e2", 1))], [])
        assert quantities((await st.read(["a"]))["a"]) == {1: 2.0}

    run(store, scenario)


@pytest.mark.parametrize("store", ["redis"], indirect=True)
def test_redis_memory_per_item_at_window_56(
    store: RedisWindowStore, capsys: pytest.CaptureFixture[str]
) -> None:
    """An item with a full window of 56 daily buckets (+3 lateness/grace) stays small."""

    async def scenario(st: RedisWindowStore) -> dict[str, dict[str, int]]:
        sizes = {}
        for name, price in (("qty", None), ("priced", 2.95)):
            deltas = [
                (day, f"{name}-{day:04d}-0123456789abcdef", 7.0 + day % 5) for day in range(59)
            ]
            await st.apply([upd(name, *deltas, price=price)], [])
            window = await st.memory_usage(name)
            # In steady state only the keys of the open and in-grace buckets are remembered
            # (older events are late): here the last 2 of 59 buckets.
            await st.apply([upd(name, dedupe_from=57)], [])
            got = await st.read([name])
            assert len(got[name].buckets) == 59
            sizes[name] = {
                "window": window["window"],
                "dedupe_all_59": window["dedupe"],
                "dedupe_steady": (await st.memory_usage(name))["dedupe"],
            }
        return sizes

    sizes = run(store, scenario)
    with capsys.disabled():
        print(f"\nMEMORY USAGE per item at window 56 (+3 buckets): {sizes}")
    assert sizes["qty"]["window"] <= 1024
    assert sizes["priced"]["window"] <= 1024
    assert sizes["qty"]["dedupe_steady"] <= 512
