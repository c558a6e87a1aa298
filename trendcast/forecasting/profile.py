"""Intraday profiles: how a bucket's units spread over its duration (learned, stored, applied).

The nowcast of an open bucket (:mod:`trendcast.forecasting.nowcast`) must know what share of
the bucket's units is normally sold by a time ``t`` inside it: by 10:00 a shop has sold a
fifth of a day's units, not 10/24 of them. That is the *cumulative share*, read from a profile
learned at training time from the timestamps of the sales lines (the buckets alone cannot tell
noon from midnight) and stored in the bundle.

Kinds, by bucket size:

==================  ==========================================================================
``hour_by_weekday`` daily buckets (``1D``): the share of a day's units in each hour of the day
                    (UTC), one row per weekday of the bucket (Monday first): 7 x 24 shares
``day_of_week``     weekly buckets (``1W``, Monday to Sunday): the share of each day, 1 x 7
``uniform``         every other size (hourly, minute, ``6h``, ``7D``…): units spread evenly.
                    An hour or a minute is short enough for a flat rate; and any bucket whose
                    lines carry no time inside the bucket (pre-aggregated daily sums, as the
                    shipped sample) gets it too, since such lines say nothing about the spread
==================  ==========================================================================

Learning (:func:`learn_profile`), on the positive lines: each *selling* bucket of an item is
turned into its own shares (units in each slot / the bucket's units), so every item-bucket
counts once, whatever its volume: a single wholesale order of 10,000 units would otherwise
define the profile. The global profile is the mean of these over all items and buckets of a
weekday; a weekday with fewer than :data:`MIN_KEY_BUCKETS` selling item-buckets (a shop shut
on Saturdays) uses the mean over all weekdays. An item with at least ``min_buckets``
(default :data:`DEFAULT_MIN_BUCKETS`, 100 selling buckets: ~14 per weekday) gets its own
profile, shrunk towards the global one with the weight of ``prior_buckets`` (default
:data:`DEFAULT_PRIOR_BUCKETS`, 20) pseudo-buckets per weekday::

    item[weekday] = (sum of the item's bucket shares on that weekday + k * global[weekday])
                    / (number of those buckets + k)

so a typical qualifying item is about half its own history, half the global profile. Other
items use the global profile. Within a slot the cumulative share grows linearly.

Stored in the bundle (:mod:`trendcast.bundle`): the kind, slot length, parameters and the
global shares in ``bundle.json`` (``intraday``), the per-item shares in ``profiles.json``,
checksummed like ``scales.json``. A bundle without ``intraday`` (older bundles) gets the
uniform profile.

This module is numpy/pandas only (no TensorFlow): the stream worker applies the profiles.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import pandas as pd

from trendcast.bundle import Bundle, IntradayMeta
from trendcast.freq import Freq

__all__ = [
    "DEFAULT_MIN_BUCKETS",
    "DEFAULT_PRIOR_BUCKETS",
    "MIN_KEY_BUCKETS",
    "IntradayProfile",
    "ProfileKind",
    "learn_profile",
    "profile_layout",
]

logger = logging.getLogger(__name__)

F64 = npt.NDArray[np.float64]
I64 = npt.NDArray[np.int64]

ProfileKind = Literal["uniform", "hour_by_weekday", "day_of_week"]

DEFAULT_MIN_BUCKETS = 100
DEFAULT_PRIOR_BUCKETS = 20.0
MIN_KEY_BUCKETS = 50

_HOUR_MS = 3_600_000
_DAY_MS = 24 * _HOUR_MS
_WEEK_MS = 7 * _DAY_MS
_MONDAY_ORIGIN_MS = 4 * _DAY_MS
# 1970-01-01 was a Thursday: with Monday = 0 its weekday is 3.
_EPOCH_WEEKDAY = 3
_DECIMALS = 5


def profile_layout(freq: Freq) -> tuple[ProfileKind, int, int]:
    """The profile kind of a bucket size, with its slot length (ms) and number of rows.

    >>> from trendcast.freq import parse_freq
    >>> [profile_layout(parse_freq(f)) for f in ("1D", "1W", "1h", "5min")]
    [('hour_by_weekday', 3600000, 7), ('day_of_week', 86400000, 1), ('uniform', 3600000, 1), \
('uniform', 300000, 1)]
    """
    if freq.step_ms == _DAY_MS:
        return "hour_by_weekday", _HOUR_MS, 7
    if freq.step_ms == _WEEK_MS and freq.origin_ms % _WEEK_MS == _MONDAY_ORIGIN_MS % _WEEK_MS:
        return "day_of_week", _DAY_MS, 1
    return "uniform", freq.step_ms, 1


def _row_keys(kind: ProfileKind, bucket_start_ms: I64) -> I64:
    """Row of the profile for each bucket: the weekday of daily buckets, else 0."""
    if kind == "hour_by_weekday":
        return ((np.floor_divide(bucket_start_ms, _DAY_MS) + _EPOCH_WEEKDAY) % 7).astype(np.int64)
    return np.zeros(np.shape(bucket_start_ms), dtype=np.int64)


@dataclass(frozen=True)
class IntradayProfile:
    """Shares of a bucket's units per slot: a global table and optional per-item tables.

    Attributes:
        kind: See the module docstring.
        step_ms: Bucket length.
        slot_ms: Slot length (``step_ms`` is a whole number of slots).
        shares: ``[rows, slots]`` global shares, each row summing to 1.
        item_shares: ``[n_items, rows, slots]`` per-item shares.
        item_index: Item id -> index into ``item_shares``.
        params: How it was learned (stored in ``bundle.json``).
    """

    kind: ProfileKind
    step_ms: int
    slot_ms: int
    shares: F64
    item_shares: F64 = field(default_factory=lambda: np.zeros((0, 1, 1)))
    item_index: Mapping[str, int] = field(default_factory=dict)
    params: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def uniform(cls, freq: Freq) -> IntradayProfile:
        """Units spread evenly over the bucket.

        >>> from trendcast.freq import parse_freq
        >>> p = IntradayProfile.uniform(parse_freq("1h"))
        >>> p.cumulative_share(["a"], np.array([0]), np.array([900_000])).tolist()
        [0.25]
        """
        return cls(
            kind="uniform", step_ms=freq.step_ms, slot_ms=freq.step_ms, shares=np.ones((1, 1))
        )

    @classmethod
    def from_bundle(cls, bundle: Bundle) -> IntradayProfile:
        """The bundle's profile; uniform for a bundle without one (older bundles)."""
        meta = bundle.meta.intraday
        if meta is None:
            return cls.uniform(bundle.freq)
        ids = sorted(bundle.item_profiles)
        rows, slots = len(meta.shares), len(meta.shares[0])
        stacked = (
            np.asarray([bundle.item_profiles[i] for i in ids], dtype=np.float64)
            if ids
            else np.zeros((0, rows, slots))
        )
        return cls(
            kind=meta.kind,
            step_ms=bundle.freq.step_ms,
            slot_ms=meta.slot_ms,
            shares=np.asarray(meta.shares, dtype=np.float64),
            item_shares=stacked,
            item_index={item: k for k, item in enumerate(ids)},
            params={"min_buckets": meta.min_buckets, "prior_buckets": meta.prior_buckets},
        )

    @property
    def n_items(self) -> int:
        """Items with a profile of their own."""
        return len(self.item_index)

    def cumulative_share(
        self, item_ids: Sequence[str], bucket_start_ms: I64, t_ms: I64 | int
    ) -> F64:
        """Share of each item's bucket units normally sold by ``t_ms`` (0 at the start, 1 at
        the end, linear within a slot), vectorised over items.

        >>> from trendcast.freq import parse_freq
        >>> shares = np.zeros((7, 24)); shares[:, 9:17] = 1 / 8  # 09:00-17:00, every day
        >>> p = IntradayProfile("hour_by_weekday", 86_400_000, 3_600_000, shares)
        >>> noon = 12 * 3_600_000 + 30 * 60_000  # 12:30 on 1970-01-01
        >>> p.cumulative_share(["a", "b"], np.array([0, 0]), np.array([noon, 86_400_000]))
        array([0.4375, 1.    ])
        """
        starts = np.asarray(bucket_start_ms, dtype=np.int64)
        elapsed = np.clip(np.asarray(t_ms, dtype=np.int64) - starts, 0, self.step_ms)
        n_slots = self.shares.shape[1]
        slot = np.minimum(elapsed // self.slot_ms, n_slots - 1)
        frac = np.clip((elapsed - slot * self.slot_ms) / self.slot_ms, 0.0, 1.0)
        keys = _row_keys(self.kind, starts)
        if self.item_index:
            own = np.array([self.item_index.get(i, -1) for i in item_ids], dtype=np.int64)
        else:
            own = np.full(len(item_ids), -1, dtype=np.int64)
        table = self.shares[keys]  # [n, slots]
        mine = own >= 0
        if mine.any():
            table[mine] = self.item_shares[own[mine], keys[mine]]
        before = np.cumsum(table, axis=1) - table
        rows = np.arange(len(table))
        share = before[rows, slot] + frac * table[rows, slot]
        share = np.where(elapsed >= self.step_ms, 1.0, share)
        return np.clip(share, 0.0, 1.0)

    def to_meta(self, items_file: str | None) -> IntradayMeta:
        """The ``bundle.json`` part (global shares and parameters)."""
        return IntradayMeta(
            kind=self.kind,
            slot_ms=self.slot_ms,
            shares=np.round(self.shares, _DECIMALS).tolist(),
            min_buckets=int(self.params.get("min_buckets", DEFAULT_MIN_BUCKETS)),
            prior_buckets=float(self.params.get("prior_buckets", DEFAULT_PRIOR_BUCKETS)),
            n_items=self.n_items,
            items_file=items_file if self.n_items else None,
            source=str(self.params.get("source", "lines")),
        )

    def items_json(self) -> dict[str, list[list[float]]]:
        """Per-item shares for ``profiles.json``."""
        rounded = np.round(self.item_shares, _DECIMALS)
        return {item: rounded[k].tolist() for item, k in sorted(self.item_index.items())}


def _uniform(freq: Freq, source: str) -> IntradayProfile:
    base = IntradayProfile.uniform(freq)
    return IntradayProfile(
        kind="uniform",
        step_ms=base.step_ms,
        slot_ms=base.slot_ms,
        shares=base.shares,
        params={"min_buckets": 0, "prior_buckets": 0.0, "source": source},
    )


def learn_profile(
    lines: pd.DataFrame | None,
    freq: Freq,
    *,
    min_buckets: int = DEFAULT_MIN_BUCKETS,
    prior_buckets: float = DEFAULT_PRIOR_BUCKETS,
) -> IntradayProfile:
    """Learn the intraday profile of ``freq`` buckets from sales lines (see the module doc).

    Args:
        lines: Canonical lines (``item_id, ts, quantity``), e.g. ``Panel.lines``; ``None``
            gives the uniform profile.
        freq: Bucket size.
        min_buckets: Selling buckets an item needs for a profile of its own.
        prior_buckets: Weight of the global profile in an item's, in buckets per row.

    >>> from trendcast.freq import parse_freq
    >>> ts = pd.to_datetime(["2011-01-03 09:10", "2011-01-03 09:40", "2011-01-04 15:00"])
    >>> lines = pd.DataFrame({"item_id": ["a", "a", "b"], "ts": ts, "quantity": [1.0, 3.0, 2.0]})
    >>> p = learn_profile(lines, parse_freq("1D"), min_buckets=1, prior_buckets=1.0)
    >>> p.kind, p.n_items, np.round(p.shares[0, [9, 15]], 2).tolist()  # pooled: few Mondays
    ('hour_by_weekday', 2, [0.5, 0.5])
    >>> np.round(p.item_shares[p.item_index["a"], 0, [9, 15]], 2).tolist()  # (1 + 0.5) / 2
    [0.75, 0.25]
    >>> learn_profile(lines.assign(ts=ts.normalize()), parse_freq("1D")).kind
    'uniform'
    """
    kind, slot_ms, n_rows = profile_layout(freq)
    if kind == "uniform":
        return _uniform(freq, f"uniform for {freq.name} buckets")
    if lines is None:
        return _uniform(freq, "no sales lines (bucketed input)")
    work = lines[lines["quantity"] > 0]
    if work.empty:
        return _uniform(freq, "no positive sales lines")
    ts_ms = work["ts"].to_numpy().astype("datetime64[ms]").astype(np.int64)
    starts = freq.floor_ms_array(ts_ms)
    offset = ts_ms - starts
    if not (offset > 0).any():
        logger.info("intraday profile: the lines carry no time within a bucket; uniform")
        return _uniform(freq, "no time within the bucket in the data")
    n_slots = freq.step_ms // slot_ms
    slot = np.minimum(offset // slot_ms, n_slots - 1)
    items, item_code = np.unique(work["item_id"].to_numpy().astype(str), return_inverse=True)
    bucket_key, bucket_code = np.unique(
        np.stack([item_code.astype(np.int64), starts]), axis=1, return_inverse=True
    )
    bucket_code = bucket_code.reshape(-1)
    n_buckets = bucket_key.shape[1]
    # Per item-bucket shares: units per slot / units of the bucket.
    units = np.zeros((n_buckets, n_slots))
    np.add.at(units, (bucket_code, slot), work["quantity"].to_numpy(dtype=np.float64))
    bucket_shares = units / units.sum(axis=1, keepdims=True)
    bucket_item = bucket_key[0]
    bucket_row = _row_keys(kind, bucket_key[1])
    # Sums of shares and counts per (item, row).
    n_items = len(items)
    sums = np.zeros((n_items, n_rows, n_slots))
    np.add.at(sums, (bucket_item, bucket_row), bucket_shares)
    counts = np.zeros((n_items, n_rows))
    np.add.at(counts, (bucket_item, bucket_row), 1.0)
    pooled = sums.sum(axis=(0, 1)) / counts.sum()
    row_counts = counts.sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        global_rows = sums.sum(axis=0) / row_counts[:, None]
    thin = row_counts < MIN_KEY_BUCKETS
    global_rows[thin] = pooled
    own = np.flatnonzero(counts.sum(axis=1) >= min_buckets)
    item_shares = (sums[own] + prior_buckets * global_rows[None]) / (
        counts[own][..., None] + prior_buckets
    )
    logger.info(
        "intraday profile %s: %d item-buckets, %d of %d items with their own profile",
        kind,
        n_buckets,
        len(own),
        n_items,
    )
    return IntradayProfile(
        kind=kind,
        step_ms=freq.step_ms,
        slot_ms=slot_ms,
        shares=global_rows,
        item_shares=item_shares,
        item_index={str(items[k]): j for j, k in enumerate(own)},
        params={"min_buckets": min_buckets, "prior_buckets": prior_buckets, "source": "lines"},
    )
