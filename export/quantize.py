"""Dynamic INT8 quantization of a bundle's model, with an honest accuracy/speed report.

``onnxruntime.quantization.quantize_dynamic`` stores weights as INT8 and quantizes
activations on the fly (no calibration data needed); ONNX Runtime then runs MatMul and the
LSTM as ``DynamicQuantizeLSTM``. Whether that pays off depends on the CPU and batch size, so
the report measures it rather than assuming: windows/s of the float and INT8 models at the
same batch size (median of several runs), and how much the forecasts move on the validation
windows kept at export.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from export.onnx_export import load_validation, onnx_parity, onnx_session, run_onnx
from training.evaluation import score_forecast
from trendcast.bundle import load_bundle, sha256_file, write_bundle_meta
from trendcast.exceptions import BundleError, ModelError
from trendcast.forecasting.onnx import default_threads, unscale_outputs

__all__ = ["QUANTIZED_FILE", "QuantizeReport", "quantize_bundle", "windows_per_second"]

logger = logging.getLogger(__name__)

F32 = npt.NDArray[np.float32]
QUANTIZED_FILE = "model.int8.onnx"


@dataclass(frozen=True)
class QuantizeReport:
    """What INT8 changed.

    Attributes:
        path: The quantized model.
        max_abs_diff: Max |int8 - float| over both outputs on the validation windows (scaled).
        mean_abs_diff: Mean of the same.
        float_scores: Validation scores of the float model (NaN-free dict, or empty).
        int8_scores: The same for INT8.
        batch_size: Windows per timed ``session.run``.
        float_windows_per_s: Throughput of the float model (median of ``runs``).
        int8_windows_per_s: Throughput of the INT8 model.
        speedup: ``int8 / float`` throughput.
        float_bytes: Size of ``model.onnx``.
        int8_bytes: Size of ``model.int8.onnx``.
    """

    path: Path
    max_abs_diff: float
    mean_abs_diff: float
    float_scores: dict[str, float]
    int8_scores: dict[str, float]
    batch_size: int
    float_windows_per_s: float
    int8_windows_per_s: float
    speedup: float
    float_bytes: int
    int8_bytes: int

    def as_dict(self) -> dict[str, Any]:
        """JSON-friendly dict (stored under ``metrics.int8`` in ``bundle.json``)."""
        out = asdict(self)
        out["path"] = self.path.name
        return out


def windows_per_second(session: Any, x: F32, runs: int = 7) -> float:
    """Median throughput of ``session.run`` on ``x`` over ``runs`` timed runs (one warm-up)."""
    session.run(None, {"x": x})
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        session.run(None, {"x": x})
        times.append(time.perf_counter() - start)
    return float(len(x) / max(float(np.median(times)), 1e-9))


def _benchmark_batch(x_val: F32 | None, window: int, n_features: int, batch_size: int) -> F32:
    if x_val is not None and len(x_val):
        reps = -(-batch_size // len(x_val))
        return np.ascontiguousarray(np.tile(x_val, (reps, 1, 1))[:batch_size])
    rng = np.random.default_rng(0)
    return rng.random((batch_size, window, n_features), dtype=np.float32)


def quantize_bundle(
    bundle_dir: Path | str, *, batch_size: int = 256, runs: int = 7, threads: int | None = None
) -> QuantizeReport:
    """Add ``model.int8.onnx`` to a bundle and report accuracy change and speed-up.

    Args:
        bundle_dir: A bundle written by :func:`export.export_bundle`.
        batch_size: Windows per timed run.
        runs: Timed runs per model (median taken).
        threads: ONNX Runtime intra-op threads for the timing (default: as the forecaster).

    Raises:
        BundleError: The bundle does not verify before or after.
        ModelError: Quantization failed.
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    bundle_dir = Path(bundle_dir)
    bundle = load_bundle(bundle_dir)
    meta = bundle.meta
    float_path = bundle.model_path()
    int8_path = bundle_dir / QUANTIZED_FILE
    tmp = bundle_dir / (QUANTIZED_FILE + ".tmp")
    try:
        quantize_dynamic(float_path, tmp, weight_type=QuantType.QInt8)
    except Exception as exc:  # onnxruntime.quantization raises assorted errors
        tmp.unlink(missing_ok=True)
        raise ModelError(f"dynamic quantization of {float_path} failed: {exc}") from exc
    tmp.replace(int8_path)

    threads = threads if threads is not None else default_threads()
    float_session = onnx_session(float_path, threads)
    int8_session = onnx_session(int8_path, threads)
    validation = load_validation(bundle_dir)
    x_val = None if validation is None else validation["x"].astype(np.float32)
    float_scores: dict[str, float] = {}
    int8_scores: dict[str, float] = {}
    max_diff = mean_diff = float("nan")
    if validation is not None and x_val is not None and len(x_val):
        f_out, q_out = run_onnx(float_session, x_val), run_onnx(int8_session, x_val)
        max_diff = onnx_parity(f_out, q_out)
        mean_diff = float(
            np.mean([np.mean(np.abs(a - b)) for a, b in zip(f_out, q_out, strict=True)])
        )
        scale = validation["scale"].astype(np.float32)
        y = validation["y"] * scale[:, None]
        for out, scores in ((f_out, float_scores), (q_out, int8_scores)):
            scores.update(
                score_forecast(
                    y,
                    unscale_outputs(out[0], out[1], scale),
                    validation["scale_sq"],
                    validation["scale_abs"],
                )
            )
    else:
        logger.warning(
            "%s has no training/validation.npz: accuracy change not measured", bundle_dir
        )
    x_bench = _benchmark_batch(x_val, meta.window, len(meta.features), batch_size)
    float_wps = windows_per_second(float_session, x_bench, runs)
    int8_wps = windows_per_second(int8_session, x_bench, runs)
    report = QuantizeReport(
        path=int8_path,
        max_abs_diff=max_diff,
        mean_abs_diff=mean_diff,
        float_scores=float_scores,
        int8_scores=int8_scores,
        batch_size=batch_size,
        float_windows_per_s=float_wps,
        int8_windows_per_s=int8_wps,
        speedup=int8_wps / float_wps if float_wps > 0 else float("nan"),
        float_bytes=float_path.stat().st_size,
        int8_bytes=int8_path.stat().st_size,
    )
    files = {**meta.files, QUANTIZED_FILE: sha256_file(int8_path)}
    metrics = {**meta.metrics, "int8": _json_safe(report.as_dict())}
    write_bundle_meta(
        bundle_dir,
        meta.model_copy(
            update={"files": files, "quantized_file": QUANTIZED_FILE, "metrics": metrics}
        ),
    )
    try:
        load_bundle(bundle_dir)
    except BundleError as exc:
        raise ModelError(f"quantized bundle does not verify: {exc}") from exc
    logger.info(
        "quantized %s: %.0f -> %.0f windows/s (x%.2f), max abs diff %.3g",
        bundle_dir,
        float_wps,
        int8_wps,
        report.speedup,
        max_diff,
    )
    return report


def _json_safe(value: Any) -> Any:
    """NaN -> None recursively (JSON has no NaN)."""
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, float) and not np.isfinite(value):
        return None
    return value
