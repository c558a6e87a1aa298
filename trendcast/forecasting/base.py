"""The forecaster interface: a batch of windows in, a batch of multi-horizon forecasts out.

Everything that forecasts in trendcast — the ONNX model, its seasonal-naive fallback, the
backtest baselines — implements :class:`Forecaster`, so backtests, ``trendcast forecast`` and
the stream worker treat them alike, and the same generic checks run against each.

Windows are raw bucket sums (not scaled), oldest first, left-padded with zeros when an item
has fewer than ``window`` buckets of history (``history_len`` tells how many are real).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt

__all__ = ["ForecastBatch", "Forecaster", "WindowBatch"]

FloatArray = npt.NDArray[np.float32]


@dataclass(frozen=True)
class WindowBatch:
    """Inputs for ``n`` items.

    Attributes:
        item_ids: The ``n`` item ids (used to look up per-item scales).
        quantities: ``[n, window]`` float32 bucket sums, oldest first, zero-padded on the left.
        prices: ``[n, window]`` float32 unit prices (NaN where unknown), or ``None``.
        last_start_ms: ``[n]`` int64 epoch ms of the start of each window's last bucket; the
            forecast starts at the next bucket.
        history_len: ``[n]`` int64 number of real (non-padded) buckets, up to ``window``.
    """

    item_ids: list[str]
    quantities: FloatArray
    prices: FloatArray | None
    last_start_ms: npt.NDArray[np.int64]
    history_len: npt.NDArray[np.int64]

    def __post_init__(self) -> None:
        n = len(self.item_ids)
        if self.quantities.ndim != 2 or self.quantities.shape[0] != n:
            raise ValueError(
                f"expected quantities of shape [{n}, window], got {self.quantities.shape}"
            )
        if self.prices is not None and self.prices.shape != self.quantities.shape:
            raise ValueError(
                f"expected prices of shape {self.quantities.shape}, got {self.prices.shape}"
            )
        if self.last_start_ms.shape != (n,) or self.history_len.shape != (n,):
            raise ValueError("expected last_start_ms and history_len of shape [n]")

    def __len__(self) -> int:
        return len(self.item_ids)

    @property
    def window(self) -> int:
        """Number of buckets per window."""
        return int(self.quantities.shape[1])

    def take(self, rows: npt.NDArray[np.int64]) -> WindowBatch:
        """The windows of ``rows`` (indices), in that order."""
        return WindowBatch(
            item_ids=[self.item_ids[row] for row in rows.tolist()],
            quantities=self.quantities[rows],
            prices=None if self.prices is None else self.prices[rows],
            last_start_ms=self.last_start_ms[rows],
            history_len=self.history_len[rows],
        )


@dataclass(frozen=True)
class ForecastBatch:
    """Forecasts for ``n`` items over ``horizon`` buckets, in quantity units.

    Attributes:
        mean: ``[n, horizon]`` expected value (for squared-error use and sums).
        p10: ``[n, horizon]`` 10% quantile.
        p50: ``[n, horizon]`` median.
        p90: ``[n, horizon]`` 90% quantile.
        fallback: ``[n]`` True where the fallback answered instead of the model.
    """

    mean: FloatArray
    p10: FloatArray
    p50: FloatArray
    p90: FloatArray
    fallback: npt.NDArray[np.bool_]

    def __len__(self) -> int:
        return int(self.mean.shape[0])

    def take(self, rows: npt.NDArray[np.int64]) -> ForecastBatch:
        """The forecasts of ``rows`` (indices), in that order."""
        return ForecastBatch(
            mean=self.mean[rows],
            p10=self.p10[rows],
            p50=self.p50[rows],
            p90=self.p90[rows],
            fallback=self.fallback[rows],
        )


@runtime_checkable
class Forecaster(Protocol):
    """Anything that turns a :class:`WindowBatch` into a :class:`ForecastBatch`."""

    @property
    def name(self) -> str:
        """Short name used in reports (``lstm``, ``seasonal_naive7``…)."""
        ...

    @property
    def horizon(self) -> int:
        """Number of buckets forecast."""
        ...

    def predict(self, batch: WindowBatch) -> ForecastBatch:
        """Forecast every window of the batch in one call."""
        ...
