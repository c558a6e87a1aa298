"""Cutting :class:`WindowBatch` es out of a bucketed panel (offline forecasts and backtests)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from trendcast.data import Panel
from trendcast.forecasting.base import WindowBatch

__all__ = ["windows_from_panel"]


def windows_from_panel(
    panel: Panel, window: int, cutoff: pd.Timestamp | None = None
) -> WindowBatch:
    """The last ``window`` buckets before ``cutoff`` (default: all data) of every item.

    Items with no bucket before ``cutoff`` are left out. Shorter histories are left-padded
    with zeros (prices with NaN) and ``history_len`` says how many buckets are real.

    >>> from trendcast.data import bucketize
    >>> from trendcast.freq import parse_freq
    >>> lines = pd.DataFrame({"item_id": ["a", "a", "b"], "quantity": [1.0, 2.0, 5.0],
    ...     "ts": pd.to_datetime(["2011-01-01", "2011-01-03", "2011-01-02"])})
    >>> b = windows_from_panel(bucketize(lines, parse_freq("1D"), has_price=False), 3)
    >>> b.item_ids, b.quantities.tolist(), b.history_len.tolist()
    (['a', 'b'], [[1.0, 0.0, 2.0], [0.0, 5.0, 0.0]], [3, 2])
    """
    frame = panel.frame if cutoff is None else panel.frame[panel.frame["ts"] < cutoff]
    frame = frame.groupby("item_id", sort=True).tail(window)
    items = frame["item_id"].to_numpy()
    # Row index where each item's rows start (frame is sorted by item, then time).
    change = np.flatnonzero(np.r_[True, items[1:] != items[:-1]])
    lengths = np.diff(np.r_[change, len(items)]).astype(np.int64)
    n = len(change)
    quantities = np.zeros((n, window), dtype=np.float32)
    prices = np.full((n, window), np.nan, dtype=np.float32) if panel.has_price else None
    row = np.repeat(np.arange(n), lengths)
    # Right-align each item's rows: its last bucket lands in the window's last column.
    within = np.arange(len(items)) - np.repeat(change, lengths)
    col = window - np.repeat(lengths, lengths) + within
    quantities[row, col] = frame["quantity"].to_numpy(dtype=np.float32)
    if prices is not None:
        prices[row, col] = frame["price"].to_numpy(dtype=np.float32)
    ts_ms = frame["ts"].to_numpy().astype("datetime64[ms]").astype(np.int64)
    last = ts_ms[change + lengths - 1] if n else np.array([], dtype=np.int64)
    return WindowBatch(
        item_ids=[str(i) for i in items[change]],
        quantities=quantities,
        prices=prices,
        last_start_ms=last.astype(np.int64),
        history_len=lengths,
    )
