"""Forecast accuracy metrics: pure numpy, one definition shared by backtests and the bench.

All functions take ``[n, horizon]`` arrays (one row per forecast: an item at one origin) and,
for the scaled metrics, per-row in-sample scales from :func:`naive_scales`. Scaled metrics
(RMSSE, MASE, scaled pinball) divide by what a one-step naive forecast got wrong on the item's
own history, so that items selling 2 and 2,000 units a day weigh the same when averaged.

Zero scales. An item whose history is constant (or has a single bucket) has no naive error to
scale by: its scaled errors would be infinite or undefined. Such rows are *excluded* from the
RMSSE, MASE and pinball averages and counted in :attr:`Scores.n_unscaled`; WAPE and coverage
need no scale and include every row. Items with a constant history are rare after the
``min_active`` filter, and reporting their count makes the exclusion visible instead of letting
a single ``inf`` swamp the mean.

Aggregation over rows is the plain (unweighted) mean, as in M5's RMSSE but *without* M5's
dollar-sales weights: every item counts once per origin, because trendcast serves every item
and a slow seller's bad forecast is still a bad forecast.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass

import numpy as np
import numpy.typing as npt

__all__ = [
    "QUANTILES",
    "Scores",
    "coverage",
    "mase",
    "naive_scales",
    "pinball",
    "rmsse",
    "rmsse_by_step",
    "score",
    "valid_scale",
    "wape",
]

logger = logging.getLogger(__name__)

F64 = npt.NDArray[np.float64]
ArrayLike = npt.ArrayLike

QUANTILES = (0.1, 0.5, 0.9)


def _as_2d(values: ArrayLike) -> F64:
    array = np.asarray(values, dtype=np.float64)
    if array.ndim == 1:
        array = array[None, :]
    if array.ndim != 2:
        raise ValueError(f"expected a [n, horizon] array, got shape {array.shape}")
    return array


def _check_same(y: F64, *others: F64) -> None:
    for other in others:
        if other.shape != y.shape:
            raise ValueError(f"expected forecasts of shape {y.shape}, got {other.shape}")


def naive_scales(history: ArrayLike) -> tuple[F64, F64]:
    """Per-row mean squared and mean absolute one-step naive error of the in-sample history.

    ``history`` is ``[n, T]`` with NaN where a row has no data (before an item's first bucket):
    only differences between two real consecutive buckets count. A row with fewer than two real
    buckets gets NaN; a constant row gets 0 — both are "unscaled" (see :func:`valid_scale`).

    Returns:
        ``(scale_sq, scale_abs)``: the RMSSE denominator and the MASE/pinball denominator.

    >>> sq, ab = naive_scales([[np.nan, 1.0, 3.0, 2.0], [5.0, 5.0, 5.0, 5.0], [np.nan] * 3 + [1]])
    >>> sq.tolist()[:2], ab.tolist()[:2], bool(np.isnan(sq[2]))
    ([2.5, 0.0], [1.5, 0.0], True)
    """
    h = _as_2d(history)
    if h.shape[1] < 2:
        nan = np.full(h.shape[0], np.nan)
        return nan, nan.copy()
    diffs = np.diff(h, axis=1)
    real = np.isfinite(diffs)
    count = real.sum(axis=1)
    filled = np.where(real, diffs, 0.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        scale_sq = np.where(count > 0, (filled**2).sum(axis=1) / count, np.nan)
        scale_abs = np.where(count > 0, np.abs(filled).sum(axis=1) / count, np.nan)
    return scale_sq, scale_abs


def valid_scale(scale: ArrayLike) -> npt.NDArray[np.bool_]:
    """Rows whose scale can divide: finite and strictly positive.

    >>> valid_scale([1.0, 0.0, np.nan, np.inf]).tolist()
    [True, False, False, False]
    """
    s = np.asarray(scale, dtype=np.float64)
    return np.isfinite(s) & (s > 0)


def _scaled_rows(per_row: F64, scale: F64) -> F64:
    """``per_row / scale`` where the scale is valid, NaN elsewhere (no warnings)."""
    ok = valid_scale(scale)
    out = np.full(per_row.shape, np.nan)
    out[ok] = per_row[ok] / scale[ok]
    return out


def rmsse(y: ArrayLike, mean: ArrayLike, scale_sq: ArrayLike) -> F64:
    """Per-row root mean squared scaled error of the ``mean`` forecast (NaN if unscaled).

    >>> rmsse([[1.0, 3.0]], [[0.0, 0.0]], [5.0]).tolist()
    [1.0]
    >>> rmsse([[1.0, 3.0], [1.0, 1.0]], [[1.0, 3.0], [0.0, 0.0]], [2.0, 0.0]).tolist()
    [0.0, nan]
    """
    yy, mm = _as_2d(y), _as_2d(mean)
    _check_same(yy, mm)
    mse = ((yy - mm) ** 2).mean(axis=1)
    return np.sqrt(_scaled_rows(mse, np.asarray(scale_sq, dtype=np.float64)))


def rmsse_by_step(y: ArrayLike, mean: ArrayLike, scale_sq: ArrayLike) -> F64:
    """RMSSE at each horizon step alone: mean over scaled rows of ``|y - mean| / sqrt(scale)``.

    With a one-step horizon RMSSE reduces to the scaled absolute error, so this is the same
    metric as :func:`rmsse` sliced by step — it shows how fast a model degrades with lead time.

    >>> y = [[1.0, 3.0], [0.0, 2.0], [1.0, 1.0]]
    >>> rmsse_by_step(y, [[0.0] * 2] * 3, [1.0, 4.0, 0.0]).tolist()
    [0.5, 2.0]
    """
    yy, mm = _as_2d(y), _as_2d(mean)
    _check_same(yy, mm)
    ok = valid_scale(scale_sq)
    if not ok.any():
        return np.full(yy.shape[1], np.nan)
    scaled = np.abs(yy[ok] - mm[ok]) / np.sqrt(np.asarray(scale_sq, dtype=np.float64)[ok])[:, None]
    result: F64 = scaled.mean(axis=0)
    return result


def mase(y: ArrayLike, p50: ArrayLike, scale_abs: ArrayLike) -> F64:
    """Per-row mean absolute scaled error of the median forecast (NaN if unscaled).

    >>> mase([[1.0, 3.0]], [[2.0, 2.0]], [0.5]).tolist()
    [2.0]
    """
    yy, pp = _as_2d(y), _as_2d(p50)
    _check_same(yy, pp)
    mae = np.abs(yy - pp).mean(axis=1)
    return _scaled_rows(mae, np.asarray(scale_abs, dtype=np.float64))


def pinball(y: ArrayLike, q: ArrayLike, tau: float, scale_abs: ArrayLike | None = None) -> F64:
    """Per-row mean pinball (quantile) loss of quantile ``tau``, optionally scaled.

    Loss per step is ``tau * (y - q)`` when the actual is above the quantile and
    ``(1 - tau) * (q - y)`` when below. Scaling by the MASE scale makes items comparable, so a
    mean over items is meaningful; unscaled rows are NaN when a scale is given.

    >>> pinball([[10.0, 0.0]], [[0.0, 10.0]], 0.9).tolist()
    [5.0]
    >>> pinball([[10.0, 0.0]], [[0.0, 10.0]], 0.9, scale_abs=[2.0]).tolist()
    [2.5]
    """
    if not 0.0 < tau < 1.0:
        raise ValueError(f"expected a quantile level in (0, 1), got {tau}")
    yy, qq = _as_2d(y), _as_2d(q)
    _check_same(yy, qq)
    diff = yy - qq
    loss: F64 = np.maximum(tau * diff, (tau - 1.0) * diff).mean(axis=1)
    if scale_abs is None:
        return loss
    return _scaled_rows(loss, np.asarray(scale_abs, dtype=np.float64))


def wape(y: ArrayLike, p50: ArrayLike) -> float:
    """Weighted absolute percentage error of the median: ``sum|y - p50| / sum|y|``, all rows.

    An all-zero forecast scores exactly 1.0, which makes WAPE the natural check that a model
    beats "sell nothing" on intermittent demand. NaN when every actual is zero.

    >>> wape([[1.0, 3.0], [0.0, 4.0]], [[0.0, 0.0], [0.0, 0.0]])
    1.0
    >>> wape([[2.0, 2.0]], [[1.0, 2.0]])
    0.25
    """
    yy, pp = _as_2d(y), _as_2d(p50)
    _check_same(yy, pp)
    denom = float(np.abs(yy).sum())
    if denom == 0.0:
        return float("nan")
    return float(np.abs(yy - pp).sum() / denom)


def coverage(y: ArrayLike, p10: ArrayLike, p90: ArrayLike) -> float:
    """Share of actuals inside ``[p10, p90]`` (bounds included); well calibrated is 0.8.

    >>> coverage([[1.0, 5.0, 0.0, 2.0]], [[0.0, 0.0, 0.0, 3.0]], [[2.0, 4.0, 0.0, 4.0]])
    0.5
    """
    yy, lo, hi = _as_2d(y), _as_2d(p10), _as_2d(p90)
    _check_same(yy, lo, hi)
    if yy.size == 0:
        return float("nan")
    return float(((yy >= lo) & (yy <= hi)).mean())


def _nanmean(values: F64) -> float:
    finite = values[np.isfinite(values)]
    return float(finite.mean()) if finite.size else float("nan")


@dataclass(frozen=True)
class Scores:
    """Aggregated scores of one model over a set of forecast rows.

    Attributes:
        rmsse: Mean over scaled rows of the per-row RMSSE of ``mean``.
        wape: WAPE of ``p50`` over all rows and steps.
        mase: Mean over scaled rows of the per-row MASE of ``p50``.
        pinball_p10: Mean scaled pinball loss of ``p10``.
        pinball_p50: Mean scaled pinball loss of ``p50`` (half the MASE).
        pinball_p90: Mean scaled pinball loss of ``p90``.
        pinball: Mean of the three scaled pinball losses.
        coverage: Share of actuals inside ``[p10, p90]`` (target 0.8).
        n_rows: Number of forecast rows (item x origin).
        n_unscaled: Rows left out of the scaled metrics (constant or one-bucket history).
    """

    rmsse: float
    wape: float
    mase: float
    pinball_p10: float
    pinball_p50: float
    pinball_p90: float
    pinball: float
    coverage: float
    n_rows: int
    n_unscaled: int

    def as_dict(self) -> dict[str, float | int]:
        """Plain dict (for JSON and frames)."""
        return asdict(self)


def score(
    y: ArrayLike,
    mean: ArrayLike,
    p10: ArrayLike,
    p50: ArrayLike,
    p90: ArrayLike,
    scale_sq: ArrayLike,
    scale_abs: ArrayLike,
) -> Scores:
    """All metrics of one model at once (see the module docstring for aggregation rules).

    >>> y = [[2.0, 0.0], [1.0, 1.0]]
    >>> s = score(y, y, y, y, y, [1.0, 0.0], [1.0, 0.0])
    >>> s.rmsse, s.wape, s.coverage, s.n_unscaled
    (0.0, 0.0, 1.0, 1)
    """
    yy = _as_2d(y)
    sq = np.asarray(scale_sq, dtype=np.float64)
    ab = np.asarray(scale_abs, dtype=np.float64)
    if sq.shape != (yy.shape[0],) or ab.shape != (yy.shape[0],):
        raise ValueError(f"expected scales of shape ({yy.shape[0]},), got {sq.shape}, {ab.shape}")
    unscaled = ~(valid_scale(sq) & valid_scale(ab))
    ab_ok = np.where(unscaled, np.nan, ab)
    losses = [
        _nanmean(pinball(yy, q, tau, ab_ok))
        for q, tau in zip((p10, p50, p90), QUANTILES, strict=True)
    ]
    return Scores(
        rmsse=_nanmean(rmsse(yy, mean, np.where(unscaled, np.nan, sq))),
        wape=wape(yy, p50),
        mase=_nanmean(mase(yy, p50, ab_ok)),
        pinball_p10=losses[0],
        pinball_p50=losses[1],
        pinball_p90=losses[2],
        pinball=float(np.mean(losses)),
        coverage=coverage(yy, p10, p90),
        n_rows=int(yy.shape[0]),
        n_unscaled=int(unscaled.sum()),
    )
