"""What every model is given at an origin, and what its forecast is scored against.

The panel is spread once into a dense item x bucket matrix (:class:`Grid`); at each origin the
longest input window is cut once (:func:`origin_inputs`), with the actuals of the horizon after
it and the in-sample scales of all history before it.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import pandas as pd

from trendcast.data import Panel
from trendcast.exceptions import ConfigError, DataError
from trendcast.forecasting.base import Forecaster, WindowBatch
from trendcast.forecasting.windows import windows_from_panel
from trendcast.metrics import naive_scales

__all__ = ["Grid", "OriginInputs", "input_windows", "origin_inputs"]

logger = logging.getLogger(__name__)

F64 = npt.NDArray[np.float64]


def _window_of(forecaster: Forecaster, default: int) -> int:
    """Input length a forecaster wants: its own ``window`` attribute if it has one.

    The ONNX model is fixed to the window it was trained with (``bundle.meta.window``) while
    baselines take any length, so a backtest cuts the longest window once per origin and hands
    each model the tail it needs.
    """
    own = getattr(forecaster, "window", None)
    return own if isinstance(own, int) and own > 0 else default


def input_windows(
    forecasters: Sequence[Forecaster], window: int, windows: Mapping[str, int] | None
) -> dict[str, int]:
    """Input length per model name: ``windows`` over the model's own ``window`` over ``window``.

    The longest of them is the one window cut per origin; each model is handed its tail.

    Raises:
        ConfigError: A window below 1 bucket.
    """
    own_windows = {f.name: _window_of(f, window) for f in forecasters} | dict(windows or {})
    if min(own_windows.values()) < 1:
        raise ConfigError(f"expected windows of at least 1 bucket, got {own_windows}")
    return own_windows


@dataclass(frozen=True)
class Grid:
    """The panel as a dense item x bucket matrix, NaN before an item's first bucket.

    Models get their inputs from :func:`windows_from_panel`; scoring needs more of each item's
    row — the test period (actuals) and *all* history before the origin (in-sample scales) —
    which this matrix gives by slicing.

    Attributes:
        start: The panel's first bucket (column 0).
        td: One bucket.
        row_of: Row of each item id.
        values: ``[items, buckets]`` quantities.
    """

    start: pd.Timestamp
    td: pd.Timedelta
    row_of: dict[str, int]
    values: F64

    @classmethod
    def of(cls, panel: Panel) -> Grid:
        """Spread the panel's long ``item_id, ts, quantity`` rows into the matrix."""
        td = panel.freq.timedelta
        items = np.array(sorted(panel.frame["item_id"].unique()), dtype=object)
        row_of = {str(item): i for i, item in enumerate(items)}
        values = np.full((len(items), panel.n_buckets), np.nan)
        rows = panel.frame["item_id"].map(row_of).to_numpy()
        cols = ((panel.frame["ts"] - panel.start) / td).to_numpy().astype(np.int64)
        values[rows, cols] = panel.frame["quantity"].to_numpy()
        return cls(start=panel.start, td=td, row_of=row_of, values=values)


@dataclass(frozen=True)
class OriginInputs:
    """What every model is given at one origin, and what its forecast is scored against.

    Attributes:
        origin: The first forecast bucket.
        batch: Windows of the longest input length, ending just before the origin, of the
            items with at least one bucket before it.
        rows: Each batch item's row in the :class:`Grid`.
        col: The origin's column in the :class:`Grid`.
        actual: ``[n, horizon]`` what sold from the origin on.
        scale_sq: Per item in-sample scale for RMSSE (all history before the origin).
        scale_abs: Per item in-sample scale for MASE and pinball.
    """

    origin: pd.Timestamp
    batch: WindowBatch
    rows: npt.NDArray[np.int64]
    col: int
    actual: F64
    scale_sq: F64
    scale_abs: F64


def origin_inputs(
    panel: Panel, grid: Grid, origin: pd.Timestamp, *, cut: int, horizon: int
) -> OriginInputs:
    """Cut the window once per origin and look up its actuals and scales.

    Cutting the longest window once and handing each model its tail keeps all
    models on the same items; the scales come from the history before the origin only, never
    from the test period.

    Raises:
        DataError: No item has a bucket before the origin.
    """
    batch = windows_from_panel(panel, cut, cutoff=origin)
    if len(batch) == 0:
        raise DataError(f"no item has a bucket before origin {origin}")
    rows = np.array([grid.row_of[i] for i in batch.item_ids], dtype=np.int64)
    col = int((origin - grid.start) / grid.td)
    scale_sq, scale_abs = naive_scales(grid.values[rows, :col])
    return OriginInputs(
        origin=origin,
        batch=batch,
        rows=rows,
        col=col,
        actual=grid.values[rows, col : col + horizon],
        scale_sq=scale_sq,
        scale_abs=scale_abs,
    )
