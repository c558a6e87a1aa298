"""The window store interface: per-item bucket sums and per-partition clocks.

A :class:`WindowStore` keeps, for each item, the sums of its recent buckets (quantity and, for
price-aware models, the quantity-weighted price) plus the bucket of its first sale, and for
each source partition its :class:`~stream.pipeline.watermark.PartitionState` and the items that sold
recently. Four operations are enough for the worker to process a batch:

* :meth:`WindowStore.apply` — add a batch of events atomically per item and idempotently
  (each event carries a dedupe key; a key seen before is skipped), advance partition state
  monotonically, and report what changed — all in one round trip;
* :meth:`WindowStore.read` — the stored buckets of some items;
* :meth:`WindowStore.load_partition` / :meth:`WindowStore.save_partition` — the clock a
  worker continues from after a restart or rebalance.

Two keep each item's newest forecast record for the lookup API (``GET /forecasts/{item_id}``
on any worker, since the state is shared):

* :meth:`WindowStore.save_latest` — after a batch's forecasts are delivered, keep each
  record unless its item already has a newer one (``as_of``, then ``emitted_at_ms``);
* :meth:`WindowStore.read_latest` — the kept records, byte for byte as on the topic.

Two more tell the worker how to watch the store: :meth:`WindowStore.ping` (``/ready`` and the
``/health`` probe) and :attr:`WindowStore.remote` (whether its operations are timed in
``trendcast_redis_seconds``).

Both implementations (:mod:`stream.state.memory`, :mod:`stream.state.redis_store`) pass the same
contract tests (tests/unit/stream/state/test_window_store_contract.py).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol

import msgspec
import numpy as np
import numpy.typing as npt
import orjson

from trendcast.exceptions import StateStoreError
from trendcast.freq import Freq

__all__ = [
    "ApplyResult",
    "BucketDelta",
    "BucketSums",
    "ItemUpdate",
    "ItemWindow",
    "LatestForecast",
    "PartitionId",
    "PartitionUpdate",
    "StateLostError",
    "WindowStore",
]

logger = logging.getLogger(__name__)


class StateLostError(StateStoreError):
    """The store no longer holds state the worker counted (flushed, evicted, a failover to
    a replica that lagged): e.g. an item the partition's sellers list has no window. The
    batch is retried once the partition's rebuild from the log has started."""


class PartitionId(NamedTuple):
    """A source topic partition."""

    topic: str
    partition: int


@dataclass(frozen=True, slots=True)
class BucketSums:
    """What a bucket holds.

    Attributes:
        quantity: Net units sold.
        price_qty: Sum of ``price * quantity`` over priced lines with positive quantity
            (a backend may keep it to 12 significant digits; quantities are exact).
        priced_qty: Sum of ``quantity`` over the same lines (so price = price_qty/priced_qty,
            the quantity-weighted mean used offline).
    """

    quantity: float
    price_qty: float = 0.0
    priced_qty: float = 0.0

    @property
    def price(self) -> float:
        """Quantity-weighted unit price, NaN when the bucket had no priced sale."""
        return self.price_qty / self.priced_qty if self.priced_qty > 0 else float("nan")


class BucketDelta(msgspec.Struct, frozen=True, gc=False):
    """One event's contribution to one bucket.

    A msgspec struct rather than a frozen dataclass or a NamedTuple: the worker builds one
    per event, and it is made in C (0.1 µs against 0.4 µs for a NamedTuple and 2.5 times
    that for a frozen dataclass). ``gc=False``: it holds only numbers and a string, so it
    can never be part of a reference cycle, and the collector need not track it.

    Attributes:
        bucket_ms: Start of the bucket.
        dedupe_key: Identity of the event; a key already applied to the item is skipped.
        quantity: Units to add.
        price_qty: ``price * quantity`` to add (0 when unpriced or a return).
        priced_qty: ``quantity`` to add to the priced total (0 when unpriced or a return).
    """

    bucket_ms: int
    dedupe_key: str
    quantity: float
    price_qty: float = 0.0
    priced_qty: float = 0.0


@dataclass(frozen=True, slots=True)
class ItemUpdate:
    """Events for one item, with the retention bounds that hold after the batch.

    Attributes:
        item_id: The item.
        deltas: Its events, in offset order.
        keep_from_ms: Buckets starting before this are deleted (no forecast needs them).
        dedupe_from_ms: Deltas for buckets before this are refused, and dedupe keys of such
            buckets forgotten. The worker passes the partition's late bound as *stored
            before* this batch: the clock calls such events late forever after, so they can
            never be counted twice — and if the clock update of this batch is lost in a
            crash, the dedupe keys of the batch's own events are still there when it is
            re-delivered. Must be ``>= keep_from_ms``.
        ttl_ms: Expiry of the item's keys, refreshed by every update.
    """

    item_id: str
    deltas: Sequence[BucketDelta]
    keep_from_ms: int
    dedupe_from_ms: int
    ttl_ms: int


@dataclass(frozen=True, slots=True)
class PartitionUpdate:
    """A partition's clock and recent sellers after a batch.

    Attributes:
        partition: The source partition.
        state: New clock state; merged by maximum, so a stale or repeated update is harmless.
        last_sale_ms: Latest bucket with a sale, per item of the batch (merged by maximum).
        forget_before_ms: Items whose latest sale bucket starts before this are forgotten.
        active_from_ms: If set, :attr:`ApplyResult.active` lists the partition's items whose
            latest sale bucket starts at or after this.
        expect_offset: The next offset of the clock this worker knows to be stored (``None``:
            none known). If the stored clock is missing or older, the state was lost (a
            ``FLUSHALL``, a failover to a replica that lagged, a restart without
            persistence): the clock is then left unwritten, so that a clock never vouches
            for windows that are not there, and the partition is reported in
            :attr:`ApplyResult.lost` (see :mod:`stream.pipeline.recovery`).
    """

    partition: PartitionId
    state: PartitionState
    last_sale_ms: Mapping[str, int] = field(default_factory=dict)
    forget_before_ms: int | None = None
    active_from_ms: int | None = None
    expect_offset: int | None = None


@dataclass(frozen=True, slots=True)
class ApplyResult:
    """What a batch changed.

    Attributes:
        changed: Per item, the bucket starts that received at least one new event.
        duplicates: Deltas skipped because their dedupe key was already applied.
        refused: Deltas refused because their bucket was before ``dedupe_from_ms``.
        active: Per partition with ``active_from_ms``, its recently selling items (sorted).
        lost: Partitions whose stored clock was missing or older than an update's
            ``expect_offset``: their state is gone, their clock was not written.
    """

    changed: dict[str, list[int]]
    duplicates: int
    refused: int
    active: dict[PartitionId, list[str]]
    lost: frozenset[PartitionId] = frozenset()


@dataclass(frozen=True, slots=True)
class PartitionState:
    """What a partition's clock remembers between batches and workers.

    Attributes:
        max_event_ms: Largest event time accepted so far (``None``: no event yet).
        emitted_to_ms: Start of the first bucket not yet forecast; every closed bucket before
            it has had its forecasts emitted (``None``: no event yet).
        next_offset: First source offset not yet fully processed: every message before it
            had its state stored and its dead letters and forecasts delivered. Offsets are
            committed to Kafka later (every commit interval), so after a crash or rebalance
            such messages come again; one that now looks late was in fact counted (the clock
            moved past it *because* it was counted) and must not be dead-lettered as late.
            Stored together with ``max_event_ms``, so the clock never runs ahead of it.
    """

    max_event_ms: int | None = None
    emitted_to_ms: int | None = None
    next_offset: int | None = None

    def merged(self, other: PartitionState) -> PartitionState:
        """Each field's maximum of the two states: how a stored clock takes an update.

        Every field only grows, and each state is consistent on its own, so for two states
        of one partition's history this is the later of them (and storing an older state
        again changes nothing).

        >>> PartitionState(5, None, 3).merged(PartitionState(4, 2, None))
        PartitionState(max_event_ms=5, emitted_to_ms=2, next_offset=3)
        """
        return PartitionState(
            max_event_ms=_most(self.max_event_ms, other.max_event_ms),
            emitted_to_ms=_most(self.emitted_to_ms, other.emitted_to_ms),
            next_offset=_most(self.next_offset, other.next_offset),
        )


def _most(a: int | None, b: int | None) -> int | None:
    return b if a is None else a if b is None else max(a, b)


@dataclass(frozen=True, slots=True)
class ItemWindow:
    """The stored state of one item.

    Attributes:
        item_id: The item.
        first_ms: Start of the item's first bucket with a sale ever seen (``None``: unknown
            item), which gives the history length even after old buckets were trimmed.
        buckets: Bucket start -> sums, for the buckets kept (sparse: absent means no sale).
    """

    item_id: str
    first_ms: int | None
    buckets: Mapping[int, BucketSums]

    def window(
        self, last_start_ms: int, window: int, freq: Freq, *, with_prices: bool = True
    ) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32] | None, int]:
        """The model input ending with the bucket that starts at ``last_start_ms``.

        Returns:
            ``(quantities, prices, history_len)``: ``window`` bucket sums oldest first, net
            returns clipped at zero as offline; unit prices carried forward (then backward)
            over real history and NaN on padding (``None`` unless ``with_prices``); and the
            number of real buckets.

        >>> from trendcast.freq import parse_freq
        >>> d = 86_400_000
        >>> w = ItemWindow("a", 2 * d, {2 * d: BucketSums(3.0, 6.0, 3.0), 4 * d: BucketSums(-1.0)})
        >>> q, p, n = w.window(4 * d, 4, parse_freq("1D"))
        >>> q.tolist(), p.tolist()[1:], n
        ([0.0, 3.0, 0.0, 0.0], [2.0, 2.0, 2.0], 3)
        """
        step = freq.step_ms
        first_col_ms = last_start_ms - (window - 1) * step
        quantities = np.zeros(window, dtype=np.float32)
        prices = np.full(window, np.nan, dtype=np.float32) if with_prices else None
        for start, sums in self.buckets.items():
            col = (start - first_col_ms) // step
            if 0 <= col < window:
                quantities[col] = max(sums.quantity, 0.0)
                if prices is not None:
                    prices[col] = sums.price
        if self.first_ms is None or self.first_ms > last_start_ms:
            return quantities, prices, 0
        history_len = min(window, (last_start_ms - self.first_ms) // step + 1)
        if prices is None:
            return quantities, None, int(history_len)
        real = prices[window - history_len :]
        if history_len and not np.isnan(real).all():
            # Forward fill, then backward fill the leading gap, like the offline bucketizer.
            idx = np.where(np.isnan(real), 0, np.arange(history_len))
            np.maximum.accumulate(idx, out=idx)
            filled = real[idx]
            first_valid = int(np.flatnonzero(~np.isnan(filled))[0])
            filled[:first_valid] = filled[first_valid]
            prices[window - history_len :] = filled
        return quantities, prices, int(history_len)


#: ``as_of`` as every forecast record spells it (the forecasts schema's pattern): fixed width,
#: so comparing two as text compares them in time.
_AS_OF = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}Z")


@dataclass(frozen=True, slots=True)
class LatestForecast:
    """A delivered forecast record, with what decides whether it is its item's newest.

    Attributes:
        item_id: The item (the record's key).
        as_of: The record's ``as_of`` (``YYYY-MM-DDTHH:MM:SSZ``): a newer one wins.
        emitted_at_ms: The record's ``emitted_at_ms``: for equal ``as_of`` (refreshes of
            the open bucket, a re-forecast) the later one wins.
        record: The record's value, exactly the bytes sent to the forecasts topic.
    """

    item_id: str
    as_of: str
    emitted_at_ms: int
    record: bytes

    def __post_init__(self) -> None:
        if not _AS_OF.fullmatch(self.as_of):
            raise ValueError(f"expected as_of like 2011-01-26T00:00:00Z, got {self.as_of!r}")
        if not 0 <= self.emitted_at_ms < 10**15:
            raise ValueError(f"expected 0 <= emitted_at_ms < 10**15, got {self.emitted_at_ms}")

    @property
    def order(self) -> tuple[str, int]:
        """What "newer" compares: ``as_of``, then ``emitted_at_ms``."""
        return self.as_of, self.emitted_at_ms

    @classmethod
    def of(cls, item_id: str, record: bytes) -> LatestForecast:
        """The fields that order ``record``, a forecast record's JSON value.

        The worker's records are compact JSON (``orjson``, the C writer) whose ``as_of``
        and ``emitted_at_ms`` keys can be found without parsing: inside a JSON string a
        quote is escaped, so ``"as_of":"`` never occurs in an item id or model version.
        Parsing costs a few microseconds per record, and a bucket close sends thousands;
        anything else (spaces, other writers) is parsed.

        >>> r = b'{"item_id":"a","as_of":"2011-01-27T00:00:00Z","emitted_at_ms":5,"kind":"close"}'
        >>> LatestForecast.of("a", r).order
        ('2011-01-27T00:00:00Z', 5)

        Raises:
            ValueError: ``record`` has no valid ``as_of`` or ``emitted_at_ms``.
        """
        start = record.find(b'"as_of":"')
        stamp = record.find(b',"emitted_at_ms":')
        if start >= 0 and stamp >= 0:
            as_of = record[start + 9 : start + 29]
            digits = stamp + 17
            end = digits
            while end < len(record) and 48 <= record[end] <= 57:
                end += 1
            if end > digits and record[start + 29 : start + 30] == b'"':
                return cls(
                    item_id, as_of.decode("ascii", "replace"), int(record[digits:end]), record
                )
        try:
            value = orjson.loads(record)
            return cls(item_id, str(value["as_of"]), int(value["emitted_at_ms"]), record)
        except (orjson.JSONDecodeError, KeyError, TypeError) as exc:
            raise ValueError(f"expected a forecast record, got {record[:80]!r}") from exc


class WindowStore(Protocol):
    """Per-item bucket sums and per-partition clocks (see the module docstring)."""

    @property
    def freq(self) -> Freq:
        """Bucket frequency of the stored sums."""
        ...

    @property
    def remote(self) -> bool:
        """Whether every operation is a round trip to a server (Redis).

        The worker times the operations of a remote store in ``trendcast_redis_seconds``
        and leaves an in-process store out, so that histogram only ever shows network round
        trips.
        """
        ...

    async def ping(self) -> None:
        """Check that the store can serve now (reachable, ready for :meth:`apply`).

        The worker calls it for ``/ready`` and every few seconds for ``/health``, so that
        even an idle worker reports an outage; an in-process store has nothing to check.

        Raises:
            StateStoreError: The backend is unavailable.
        """
        ...

    async def apply(
        self, items: Sequence[ItemUpdate], partitions: Sequence[PartitionUpdate]
    ) -> ApplyResult:
        """Apply a batch in one round trip: atomic per item, idempotent per dedupe key.

        Raises:
            StateStoreError: The backend failed; nothing or part of the batch was applied,
                and re-applying the whole batch is safe.
        """
        ...

    async def read(self, item_ids: Sequence[str]) -> dict[str, ItemWindow]:
        """Stored windows of the items (unknown items come back empty)."""
        ...

    async def save_latest(self, forecasts: Sequence[LatestForecast], ttl_ms: int) -> int:
        """Keep each record as its item's latest, unless the item has a newer one stored.

        One round trip; per item atomic, so an older record (a late re-forecast of an
        older bucket, a re-send after a retry) never replaces a newer one, whatever the
        order the calls arrive in. Records of one call are taken in order. A kept record
        expires after ``ttl_ms`` (the item's window TTL) unless a newer one replaces it.

        Returns:
            How many records were kept (became their item's latest).

        Raises:
            StateStoreError: The backend failed; saving the same records again is safe.
        """
        ...

    async def read_latest(self, item_ids: Sequence[str]) -> dict[str, bytes | None]:
        """Each item's latest forecast record as sent to the topic (``None``: none kept).

        Raises:
            StateStoreError: The backend failed.
        """
        ...

    async def load_partition(self, partition: PartitionId) -> PartitionState:
        """The persisted clock of a partition (empty if never seen)."""
        ...

    async def save_partition(self, partition: PartitionId, state: PartitionState) -> None:
        """Merge ``state`` into the persisted clock (field-wise maximum)."""
        ...

    async def aclose(self) -> None:
        """Release connections."""
        ...
