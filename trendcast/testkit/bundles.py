"""A hand-built, TensorFlow-free model bundle for fast tests of bundle loading and inference.

The ONNX graph is a linear map of the flattened window (no LSTM), but it has exactly the
bundle's input/output contract, so loaders, forecasters and the stream worker can be tested
in milliseconds. Tests of the real trained model live in tests/integration/test_train_export.py.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import onnx
import orjson
from onnx import TensorProto, helper, numpy_helper

from trendcast.bundle import BundleMeta, TrainingMeta, sha256_file, write_bundle_meta

FEATURES = ["qty", "dow_sin", "dow_cos", "dom_sin", "dom_cos", "month_sin", "month_cos"]


def fake_onnx(window: int, horizon: int, n_features: int, seed: int = 0) -> onnx.ModelProto:
    """A linear model with the bundle's I/O contract: x[b,w,f] -> mean[b,h], quantiles[b,h,3]."""
    rng = np.random.default_rng(seed)
    flat = window * n_features
    w_mean = (rng.random((flat, horizon)) / flat).astype(np.float32)
    w_q = (rng.random((flat, horizon * 3)) / flat).astype(np.float32)
    nodes = [
        helper.make_node("Reshape", ["x", "flat_shape"], ["flat"]),
        helper.make_node("MatMul", ["flat", "w_mean"], ["mean"]),
        helper.make_node("MatMul", ["flat", "w_q"], ["q_flat"]),
        helper.make_node("Reshape", ["q_flat", "q_shape"], ["quantiles"]),
    ]
    inits = [
        numpy_helper.from_array(np.array([-1, flat], dtype=np.int64), "flat_shape"),
        numpy_helper.from_array(np.array([-1, horizon, 3], dtype=np.int64), "q_shape"),
        numpy_helper.from_array(w_mean, "w_mean"),
        numpy_helper.from_array(w_q, "w_q"),
    ]
    graph = helper.make_graph(
        nodes,
        "fake_trendcast",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", window, n_features])],
        [
            helper.make_tensor_value_info("mean", TensorProto.FLOAT, ["batch", horizon]),
            helper.make_tensor_value_info("quantiles", TensorProto.FLOAT, ["batch", horizon, 3]),
        ],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def make_fake_bundle(
    path: Path,
    *,
    window: int = 14,
    horizon: int = 7,
    freq: str = "1D",
    features: list[str] | None = None,
    scales: dict[str, float] | None = None,
) -> Path:
    """Write a complete, verifiable bundle directory and return its path."""
    features = features or FEATURES
    path.mkdir(parents=True, exist_ok=True)
    onnx.save(fake_onnx(window, horizon, len(features)), str(path / "model.onnx"))
    (path / "scales.json").write_bytes(orjson.dumps({"items": scales or {}, "price": {}}))
    digest = sha256_file(path / "model.onnx")
    meta = BundleMeta(
        model_version=f"test-{digest[:8]}",
        created_at=datetime.now(UTC),
        files={"model.onnx": digest, "scales.json": sha256_file(path / "scales.json")},
        window=window,
        horizon=horizon,
        freq=freq,
        quantiles=[0.1, 0.5, 0.9],
        features=features,
        training=TrainingMeta(
            data_start="2011-01-01",
            data_end="2011-06-30",
            n_items=1,
            n_windows=1,
            epochs=0,
            loss="none",
            seed=0,
        ),
    )
    write_bundle_meta(path, meta)
    return path
