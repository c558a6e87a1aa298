"""Trend candidates shared by all workers, and who merges them: :class:`CandidateStore`.

Each worker ranks only the items it forecasts (its partitions). To publish *one* trends
ranking, every worker puts its top candidates here under its own name (a *source*), with a
TTL, and one elected worker reads them all, merges them and publishes the result
(:mod:`stream.monitoring.trends`). The store knows nothing of trends: a value is opaque
bytes. Three operations:

* :meth:`CandidateStore.put` — replace a source's value; it expires after ``ttl_ms`` unless
  put again, so the candidates of a worker that died vanish by themselves;
* :meth:`CandidateStore.read_all` — every source's unexpired value;
* :meth:`CandidateStore.lead` — take or renew a lease (a lock with a TTL): the holder is the
  one publisher. A holder that stops renewing loses it after ``ttl_ms``, and the next worker
  to ask takes over.

Both implementations pass the same contract tests
(``tests/unit/stream/state/test_candidate_store_contract.py``). They live beside the window
state: :func:`candidate_store_for` gives the workers sharing a window store (one Redis and
prefix, or one in-memory store in a test) one candidate store.

Redis key layout (``P`` = the state prefix; one hash tag, so every script touches one slot of
a Redis Cluster)::

    P:{trends}:candidates   hash   source -> value
    P:{trends}:expiry       zset   source -> expiry (Redis server time, ms)
    P:{trends}:leader       string the lease holder, with the lease as its TTL

Expiry is kept per source in a zset (a hash field has no TTL of its own before Redis 7.4)
and measured on the Redis server's clock, so workers' clocks need not agree. The suffixes
differ from the window store's (``w``, ``d``, ``s``, ``a``), so no item id can collide.
"""

from __future__ import annotations

import logging
import time
import weakref
from collections.abc import Callable
from typing import Any, Protocol

from stream.state.redis_clients import CLIENT_ERRORS, AsyncRedisClient, async_client
from trendcast.exceptions import StateStoreError

__all__ = [
    "CandidateStore",
    "MemoryCandidateStore",
    "RedisCandidateStore",
    "candidate_keys",
    "candidate_store_for",
]

logger = logging.getLogger(__name__)


class CandidateStore(Protocol):
    """Values per source with a TTL, and a lease (see the module docstring)."""

    async def put(self, source: str, value: bytes, ttl_ms: int) -> None:
        """Replace ``source``'s value; it expires ``ttl_ms`` from now unless put again.

        Raises:
            StateStoreError: The backend failed.
        """
        ...

    async def read_all(self) -> dict[str, bytes]:
        """Every source's unexpired value.

        Raises:
            StateStoreError: The backend failed.
        """
        ...

    async def lead(self, holder: str, ttl_ms: int) -> bool:
        """Take the lease if free (or expired), renew it if ``holder`` has it.

        Returns:
            Whether ``holder`` holds the lease for the next ``ttl_ms``.

        Raises:
            StateStoreError: The backend failed.
        """
        ...


def _check_ttl(ttl_ms: int) -> None:
    if ttl_ms <= 0:
        raise ValueError(f"expected ttl_ms > 0, got {ttl_ms}")


class MemoryCandidateStore:
    """Dict-backed :class:`CandidateStore` for unit tests and single-process workers.

    Args:
        clock_ms: The clock expiries are measured on (injectable for tests).
    """

    def __init__(self, clock_ms: Callable[[], int] | None = None) -> None:
        self._clock_ms = clock_ms or (lambda: time.monotonic_ns() // 1_000_000)
        self._values: dict[str, tuple[bytes, int]] = {}  # source -> (value, expires at)
        self._leader: tuple[str, int] | None = None  # (holder, expires at)

    async def put(self, source: str, value: bytes, ttl_ms: int) -> None:
        """Replace ``source``'s value until ``ttl_ms`` from now."""
        _check_ttl(ttl_ms)
        self._values[source] = (value, self._clock_ms() + ttl_ms)

    async def read_all(self) -> dict[str, bytes]:
        """Every source's unexpired value (expired ones are dropped)."""
        now = self._clock_ms()
        self._values = {s: v for s, v in self._values.items() if v[1] > now}
        return {source: value for source, (value, _) in self._values.items()}

    async def lead(self, holder: str, ttl_ms: int) -> bool:
        """Take or renew the lease."""
        _check_ttl(ttl_ms)
        now = self._clock_ms()
        if self._leader is None or self._leader[1] <= now or self._leader[0] == holder:
            self._leader = (holder, now + ttl_ms)
            return True
        return False


def candidate_keys(prefix: str) -> tuple[str, str, str]:
    """Candidates hash, expiry zset and lease keys (one hash slot).

    >>> candidate_keys("tc")
    ('tc:{trends}:candidates', 'tc:{trends}:expiry', 'tc:{trends}:leader')
    """
    base = f"{prefix}:{{trends}}"
    return f"{base}:candidates", f"{base}:expiry", f"{base}:leader"


# Milliseconds on the server's clock: TIME is allowed in scripts (effects are replicated).
_NOW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""

# KEYS: candidates, expiry. ARGV: source, value, ttl_ms. Both keys live as long as their
# longest-lived entry (PTTL is -1 right after the key is created).
_PUT = (
    _NOW
    + """
local ttl = tonumber(ARGV[3])
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('ZADD', KEYS[2], now + ttl, ARGV[1])
for _, key in ipairs(KEYS) do
  if redis.call('PTTL', key) < ttl then redis.call('PEXPIRE', key, ttl) end
end
return 1
"""
)

# KEYS: candidates, expiry. Drops the expired sources, returns HGETALL of the rest. There are
# as many sources as workers, far below Lua's unpack limit.
_READ_ALL = (
    _NOW
    + """
local gone = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now)
if #gone > 0 then
  redis.call('HDEL', KEYS[1], unpack(gone))
  redis.call('ZREM', KEYS[2], unpack(gone))
end
return redis.call('HGETALL', KEYS[1])
"""
)

# KEYS: lease. ARGV: holder, ttl_ms. 1 if the holder has the lease now.
_LEAD = """
local current = redis.call('GET', KEYS[1])
if current == false then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
if current == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
"""


class RedisCandidateStore:
    """:class:`CandidateStore` in Redis (one server or a Cluster; see the module docstring).

    Scripts go as EVAL, not EVALSHA: they are a few hundred bytes, sent once per publish
    interval, so caching them is not worth the NOSCRIPT handling.

    Args:
        client: An asyncio Redis or RedisCluster client (``decode_responses=False``).
        prefix: The state prefix (``TRENDCAST_STATE_PREFIX``).
        owns_client: Close the client in :meth:`aclose` (not when it is the window store's).
    """

    def __init__(self, client: AsyncRedisClient, prefix: str, *, owns_client: bool = False):
        self._client = client
        self._keys = candidate_keys(prefix)
        self._owns_client = owns_client

    @classmethod
    def from_url(cls, url: str, prefix: str, *, cluster: bool = False) -> RedisCandidateStore:
        """Connect lazily to ``url``; the store owns (and closes) its client."""
        return cls(async_client(url, cluster=cluster), prefix, owns_client=True)

    async def _eval(self, script: str, keys: tuple[str, ...], *args: Any) -> Any:
        try:
            return await self._client.eval(script, len(keys), *keys, *args)
        except CLIENT_ERRORS as exc:
            raise StateStoreError(f"trend candidates: {type(exc).__name__}: {exc}") from exc

    async def put(self, source: str, value: bytes, ttl_ms: int) -> None:
        """Replace ``source``'s value until ``ttl_ms`` from now (server time)."""
        _check_ttl(ttl_ms)
        await self._eval(_PUT, self._keys[:2], source, value, ttl_ms)

    async def read_all(self) -> dict[str, bytes]:
        """Every source's unexpired value."""
        flat = await self._eval(_READ_ALL, self._keys[:2])
        return {bytes(flat[i]).decode(): bytes(flat[i + 1]) for i in range(0, len(flat), 2)}

    async def lead(self, holder: str, ttl_ms: int) -> bool:
        """Take or renew the lease."""
        _check_ttl(ttl_ms)
        return bool(await self._eval(_LEAD, self._keys[2:], holder, ttl_ms))

    async def aclose(self) -> None:
        """Close the client if this store opened it."""
        if self._owns_client:
            await self._client.aclose()


#: One in-memory candidate store per in-memory window store: workers of one test share both.
_MEMORY: weakref.WeakKeyDictionary[object, MemoryCandidateStore] = weakref.WeakKeyDictionary()


def candidate_store_for(window_store: object) -> CandidateStore:
    """The candidate store beside ``window_store``: same Redis and prefix, or in memory.

    Workers that share window state share candidates, with nothing more to configure: a
    Redis window store (also when wrapped, e.g. timed: anything with an ``inner`` store)
    lends its client and prefix, so TLS, credentials and Cluster mode are those of the
    windows; any other store gets an in-memory one, shared by every caller with the same
    store object.
    """
    from stream.state.redis_store import RedisWindowStore

    inner = window_store
    while hasattr(inner, "inner"):
        inner = inner.inner
    if isinstance(inner, RedisWindowStore):
        # The window store's own client: one connection pool per worker, closed with it.
        return RedisCandidateStore(inner.client, inner.prefix)
    store = _MEMORY.get(inner)
    if store is None:
        store = _MEMORY[inner] = MemoryCandidateStore()
    return store
