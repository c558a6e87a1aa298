"""Redis :class:`~stream.state.base.WindowStore`: Lua scripts, one pipelined round trip.

The scripts are files in ``stream/state/lua/`` (what each takes and returns is written above
its loading line below).

Key layout (``P`` = the configured prefix; the ``{...}`` part is the Redis Cluster hash tag,
so every script touches the keys of one slot only)::

    P:{<item_id>}:w        hash   bucket index -> "q", "q,price_qty" (priced_qty == q) or
                                  "q,price_qty,priced_qty"; "f" -> first sale's bucket index
    P:{<item_id>}:d        zset   dedupe key -> bucket index (forgotten once the bucket is late);
                                  "\\x1e", "\\x1f" -> trim markers (see ``_ITEM_FUNCTION``)
    P:{<item_id>}:f        string the item's latest forecast record, behind a 35-byte header
                                  (``as_of`` + ``emitted_at_ms`` in 15 digits: see
                                  ``_SAVE_LATEST``); read back without the header
    P:{p:<topic>:<n>}:s    hash   "m" -> max event ms, "e" -> first bucket not yet forecast,
                                  "o" -> first offset not fully processed
    P:{p:<topic>:<n>}:a    zset   item_id -> start ms of its latest bucket with a sale

Bucket *indices* (``(start - origin) / step``) rather than epoch ms keep hash fields small
integers, which Redis stores compactly in a listpack; item ids containing braces get a hashed
tag (the raw id would split the tag) and keep the id in the key for uniqueness.

A batch is one pipeline of EVALSHA calls: per item (atomic for that item: dedupe check,
sums, trim, TTL; a single server takes up to 200 items per call) and per partition
(monotonic clock merge, recent sellers). On a single server the pipeline is written call by
call as the calls are built, so Redis starts on the first while the rest are built (see
``RedisWindowStore._stream``). The pipeline is not a cross-slot transaction — a crash can
leave some items applied — but every script is idempotent, so the worker simply re-applies
the whole batch when it is re-delivered.

Redis Cluster (``TRENDCAST_REDIS_CLUSTER=true``, client from :mod:`stream.state.redis_clients`)
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
from collections.abc import Callable, Iterable, Iterator, Sequence
from importlib import resources
from itertools import chain
from typing import Any, cast

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster
from redis.exceptions import NoScriptError, ResponseError
from redis.typing import EncodableT

from stream.state.base import (
    ApplyResult,
    BucketSums,
    ItemUpdate,
    ItemWindow,
    LatestForecast,
    PartitionId,
    PartitionState,
    PartitionUpdate,
)
from stream.state.redis_clients import CLIENT_ERRORS, AsyncRedisClient, async_client
from trendcast.exceptions import StateStoreError
from trendcast.freq import Freq

__all__ = ["RedisWindowStore", "item_keys", "latest_key", "partition_keys"]

logger = logging.getLogger(__name__)


def _script(name: str) -> str:
    """The Lua source ``stream/state/lua/<name>.lua`` (package data, see pyproject.toml).

    Read as bytes and decoded, not with ``read_text``: text mode would translate line
    endings, and a script's SHA1 (what EVALSHA names it by) must be the file's, byte for
    byte. Each file keeps the leading newline the scripts had when they were Python strings,
    so the SHA1s did not change when they moved out.

    >>> _script("read_windows").splitlines()[1]
    'local out = {}'
    """
    return resources.files("stream.state").joinpath("lua", f"{name}.lua").read_bytes().decode()


# lua/item_lib.lua (prepended to apply_item.lua and apply_items.lua, which call it):
# apply_item(window hash, dedupe zset, keep_from_idx, dedupe_from_idx, ttl_ms, arguments)
# adds a batch's events to one item. Its arguments are a run of ARGV (the multi-item script
# walks the runs of its items): a header, then the item's dedupe keys, one argument each.
# The header's first character is the mode:
#
# * "s" (summed, the common case): per bucket "bucket_idx,quantity,price_qty,priced_qty,n;"
#   (the sums of the bucket's events), its n keys following those of the previous bucket.
#   If ANY key was seen before, nothing is written and {-1} is returned: the caller re-sends
#   that item in mode "e". Re-deliveries are rare, so the sums of a batch are added once per
#   bucket, not once per event.
# * "e" (events): per event "bucket_idx,quantity,price_qty,priced_qty;", one key each: every
#   key checked on its own, in order (a key twice in the batch counts once), and only the
#   duplicates skipped.
#
# Events of buckets before dedupe_from are refused by the caller, which leaves them out.
# Returns {duplicates, {changed bucket indices}} and the index of the next item's header.
#
# The keys are arguments of their own rather than joined into the header: Redis builds ARGV
# in C, and ZMSCORE takes them straight from it (unpack), while splitting them with
# string.gmatch cost more than all the item's commands together. The few numbers per bucket
# stay in one string: an argument each costs the client more (packing) than parsing costs
# Lua.
#
# Likewise each redis.call costs a few microseconds, more than the command itself on these
# small keys, so an item takes the same handful of calls whatever its number of buckets and
# events: ZMSCORE (every key), HMGET (every touched bucket and 'f'), ZADD, HSET, 2 PEXPIRE.
# Trimming would cost an HKEYS (and a ZREMRANGEBYSCORE) per update; instead the dedupe zset
# keeps two marker members, which no dedupe key can equal (_safe_key hashes keys holding
# these characters):
#
# * "\30" scored with a lower bound of the lowest bucket in the window hash: the hash is
#   scanned only once keep_from passes it (about once per bucket, not once per update);
# * "\31" scored with a lower bound of the lowest dedupe key score: old keys are removed
#   only once dedupe_from passes it (after which dedupe_from itself is the bound: keys are
#   only added at or after it).
#
# A missing marker means "unknown" (data of an older version, an expired or evicted key):
# that item is trimmed the full way once and gets its markers. They live in the dedupe zset,
# not in the window hash, so that readers of the window (older workers too, during a rolling
# upgrade) see the layout they know. An older worker's ZREMRANGEBYSCORE drops the markers
# below its dedupe_from (the usual case), which only makes the next update trim the full way.
# Only if "\30" survived it (an item whose lowest bucket is recent) could an older worker add
# a bucket below the marker unseen: that bucket then outlives keep_from until keep_from
# passes the marker, at most a window's length — harmless, as no window reaches before
# keep_from.
_ITEM_FUNCTION = _script("item_lib")

# lua/apply_item.lua. KEYS: window hash, dedupe zset. ARGV: keep_from_idx, dedupe_from_idx,
# ttl_ms, then the item's arguments. One item per call: what Redis Cluster allows (both keys
# share the item's hash slot).
_APPLY_ITEM = _ITEM_FUNCTION + _script("apply_item")

# lua/apply_items.lua. KEYS: window hash and dedupe zset of each of n items. ARGV:
# keep_from_idx, dedupe_from_idx, ttl_ms (the same for every item of the call), then the
# arguments of each item in turn.
# Returns one apply_item result per item. On a single Redis server the keys of many items
# may go into one script call, so a batch costs a handful of commands instead of one per
# item (redis-py's per-command cost dominated); the whole call is still atomic.
_APPLY_ITEMS = _ITEM_FUNCTION + _script("apply_items")

# lua/read_windows.lua. KEYS: window hashes. Returns HGETALL of each (single server only,
# like _APPLY_ITEMS).
_READ_WINDOWS = _script("read_windows")

#: Distinct stored bucket values whose parsed sums read() keeps (then it starts over): far
#: more than the common ones, a few MB at most.
_SUMS_CACHED = 1 << 15

#: Items per multi-item script call: large enough to amortise the per-command cost, small
#: enough that one call keeps Redis busy for milliseconds, not seconds.
_ITEMS_PER_CALL = 200

#: Keys per MGET of :meth:`RedisWindowStore.read_latest` (the lookup API asks for at most
#: 500; larger reads are split so that one command never holds Redis for long).
_READS_PER_CALL = 1000

# lua/apply_partition.lua. KEYS: clock hash, sellers zset.
# ARGV: max_event_ms, emitted_to_ms, forget_before_ms, active_from_ms, next_offset,
#       expect_offset ('' = none), then 2 per item: item_id, latest sale bucket ms.
# Returns {lost, active items (or {})}: lost is 1 when expect_offset is set and the stored
# clock is missing or older (the clock is then not written; see PartitionUpdate).
# One HMGET/HSET for the clock and one ZADD GT per 1000 sellers rather than a call per item:
# each redis.call costs more than the command itself.
_APPLY_PARTITION = _script("apply_partition")

# lua/save_latest.lua. KEYS: latest-forecast strings. ARGV: ttl_ms, header width, then one
# value per key: header + record. Keeps each value unless its key holds a newer header; returns
# how many were kept.
# The header is ``as_of`` (fixed width, ISO) then ``emitted_at_ms`` zero-padded, so "newer"
# is one string comparison in Lua, on a GETRANGE of the header alone (the stored record is
# never copied into Lua). On a single server one call takes up to _ITEMS_PER_CALL keys; on a
# cluster one key per call (keys of different items are in different slots).
_SAVE_LATEST = _script("save_latest")

#: ``as_of`` (``YYYY-MM-DDTHH:MM:SSZ``) + ``emitted_at_ms`` in 15 digits.
_LATEST_HEADER = 20 + 15


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


def latest_key(prefix: str, item_id: str) -> str:
    """Key of an item's latest forecast record (the hash slot of its window).

    >>> latest_key("tc", "85123A")
    'tc:{85123A}:f'
    """
    return item_keys(prefix, item_id)[0][:-1] + "f"


def _latest_value(forecast: LatestForecast) -> bytes:
    """The stored value: the header that orders it, then the record.

    >>> _latest_value(LatestForecast("a", "2011-01-27T00:00:00Z", 5, b"{}"))
    b'2011-01-27T00:00:00Z000000000000005{}'
    """
    return b"%s%015d%s" % (forecast.as_of.encode(), forecast.emitted_at_ms, forecast.record)


def partition_keys(prefix: str, partition: PartitionId) -> tuple[str, str]:
    """Clock hash and sellers zset keys of a partition (same hash slot).

    >>> partition_keys("tc", PartitionId("sales", 3))
    ('tc:{p:sales:3}:s', 'tc:{p:sales:3}:a')
    """
    base = f"{prefix}:{{p:{partition.topic}:{partition.partition}}}"
    return f"{base}:s", f"{base}:a"


def _safe_key(key: str) -> str:
    """``key``, or a digest of it when it holds a separator character (\\x1d, \\x1e, \\x1f).

    Dedupe keys were once joined with these separators; they now go as arguments of their
    own, but a key must still never equal a trim marker ("\\x1e", "\\x1f"), and the same
    event must keep the member it was stored under by an older version.

    >>> _safe_key("e:42"), _safe_key("e:a\x1fb")
    ('e:42', 'h:8a85ddc9bec331ea26473138d69d0632dd6f4da4')
    """
    if "\x1d" in key or "\x1e" in key or "\x1f" in key:
        return "h:" + hashlib.sha1(key.encode(), usedforsecurity=False).hexdigest()
    return key


def _parse_sums(value: bytes) -> BucketSums:
    """A stored bucket value: "q", "q,price_qty" (priced_qty == q) or "q,pq,priced_qty".

    >>> _parse_sums(b"3"), _parse_sums(b"2,5.9") == BucketSums(2.0, 5.9, 2.0)
    (BucketSums(quantity=3.0, price_qty=0.0, priced_qty=0.0), True)
    """
    if b"," not in value:
        return BucketSums(float(value))
    parts = [float(x) for x in value.split(b",")]
    return BucketSums(parts[0], parts[1], parts[2] if len(parts) > 2 else parts[0])


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
        self._sums: dict[bytes, BucketSums] = {}  # stored value -> parsed (see read)
        self._starts: dict[bytes, int] = {}  # window field -> bucket start (see read)
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
            cluster: ``url`` is a Redis Cluster node (see :mod:`stream.state.redis_clients`).

        Raises:
            ConfigError: ``cluster`` with a URL a cluster cannot serve (a database other
                than 0, a unix socket).
        """
        return cls(async_client(url, cluster=cluster), freq, prefix)

    @property
    def freq(self) -> Freq:
        """Bucket frequency of the stored sums."""
        return self._freq

    @property
    def remote(self) -> bool:
        """Every operation is a round trip to Redis (timed in ``trendcast_redis_seconds``)."""
        return True

    @property
    def client(self) -> AsyncRedisClient:
        """The Redis client (shared by stores that keep other state beside the windows, e.g.
        the trends candidates, so that TLS, credentials and Cluster mode are the same)."""
        return self._client

    @property
    def prefix(self) -> str:
        """Prefix of every key this store writes."""
        return self._prefix

    def _idx(self, ms: int) -> int:
        return (ms - self._freq.origin_ms) // self._freq.step_ms

    async def _load_scripts(self) -> None:
        # On a cluster, redis-py sends SCRIPT LOAD to every primary (and returns one sha).
        scripts = [
            ("item", _APPLY_ITEM),
            ("partition", _APPLY_PARTITION),
            ("latest", _SAVE_LATEST),
        ]
        if not self._cluster:
            scripts += [("items", _APPLY_ITEMS), ("read", _READ_WINDOWS)]
        for name, body in scripts:
            self._shas[name] = _decode(await self._client.script_load(body))

    async def ping(self) -> None:
        """Check the connection and load the scripts (see :meth:`WindowStore.ping`).

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
        """See :meth:`stream.state.base.WindowStore.apply`."""
        if not items and not partitions:
            return ApplyResult({}, 0, 0, {})
        try:
            if not self._shas:
                await self._load_scripts()
            results, refused = await self._execute(items, partitions)
            if any(isinstance(r, NoScriptError) for r in results):
                # Redis restarted or flushed its script cache: reload and re-run the whole
                # batch, which is safe because every script is idempotent.
                logger.warning("Redis lost the window scripts; reloading them")
                await self._load_scripts()
                results, refused = await self._execute(items, partitions)
        except CLIENT_ERRORS as exc:
            raise StateStoreError(f"Redis failed applying a batch: {exc}") from exc
        errors = [r for r in results if isinstance(r, Exception)]
        if errors:
            raise StateStoreError(f"Redis failed applying a batch: {errors[0]}") from errors[0]
        changed: dict[str, list[int]] = {}
        duplicates = 0
        origin, step = self._freq.origin_ms, self._freq.step_ms
        for update, result in zip(items, results[: len(items)], strict=True):
            duplicates += int(result[0])
            if result[1]:
                starts = [origin + int(i) * step for i in result[1]]
                known = changed.get(update.item_id)
                if known is None:  # the usual case: an item comes once per batch
                    changed[update.item_id] = starts
                else:
                    known.extend(b for b in starts if b not in known)
        active: dict[PartitionId, list[str]] = {}
        lost: set[PartitionId] = set()
        for p, result in zip(partitions, results[len(items) :], strict=True):
            if int(result[0]):
                lost.add(p.partition)
            if p.active_from_ms is not None:
                active[p.partition] = sorted(_decode(i) for i in result[1])
        return ApplyResult(
            changed=changed,
            duplicates=duplicates,
            refused=refused,
            active=active,
            lost=frozenset(lost),
        )

    def _item_args(self, u: ItemUpdate, *, summed: bool) -> tuple[list[EncodableT], int]:
        """apply_item's arguments after the head (see ``_ITEM_FUNCTION``), and how many
        deltas were refused (left out: their bucket is before ``dedupe_from_ms``)."""
        origin, step = self._freq.origin_ms, self._freq.step_ms
        dedupe_from = self._idx(u.dedupe_from_ms)
        deltas = u.deltas
        keys = [d.dedupe_key for d in deltas]
        if summed and len(set(keys)) < len(keys):
            summed = False  # a key twice in the batch: only the events path skips the copy
        probe = "".join(keys)  # one scan rather than a call per key, in the usual case
        if "\x1d" in probe or "\x1e" in probe or "\x1f" in probe:
            keys = [_safe_key(k) for k in keys]
        refused = 0
        if not summed:
            entries, event_keys = ["e"], []
            for d, key in zip(deltas, keys, strict=True):
                idx = (d.bucket_ms - origin) // step
                if idx < dedupe_from:
                    refused += 1
                    continue
                entries.append(
                    f"{idx},{float(d.quantity)!r},{float(d.price_qty)!r},{float(d.priced_qty)!r};"
                )
                event_keys.append(key)
            return ["".join(entries), *event_keys], refused
        first = deltas[0].bucket_ms if deltas else None
        if first is not None and all(d.bucket_ms == first for d in deltas):  # the usual case
            idx = (first - origin) // step
            if idx < dedupe_from:
                return ["s"], len(keys)
            # Summed in offset order, as the events path would add them one by one.
            q, pq, pn = deltas[0].quantity, deltas[0].price_qty, deltas[0].priced_qty
            for d in deltas[1:]:
                q += d.quantity
                pq += d.price_qty
                pn += d.priced_qty
            return [f"s{idx},{float(q)!r},{float(pq)!r},{float(pn)!r},{len(keys)};", *keys], 0
        # Sums per bucket in offset order, as the events path would add them one by one.
        buckets: dict[int, list[Any]] = {}
        for d, key in zip(deltas, keys, strict=True):
            acc = buckets.get(d.bucket_ms)
            if acc is None:
                buckets[d.bucket_ms] = [d.quantity, d.price_qty, d.priced_qty, [key]]
            else:
                acc[0] += d.quantity
                acc[1] += d.price_qty
                acc[2] += d.priced_qty
                acc[3].append(key)
        args: list[EncodableT] = [""]
        blocks = ["s"]
        for bucket, (q, pq, pn, bucket_keys) in buckets.items():
            idx = (bucket - origin) // step
            if idx < dedupe_from:
                refused += len(bucket_keys)
                continue
            blocks.append(f"{idx},{float(q)!r},{float(pq)!r},{float(pn)!r},{len(bucket_keys)};")
            args += bucket_keys
        args[0] = "".join(blocks)
        return args, refused

    async def _execute(
        self, items: Sequence[ItemUpdate], partitions: Sequence[PartitionUpdate]
    ) -> tuple[list[Any], int]:
        """Apply the items (summed; seen keys -> again event by event), then the partitions.

        Returns:
            One result per item ({duplicates, changed}) then per partition, and the number
            of refused deltas.
        """
        refused = 0

        def summed(u: ItemUpdate) -> list[EncodableT]:
            nonlocal refused
            item_args, item_refused = self._item_args(u, summed=True)
            refused += item_refused
            return item_args

        results = await self._run(items, summed, partitions)
        again = [
            i
            for i, r in enumerate(results[: len(items)])
            if not isinstance(r, Exception) and int(r[0]) == -1
        ]
        if again:
            # Some keys were seen before (a re-delivery): nothing of those items was
            # written; apply them event by event so that only the duplicates are skipped.
            redo = [items[i] for i in again]
            by_event = await self._run(redo, lambda u: self._item_args(u, summed=False)[0], [])
            for i, result in zip(again, by_event, strict=True):
                results[i] = result
        return results, refused

    async def _run(
        self,
        items: Sequence[ItemUpdate],
        args_of: Callable[[ItemUpdate], list[EncodableT]],
        partitions: Sequence[PartitionUpdate],
    ) -> list[Any]:
        """One pipeline: the items' scripts, then the partitions'; results in that order.

        ``args_of`` builds an item's arguments after the head (see :meth:`_item_args`); it
        is called as the pipeline is written, item by item.
        """
        heads = [(self._idx(u.keep_from_ms), self._idx(u.dedupe_from_ms), u.ttl_ms) for u in items]
        if self._cluster:
            pipe = self._client.pipeline(transaction=False)
            for u, head in zip(items, heads, strict=True):
                # execute_command rather than pipe.evalsha: redis-py's cluster pipeline
                # blocks the evalsha() helper but routes a raw EVALSHA by its keys.
                pipe.execute_command(
                    "EVALSHA",
                    self._shas["item"],
                    2,
                    *item_keys(self._prefix, u.item_id),
                    *head,
                    *args_of(u),
                )
            for call in self._partition_calls(partitions):
                pipe.execute_command(*call)
            return list(await pipe.execute(raise_on_error=False))
        chunks: list[int] = []  # items per multi-item call
        calls = self._item_calls(items, heads, args_of, chunks)
        results = await self._stream(chain(calls, self._partition_calls(partitions)))
        # Unfold the multi-item replies to one result per item, like the cluster path.
        flat: list[Any] = []
        for n, reply in zip(chunks, results[: len(chunks)], strict=True):
            flat.extend([reply] * n if isinstance(reply, Exception) else reply)
        return flat + results[len(chunks) :]

    def _item_calls(
        self,
        items: Sequence[ItemUpdate],
        heads: Sequence[tuple[int, int, int]],
        args_of: Callable[[ItemUpdate], list[EncodableT]],
        chunks: list[int],
    ) -> Iterator[list[EncodableT]]:
        """Multi-item EVALSHA calls (single server), each built when the pipeline needs it.

        A call takes consecutive items sharing keep_from/dedupe_from/ttl (in practice all the
        items of a batch: they are the partition's bounds), sent once per call. Appends each
        call's number of items to ``chunks``.
        """
        start = 0
        while start < len(items):
            head = heads[start]
            end = start + 1
            while end < len(items) and end - start < _ITEMS_PER_CALL and heads[end] == head:
                end += 1
            call: list[EncodableT] = ["EVALSHA", self._shas["items"], 2 * (end - start)]
            for u in items[start:end]:
                call += item_keys(self._prefix, u.item_id)
            call += head
            for u in items[start:end]:
                call += args_of(u)
            chunks.append(end - start)
            yield call
            start = end

    def _partition_calls(self, partitions: Sequence[PartitionUpdate]) -> Iterator[list[EncodableT]]:
        """One EVALSHA of the partition script per partition."""
        for p in partitions:
            call: list[EncodableT] = [
                "EVALSHA",
                self._shas["partition"],
                2,
                *partition_keys(self._prefix, p.partition),
                _opt(p.state.max_event_ms),
                _opt(p.state.emitted_to_ms),
                _opt(p.forget_before_ms),
                _opt(p.active_from_ms),
                _opt(p.state.next_offset),
                _opt(p.expect_offset),
            ]
            for item_id, last in p.last_sale_ms.items():
                call += [item_id, last]
            yield call

    async def _stream(self, calls: Iterable[Sequence[EncodableT]]) -> list[Any]:
        """Send ``calls`` as one pipeline on one connection, each as soon as it is built.

        Why not redis-py's pipeline: it sends nothing before every command is packed, so
        Redis idles while the worker builds a batch's arguments and the worker idles while
        Redis runs the scripts. Written call by call, Redis starts on the first call while
        the next ones are built (one write per call, still one round trip: no reply is
        awaited before the last call is sent). Replies are read in order; an error reply
        (NOSCRIPT, a script error) becomes that call's result, as in a pipeline with
        ``raise_on_error=False``. On any other failure the connection is dropped rather than
        returned to the pool with replies left unread, and the error fails the batch: the
        worker retries it whole (every script is idempotent) instead of redis-py retrying
        the pipeline.
        """
        pool = cast(aioredis.Redis, self._client).connection_pool  # single server only
        conn = await pool.get_connection()  # type: ignore[no-untyped-call]
        try:
            sent = 0
            for call in calls:
                await conn.send_packed_command(conn.pack_command(*call), check_health=sent == 0)
                sent += 1
            results: list[Any] = []
            for _ in range(sent):
                try:
                    results.append(await conn.read_response())
                except ResponseError as exc:
                    results.append(exc)
            return results
        except BaseException:
            await conn.disconnect()
            raise
        finally:
            await pool.release(conn)

    async def read(self, item_ids: Sequence[str]) -> dict[str, ItemWindow]:
        """See :meth:`stream.state.base.WindowStore.read`."""
        if not item_ids:
            return {}
        try:
            results = await self._read_raw(item_ids)
        except CLIENT_ERRORS as exc:
            raise StateStoreError(f"Redis failed reading windows: {exc}") from exc
        # Runs for every item of a bucket close, so for every bucket of every window: bytes
        # parsed as they come (the client never decodes; int() takes ASCII bytes), in
        # comprehensions, and the sums of a stored value built once — the same few
        # quantities ("1", "12", "6") fill most buckets, and a frozen BucketSums is safe to
        # share between windows.
        # The bucket start of a field is remembered too: every window of a close holds the
        # same few dozen bucket indices, so a dict lookup replaces int() and the arithmetic.
        origin, step = self._freq.origin_ms, self._freq.step_ms
        cached = self._sums.get
        parse = self._parse_sums
        known_start = self._starts.get
        start_of = self._start_of
        out: dict[str, ItemWindow] = {}
        for item_id, fields in zip(item_ids, results, strict=True):
            f = fields.pop(b"f", None)
            buckets = {
                known_start(k) or start_of(k): cached(v) or parse(v) for k, v in fields.items()
            }
            # HSET appends new fields, so buckets mostly come oldest first already.
            starts = list(buckets)
            if starts != sorted(starts):
                buckets = dict(sorted(buckets.items()))
            first = None if f is None else origin + int(f) * step
            out[item_id] = ItemWindow(item_id, first, buckets)
        return out

    def _start_of(self, field: bytes) -> int:
        """Start (epoch ms) of the bucket of a window field, remembered (see :meth:`read`)."""
        if len(self._starts) >= _SUMS_CACHED:
            self._starts.clear()
        start = self._starts[field] = self._freq.origin_ms + int(field) * self._freq.step_ms
        return start

    def _parse_sums(self, value: bytes) -> BucketSums:
        """:func:`_parse_sums`, remembered for the next windows (see :meth:`read`)."""
        if len(self._sums) >= _SUMS_CACHED:
            self._sums.clear()
        sums = self._sums[value] = _parse_sums(value)
        return sums

    async def _read_raw(
        self, item_ids: Sequence[str], *, retry: bool = True
    ) -> list[dict[bytes, bytes]]:
        """Each item's window hash (field -> value), in one round trip."""
        keys = [item_keys(self._prefix, item_id)[0] for item_id in item_ids]
        if self._cluster:
            pipe = self._client.pipeline(transaction=False)
            for key in keys:
                pipe.hgetall(key)
            return list(await pipe.execute())
        if "read" not in self._shas:
            await self._load_scripts()
        sha = self._shas["read"]
        replies = await self._stream(
            ["EVALSHA", sha, len(chunk), *chunk]
            for chunk in (
                keys[start : start + _ITEMS_PER_CALL]
                for start in range(0, len(keys), _ITEMS_PER_CALL)
            )
        )
        if retry and any(isinstance(r, NoScriptError) for r in replies):
            logger.warning("Redis lost the window scripts; reloading them")
            await self._load_scripts()
            return await self._read_raw(item_ids, retry=False)
        for reply in replies:
            if isinstance(reply, Exception):
                raise reply
        # HGETALL through Lua is a flat [field, value, field, value, ...] list: paired by
        # zipping one iterator with itself.
        return [dict(zip(*[iter(flat)] * 2, strict=True)) for r in replies for flat in r]

    async def save_latest(self, forecasts: Sequence[LatestForecast], ttl_ms: int) -> int:
        """See :meth:`stream.state.base.WindowStore.save_latest`."""
        if not forecasts:
            return 0
        try:
            if "latest" not in self._shas:
                await self._load_scripts()
            results = await self._save_latest(forecasts, ttl_ms)
            if any(isinstance(r, NoScriptError) for r in results):
                logger.warning("Redis lost the window scripts; reloading them")
                await self._load_scripts()
                results = await self._save_latest(forecasts, ttl_ms)
        except CLIENT_ERRORS as exc:
            raise StateStoreError(f"Redis failed saving latest forecasts: {exc}") from exc
        errors = [r for r in results if isinstance(r, Exception)]
        if errors:
            raise StateStoreError(f"Redis failed saving latest forecasts: {errors[0]}") from errors[
                0
            ]
        return sum(int(r) for r in results)

    async def _save_latest(self, forecasts: Sequence[LatestForecast], ttl_ms: int) -> list[Any]:
        """One pipeline of save_latest calls; a reply (or error) per call."""
        sha, prefix = self._shas["latest"], self._prefix
        if self._cluster:
            pipe = self._client.pipeline(transaction=False)
            for f in forecasts:
                pipe.execute_command(
                    "EVALSHA",
                    sha,
                    1,
                    latest_key(prefix, f.item_id),
                    ttl_ms,
                    _LATEST_HEADER,
                    _latest_value(f),
                )
            return list(await pipe.execute(raise_on_error=False))

        def calls() -> Iterator[list[EncodableT]]:
            for start in range(0, len(forecasts), _ITEMS_PER_CALL):
                chunk = forecasts[start : start + _ITEMS_PER_CALL]
                call: list[EncodableT] = ["EVALSHA", sha, len(chunk)]
                call += [latest_key(prefix, f.item_id) for f in chunk]
                call += [ttl_ms, _LATEST_HEADER]
                call += [_latest_value(f) for f in chunk]
                yield call

        return await self._stream(calls())

    async def read_latest(self, item_ids: Sequence[str]) -> dict[str, bytes | None]:
        """See :meth:`stream.state.base.WindowStore.read_latest`."""
        if not item_ids:
            return {}
        keys = [latest_key(self._prefix, item_id) for item_id in item_ids]
        try:
            if self._cluster:
                pipe = self._client.pipeline(transaction=False)
                for key in keys:
                    pipe.get(key)
                values = list(await pipe.execute())
            else:
                replies = await self._stream(
                    ["MGET", *keys[start : start + _READS_PER_CALL]]
                    for start in range(0, len(keys), _READS_PER_CALL)
                )
                for reply in replies:
                    if isinstance(reply, Exception):
                        raise reply
                values = [v for reply in replies for v in reply]
        except CLIENT_ERRORS as exc:
            raise StateStoreError(f"Redis failed reading latest forecasts: {exc}") from exc
        return {
            item_id: None if value is None else value[_LATEST_HEADER:]
            for item_id, value in zip(item_ids, values, strict=True)
        }

    async def load_partition(self, partition: PartitionId) -> PartitionState:
        """See :meth:`stream.state.base.WindowStore.load_partition`."""
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
        """See :meth:`stream.state.base.WindowStore.save_partition`."""
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
