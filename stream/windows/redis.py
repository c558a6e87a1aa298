"""Redis :class:`~stream.windows.base.WindowStore`: Lua scripts, one pipelined round trip.

Key layout (``P`` = the configured prefix; the ``{...}`` part is the Redis Cluster hash tag,
so every script touches the keys of one slot only)::

    P:{<item_id>}:w        hash   bucket index -> "q", "q,price_qty" (priced_qty == q) or
                                  "q,price_qty,priced_qty"; "f" -> first sale's bucket index
    P:{<item_id>}:d        zset   dedupe key -> bucket index (forgotten once the bucket is late)
    P:{p:<topic>:<n>}:s    hash   "m" -> max event ms, "e" -> first bucket not yet forecast,
                                  "o" -> first offset not fully processed
    P:{p:<topic>:<n>}:a    zset   item_id -> start ms of its latest bucket with a sale

Bucket *indices* (``(start - origin) / step``) rather than epoch ms keep hash fields small
integers, which Redis stores compactly in a listpack; item ids containing braces get a hashed
tag (the raw id would split the tag) and keep the id in the key for uniqueness.

A batch is one pipeline of EVALSHA calls: one per item (atomic for that item: dedupe check,
sums, trim, TTL) and one per partition (monotonic clock merge, recent sellers). The pipeline
is not a cross-slot transaction — a crash can leave some items applied — but every script is
idempotent, so the worker simply re-applies the whole batch when it is re-delivered.

Redis Cluster (``TRENDCAST_REDIS_CLUSTER=true``, client from :mod:`stream.windows.clients`)
needs nothing else from this layout, because no script or command spans two slots:

* redis-py splits the batch pipeline per node and sends the parts concurrently, so a batch
  costs one round trip *per node* (each node still runs its scripts atomically per item);
* ``SCRIPT LOAD`` goes to every primary. The script cache is per node and not persisted, so
  a node may still lack the scripts (restarted, a replica promoted after a failover, a node
  added by resharding): it answers NOSCRIPT for its share of the batch, and the whole batch is
  re-run after loading the scripts on every primary again, exactly as after a restart of a
  single server (tests/integration/test_redis_cluster.py flushes one primary to prove it).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from typing import Any

from redis.exceptions import NoScriptError

from stream.watermark import PartitionState
from stream.windows.base import (
    ApplyResult,
    BucketSums,
    ItemUpdate,
    ItemWindow,
    PartitionId,
    PartitionUpdate,
)
from stream.windows.clients import CLIENT_ERRORS, AsyncRedisClient, async_client
from trendcast.exceptions import StateStoreError
from trendcast.freq import Freq

__all__ = ["RedisWindowStore", "item_keys", "partition_keys"]

logger = logging.getLogger(__name__)

# KEYS: window hash, dedupe zset.
# ARGV: keep_from_idx, dedupe_from_idx, ttl_ms, then 5 per event:
#       dedupe_key, bucket_idx, quantity, price_qty, priced_qty.
# Returns {duplicates, refused, {changed bucket indices}}.
_APPLY_ITEM = """
local w, d = KEYS[1], KEYS[2]
-- Shortest of %.15g / %.17g that reads back as the same double: exact, and short for the
-- usual sums (26.55 rather than 26.550000000000001), which keeps the hash in a listpack.
-- price*quantity sums (2.95 * 7 = 20.650000000000002) are kept to 12 significant digits
-- instead: far below float32 model precision, and half the bytes.
local function fmt(x)
  local s = string.format('%.15g', x)
  if tonumber(s) ~= x then s = string.format('%.17g', x) end
  return s
end
local keep_from = tonumber(ARGV[1])
local dedupe_from = tonumber(ARGV[2])
local ttl = tonumber(ARGV[3])
local changed, touched = {}, {}
local dup, refused = 0, 0
for i = 4, #ARGV, 5 do
  local field = ARGV[i + 1]
  local idx = tonumber(field)
  if idx < dedupe_from then
    refused = refused + 1
  elseif redis.call('ZADD', d, 'NX', idx, ARGV[i]) == 0 then
    dup = dup + 1
  else
    local q, pq, pn = 0, 0, 0
    local cur = redis.call('HGET', w, field)
    if cur then
      local a, b, c = string.match(cur, '^([^,]+),([^,]+),([^,]+)$')
      if a then
        q, pq, pn = tonumber(a), tonumber(b), tonumber(c)
      else
        a, b = string.match(cur, '^([^,]+),([^,]+)$')
        if a then q, pq, pn = tonumber(a), tonumber(b), tonumber(a) else q = tonumber(cur) end
      end
    end
    q = q + tonumber(ARGV[i + 2])
    pq = pq + tonumber(ARGV[i + 3])
    pn = pn + tonumber(ARGV[i + 4])
    local value
    if pq == 0 and pn == 0 then
      value = fmt(q)
    elseif pn == q then
      value = fmt(q) .. ',' .. string.format('%.12g', pq)
    else
      value = fmt(q) .. ',' .. string.format('%.12g', pq) .. ',' .. fmt(pn)
    end
    redis.call('HSET', w, field, value)
    local first = redis.call('HGET', w, 'f')
    if (not first) or idx < tonumber(first) then redis.call('HSET', w, 'f', field) end
    if not touched[field] then
      touched[field] = true
      changed[#changed + 1] = idx
    end
  end
end
for _, f in ipairs(redis.call('HKEYS', w)) do
  if f ~= 'f' and tonumber(f) < keep_from then redis.call('HDEL', w, f) end
end
redis.call('ZREMRANGEBYSCORE', d, '-inf', '(' .. ARGV[2])
if ttl > 0 then
  redis.call('PEXPIRE', w, ttl)
  redis.call('PEXPIRE', d, ttl)
end
return {dup, refused, changed}
"""

# KEYS: clock hash, sellers zset.
# ARGV: max_event_ms, emitted_to_ms, forget_before_ms, active_from_ms, next_offset ('' = none),
#       then 2 per item: item_id, latest sale bucket ms. Returns the active items (or {}).
_APPLY_PARTITION = """
local s, a = KEYS[1], KEYS[2]
local function merge_max(field, value)
  if value == '' then return end
  local cur = redis.call('HGET', s, field)
  if (not cur) or tonumber(value) > tonumber(cur) then redis.call('HSET', s, field, value) end
end
merge_max('m', ARGV[1])
merge_max('e', ARGV[2])
merge_max('o', ARGV[5])
for i = 6, #ARGV, 2 do redis.call('ZADD', a, 'GT', ARGV[i + 1], ARGV[i]) end
if ARGV[3] ~= '' then redis.call('ZREMRANGEBYSCORE', a, '-inf', '(' .. ARGV[3]) end
if ARGV[4] ~= '' then return redis.call('ZRANGEBYSCORE', a, ARGV[4], '+inf') end
return {}
"""


def _tag(item_id: str) -> str:
    if "{" in item_id or "}" in item_id:
        return "#" + hashlib.sha1(item_id.encode(), usedforsecurity=False).hexdigest()[:16]
    return item_id


def item_keys(prefix: str, item_id: str) -> tuple[str, str]:
    """Window hash and dedupe zset keys of an item (same hash slot).

    >>> item_keys("tc", "85123A")
    ('tc:{85123A}:w', 'tc:{85123A}:d')
    >>> item_keys("tc", "a}b")[0]
    'tc:{#1839300f5a583115}:a}b:w'
    """
    tag = _tag(item_id)
    base = f"{prefix}:{{{tag}}}" if tag == item_id else f"{prefix}:{{{tag}}}:{item_id}"
    return f"{base}:w", f"{base}:d"


def partition_keys(prefix: str, partition: PartitionId) -> tuple[str, str]:
    """Clock hash and sellers zset keys of a partition (same hash slot).

    >>> partition_keys("tc", PartitionId("sales", 3))
    ('tc:{p:sales:3}:s', 'tc:{p:sales:3}:a')
    """
    base = f"{prefix}:{{p:{partition.topic}:{partition.partition}}}"
    return f"{base}:s", f"{base}:a"


def _opt(value: int | None) -> str:
    return "" if value is None else str(value)


def _decode(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class RedisWindowStore:
    """Window store on a real Redis (or Redis Cluster) server.

    Args:
        client: An asyncio Redis or RedisCluster client (``decode_responses=False``).
        freq: Bucket frequency of the stored sums.
        prefix: Prefix of every key.
    """

    def __init__(self, client: AsyncRedisClient, freq: Freq, prefix: str) -> None:
        self._client = client
        self._freq = freq
        self._prefix = prefix
        self._shas: dict[str, str] = {}

    @classmethod
    def from_url(
        cls, url: str, freq: Freq, prefix: str, *, cluster: bool = False
    ) -> RedisWindowStore:
        """Connect lazily to ``url`` (the first command opens the connection).

        Args:
            url: Redis URL; with ``cluster``, any node of the cluster.
            freq: Bucket frequency of the stored sums.
            prefix: Prefix of every key.
            cluster: ``url`` is a Redis Cluster node (see :mod:`stream.windows.clients`).

        Raises:
            ConfigError: ``cluster`` with a URL a cluster cannot serve (a database other
                than 0, a unix socket).
        """
        return cls(async_client(url, cluster=cluster), freq, prefix)

    @property
    def freq(self) -> Freq:
        """Bucket frequency of the stored sums."""
        return self._freq

    def _idx(self, ms: int) -> int:
        return (ms - self._freq.origin_ms) // self._freq.step_ms

    def _ms(self, idx: int) -> int:
        return self._freq.origin_ms + idx * self._freq.step_ms

    async def _load_scripts(self) -> None:
        # On a cluster, redis-py sends SCRIPT LOAD to every primary (and returns one sha).
        for name, body in (("item", _APPLY_ITEM), ("partition", _APPLY_PARTITION)):
            self._shas[name] = _decode(await self._client.script_load(body))

    async def ping(self) -> None:
        """Check the connection and load the scripts.

        Raises:
            StateStoreError: Redis is unreachable or refuses the scripts.
        """
        try:
            await self._client.ping()
            await self._load_scripts()
        except CLIENT_ERRORS as exc:
            raise StateStoreError(f"Redis unavailable: {exc}") from exc

    async def apply(
        self, items: Sequence[ItemUpdate], partitions: Sequence[PartitionUpdate]
    ) -> ApplyResult:
        """See :meth:`stream.windows.base.WindowStore.apply`."""
        if not items and not partitions:
            return ApplyResult({}, 0, 0, {})
        try:
            if not self._shas:
                await self._load_scripts()
            results = await self._execute(items, partitions)
            if any(isinstance(r, NoScriptError) for r in results):
                # Redis restarted or flushed its script cache: reload and re-run the whole
                # batch, which is safe because every script is idempotent.
                logger.warning("Redis lost the window scripts; reloading them")
                await self._load_scripts()
                results = await self._execute(items, partitions)
        except CLIENT_ERRORS as exc:
            raise StateStoreError(f"Redis failed applying a batch: {exc}") from exc
        errors = [r for r in results if isinstance(r, Exception)]
        if errors:
            raise StateStoreError(f"Redis failed applying a batch: {errors[0]}") from errors[0]
        changed: dict[str, list[int]] = {}
        duplicates = refused = 0
        for update, result in zip(items, results[: len(items)], strict=True):
            duplicates += int(result[0])
            refused += int(result[1])
            if result[2]:
                known = changed.setdefault(update.item_id, [])
                known.extend(b for b in (self._ms(int(i)) for i in result[2]) if b not in known)
        active: dict[PartitionId, list[str]] = {}
        for p, result in zip(partitions, results[len(items) :], strict=True):
            if p.active_from_ms is not None:
                active[p.partition] = sorted(_decode(i) for i in result)
        return ApplyResult(changed=changed, duplicates=duplicates, refused=refused, active=active)

    async def _execute(
        self, items: Sequence[ItemUpdate], partitions: Sequence[PartitionUpdate]
    ) -> list[Any]:
        pipe = self._client.pipeline(transaction=False)
        for u in items:
            args: list[str | int] = [
                self._idx(u.keep_from_ms),
                self._idx(u.dedupe_from_ms),
                u.ttl_ms,
            ]
            for d in u.deltas:
                args += [
                    d.dedupe_key,
                    self._idx(d.bucket_ms),
                    repr(float(d.quantity)),
                    repr(float(d.price_qty)),
                    repr(float(d.priced_qty)),
                ]
            # execute_command rather than pipe.evalsha: redis-py's cluster pipeline blocks
            # the evalsha() helper but routes a raw EVALSHA by its keys like any command.
            pipe.execute_command(
                "EVALSHA", self._shas["item"], 2, *item_keys(self._prefix, u.item_id), *args
            )
        for p in partitions:
            pargs: list[str | int] = [
                _opt(p.state.max_event_ms),
                _opt(p.state.emitted_to_ms),
                _opt(p.forget_before_ms),
                _opt(p.active_from_ms),
                _opt(p.state.next_offset),
            ]
            for item_id, last in p.last_sale_ms.items():
                pargs += [item_id, last]
            pipe.execute_command(
                "EVALSHA",
                self._shas["partition"],
                2,
                *partition_keys(self._prefix, p.partition),
                *pargs,
            )
        return list(await pipe.execute(raise_on_error=False))

    async def read(self, item_ids: Sequence[str]) -> dict[str, ItemWindow]:
        """See :meth:`stream.windows.base.WindowStore.read`."""
        if not item_ids:
            return {}
        try:
            pipe = self._client.pipeline(transaction=False)
            for item_id in item_ids:
                pipe.hgetall(item_keys(self._prefix, item_id)[0])
            results = await pipe.execute()
        except CLIENT_ERRORS as exc:
            raise StateStoreError(f"Redis failed reading windows: {exc}") from exc
        out: dict[str, ItemWindow] = {}
        for item_id, raw in zip(item_ids, results, strict=True):
            first: int | None = None
            buckets: dict[int, BucketSums] = {}
            for key, value in raw.items():
                field, text = _decode(key), _decode(value)
                if field == "f":
                    first = self._ms(int(text))
                    continue
                parts = [float(x) for x in text.split(",")]
                if len(parts) == 2:  # priced_qty == quantity, the common case, is left out
                    parts.append(parts[0])
                buckets[self._ms(int(field))] = BucketSums(*parts)
            out[item_id] = ItemWindow(item_id, first, dict(sorted(buckets.items())))
        return out

    async def load_partition(self, partition: PartitionId) -> PartitionState:
        """See :meth:`stream.windows.base.WindowStore.load_partition`."""
        try:
            raw = await self._client.hgetall(partition_keys(self._prefix, partition)[0])
        except CLIENT_ERRORS as exc:
            raise StateStoreError(f"Redis failed reading partition state: {exc}") from exc
        fields = {_decode(k): int(_decode(v)) for k, v in raw.items()}
        return PartitionState(
            max_event_ms=fields.get("m"),
            emitted_to_ms=fields.get("e"),
            next_offset=fields.get("o"),
        )

    async def save_partition(self, partition: PartitionId, state: PartitionState) -> None:
        """See :meth:`stream.windows.base.WindowStore.save_partition`."""
        await self.apply([], [PartitionUpdate(partition, state)])

    async def memory_usage(self, item_id: str) -> dict[str, int]:
        """``MEMORY USAGE`` in bytes of an item's keys (for capacity planning)."""
        out: dict[str, int] = {}
        for name, key in zip(("window", "dedupe"), item_keys(self._prefix, item_id), strict=True):
            out[name] = int(await self._client.memory_usage(key) or 0)
        return out

    async def aclose(self) -> None:
        """Close the connection pool."""
        await self._client.aclose()
