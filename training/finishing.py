"""After training: the model's frozen blends and calibrations, fitted on the validation split.

Why apart from :mod:`training.trainer` (the split, the fit, the scores): each of these sets
frozen layers of an already trained model (:func:`training.model.set_blend`,
:func:`~training.model.calibrate_mean`, :func:`~training.model.calibrate_band`) from its
validation forecasts, and each was chosen by a measurement (see the functions).
"""

from __future__ import annotations

import logging
from typing import Any

import keras
import numpy as np
import pandas as pd
from rich.console import Console

from training.calibration import fit_band_scales
from training.evaluation import score_forecast
from training.model import calibrate_band, set_blend
from trendcast.data import Panel
from trendcast.forecasting.features import TrainingWindows
from trendcast.forecasting.onnx import unscale_outputs

__all__ = [
    "calibrate_band_on_validation",
    "choose_blends",
    "predict_scaled",
    "rmsse_calibration",
    "weekday_factors",
]

logger = logging.getLogger(__name__)


def predict_scaled(
    model: keras.Model, x: np.ndarray[Any, np.dtype[np.float32]], batch_size: int = 1024
) -> tuple[np.ndarray[Any, np.dtype[np.float32]], np.ndarray[Any, np.dtype[np.float32]]]:
    """Scaled ``(mean, quantiles)`` of a Keras model (inference mode, no dropout)."""
    out = model.predict(x, batch_size=batch_size, verbose=0)
    return np.asarray(out["mean"], np.float32), np.asarray(out["quantiles"], np.float32)


_BLEND_GRID = tuple(i / 10 for i in range(11))


def _blend_level(
    model: keras.Model, x: np.ndarray[Any, np.dtype[np.float32]], window: int
) -> np.ndarray[Any, np.dtype[np.float32]]:
    """The level the mean is blended with: the model's seasonal level ``[n, horizon]`` where
    it has one, else level28 ``[n, 1]``."""
    names = {layer.name for layer in model.layers}
    if "seasonal_level" not in names:
        return np.asarray(x[:, -min(28, window) :, 0].mean(axis=1)[:, None], np.float32)
    level = keras.Model(model.inputs, model.get_layer("seasonal_level").output)
    return np.asarray(level.predict(x, batch_size=4096, verbose=0), np.float32)


_CALIBRATION_GRID = tuple(round(0.5 + 0.05 * i, 2) for i in range(21))


def rmsse_calibration(
    raw_mean: np.ndarray[Any, np.dtype[np.float32]],
    raw_q: np.ndarray[Any, np.dtype[np.float32]],
    windows: TrainingWindows,
) -> float:
    """The factor of :data:`_CALIBRATION_GRID` with the lowest validation RMSSE of the mean."""
    y_val = windows.y_val * windows.scale_val[:, None]

    def rmsse(factor: float) -> float:
        forecast = unscale_outputs(
            (raw_mean * np.float32(factor)).astype(np.float32), raw_q, windows.scale_val
        )
        scores = score_forecast(y_val, forecast, windows.val_scale_sq, windows.val_scale_abs)
        return scores["rmsse"]

    return float(min(_CALIBRATION_GRID, key=rmsse))


def weekday_factors(panel: Panel, until: Any) -> list[float] | None:
    """The catalogue's units by weekday before ``until``, Monday first, scaled to mean 1.

    None for data that is not daily, or sold nothing. Computed on the training part only, so
    the factors frozen into the model know nothing of the validation period.

    >>> import pandas as pd
    >>> from trendcast.data import Panel
    >>> from trendcast.freq import parse_freq
    >>> days = pd.date_range("2024-01-01", periods=14, freq="D")  # Monday first
    >>> qty = ([2.0] * 5 + [0.0] * 2) * 2
    >>> frame = pd.DataFrame({"item_id": "a", "ts": days, "quantity": qty})
    >>> weekday_factors(Panel(frame=frame, freq=parse_freq("1D"), has_price=False), days[-1])
    [1.4, 1.4, 1.4, 1.4, 1.4, 0.0, 0.0]
    """
    if panel.freq.timedelta != pd.Timedelta(days=1):
        return None
    frame = panel.frame[panel.frame["ts"] < until]
    units = frame.groupby(frame["ts"].dt.dayofweek)["quantity"].sum()
    totals = np.array([max(float(units.get(day, 0.0)), 0.0) for day in range(7)])
    if totals.sum() <= 0:
        return None
    return [round(float(v), 6) for v in totals / totals.mean()]


def choose_blends(
    model: keras.Model,
    windows: TrainingWindows,
    window: int,
    mean_blend: float | None,
    p50_blend: float | None,
) -> dict[str, float]:
    """Set the mean and p50 combinations (fixed or chosen on validation): the mean's with
    the seasonal level where the model has one (else level28), the median's with level28."""
    mean_w, p50_w = mean_blend, p50_blend
    if mean_w is None or p50_w is None:
        raw_mean, raw_q = predict_scaled(model, windows.x_val)
        level = _blend_level(model, windows.x_val, window)
        level28 = windows.x_val[:, -min(28, window) :, 0].mean(axis=1)[:, None]
        y_val = windows.y_val * windows.scale_val[:, None]

        def scores(w_mean: float, w_p50: float) -> dict[str, float]:
            mean = w_mean * raw_mean + (1.0 - w_mean) * level
            q = raw_q + ((1.0 - w_p50) * (level28 - raw_q[..., 1]))[..., None]
            forecast = unscale_outputs(mean, q.astype(np.float32), windows.scale_val)
            return score_forecast(y_val, forecast, windows.val_scale_sq, windows.val_scale_abs)

        if mean_w is None:
            mean_w = min(_BLEND_GRID, key=lambda w: scores(w, 1.0)["rmsse"])
        if p50_w is None:
            p50_w = min(_BLEND_GRID, key=lambda w: scores(1.0, w)["wape"])
    set_blend(model, "mean_blend", mean_w)
    set_blend(model, "p50", p50_w)
    logger.info("blends: mean x%.2f, p50 x%.2f", mean_w, p50_w)
    return {"mean_blend": float(mean_w), "p50_blend": float(p50_w)}


def calibrate_band_on_validation(
    model: keras.Model, windows: TrainingWindows, console: Console
) -> dict[str, Any]:
    """Fit and set the per-step p10/p90 offset factors on the validation split (in-graph)."""
    _, quantiles = predict_scaled(model, windows.x_val)
    p50 = quantiles[..., 1]
    band = fit_band_scales(windows.y_val, p50, p50 - quantiles[..., 0], quantiles[..., 2] - p50)
    calibrate_band(model, band.p10.tolist(), band.p90.tolist())
    facts = band.as_dict()
    console.print(
        "band calibration on the validation split: p10 offset x"
        f"{band.p10.min():.2f}..{band.p10.max():.2f}, p90 offset x"
        f"{band.p90.min():.2f}..{band.p90.max():.2f} (per step); coverage "
        f"{facts['coverage_before']:.1%} -> {facts['coverage_after']:.1%} (in-sample)"
    )
    return facts
