"""Stacking stored windows into the model input of a batch (numpy over the whole batch)."""

from __future__ import annotations

from collections.abc import Sequence
from itertools import chain
from operator import attrgetter, methodcaller

import numpy as np
import numpy.typing as npt

from stream.state.base import ItemWindow
from trendcast.freq import Freq

__all__ = ["stack_windows"]

_NO_FIRST = np.iinfo(np.int64).max  # first_ms of an unknown item: after every window

# C-level getters for stack_windows (no Python frame per bucket).
_BUCKETS = attrgetter("buckets")
_FIRST_MS = attrgetter("first_ms")
_VALUES = methodcaller("values")


def stack_windows(
    windows: Sequence[ItemWindow],
    last_start_ms: npt.NDArray[np.int64],
    window: int,
    freq: Freq,
    *,
    with_prices: bool = True,
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32] | None, npt.NDArray[np.int64]]:
    """:meth:`ItemWindow.window` of many items at once, stacked: the model input of a batch.

    A bucket close assembles thousands of windows, and a Python loop over each window's
    buckets (plus a small array per row) was a large share of the cost of a forecast. Here
    the buckets of all windows are pulled out with C-level iteration (``chain``, ``map``)
    and one list comprehension per field, then placed, clipped and price-filled with
    numpy over the whole batch. The result is identical to stacking
    :meth:`ItemWindow.window` row by row (tests compare them): quantities clipped with
    ``q < 0 -> 0`` keep ``-0.0`` and NaN like ``max(q, 0.0)`` does; a batch with a
    bucket start off the frequency grid (two buckets could share a column, and the
    row-by-row order decides which wins) is assembled row by row.

    Args:
        windows: The stored windows, one per row.
        last_start_ms: ``[n]`` start of each row's last bucket.
        window: Buckets per row.
        freq: Bucket frequency.
        with_prices: Also assemble unit prices.

    Returns:
        ``(quantities [n, window], prices [n, window] or None, history_len [n])``.
    """
    n = len(windows)
    step = freq.step_ms
    last = np.asarray(last_start_ms, dtype=np.int64)
    quantities = np.zeros((n, window), dtype=np.float32)
    prices = np.full((n, window), np.nan, dtype=np.float32) if with_prices else None
    maps = list(map(_BUCKETS, windows))
    counts = np.fromiter(map(len, maps), dtype=np.int64, count=n)
    total = int(counts.sum())
    if total:
        starts = np.fromiter(chain.from_iterable(maps), dtype=np.int64, count=total)
        rows = np.repeat(np.arange(n), counts)
        offset = starts - (last[rows] - (window - 1) * step)
        cols = offset // step
        inside = (cols >= 0) & (cols < window)
        if (offset[inside] % step).any():  # off the grid: columns may collide
            return _stack_rows(windows, last, window, freq, with_prices=with_prices)
        sums = list(chain.from_iterable(map(_VALUES, maps)))
        # (a list comprehension reads slots attributes faster than attrgetter here)
        qty = np.array([s.quantity for s in sums], dtype=np.float64)
        rows, cols = rows[inside], cols[inside]
        # Beyond float32 a value becomes inf, silently, as it does assigned one at a time.
        with np.errstate(over="ignore", invalid="ignore"):
            quantities[rows, cols] = np.where(qty < 0.0, 0.0, qty)[inside]
            if prices is not None:
                price_qty = np.array([s.price_qty for s in sums], dtype=np.float64)
                priced_qty = np.array([s.priced_qty for s in sums], dtype=np.float64)
                price = np.full(total, np.nan)
                np.divide(price_qty, priced_qty, out=price, where=priced_qty > 0)
                prices[rows, cols] = price[inside]
    # None (unknown item) and a first sale after the window's end both mean no history.
    first = np.fromiter(
        (_NO_FIRST if f is None else f for f in map(_FIRST_MS, windows)), dtype=np.int64, count=n
    )
    known = first <= last
    span = (last - np.where(known, first, last)) // step + 1
    history = np.where(known, np.minimum(window, span), 0)
    if prices is not None:
        _fill_prices(prices, history)
    return quantities, prices, history


def _fill_prices(prices: npt.NDArray[np.float32], history: npt.NDArray[np.int64]) -> None:
    """Forward, then backward fill each row's real buckets in place (rows with a price)."""
    n, window = prices.shape
    col = np.arange(window)
    real = col[None, :] >= (window - history)[:, None]
    valid = real & ~np.isnan(prices)
    has = valid.any(axis=1)
    if not has.any():
        return
    source = np.where(valid, col[None, :], -1)
    np.maximum.accumulate(source, axis=1, out=source)
    # Before a row's first price, the first price (the backward fill of the leading gap).
    source = np.where(source < 0, valid.argmax(axis=1)[:, None], source)
    filled = np.take_along_axis(prices, source, axis=1)
    np.copyto(prices, filled, where=real & has[:, None])


def _stack_rows(
    windows: Sequence[ItemWindow],
    last: npt.NDArray[np.int64],
    window: int,
    freq: Freq,
    *,
    with_prices: bool,
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32] | None, npt.NDArray[np.int64]]:
    """:func:`stack_windows` row by row with :meth:`ItemWindow.window` (the reference)."""
    n = len(windows)
    quantities = np.zeros((n, window), dtype=np.float32)
    prices = np.full((n, window), np.nan, dtype=np.float32) if with_prices else None
    history = np.zeros(n, dtype=np.int64)
    for row, (stored, end) in enumerate(zip(windows, last.tolist(), strict=True)):
        q, p, h = stored.window(end, window, freq, with_prices=with_prices)
        quantities[row], history[row] = q, h
        if prices is not None and p is not None:
            prices[row] = p
    return quantities, prices, history
