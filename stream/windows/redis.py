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

from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster
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

# apply_item(window hash, dedupe zset, keep_from_idx, dedupe_from_idx, ttl_ms, mode, payload)
# adds a batch's events to one item. Two payload layouts, one argument either way (building
# and encoding an argument per event was most of the worker's Redis time: redis-py packs
# each in Python):
#
# * mode "s" (summed, the common case): per bucket
#   "bucket_idx US quantity US price_qty US priced_qty US key RS key RS ... GS", the sums
#   of the bucket's events and their dedupe keys. If ANY key was seen before, nothing is
#   written and {-1} is returned: the caller re-sends that item in mode "e". Re-deliveries
#   are rare, so a batch costs one ZMSCORE and one ZADD per bucket instead of a ZADD and a
#   hash update per event.
# * mode "e" (events): per event
#   "dedupe_key US bucket_idx US quantity US price_qty US priced_qty RS", each checked and
#   added on its own, so the duplicates among them are skipped.
#
# (US = \31, RS = \30, GS = \29.) Returns {duplicates, refused, {changed bucket indices}}.
_ITEM_FUNCTION = """
-- Shortest of %.15g / %.17g that reads back as the same double: exact, and short for the
-- usual sums (26.55 rather than 26.550000000000001), which keeps the hash in a listpack.
-- price*quantity sums (2.95 * 7 = 20.650000000000002) are kept to 12 significant digits
-- instead: far below float32 model precision, and half the bytes.
local function fmt(x)
  local s = string.format('%.15g', x)
  if tonumber(s) ~= x then s = string.format('%.17g', x) end
  return s
end
local function parse(cur)
  if not cur then return {0, 0, 0} end
  local a, b, c = string.match(cur, '^([^,]+),([^,]+),([^,]+)$')
  if a then return {tonumber(a), tonumber(b), tonumber(c)} end
  a, b = string.match(cur, '^([^,]+),([^,]+)$')
  if a then return {tonumber(a), tonumber(b), tonumber(a)} end
  return {tonumber(cur), 0, 0}
end
local function store_sums(w, d, sums, changed, lowest, keep_from, dedupe_from_arg, ttl)
  for field, s in pairs(sums) do
    local q, pq, pn = s[1], s[2], s[3]
    local value
    if pq == 0 and pn == 0 then
      value = fmt(q)
    elseif pn == q then
      value = fmt(q) .. ',' .. string.format('%.12g', pq)
    else
      value = fmt(q) .. ',' .. string.format('%.12g', pq) .. ',' .. fmt(pn)
    end
    redis.call('HSET', w, field, value)
  end
  if lowest then
    local first = redis.call('HGET', w, 'f')
    if (not first) or lowest < tonumber(first) then redis.call('HSET', w, 'f', lowest) end
  end
  for _, f in ipairs(redis.call('HKEYS', w)) do
    if f ~= 'f' and tonumber(f) < keep_from then redis.call('HDEL', w, f) end
  end
  redis.call('ZREMRANGEBYSCORE', d, '-inf', '(' .. dedupe_from_arg)
  if ttl > 0 then
    redis.call('PEXPIRE', w, ttl)
    redis.call('PEXPIRE', d, ttl)
  end
end
local CHUNK = 1000
local function apply_summed(w, d, keep_from, dedupe_from, dedupe_from_arg, ttl, payload)
  local blocks, refused = {}, 0
  for field, q, pq, pn, keys in string.gmatch(payload,
      '([^\\31]*)\\31([^\\31]*)\\31([^\\31]*)\\31([^\\31]*)\\31([^\\29]*)\\29') do
    local list = {}
    for k in string.gmatch(keys, '[^\\30]+') do list[#list + 1] = k end
    if tonumber(field) < dedupe_from then
      refused = refused + #list
    else
      blocks[#blocks + 1] = {field, tonumber(q), tonumber(pq), tonumber(pn), list}
    end
  end
  for _, b in ipairs(blocks) do  -- check every key before writing anything
    local list = b[5]
    for i = 1, #list, CHUNK do
      local scores = redis.call('ZMSCORE', d, unpack(list, i, math.min(i + CHUNK - 1, #list)))
      for _, score in ipairs(scores) do
        if score then return {-1} end
      end
    end
  end
  local sums, changed, lowest = {}, {}, nil
  for _, b in ipairs(blocks) do
    local field, list = b[1], b[5]
    local idx = tonumber(field)
    for i = 1, #list, CHUNK do
      local args = {}
      for j = i, math.min(i + CHUNK - 1, #list) do
        args[#args + 1] = idx
        args[#args + 1] = list[j]
      end
      redis.call('ZADD', d, 'NX', unpack(args))
    end
    local s = sums[field]
    if not s then
      s = parse(redis.call('HGET', w, field))
      sums[field] = s
      changed[#changed + 1] = idx
      if (not lowest) or idx < lowest then lowest = idx end
    end
    s[1] = s[1] + b[2]
    s[2] = s[2] + b[3]
    s[3] = s[3] + b[4]
  end
  store_sums(w, d, sums, changed, lowest, keep_from, dedupe_from_arg, ttl)
  return {0, refused, changed}
end
local function apply_events(w, d, keep_from, dedupe_from, dedupe_from_arg, ttl, events)
  local sums, changed = {}, {}
  local dup, refused, lowest = 0, 0, nil
  for key, field, q, pq, pn in string.gmatch(events,
      '([^\\31]*)\\31([^\\31]*)\\31([^\\31]*)\\31([^\\31]*)\\31([^\\30]*)\\30') do
    local idx = tonumber(field)
    if idx < dedupe_from then
      refused = refused + 1
    elseif redis.call('ZADD', d, 'NX', idx, key) == 0 then
      dup = dup + 1
    else
      local s = sums[field]
      if not s then
        -- First event of this bucket: start from the stored sums, then add event by event.
        s = parse(redis.call('HGET', w, field))
        sums[field] = s
        changed[#changed + 1] = idx
        if (not lowest) or idx < lowest then lowest = idx end
      end
      s[1] = s[1] + tonumber(q)
      s[2] = s[2] + tonumber(pq)
      s[3] = s[3] + tonumber(pn)
    end
  end
  store_sums(w, d, sums, changed, lowest, keep_from, dedupe_from_arg, ttl)
  return {dup, refused, changed}
end
local function apply_item(w, d, keep_from_arg, dedupe_from_arg, ttl_arg, mode, payload)
  local keep_from, dedupe_from = tonumber(keep_from_arg), tonumber(dedupe_from_arg)
  local ttl = tonumber(ttl_arg)
  if mode == 's' then
    return apply_summed(w, d, keep_from, dedupe_from, dedupe_from_arg, ttl, payload)
  end
  return apply_events(w, d, keep_from, dedupe_from, dedupe_from_arg, ttl, payload)
end
"""

# KEYS: window hash, dedupe zset. ARGV: the five arguments of apply_item after the keys.
# One item per call: what Redis Cluster allows (both keys share the item's hash slot).
_APPLY_ITEM = (
    _ITEM_FUNCTION
    + "return apply_item(KEYS[1], KEYS[2], ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5])"
)

# KEYS: window hash and dedupe zset of each of n items. ARGV: 5 per item, as above.
# Returns one apply_item result per item. On a single Redis server the keys of many items
# may go into one script call, so a batch costs a handful of commands instead of one per
# item (redis-py's per-command cost dominated); the whole call is still atomic.
_APPLY_ITEMS = (
    _ITEM_FUNCTION
    + """
local out = {}
for i = 1, #KEYS / 2 do
  local a = 5 * (i - 1)
  out[i] = apply_item(KEYS[2 * i - 1], KEYS[2 * i], ARGV[a + 1], ARGV[a + 2], ARGV[a + 3],
                      ARGV[a + 4], ARGV[a + 5])
end
return out
"""
)

# KEYS: window hashes. Returns HGETALL of each (single server only, like _APPLY_ITEMS).
_READ_WINDOWS = """
local out = {}
for i, key in ipairs(KEYS) do out[i] = redis.call('HGETALL', key) end
return out
"""

#: Items per multi-item script call: large enough to amortise the per-command cost, small
#: enough that one call keeps Redis busy for milliseconds, not seconds.
_ITEMS_PER_CALL = 200

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


_RS = "\x1e"  # separates the dedupe keys of a bucket in a summed payload


def _safe_key(key: str) -> str:
    """``key``, or a digest of it when it holds a payload separator (\\x1d, \\x1e, \\x1f).

    >>> _safe_key("e:42"), _safe_key("e:a\x1fb")
    ('e:42', 'h:8a85ddc9bec331ea26473138d69d0632dd6f4da4')
    """
    if "\x1d" in key or "\x1e" in key or "\x1f" in key:
        return "h:" + hashlib.sha1(key.encode(), usedforsecurity=False).hexdigest()
    return key


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
        # A single server takes the keys of many items in one script call; a cluster only
        # keys of one slot (see _APPLY_ITEMS).
        self._cluster = isinstance(client, AsyncRedisCluster)

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
        scripts = [("item", _APPLY_ITEM), ("partition", _APPLY_PARTITION)]
        if not self._cluster:
            scripts += [("items", _APPLY_ITEMS), ("read", _READ_WINDOWS)]
        for name, body in scripts:
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

    def _item_args(self, u: ItemUpdate, *, summed: bool) -> list[str | int]:
        """apply_item's arguments after the keys (see ``_ITEM_FUNCTION``)."""
        origin, step = self._freq.origin_ms, self._freq.step_ms
        head: list[str | int] = [self._idx(u.keep_from_ms), self._idx(u.dedupe_from_ms), u.ttl_ms]
        if summed and len({d.dedupe_key for d in u.deltas}) < len(u.deltas):
            summed = False  # a key twice in the batch: only the events path skips the copy
        if not summed:
            events = "".join(
                [
                    f"{_safe_key(d.dedupe_key)}\x1f{(d.bucket_ms - origin) // step}"
                    f"\x1f{float(d.quantity)!r}\x1f{float(d.price_qty)!r}"
                    f"\x1f{float(d.priced_qty)!r}\x1e"
                    for d in u.deltas
                ]
            )
            return [*head, "e", events]
        # Sums per bucket in offset order, as the events path would add them one by one.
        buckets: dict[int, list[Any]] = {}
        for d in u.deltas:
            acc = buckets.get(d.bucket_ms)
            if acc is None:
                buckets[d.bucket_ms] = [d.quantity, d.price_qty, d.priced_qty, [d.dedupe_key]]
            else:
                acc[0] += d.quantity
                acc[1] += d.price_qty
                acc[2] += d.priced_qty
                acc[3].append(d.dedupe_key)
        blocks = "".join(
            [
                f"{(bucket - origin) // step}\x1f{float(q)!r}\x1f{float(pq)!r}\x1f{float(pn)!r}"
                f"\x1f{_RS.join(map(_safe_key, keys))}\x1d"
                for bucket, (q, pq, pn, keys) in buckets.items()
            ]
        )
        return [*head, "s", blocks]

    async def _execute(
        self, items: Sequence[ItemUpdate], partitions: Sequence[PartitionUpdate]
    ) -> list[Any]:
        """Apply the items (summed; seen keys -> again event by event), then the partitions."""
        results = await self._run(items, partitions, summed=True)
        again = [
            i
            for i, r in enumerate(results[: len(items)])
            if not isinstance(r, Exception) and int(r[0]) == -1
        ]
        if again:
            # Some keys were seen before (a re-delivery): nothing of those items was
            # written; apply them event by event so that only the duplicates are skipped.
            redo = await self._run([items[i] for i in again], [], summed=False)
            for i, result in zip(again, redo, strict=True):
                results[i] = result
        return results

    async def _run(
        self,
        items: Sequence[ItemUpdate],
        partitions: Sequence[PartitionUpdate],
        *,
        summed: bool,
    ) -> list[Any]:
        """One pipeline: the items' scripts, then the partitions'; results in that order."""
        pipe = self._client.pipeline(transaction=False)
        chunks: list[int] = []  # items per multi-item call (single server)
        if self._cluster:
            for u in items:
                # execute_command rather than pipe.evalsha: redis-py's cluster pipeline
                # blocks the evalsha() helper but routes a raw EVALSHA by its keys.
                pipe.execute_command(
                    "EVALSHA",
                    self._shas["item"],
                    2,
                    *item_keys(self._prefix, u.item_id),
                    *self._item_args(u, summed=summed),
                )
        else:
            for start in range(0, len(items), _ITEMS_PER_CALL):
                chunk = items[start : start + _ITEMS_PER_CALL]
                keys = [k for u in chunk for k in item_keys(self._prefix, u.item_id)]
                args = [a for u in chunk for a in self._item_args(u, summed=summed)]
                pipe.execute_command("EVALSHA", self._shas["items"], len(keys), *keys, *args)
                chunks.append(len(chunk))
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
        results = list(await pipe.execute(raise_on_error=False))
        if not chunks:
            return results
        # Unfold the multi-item replies to one result per item, like the cluster path.
        flat: list[Any] = []
        for n, reply in zip(chunks, results[: len(chunks)], strict=True):
            flat.extend([reply] * n if isinstance(reply, Exception) else reply)
        return flat + results[len(chunks) :]

    async def read(self, item_ids: Sequence[str]) -> dict[str, ItemWindow]:
        """See :meth:`stream.windows.base.WindowStore.read`."""
        if not item_ids:
            return {}
        try:
            results = await self._read_raw(item_ids)
        except CLIENT_ERRORS as exc:
            raise StateStoreError(f"Redis failed reading windows: {exc}") from exc
        # Runs for every item of a bucket close: bytes parsed as they come (the client never
        # decodes; int() and float() take ASCII bytes), most buckets a bare quantity.
        origin, step = self._freq.origin_ms, self._freq.step_ms
        out: dict[str, ItemWindow] = {}
        for item_id, raw in zip(item_ids, results, strict=True):
            first: int | None = None
            buckets: dict[int, BucketSums] = {}
            for key, value in raw:
                if key == b"f":
                    first = origin + int(value) * step
                    continue
                if b"," not in value:
                    sums = BucketSums(float(value))
                else:
                    parts = [float(x) for x in value.split(b",")]
                    # priced_qty == quantity, the common case, is left out
                    sums = BucketSums(parts[0], parts[1], parts[2] if len(parts) > 2 else parts[0])
                buckets[origin + int(key) * step] = sums
            out[item_id] = ItemWindow(item_id, first, dict(sorted(buckets.items())))
        return out

    async def _read_raw(
        self, item_ids: Sequence[str], *, retry: bool = True
    ) -> list[list[tuple[Any, Any]]]:
        """Each item's window hash as (field, value) pairs, in one round trip."""
        keys = [item_keys(self._prefix, item_id)[0] for item_id in item_ids]
        if self._cluster:
            pipe = self._client.pipeline(transaction=False)
            for key in keys:
                pipe.hgetall(key)
            return [list(r.items()) for r in await pipe.execute()]
        if "read" not in self._shas:
            await self._load_scripts()
        pipe = self._client.pipeline(transaction=False)
        for start in range(0, len(keys), _ITEMS_PER_CALL):
            chunk = keys[start : start + _ITEMS_PER_CALL]
            pipe.execute_command("EVALSHA", self._shas["read"], len(chunk), *chunk)
        replies = await pipe.execute(raise_on_error=False)
        if retry and any(isinstance(r, NoScriptError) for r in replies):
            logger.warning("Redis lost the window scripts; reloading them")
            await self._load_scripts()
            return await self._read_raw(item_ids, retry=False)
        for reply in replies:
            if isinstance(reply, Exception):
                raise reply
        # HGETALL through Lua is a flat [field, value, field, value, ...] list.
        return [list(zip(flat[::2], flat[1::2], strict=True)) for r in replies for flat in r]

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
