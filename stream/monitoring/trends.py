"""Trends: which items the live model expects to sell much more, or much less, next week.

:class:`TrendTracker` keeps, per item, the latest live forecast reduced to two numbers: the
expected sales of the next week (the sum of ``mean`` over the next week's buckets) and the
actual sales of the last week (the sum of the same number of the window's last buckets).
:meth:`TrendTracker.candidates` ranks the worker's items by the absolute change and keeps
the top ``k`` each way; :func:`merge_candidates` merges the candidates of every worker into the
one record of the ``trends`` topic (``trendcast schema trends``)::

    {"emitted_at_ms", "freq", "buckets", "items_considered", "workers",
     "rising":  [{"item_id", "last_week", "next_week", "change", "change_pct", "as_of",
                  "model_version"}, ...],
     "falling": [...]}

**One ranking for all workers.** Each worker sees only the items of its partitions, but the
global top ``k`` is always among the union of every worker's own top ``k``, so workers need
only share their top ``k`` each way: :class:`GlobalTrends` puts this worker's candidates in a
:class:`~stream.state.candidates.CandidateStore` (beside the windows, in Redis) every publish
interval with a TTL of a few intervals, and the worker holding the store's lease merges every
worker's candidates and publishes one record, keyed ``global`` (:data:`TRENDS_KEY`), so the
topic can be compacted and a reader needs its last record only. ``items_considered`` is summed
over the workers and ``workers`` counts them. A dead worker's candidates expire with their TTL
(its items come back when their new owner forecasts them, at the next bucket close); a dead
publisher's lease expires the same way and the next worker to publish takes over.

Items move between workers at rebalances, and the observers are not told which partition an
item came from, so candidates are per worker, not per partition. Two rules keep a moved item
from being counted twice or shown stale: the merge keeps one entry per item, the one with the
newest ``as_of``; and a worker that lost partitions (:meth:`TrendTracker.handover`) drops the
items it had before, once its next bucket closes without re-forecasting them (every item it
still owns that sold within a window is re-forecast at each close). Until that close the old
owner's figures stay, and they are the latest forecast of those items.

"A week" is ``7 * 86_400_000 // step_ms`` buckets (7 daily, 168 hourly buckets), capped at
the model's horizon and window, and at least one bucket, so both sides always cover the same
number of buckets (``buckets`` in the record):

* a horizon shorter than a week (e.g. hourly with horizon 24) compares the next ``horizon``
  buckets with the last ``horizon`` buckets, a like-for-like change over less than a week;
* a weekly frequency compares next week's bucket with last week's; a coarser one (``2W``)
  compares one bucket each side, so "week" then means that bucket.

Absolute change ranks: a big seller moving 10% matters more to stock than a slow one doubling.
``change_pct`` is ``100 * change / last_week``, None when the item sold nothing last week.
An item with less than a week of history looks rising (its padded buckets count as 0).

Shadow forecasts are ignored: trends describe what the published model says. Memory is one
slot per item (about 100 bytes with its dict entry); an item not forecast for longer than a
window is dropped, and at most ``max_items`` items are kept (newer ones are ignored until
slots free up). Time is bucket time: the newest bucket of any batch is "now".
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from itertools import repeat
from typing import Any

import numpy as np
import numpy.typing as npt
import orjson

from stream.inference.model_info import ModelInfo, iso_utc
from stream.inference.observers import ScoredBatch
from stream.state.candidates import CandidateStore
from trendcast.freq import Freq

__all__ = ["TRENDS_KEY", "GlobalTrends", "TrendTracker", "merge_candidates", "week_buckets"]

logger = logging.getLogger(__name__)

_DAY_MS = 86_400_000
_WEEK_MS = 7 * _DAY_MS
_EMPTY = np.iinfo(np.int64).min  # last_start of a free slot

#: Key of every record on the trends topic: one ranking, so a compacted topic keeps one record.
TRENDS_KEY = b"global"


def week_buckets(step_ms: int, horizon: int, window: int) -> int:
    """Buckets summed on each side: a week's worth, capped at horizon and window, at least 1.

    >>> week_buckets(86_400_000, 28, 56), week_buckets(3_600_000, 24, 168)
    (7, 24)
    >>> week_buckets(7 * 86_400_000, 4, 8), week_buckets(14 * 86_400_000, 4, 8)
    (1, 1)
    """
    return max(1, min(_WEEK_MS // step_ms, horizon, window))


class TrendTracker:
    """Latest next-week vs last-week sales per item, from live forecasts (a ForecastObserver).

    Args:
        max_items: Items kept at most (see the module docstring).

    Wiring: call :meth:`on_forecasts` after every ``predict`` (shadow batches are ignored),
    and :meth:`snapshot` when a bucket closes to publish to the ``trends`` topic.
    """

    def __init__(self, *, max_items: int = 200_000) -> None:
        if max_items < 0:
            raise ValueError(f"expected max_items >= 0, got {max_items}")
        self.max_items = max_items
        self._reset()

    def _reset(self) -> None:
        self._freq: Freq | None = None
        self._buckets = 1
        self._window = 1
        self._newest_ms: int | None = None
        self._index: dict[str, int] = {}
        self._items: list[str | None] = []
        self._free: list[int] = []
        self._versions: list[str] = []  # model versions seen, referenced by index
        self._next = np.empty(0, dtype=np.float64)
        self._last = np.empty(0, dtype=np.float64)
        self._start: npt.NDArray[np.int64] = np.empty(0, dtype=np.int64)
        self._version = np.empty(0, dtype=np.int32)
        self._epoch = 0  # bumped at each handover
        self._epochs = np.empty(0, dtype=np.int32)  # per slot: epoch of its newest forecast
        self._handover_ms: int | None = None  # newest bucket when partitions were lost

    @property
    def items(self) -> int:
        """Items currently known."""
        return len(self._index)

    def on_forecasts(self, scored: ScoredBatch) -> None:
        """Keep each item's newest live forecast as next-week and last-week sums."""
        if scored.role != "live" or len(scored.batch) == 0:
            return
        model, batch = scored.model, scored.batch
        if self._freq is not None and model.freq != self._freq:
            logger.info("trends: frequency changed to %s, forgetting items", model.freq.name)
            self._reset()
        self._use(model)
        newest = int(batch.last_start_ms.max())
        if self._newest_ms is None or newest > self._newest_ms:
            self._newest_ms = newest
            self._expire(newest - self._window * model.freq.step_ms)  # before new items come
        slots = self._slots(batch.item_ids)
        known = slots >= 0
        rows = np.flatnonzero(known)
        last_start = batch.last_start_ms[rows]
        s = slots[rows]
        # A window older than the one kept (a stale re-forecast) does not replace it.
        newer = last_start >= self._start[s]
        rows, s = rows[newer], s[newer]
        n = self._buckets
        self._next[s] = scored.result.mean[rows, :n].sum(axis=1, dtype=np.float64)
        self._last[s] = batch.quantities[rows, -n:].sum(axis=1, dtype=np.float64)
        self._start[s] = batch.last_start_ms[rows]
        self._version[s] = self._version_index(model.model_version)
        self._epochs[s] = self._epoch

    def handover(self) -> None:
        """Partitions were taken away: forget their items once they are forecast elsewhere.

        The tracker does not know which items came from which partition. Every item it
        still owns that sold within a window is forecast again when its next bucket closes,
        so the items not forecast since this call are dropped once a newer bucket than the
        newest seen now has been forecast (checked by :meth:`candidates`). An own partition
        lagging behind the others (catching up) may lose its items until it closes that
        bucket too.
        """
        if self._newest_ms is not None:
            self._epoch += 1
            self._handover_ms = self._newest_ms

    def _forget_handed_over(self) -> None:
        if self._handover_ms is None or self._newest_ms is None:
            return
        if self._newest_ms <= self._handover_ms:
            return
        used = self._start != _EMPTY
        stale = used & (self._epochs < self._epoch) & (self._start < self._newest_ms)
        self._drop(np.flatnonzero(stale))
        self._handover_ms = None

    def _use(self, model: ModelInfo) -> None:
        self._freq = model.freq
        self._window = model.window
        self._buckets = week_buckets(model.freq.step_ms, model.horizon, model.window)

    def _version_index(self, version: str) -> int:
        if not self._versions or self._versions[-1] != version:
            if version in self._versions:
                return self._versions.index(version)
            self._versions.append(version)
        return len(self._versions) - 1

    def _slots(self, item_ids: list[str]) -> npt.NDArray[np.int64]:
        found = map(self._index.get, item_ids, repeat(-1))  # dict.get from C, no frame per item
        slots = np.fromiter(found, dtype=np.int64, count=len(item_ids))
        new_rows = np.flatnonzero(slots < 0)
        room = self.max_items - len(self._index)
        for row in new_rows[: max(0, room)].tolist():
            item = item_ids[row]
            if item in self._index:  # the same new item twice in one batch
                slots[row] = self._index[item]
                continue
            if not self._free:
                self._grow()
            slot = self._free.pop()
            self._index[item] = slot
            self._items[slot] = item
            slots[row] = slot
        return slots

    def _grow(self) -> None:
        old = len(self._items)
        new = max(1024, 2 * old)
        pad = new - old
        self._next = np.concatenate([self._next, np.zeros(pad)])
        self._last = np.concatenate([self._last, np.zeros(pad)])
        self._start = np.concatenate([self._start, np.full(pad, _EMPTY, np.int64)])
        self._version = np.concatenate([self._version, np.zeros(pad, np.int32)])
        self._epochs = np.concatenate([self._epochs, np.zeros(pad, np.int32)])
        self._items.extend([None] * pad)
        self._free.extend(range(new - 1, old - 1, -1))

    def _expire(self, before_ms: int) -> None:
        """Forget items whose newest window ends before ``before_ms`` (not forecast since)."""
        self._drop(np.flatnonzero((self._start != _EMPTY) & (self._start < before_ms)))

    def _drop(self, stale: npt.NDArray[np.intp]) -> None:
        for slot in stale.tolist():
            item = self._items[slot]
            if item is not None:
                del self._index[item]
            self._items[slot] = None
            self._free.append(slot)
        self._start[stale] = _EMPTY

    def candidates(self, k: int, now_ms: int) -> bytes | None:
        """This worker's top-``k`` rising and falling items, for :func:`merge_candidates`.

        The record's shape (see the module docstring) without ``workers``; each entry also
        carries ``rank``, its change unrounded, so the merge orders exactly as one tracker
        holding every item would. None if nothing is known.
        """
        if k < 0:
            raise ValueError(f"expected k >= 0, got {k}")
        self._forget_handed_over()
        freq = self._freq
        if not self._index or freq is None:
            return None
        used = self._start != _EMPTY
        change = self._next - self._last
        rising = self._top(np.flatnonzero(used & (change > 0)), change, k)
        falling = self._top(np.flatnonzero(used & (change < 0)), -change, k)
        value: dict[str, Any] = {
            "emitted_at_ms": now_ms,
            "freq": freq.name,
            "buckets": self._buckets,
            "items_considered": int(used.sum()),
            "rising": [self._entry(slot, freq.step_ms) for slot in rising],
            "falling": [self._entry(slot, freq.step_ms) for slot in falling],
        }
        return orjson.dumps(value)

    def snapshot(self, k: int, now_ms: int) -> bytes | None:
        """The trends record of this worker's items alone (``workers`` = 1); None if empty.

        What :class:`GlobalTrends` publishes when this worker is the only one. Ties in
        change are broken by item id, so equal snapshots are equal bytes.
        """
        own = self.candidates(k, now_ms)
        return None if own is None else merge_candidates([own], k, now_ms)

    def _top(
        self, slots: npt.NDArray[np.int64], score: npt.NDArray[np.float64], k: int
    ) -> list[int]:
        if k == 0 or slots.size == 0:
            return []
        if slots.size > k:  # keep every slot tied with the k-th before the exact sort
            kth = np.partition(score[slots], slots.size - k)[slots.size - k]
            slots = slots[score[slots] >= kth]
        ranked = sorted(slots.tolist(), key=lambda s: (-score[s], self._items[s] or ""))
        return ranked[:k]

    def _entry(self, slot: int, step_ms: int) -> dict[str, Any]:
        last, nxt = float(self._last[slot]), float(self._next[slot])
        change = nxt - last
        return {
            "item_id": self._items[slot],
            "last_week": round(last, 4),
            "next_week": round(nxt, 4),
            "change": round(change, 4),
            "change_pct": None if last == 0 else round(100.0 * change / last, 2),
            "as_of": iso_utc(int(self._start[slot]) + step_ms),
            "model_version": self._versions[int(self._version[slot])],
            "rank": change,
        }


def _newest_first(entry: dict[str, Any]) -> tuple[str, str, float]:
    return entry["as_of"], entry["model_version"], entry["rank"]


def merge_candidates(values: Iterable[bytes], k: int, now_ms: int) -> bytes | None:
    """One trends record from the candidates of every worker (:meth:`TrendTracker.candidates`).

    Keeps one entry per item (the newest ``as_of``: an item moved between workers is
    counted once), ranks like :meth:`TrendTracker.candidates` (by the unrounded change, ties
    by item id) and sums ``items_considered``. Candidates of another frequency than the
    newest ones' (workers on both sides of a model swap) are left out until they are
    replaced. None if there are no candidates.

    >>> a = {"emitted_at_ms": 1, "freq": "1D", "buckets": 7, "items_considered": 2,
    ...      "rising": [{"item_id": "x", "change": 2.0, "rank": 2.0, "as_of": "t",
    ...                  "model_version": "v"}], "falling": []}
    >>> b = {**a, "items_considered": 3,
    ...      "rising": [{**a["rising"][0], "item_id": "y", "change": 5.0, "rank": 5.0}]}
    >>> merged = orjson.loads(merge_candidates([orjson.dumps(a), orjson.dumps(b)], 5, 9))
    >>> [e["item_id"] for e in merged["rising"]], merged["items_considered"], merged["workers"]
    (['y', 'x'], 5, 2)
    """
    if k < 0:
        raise ValueError(f"expected k >= 0, got {k}")
    parts: list[dict[str, Any]] = []
    for raw in values:
        try:
            parts.append(orjson.loads(raw))
        except orjson.JSONDecodeError:
            logger.warning("trends: ignoring unreadable candidates (%d bytes)", len(raw))
    if not parts:
        return None
    newest = max(parts, key=lambda p: p["emitted_at_ms"])
    shape = (newest["freq"], newest["buckets"])
    kept = [p for p in parts if (p["freq"], p["buckets"]) == shape]
    best: dict[str, dict[str, Any]] = {}
    for part in kept:
        for entry in (*part["rising"], *part["falling"]):
            seen = best.get(entry["item_id"])
            if seen is None or _newest_first(entry) > _newest_first(seen):
                best[entry["item_id"]] = entry
    entries = list(best.values())
    rising = sorted((e for e in entries if e["rank"] > 0), key=lambda e: (-e["rank"], e["item_id"]))
    falling = sorted((e for e in entries if e["rank"] < 0), key=lambda e: (e["rank"], e["item_id"]))
    value = {
        "emitted_at_ms": now_ms,
        "freq": shape[0],
        "buckets": shape[1],
        "items_considered": sum(int(p["items_considered"]) for p in kept),
        "workers": len(kept),
        "rising": [_public(e) for e in rising[:k]],
        "falling": [_public(e) for e in falling[:k]],
    }
    return orjson.dumps(value)


def _public(entry: dict[str, Any]) -> dict[str, Any]:
    return {key: v for key, v in entry.items() if key != "rank"}


class GlobalTrends:
    """Shares this worker's trend candidates and, if it leads, makes the one trends record.

    Args:
        tracker: This worker's items.
        store: Where every worker's candidates meet (:func:`~stream.state.candidates.
            candidate_store_for` the worker's window store).
        worker: This worker's name (unique among the workers: host and process id).
        top_k: Items in each list.
        ttl_ms: How long candidates and the lease outlive their last put or renewal: a few
            publish intervals, so one slow interval loses neither.
    """

    def __init__(
        self,
        tracker: TrendTracker,
        store: CandidateStore,
        *,
        worker: str,
        top_k: int,
        ttl_ms: int,
    ) -> None:
        self.tracker = tracker
        self.store = store
        self.worker = worker
        self.top_k = top_k
        self.ttl_ms = ttl_ms
        self._assigned: frozenset[Any] | None = None

    async def publish(self, now_ms: int, assigned: frozenset[Any] | None = None) -> bytes | None:
        """Put this worker's candidates; the merged record if this worker leads, else None.

        Args:
            now_ms: Wall clock (``emitted_at_ms``).
            assigned: The partitions this worker consumes now (``None``: unknown). When one
                it had at the last call is gone, :meth:`TrendTracker.handover` is called.

        Raises:
            StateStoreError: The candidate store failed (try again next interval).
        """
        if assigned is not None:
            if self._assigned is not None and self._assigned - assigned:
                self.tracker.handover()
            self._assigned = assigned
        own = self.tracker.candidates(self.top_k, now_ms)
        if own is not None:
            await self.store.put(self.worker, own, self.ttl_ms)
        if not await self.store.lead(self.worker, self.ttl_ms):
            return None
        return merge_candidates((await self.store.read_all()).values(), self.top_k, now_ms)
