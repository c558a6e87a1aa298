"""In-memory :class:`~stream.state.base.WindowStore` for unit tests and single-process demos.

It implements exactly the Redis store's semantics (the contract tests run against both), in
plain dicts. TTLs are not modelled: nothing in a test lives long enough to expire.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

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
from trendcast.freq import Freq

__all__ = ["MemoryWindowStore"]

logger = logging.getLogger(__name__)


@dataclass
class _Item:
    first_ms: int | None = None
    buckets: dict[int, BucketSums] = field(default_factory=dict)
    seen: dict[str, int] = field(default_factory=dict)  # dedupe key -> bucket start


class MemoryWindowStore:
    """Dict-backed window store.

    Args:
        freq: Bucket frequency of the stored sums.
    """

    def __init__(self, freq: Freq) -> None:
        self._freq = freq
        self._items: dict[str, _Item] = {}
        self._clocks: dict[PartitionId, PartitionState] = {}
        self._sellers: dict[PartitionId, dict[str, int]] = {}
        self._latest: dict[str, LatestForecast] = {}

    @property
    def freq(self) -> Freq:
        """Bucket frequency of the stored sums."""
        return self._freq

    @property
    def remote(self) -> bool:
        """In-process: its operations are not timed as Redis round trips."""
        return False

    async def ping(self) -> None:
        """Always available: nothing to check."""

    async def apply(
        self, items: Sequence[ItemUpdate], partitions: Sequence[PartitionUpdate]
    ) -> ApplyResult:
        """See :meth:`stream.state.base.WindowStore.apply`."""
        changed: dict[str, list[int]] = {}
        duplicates = refused = 0
        for update in items:
            item = self._items.setdefault(update.item_id, _Item())
            touched: list[int] = []
            for delta in update.deltas:
                if delta.bucket_ms < update.dedupe_from_ms:
                    refused += 1
                    continue
                if delta.dedupe_key in item.seen:
                    duplicates += 1
                    continue
                item.seen[delta.dedupe_key] = delta.bucket_ms
                old = item.buckets.get(delta.bucket_ms, BucketSums(0.0))
                item.buckets[delta.bucket_ms] = BucketSums(
                    old.quantity + delta.quantity,
                    old.price_qty + delta.price_qty,
                    old.priced_qty + delta.priced_qty,
                )
                if item.first_ms is None or delta.bucket_ms < item.first_ms:
                    item.first_ms = delta.bucket_ms
                if delta.bucket_ms not in touched:
                    touched.append(delta.bucket_ms)
            item.buckets = {b: s for b, s in item.buckets.items() if b >= update.keep_from_ms}
            item.seen = {k: b for k, b in item.seen.items() if b >= update.dedupe_from_ms}
            if touched:
                known = changed.setdefault(update.item_id, [])
                known.extend(b for b in touched if b not in known)
        active: dict[PartitionId, list[str]] = {}
        lost: set[PartitionId] = set()
        for p in partitions:
            stored = self._clocks.get(p.partition)
            if p.expect_offset is not None and (
                stored is None or stored.next_offset is None or stored.next_offset < p.expect_offset
            ):
                lost.add(p.partition)  # the state is gone: the clock is not written
            else:
                self._clocks[p.partition] = (stored or PartitionState()).merged(p.state)
            sellers = self._sellers.setdefault(p.partition, {})
            for item_id, last in p.last_sale_ms.items():
                sellers[item_id] = max(last, sellers.get(item_id, last))
            if p.forget_before_ms is not None:
                cutoff = p.forget_before_ms
                self._sellers[p.partition] = sellers = {
                    i: b for i, b in sellers.items() if b >= cutoff
                }
            if p.active_from_ms is not None:
                since = p.active_from_ms
                active[p.partition] = sorted(i for i, b in sellers.items() if b >= since)
        return ApplyResult(
            changed=changed,
            duplicates=duplicates,
            refused=refused,
            active=active,
            lost=frozenset(lost),
        )

    def flush(self) -> None:
        """Forget everything, like ``FLUSHALL`` on Redis (tests of the rebuild from the log)."""
        self._items.clear()
        self._clocks.clear()
        self._sellers.clear()

    async def read(self, item_ids: Sequence[str]) -> dict[str, ItemWindow]:
        """See :meth:`stream.state.base.WindowStore.read`."""
        out: dict[str, ItemWindow] = {}
        for item_id in item_ids:
            item = self._items.get(item_id, _Item())
            out[item_id] = ItemWindow(item_id, item.first_ms, dict(sorted(item.buckets.items())))
        return out

    async def save_latest(self, forecasts: Sequence[LatestForecast], ttl_ms: int) -> int:
        """See :meth:`stream.state.base.WindowStore.save_latest` (``ttl_ms`` is not modelled)."""
        kept = 0
        for forecast in forecasts:
            stored = self._latest.get(forecast.item_id)
            if stored is None or stored.order <= forecast.order:
                self._latest[forecast.item_id] = forecast
                kept += 1
        return kept

    async def read_latest(self, item_ids: Sequence[str]) -> dict[str, bytes | None]:
        """See :meth:`stream.state.base.WindowStore.read_latest`."""
        out: dict[str, bytes | None] = {}
        for item_id in item_ids:
            stored = self._latest.get(item_id)
            out[item_id] = None if stored is None else stored.record
        return out

    async def load_partition(self, partition: PartitionId) -> PartitionState:
        """See :meth:`stream.state.base.WindowStore.load_partition`."""
        return self._clocks.get(partition, PartitionState())

    async def save_partition(self, partition: PartitionId, state: PartitionState) -> None:
        """See :meth:`stream.state.base.WindowStore.save_partition`."""
        await self.apply([], [PartitionUpdate(partition, state)])

    async def aclose(self) -> None:
        """Nothing to release."""
