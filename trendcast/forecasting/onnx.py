"""The LSTM served from ONNX Runtime: the production :class:`Forecaster` (name ``lstm``).

This module must stay TensorFlow-free (the stream worker imports it): onnxruntime and numpy
only, plus trendcast's own :mod:`trendcast.forecasting.features`, the single definition of
the model inputs shared with training, so what the worker feeds the model is what it was trained on.

One ``session.run`` per :meth:`OnnxForecaster.predict` call: the caller micro-batches windows
(the stream worker collects many items per batch), which amortises ONNX Runtime's per-call
overhead. Items with less than ``window`` buckets of history were never seen in that form
during training (training windows lie fully inside history), so they get the seasonal-naive
fallback instead, flagged with ``fallback=True``. Its season is
:func:`trendcast.freq.season_length` of the bundle's buckets (a week of days, a day of hours,
an hour of minutes).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

import numpy as np
import numpy.typing as npt
import onnxruntime as ort

from trendcast.bundle import Bundle
from trendcast.exceptions import BundleError, ForecastError
from trendcast.forecasting.base import ForecastBatch, Forecaster, WindowBatch
from trendcast.forecasting.baselines import SeasonalNaiveForecaster
from trendcast.forecasting.features import build_inputs
from trendcast.freq import season_length

__all__ = [
    "FALLBACK_SEASON",
    "OnnxForecaster",
    "default_threads",
    "unscale_outputs",
    "with_fallback",
]

logger = logging.getLogger(__name__)

F32 = npt.NDArray[np.float32]
#: The fallback's season for daily bundles (other sizes: :func:`trendcast.freq.season_length`).
FALLBACK_SEASON = 7
# Beyond a few threads a small LSTM gains nothing and starves the rest of the worker.
_MAX_DEFAULT_THREADS = 4


def default_threads() -> int:
    """Intra-op threads when none are given: the CPUs available to us, at most 4.

    Leaving a core to the worker's event loop (one thread on 2 cores) was measured too, now
    that the loop writes and sends records while ONNX Runtime computes
    (:func:`stream.inference.delivery.forecast_and_deliver`): a 100,000-item close took 15.9
    and 15.6 s with one thread, 14.3 and 15.2 s with two (docs/performance-log.md, ninth
    round), so the default stays; ``TRENDCAST_ONNX_THREADS`` sets it for the worker and
    ``TRENDCAST_THREADS`` for ``trendcast forecast``.

    >>> 1 <= default_threads() <= 4
    True
    """
    try:
        available = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        available = os.cpu_count() or 1
    return max(1, min(available, _MAX_DEFAULT_THREADS))


def unscale_outputs(mean: F32, quantiles: F32, scale: F32) -> ForecastBatch:
    """Turn scaled model outputs into quantities.

    Multiplies by the item scale, clips at zero (demand is never negative; the p10 head may
    dip below) and sorts the quantiles so p10 <= p50 <= p90 holds even if numerical noise or a
    quantized model crossed them.

    >>> fb = unscale_outputs(np.ones((1, 2), np.float32),
    ...     np.array([[[-1, 1, 2], [3, 2, 4]]], np.float32), np.array([2], np.float32))
    >>> fb.mean.tolist(), fb.p10.tolist(), fb.p50.tolist(), fb.p90.tolist()
    ([[2.0, 2.0]], [[0.0, 4.0]], [[2.0, 6.0]], [[4.0, 8.0]])
    """
    s = scale.astype(np.float32)
    q = np.sort(np.maximum(quantiles * s[:, None, None], 0.0), axis=-1).astype(np.float32)
    return ForecastBatch(
        mean=np.maximum(mean * s[:, None], 0.0).astype(np.float32),
        p10=np.ascontiguousarray(q[..., 0]),
        p50=np.ascontiguousarray(q[..., 1]),
        p90=np.ascontiguousarray(q[..., 2]),
        fallback=np.zeros(len(s), dtype=bool),
    )


def _subset(batch: WindowBatch, rows: npt.NDArray[np.int64]) -> WindowBatch:
    return WindowBatch(
        item_ids=[batch.item_ids[i] for i in rows],
        quantities=batch.quantities[rows],
        prices=None if batch.prices is None else batch.prices[rows],
        last_start_ms=batch.last_start_ms[rows],
        history_len=batch.history_len[rows],
    )


class OnnxForecaster:
    """Forecasts with a bundle's ONNX model; seasonal-naive for items with short history.

    Args:
        bundle: A bundle verified by :func:`trendcast.bundle.load_bundle`.
        quantized: Use the INT8 model (``export --quantize``) instead of the float one.
        threads: ONNX Runtime intra-op threads (default: :func:`default_threads`).

    Raises:
        BundleError: The model file cannot be opened by ONNX Runtime, or ``quantized`` was
            asked for but the bundle has no quantized model.
    """

    def __init__(
        self, bundle: Bundle, *, quantized: bool = False, threads: int | None = None
    ) -> None:
        self.bundle = bundle
        self.quantized = quantized
        meta = bundle.meta
        path = bundle.model_path(quantized)
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = threads if threads is not None else default_threads()
        # No busy-waiting of the intra-op threads between and after runs: the worker shares
        # its cores with its own event loop, Redis and the broker, and a spinning thread takes
        # CPU from all three. On 2 cores, 2 threads spinning made 9,900-12,000 windows/s of
        # the daily LSTM at batch 256, not spinning 16,400-18,200 (1 thread: 18,600-21,300).
        # Results are the same: spinning is about waiting, not arithmetic.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        # One model, one request at a time: parallel branches do not exist in this graph.
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        try:
            self._session = ort.InferenceSession(
                str(path), sess_options=options, providers=["CPUExecutionProvider"]
            )
        except Exception as exc:  # onnxruntime raises its own (untyped) exception classes
            raise BundleError(f"{path}: ONNX Runtime cannot load the model ({exc})") from exc
        self._input = meta.input_name
        self._outputs = [meta.output_names["mean"], meta.output_names["quantiles"]]
        self._features = list(meta.features)
        self._epsilon = meta.scaling.epsilon
        self._freq = bundle.freq
        self._fallback = SeasonalNaiveForecaster(meta.horizon, season_length(self._freq))
        logger.info(
            "ONNX forecaster %s (%s, %d threads)",
            meta.model_version,
            "int8" if quantized else "float32",
            options.intra_op_num_threads,
        )

    @property
    def name(self) -> str:
        """``lstm``."""
        return "lstm"

    @property
    def horizon(self) -> int:
        """Buckets forecast."""
        return self.bundle.meta.horizon

    @property
    def window(self) -> int:
        """Buckets of history the model reads."""
        return self.bundle.meta.window

    @property
    def model_version(self) -> str:
        """The bundle's model version (``<UTC timestamp>-<sha8 of model.onnx>``)."""
        return self.bundle.meta.model_version

    def predict(self, batch: WindowBatch) -> ForecastBatch:
        """Forecast every window of ``batch`` with one ONNX Runtime call.

        Raises:
            ForecastError: The batch's window length differs from the model's, or ONNX
                Runtime failed.
        """
        if batch.window != self.window:
            raise ForecastError(f"expected windows of {self.window} buckets, got {batch.window}")
        return with_fallback(batch, self.window, self._model_forecast, self._fallback)

    def _model_forecast(self, batch: WindowBatch) -> ForecastBatch:
        """The model's forecast of windows with full history (unscaled, clipped)."""
        x, scale = build_inputs(
            batch,
            self._features,
            self.bundle.scales,
            self.bundle.prices,
            self._freq,
            self._epsilon,
        )
        try:
            raw_mean, raw_q = self._session.run(self._outputs, {self._input: x})
        except Exception as exc:  # onnxruntime's exception classes are not exported
            raise ForecastError(f"ONNX Runtime failed on {len(batch)} windows: {exc}") from exc
        return unscale_outputs(
            np.asarray(raw_mean, np.float32), np.asarray(raw_q, np.float32), scale
        )


def with_fallback(
    batch: WindowBatch,
    window: int,
    model: Callable[[WindowBatch], ForecastBatch],
    fallback: Forecaster,
) -> ForecastBatch:
    """``model``'s forecasts of the windows with full history, ``fallback``'s of the rest.

    Items with less than ``window`` buckets of history were never seen in that form in
    training (its windows lie fully inside history), and a non-finite model forecast would
    poison every consumer downstream: both get the fallback, flagged ``fallback=True``. Shared
    by the served model and the Keras one scored by ``trendcast tune``.
    """
    n = len(batch)
    mean = np.zeros((n, fallback.horizon), dtype=np.float32)
    p10, p50, p90 = mean.copy(), mean.copy(), mean.copy()
    use_fallback = batch.history_len < window
    model_rows = np.flatnonzero(~use_fallback)
    if model_rows.size:
        out = model(batch if model_rows.size == n else _subset(batch, model_rows))
        finite = np.isfinite(out.mean).all(axis=1) & np.isfinite(out.p90).all(axis=1)
        if not finite.all():
            logger.warning(
                "%d non-finite model forecasts replaced by the fallback", int((~finite).sum())
            )
            use_fallback[model_rows[~finite]] = True
        ok = model_rows[finite]
        mean[ok], p10[ok] = out.mean[finite], out.p10[finite]
        p50[ok], p90[ok] = out.p50[finite], out.p90[finite]
    fallback_rows = np.flatnonzero(use_fallback)
    if fallback_rows.size:
        fb = fallback.predict(_subset(batch, fallback_rows))
        mean[fallback_rows], p10[fallback_rows] = fb.mean, fb.p10
        p50[fallback_rows], p90[fallback_rows] = fb.p50, fb.p90
    return ForecastBatch(mean=mean, p10=p10, p50=p50, p90=p90, fallback=use_fallback)
