"""One contract, two candidate stores: the in-memory one and Redis (a real server).

Every test runs against both (``cstore`` is parametrized indirectly, as the window store's
contract tests are); the Redis ones use the session Redis of :mod:`tests.services` and a
unique key prefix. Expiry is real time on both (short TTLs, short sleeps).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import pytest
from redis.crc import key_slot

from stream.state.candidates import (
    CandidateStore,
    MemoryCandidateStore,
    RedisCandidateStore,
    candidate_keys,
    candidate_store_for,
)
from stream.state.memory import MemoryWindowStore
from stream.state.redis_store import RedisWindowStore
from trendcast.freq import parse_freq

FREQ = parse_freq("1D")


@pytest.fixture
def cstore(request: pytest.FixtureRequest) -> Iterator[Any]:
    if request.param == "memory":
        yield MemoryCandidateStore()
    else:
        url = request.getfixturevalue("redis_url")
        prefix = request.getfixturevalue("redis_prefix")
        yield RedisCandidateStore.from_url(url, prefix)


both = pytest.mark.parametrize("cstore", ["memory", "redis"], indirect=True)


def run(store: Any, scenario: Callable[[Any], Awaitable[None]]) -> None:
    """Run on one loop and close a Redis store on it (its pool belongs to that loop)."""

    async def main() -> None:
        try:
            await scenario(store)
        finally:
            if isinstance(store, RedisCandidateStore):
                await store.aclose()

    asyncio.run(main())


@both
def test_put_replaces_a_source_and_read_all_returns_every_source(cstore: Any) -> None:
    async def scenario(s: CandidateStore) -> None:
        assert await s.read_all() == {}
        await s.put("w1", b"one", 60_000)
        await s.put("w2", b"two", 60_000)
        await s.put("w1", b"one again", 60_000)
        assert await s.read_all() == {"w1": b"one again", "w2": b"two"}

    run(cstore, scenario)


@both
def test_a_source_not_put_again_expires(cstore: Any) -> None:
    async def scenario(s: CandidateStore) -> None:
        await s.put("dead", b"x", 100)
        await s.put("alive", b"y", 60_000)
        await asyncio.sleep(0.25)
        assert await s.read_all() == {"alive": b"y"}
        await s.put("dead", b"back", 60_000)  # a restarted worker under the same name
        assert await s.read_all() == {"alive": b"y", "dead": b"back"}

    run(cstore, scenario)


@both
def test_one_holder_leads_renews_and_is_replaced_after_its_lease(cstore: Any) -> None:
    async def scenario(s: CandidateStore) -> None:
        assert await s.lead("a", 200)
        assert not await s.lead("b", 200)
        assert await s.lead("a", 200)  # renewed
        await asyncio.sleep(0.1)
        assert await s.lead("a", 200)  # renewed again: still a's after the first lease
        await asyncio.sleep(0.15)
        assert not await s.lead("b", 200)
        await asyncio.sleep(0.3)  # a stopped renewing
        assert await s.lead("b", 60_000)
        assert not await s.lead("a", 60_000)

    run(cstore, scenario)


@both
def test_values_are_bytes_of_any_content(cstore: Any) -> None:
    value = bytes(range(256)) + "é{}".encode()

    async def scenario(s: CandidateStore) -> None:
        await s.put("host:1{x}", value, 60_000)
        assert await s.read_all() == {"host:1{x}": value}

    run(cstore, scenario)


@both
def test_a_ttl_must_be_positive(cstore: Any) -> None:
    async def scenario(s: CandidateStore) -> None:
        with pytest.raises(ValueError, match="ttl_ms > 0"):
            await s.put("w", b"x", 0)
        with pytest.raises(ValueError, match="ttl_ms > 0"):
            await s.lead("w", -1)

    run(cstore, scenario)


def test_redis_keys_share_one_cluster_slot_and_expire(
    redis_url: str, redis_prefix: str, redis_client: Any
) -> None:
    keys = candidate_keys(redis_prefix)
    assert len({key_slot(k.encode()) for k in keys}) == 1

    async def scenario(s: CandidateStore) -> None:
        await s.put("w", b"x", 5_000)
        await s.lead("w", 5_000)

    run(RedisCandidateStore.from_url(redis_url, redis_prefix), scenario)
    for key in keys:
        assert 0 < redis_client.pttl(key) <= 5_000


class Timed:
    """Stands for telemetry.TimedWindowStore: a wrapper with an ``inner`` store."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner


def test_workers_sharing_window_state_share_candidates(redis_url: str, redis_prefix: str) -> None:
    windows = MemoryWindowStore(FREQ)
    shared = candidate_store_for(windows)
    assert isinstance(shared, MemoryCandidateStore)
    assert candidate_store_for(Timed(windows)) is shared
    assert candidate_store_for(MemoryWindowStore(FREQ)) is not shared

    redis_windows = RedisWindowStore.from_url(redis_url, FREQ, redis_prefix)

    async def scenario() -> None:
        other_windows = RedisWindowStore.from_url(redis_url, FREQ, redis_prefix)
        one = candidate_store_for(Timed(redis_windows))
        other = candidate_store_for(other_windows)
        assert isinstance(one, RedisCandidateStore)
        await one.put("w1", b"x", 60_000)
        assert await other.read_all() == {"w1": b"x"}
        await one.aclose()  # not its client: the window store's stays usable
        await redis_windows.ping()
        await redis_windows.aclose()
        await other_windows.aclose()

    asyncio.run(scenario())
