"""Keras -> ONNX export into a verified, versioned bundle directory.

The export refuses to write a bundle it cannot vouch for:

* the graph must contain the ONNX ``LSTM`` op. tf2onnx silently falls back to a generic
  ``Loop`` when it does not recognise the recurrent pattern; that model would still run, but
  several times slower and outside what the quantizer and the parity check were validated on;
* ONNX Runtime must reproduce Keras on the validation windows within ``tolerance`` (max
  absolute difference of both outputs, scaled units), so the worker serves the model that was
  scored, not an approximation of it.

Besides the bundle files (``model.onnx``, ``scales.json``, ``bundle.json`` with the global
intraday profile, and ``profiles.json`` with the per-item ones when any item has one) the Keras
model,
its training history and the validation windows are kept in ``BUNDLE/training/`` (Keras'
native format, JSON and a plain ``.npz``; never pickle). They are not listed in ``files`` and
inference never reads them; :func:`export_from_training_dir` re-exports from them (e.g. after
a tf2onnx upgrade) without retraining.
"""

from __future__ import annotations

import importlib.metadata
import logging
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import keras
import numpy as np
import numpy.typing as npt
import onnx
import onnxruntime as ort
import orjson

from training.model import QUANTILES
from training.trainer import TrainResult, predict_scaled
from trendcast import __version__ as trendcast_version
from trendcast.bundle import (
    PROFILES_FILE,
    SCALES_FILE,
    BundleMeta,
    IntradayMeta,
    ScalingMeta,
    TrainingMeta,
    load_bundle,
    sha256_file,
    write_bundle_meta,
)
from trendcast.exceptions import BundleError, ModelError

__all__ = [
    "DEFAULT_TOLERANCE",
    "MODEL_FILE",
    "OPSET",
    "TRAINING_DIR",
    "ExportSpec",
    "check_lstm_op",
    "convert_to_onnx",
    "export_bundle",
    "export_from_training_dir",
    "load_validation",
    "onnx_parity",
    "onnx_session",
    "run_onnx",
    "save_training_dir",
]

logger = logging.getLogger(__name__)

F32 = npt.NDArray[np.float32]

OPSET = 17
DEFAULT_TOLERANCE = 1e-4
MODEL_FILE = "model.onnx"
TRAINING_DIR = "training"
KERAS_FILE = "model.keras"
HISTORY_FILE = "history.json"
VALIDATION_FILE = "validation.npz"
SPEC_FILE = "training.json"


@dataclass(frozen=True)
class ExportSpec:
    """Everything about a trained model that the bundle records (JSON-serialisable).

    Kept in ``BUNDLE/training/training.json`` so a re-export needs no access to the data.
    """

    window: int
    horizon: int
    freq: str
    features: list[str]
    epsilon: float
    scales: dict[str, float]
    prices: dict[str, float]
    training: dict[str, Any]
    metrics: dict[str, Any]
    # Absent from specs written before intraday profiles: those bundles stay uniform.
    intraday: dict[str, Any] | None = None
    item_profiles: dict[str, list[list[float]]] | None = None

    @classmethod
    def from_result(cls, result: TrainResult) -> ExportSpec:
        """The spec of a fresh training result."""
        config = result.config
        return cls(
            window=config.window,
            horizon=config.horizon,
            freq=result.freq.name,
            features=list(result.features),
            epsilon=config.epsilon,
            scales=dict(result.scales),
            prices=dict(result.prices),
            training={
                "data_start": result.data_start,
                "data_end": result.data_end,
                "n_items": result.n_items,
                "n_windows": result.n_windows,
                "epochs": result.epochs_run,
                "loss": config.loss,
                "seed": config.seed,
                "extra": {
                    "config": config.as_dict(),
                    "best_epoch": result.best_epoch,
                    "fit_seconds": round(result.seconds, 2),
                    "n_windows_available": result.windows.n_available,
                    "n_validation_rows": int(result.windows.x_val.shape[0]),
                    **result.extra,
                },
            },
            metrics={"validation": result.metrics},
            intraday=(
                None
                if result.profile is None
                else result.profile.to_meta(PROFILES_FILE).model_dump(mode="json")
            ),
            item_profiles=None if result.profile is None else result.profile.items_json(),
        )

    def to_json(self) -> bytes:
        """Serialised spec."""
        return orjson.dumps(self.__dict__, option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY)

    @classmethod
    def from_json(cls, data: bytes) -> ExportSpec:
        """Inverse of :meth:`to_json`.

        Raises:
            BundleError: Not a valid spec.
        """
        try:
            return cls(**orjson.loads(data))
        except (orjson.JSONDecodeError, TypeError) as exc:
            raise BundleError(f"invalid {SPEC_FILE}: {exc}") from exc


def convert_to_onnx(model: keras.Model, window: int, n_features: int) -> onnx.ModelProto:
    """Convert with tf2onnx (opset 17): input ``x`` with a dynamic batch, outputs ``mean``
    and ``quantiles``.

    Raises:
        ModelError: Conversion failed or produced unexpected input/output names.
    """
    import tensorflow as tf
    import tf2onnx

    spec = (tf.TensorSpec((None, window, n_features), tf.float32, name="x"),)
    try:
        converted = tf2onnx.convert.from_keras(model, input_signature=spec, opset=OPSET)
    except Exception as exc:  # tf2onnx raises anything from ValueError to TF internals
        raise ModelError(f"tf2onnx could not convert the model: {exc}") from exc
    proto: onnx.ModelProto = converted[0]
    inputs = [i.name for i in proto.graph.input]
    outputs = sorted(o.name for o in proto.graph.output)
    if inputs != ["x"] or outputs != ["mean", "quantiles"]:
        raise ModelError(
            f"expected ONNX input ['x'] and outputs ['mean', 'quantiles'], got {inputs} and "
            f"{outputs}"
        )
    return proto


def check_lstm_op(proto: onnx.ModelProto) -> None:
    """Require the ONNX ``LSTM`` op (and no ``Loop``/``Scan`` fallback) in the main graph.

    Raises:
        ModelError: No LSTM op.
    """
    ops = {node.op_type for node in proto.graph.node}
    if "LSTM" not in ops:
        raise ModelError(
            "tf2onnx did not map the recurrent layer to an ONNX LSTM op "
            f"(graph ops: {', '.join(sorted(ops))}); the Loop fallback is not supported"
        )


def onnx_session(model: Path | bytes, threads: int | None = None) -> ort.InferenceSession:
    """An ONNX Runtime CPU session with all graph optimizations (as the forecaster uses)."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads is not None:
        options.intra_op_num_threads = threads
    source = str(model) if isinstance(model, Path) else model
    return ort.InferenceSession(source, sess_options=options, providers=["CPUExecutionProvider"])


def run_onnx(session: ort.InferenceSession, x: F32, batch_size: int = 4096) -> tuple[F32, F32]:
    """Scaled ``(mean, quantiles)`` of an ONNX session, in chunks of ``batch_size``."""
    means, quants = [], []
    for start in range(0, max(len(x), 1), batch_size):
        mean, q = session.run(["mean", "quantiles"], {"x": x[start : start + batch_size]})
        means.append(np.asarray(mean, np.float32))
        quants.append(np.asarray(q, np.float32))
    return np.concatenate(means), np.concatenate(quants)


def onnx_parity(keras_out: tuple[F32, F32], onnx_out: tuple[F32, F32]) -> float:
    """Max absolute difference over both outputs.

    >>> a = (np.zeros((1, 2), np.float32), np.zeros((1, 2, 3), np.float32))
    >>> b = (np.full((1, 2), 0.5, np.float32), np.zeros((1, 2, 3), np.float32))
    >>> onnx_parity(a, b)
    0.5
    """
    return float(
        max(
            np.max(np.abs(k - o)) if k.size else 0.0
            for k, o in zip(keras_out, onnx_out, strict=True)
        )
    )


def _versions() -> dict[str, str]:
    import tensorflow as tf

    versions = {
        "tensorflow": str(tf.__version__),
        "keras": str(keras.__version__),
        "onnx": str(onnx.__version__),
        "onnxruntime": str(ort.__version__),
        "trendcast": trendcast_version,
    }
    try:
        versions["tf2onnx"] = importlib.metadata.version("tf2onnx")
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover - it converted above
        versions["tf2onnx"] = "unknown"
    return versions


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(path)


def _export(
    model: keras.Model, spec: ExportSpec, x_val: F32, bundle_dir: Path, tolerance: float
) -> Path:
    n_features = len(spec.features)
    proto = convert_to_onnx(model, spec.window, n_features)
    check_lstm_op(proto)
    data = proto.SerializeToString()
    keras_out = predict_scaled(model, x_val)
    onnx_out = run_onnx(onnx_session(data), x_val)
    diff = onnx_parity(keras_out, onnx_out)
    logger.info("ONNX parity on %d validation windows: max abs diff %.3g", len(x_val), diff)
    if not np.isfinite(diff) or diff > tolerance:
        raise ModelError(
            f"ONNX Runtime differs from Keras by {diff:.3g} (> tolerance {tolerance:g}) on "
            f"{len(x_val)} validation windows; refusing to export"
        )
    model_path = bundle_dir / MODEL_FILE
    _write_atomic(model_path, data)
    # A quantized model from an earlier export no longer matches this model.
    (bundle_dir / "model.int8.onnx").unlink(missing_ok=True)
    scales = {"items": spec.scales, "price": spec.prices}
    _write_atomic(bundle_dir / SCALES_FILE, orjson.dumps(scales, option=orjson.OPT_INDENT_2))
    model_sha = sha256_file(model_path)
    files = {MODEL_FILE: model_sha, SCALES_FILE: sha256_file(bundle_dir / SCALES_FILE)}
    intraday = None if spec.intraday is None else IntradayMeta(**spec.intraday)
    if intraday is not None and intraday.items_file is not None:
        profiles = {"items": spec.item_profiles or {}}
        _write_atomic(bundle_dir / intraday.items_file, orjson.dumps(profiles))
        files[intraday.items_file] = sha256_file(bundle_dir / intraday.items_file)
    else:
        # Per-item profiles of an earlier export no longer belong to this model.
        (bundle_dir / PROFILES_FILE).unlink(missing_ok=True)
    created = datetime.now(UTC).replace(microsecond=0)
    meta = BundleMeta(
        model_version=f"{created:%Y%m%dT%H%M%SZ}-{model_sha[:8]}",
        created_at=created,
        model_file=MODEL_FILE,
        files=files,
        window=spec.window,
        horizon=spec.horizon,
        freq=spec.freq,
        quantiles=list(QUANTILES),
        features=spec.features,
        scaling=ScalingMeta(epsilon=spec.epsilon),
        training=TrainingMeta(**spec.training),
        metrics=spec.metrics,
        parity={
            "max_abs_diff": diff,
            "tolerance": tolerance,
            "n_windows": int(len(x_val)),
            "units": "scaled",
            "opset": OPSET,
        },
        versions=_versions(),
        intraday=intraday,
    )
    write_bundle_meta(bundle_dir, meta)
    bundle = load_bundle(bundle_dir)  # the worker's check, run once here before anyone relies on it
    logger.info("wrote bundle %s (model %s)", bundle_dir, bundle.meta.model_version)
    return bundle_dir


def export_bundle(
    result: TrainResult, bundle_dir: Path | str, *, tolerance: float = DEFAULT_TOLERANCE
) -> Path:
    """Write a verified bundle from a training result (and keep its training artifacts).

    Args:
        result: What :func:`training.train` returned.
        bundle_dir: Target directory (created; existing bundle files are replaced).
        tolerance: Max abs difference allowed between ONNX Runtime and Keras.

    Returns:
        The bundle directory.

    Raises:
        ModelError: No LSTM op in the ONNX graph, or parity above ``tolerance``.
        BundleError: The written bundle does not verify.
    """
    bundle_dir = Path(bundle_dir)
    save_training_dir(result, bundle_dir)
    spec = ExportSpec.from_result(result)
    return _export(result.model, spec, result.windows.x_val, bundle_dir, tolerance)


def save_training_dir(result: TrainResult, bundle_dir: Path | str) -> Path:
    """Keep the Keras model, history, spec and validation windows in ``BUNDLE/training/``."""
    training_dir = Path(bundle_dir) / TRAINING_DIR
    training_dir.mkdir(parents=True, exist_ok=True)
    result.model.save(training_dir / KERAS_FILE)
    _write_atomic(
        training_dir / HISTORY_FILE, orjson.dumps(result.history, option=orjson.OPT_INDENT_2)
    )
    _write_atomic(training_dir / SPEC_FILE, ExportSpec.from_result(result).to_json())
    w = result.windows
    np.savez_compressed(
        training_dir / VALIDATION_FILE,
        x=w.x_val,
        y=w.y_val,
        scale=w.scale_val,
        scale_sq=w.val_scale_sq,
        scale_abs=w.val_scale_abs,
    )
    return training_dir


def load_validation(bundle_dir: Path | str) -> dict[str, npt.NDArray[Any]] | None:
    """The validation arrays kept at export (``x``, ``y``, ``scale``, ``scale_sq``,
    ``scale_abs``), or ``None`` if the bundle has no training directory."""
    path = Path(bundle_dir) / TRAINING_DIR / VALIDATION_FILE
    if not path.is_file():
        return None
    with np.load(path, allow_pickle=False) as data:
        return {k: data[k] for k in data.files}


def export_from_training_dir(
    bundle_dir: Path | str, *, tolerance: float = DEFAULT_TOLERANCE
) -> Path:
    """Re-export ``model.onnx`` and ``bundle.json`` from ``BUNDLE/training/`` (no retraining).

    Raises:
        BundleError: The training directory is missing or incomplete.
        ModelError: As :func:`export_bundle`.
    """
    bundle_dir = Path(bundle_dir)
    training_dir = bundle_dir / TRAINING_DIR
    needed = [training_dir / n for n in (KERAS_FILE, SPEC_FILE, VALIDATION_FILE)]
    missing = [p.name for p in needed if not p.is_file()]
    if missing:
        raise BundleError(
            f"{training_dir}: cannot re-export, missing {', '.join(missing)} (train first)"
        )
    spec = ExportSpec.from_json((training_dir / SPEC_FILE).read_bytes())
    try:
        model = keras.models.load_model(training_dir / KERAS_FILE, compile=False)
    except Exception as exc:  # keras raises ValueError, OSError, zipfile errors…
        raise BundleError(f"{training_dir / KERAS_FILE}: cannot load ({exc})") from exc
    validation = load_validation(bundle_dir)
    if validation is None:  # pragma: no cover - checked above, guards a race with a delete
        raise BundleError(f"{training_dir}: missing {VALIDATION_FILE}")
    x_val = validation["x"].astype(np.float32)
    return _export(model, spec, x_val, bundle_dir, tolerance)
