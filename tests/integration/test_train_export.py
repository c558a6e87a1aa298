"""Train a tiny real LSTM, export it to ONNX, serve it, quantize it and tamper with it."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import orjson
import pandas as pd
import pytest
from onnx import TensorProto, helper

from trendcast.bundle import load_bundle
from trendcast.exceptions import BundleError, ModelError
from trendcast.forecasting.base import Forecaster, WindowBatch
from trendcast.forecasting.features import build_inputs
from trendcast.forecasting.onnx import OnnxForecaster
from trendcast.forecasting.windows import windows_from_panel
from trendcast.testkit.trained_bundle import (
    TINY_HORIZON,
    TINY_WINDOW,
    tiny_panel,
)

pytest.importorskip("tensorflow")
pytest.importorskip("tf2onnx")


@pytest.fixture(scope="module")
def bundle_dir(tiny_bundle: Path) -> Path:
    return tiny_bundle


@pytest.fixture
def bundle_copy(bundle_dir: Path, tmp_path: Path) -> Path:
    """A private copy for tests that modify the bundle."""
    return Path(shutil.copytree(bundle_dir, tmp_path / "bundle"))


def _short_item_batch(window: int) -> WindowBatch:
    q = np.zeros((1, window), dtype=np.float32)
    q[0, -3:] = [2.0, 0.0, 5.0]
    return WindowBatch(
        ["brand-new"],
        q,
        None,
        np.array([pd.Timestamp("2011-08-31").value // 1_000_000]),
        np.array([3], dtype=np.int64),
    )


def test_graph_has_the_onnx_lstm_op(bundle_dir: Path) -> None:
    model = onnx.load(str(bundle_dir / "model.onnx"))
    ops = {n.op_type for n in model.graph.node}
    assert "LSTM" in ops and "Loop" not in ops and "Scan" not in ops


def test_bundle_loads_and_records_parity(bundle_dir: Path) -> None:
    bundle = load_bundle(bundle_dir)
    meta = bundle.meta
    assert (meta.window, meta.horizon, meta.freq) == (TINY_WINDOW, TINY_HORIZON, "1D")
    assert meta.parity["max_abs_diff"] <= meta.parity["tolerance"] == 1e-4
    assert meta.model_version.endswith(meta.files["model.onnx"][:8])
    assert set(meta.files) == {"model.onnx", "scales.json"}  # no per-item profiles
    assert meta.intraday is not None and meta.intraday.kind == "uniform"  # daily sums
    assert meta.features[0] == "qty" and meta.features[-1] == "price"
    assert {"tensorflow", "keras", "tf2onnx", "onnx", "onnxruntime", "trendcast"} <= set(
        meta.versions
    )
    assert meta.metrics["validation"]["lstm"]["coverage"] >= 0.0
    assert 0.5 <= meta.training.extra["mean_calibration"] <= 1.5
    assert meta.training.extra["config"]["window"] == TINY_WINDOW
    assert len(bundle.scales) == 6
    training = bundle_dir / "training"
    assert {p.name for p in training.iterdir()} >= {
        "model.keras",
        "history.json",
        "validation.npz",
        "training.json",
    }
    assert not list(bundle_dir.rglob("*.pkl")) and not list(bundle_dir.rglob("*.pickle"))


def test_forecaster_output_contract(bundle_dir: Path) -> None:
    forecaster = OnnxForecaster(load_bundle(bundle_dir), threads=1)
    assert isinstance(forecaster, Forecaster)
    assert forecaster.name == "lstm" and forecaster.horizon == TINY_HORIZON
    assert forecaster.model_version == load_bundle(bundle_dir).meta.model_version
    batch = windows_from_panel(tiny_panel(), TINY_WINDOW)
    out = forecaster.predict(batch)
    assert out.mean.shape == out.p10.shape == out.p90.shape == (len(batch), TINY_HORIZON)
    assert out.mean.dtype == np.float32
    assert np.all(out.p10 >= 0) and np.all(out.mean >= 0)
    assert np.all(out.p10 <= out.p50) and np.all(out.p50 <= out.p90)
    assert not out.fallback.any()
    assert np.isfinite(out.mean).all()


def test_short_history_gets_the_seasonal_naive_fallback(bundle_dir: Path) -> None:
    forecaster = OnnxForecaster(load_bundle(bundle_dir), threads=1)
    full = windows_from_panel(tiny_panel(), TINY_WINDOW)
    short = _short_item_batch(TINY_WINDOW)
    mixed = WindowBatch(
        full.item_ids[:2] + short.item_ids,
        np.concatenate([full.quantities[:2], short.quantities]),
        None,
        np.concatenate([full.last_start_ms[:2], short.last_start_ms]),
        np.concatenate([full.history_len[:2], short.history_len]),
    )
    out = forecaster.predict(mixed)
    assert out.fallback.tolist() == [False, False, True]
    # Fewer buckets than one season: the fallback repeats the mean of what there is.
    assert np.allclose(out.mean[2], 7.0 / 3.0)
    empty = forecaster.predict(
        WindowBatch(
            [],
            np.zeros((0, TINY_WINDOW), np.float32),
            None,
            np.zeros(0, np.int64),
            np.zeros(0, np.int64),
        )
    )
    assert len(empty) == 0


def test_forecaster_serves_what_keras_computes(bundle_dir: Path) -> None:
    """The ONNX forecaster reproduces the Keras model on features built at inference time."""
    import keras

    bundle = load_bundle(bundle_dir)
    batch = windows_from_panel(tiny_panel(), TINY_WINDOW)
    x, scale = build_inputs(
        batch,
        bundle.meta.features,
        bundle.scales,
        bundle.prices,
        bundle.freq,
        bundle.meta.scaling.epsilon,
    )
    model = keras.models.load_model(bundle_dir / "training" / "model.keras", compile=False)
    expected = np.maximum(np.asarray(model.predict(x, verbose=0)["mean"]) * scale[:, None], 0)
    out = OnnxForecaster(bundle, threads=1).predict(batch)
    assert np.abs(out.mean - expected).max() <= 1e-4 * max(1.0, float(scale.max()))


def test_quantize_adds_a_verified_int8_model(bundle_copy: Path) -> None:
    from export import quantize_bundle

    report = quantize_bundle(bundle_copy, batch_size=64, runs=2)
    bundle = load_bundle(bundle_copy)
    assert bundle.meta.quantized_file == "model.int8.onnx"
    assert "model.int8.onnx" in bundle.meta.files
    assert report.float_windows_per_s > 0 and report.int8_windows_per_s > 0
    assert np.isfinite(report.max_abs_diff) and set(report.int8_scores) >= {"rmsse", "wape"}
    assert bundle.meta.metrics["int8"]["batch_size"] == 64
    out = OnnxForecaster(bundle, quantized=True, threads=1).predict(
        windows_from_panel(tiny_panel(), TINY_WINDOW)
    )
    assert np.all(out.p10 <= out.p50) and np.all(out.p50 <= out.p90) and np.all(out.p10 >= 0)


def test_reexport_from_training_dir(bundle_copy: Path) -> None:
    from export import export_from_training_dir, quantize_bundle

    quantize_bundle(bundle_copy, batch_size=16, runs=1)
    export_from_training_dir(bundle_copy)
    bundle = load_bundle(bundle_copy)
    assert bundle.meta.quantized_file is None  # the old int8 model no longer matches
    assert not (bundle_copy / "model.int8.onnx").exists()
    assert bundle.meta.parity["max_abs_diff"] <= 1e-4


def test_parity_failure_refuses_export(bundle_copy: Path) -> None:
    from export import export_from_training_dir

    with pytest.raises(ModelError, match="differs from Keras"):
        export_from_training_dir(bundle_copy, tolerance=-1.0)


def test_missing_lstm_op_is_a_model_error() -> None:
    from export import check_lstm_op

    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    with pytest.raises(ModelError, match="LSTM"):
        check_lstm_op(helper.make_model(graph))


def test_corrupt_model_bytes_are_refused(bundle_copy: Path) -> None:
    model = bundle_copy / "model.onnx"
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0xFF
    model.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="checksum"):
        load_bundle(bundle_copy)


def test_edited_window_is_refused(bundle_copy: Path) -> None:
    meta_file = bundle_copy / "bundle.json"
    meta = orjson.loads(meta_file.read_bytes())
    meta["window"] = TINY_WINDOW + 1
    meta_file.write_bytes(orjson.dumps(meta))
    with pytest.raises(BundleError, match="shape"):
        load_bundle(bundle_copy)


@pytest.mark.parametrize("name", ["model.onnx", "scales.json", "bundle.json"])
def test_truncated_file_is_refused(bundle_copy: Path, name: str) -> None:
    path = bundle_copy / name
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(BundleError):
        load_bundle(bundle_copy)


def test_onnx_forecaster_never_imports_tensorflow() -> None:
    code = (
        "import sys; import trendcast.forecasting.onnx; "
        "bad = [m for m in ('tensorflow', 'keras', 'tf2onnx') if m in sys.modules]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def _minute_lines(minutes: int = 360, items: int = 4, seed: int = 3) -> pd.DataFrame:
    """Sales lines every few seconds: a rate that changes with the minute of the hour."""
    rng = np.random.default_rng(seed)
    start = pd.Timestamp("2011-06-01 09:00")
    rows = []
    for k in range(items):
        for m in range(minutes):
            rate = (k + 1) * (1.5 + np.sin(2 * np.pi * m / 60))
            for s in rng.uniform(0, 60, size=rng.poisson(rate)):
                rows.append((f"m{k}", start + pd.Timedelta(minutes=m, seconds=float(s)), 1.0))
    return pd.DataFrame(rows, columns=["item_id", "ts", "quantity"])


def test_one_minute_bundle_trains_exports_and_serves(tmp_path: Path) -> None:
    """A 1min bundle: minute calendar inputs, uniform profile, ONNX == Keras, minute dates."""
    import keras
    from rich.console import Console

    from export import export_bundle
    from training import TrainConfig, train
    from trendcast.data import bucketize
    from trendcast.forecasting.output import forecast_frame
    from trendcast.forecasting.profile import IntradayProfile
    from trendcast.freq import parse_freq

    panel = bucketize(_minute_lines(), parse_freq("1min"), has_price=False)
    config = TrainConfig(window=30, horizon=5, epochs=2, units=8, max_windows=500, seed=3)
    result = train(panel, config, console=Console(quiet=True))
    bundle = load_bundle(export_bundle(result, tmp_path / "bundle"))
    meta = bundle.meta
    assert meta.freq == "1min" and meta.parity["max_abs_diff"] <= 1e-4
    assert meta.features == [
        "qty",
        "moh_sin",
        "moh_cos",
        "hod_sin",
        "hod_cos",
        "dow_sin",
        "dow_cos",
    ]
    assert meta.intraday is not None and meta.intraday.kind == "uniform"
    assert IntradayProfile.from_bundle(bundle).kind == "uniform"
    assert "seasonal_naive60" in meta.metrics["validation"]["baselines"]
    batch = windows_from_panel(panel, meta.window)
    x, scale = build_inputs(
        batch, meta.features, bundle.scales, bundle.prices, bundle.freq, meta.scaling.epsilon
    )
    model = keras.models.load_model(tmp_path / "bundle" / "training" / "model.keras", compile=False)
    expected = np.maximum(np.asarray(model.predict(x, verbose=0)["mean"]) * scale[:, None], 0)
    out = OnnxForecaster(bundle, threads=1).predict(batch)
    assert np.abs(out.mean - expected).max() <= 1e-4 * max(1.0, float(scale.max()))
    frame = forecast_frame(batch, out, bundle.freq)
    assert frame["date"].iloc[0] == "2011-06-01T15:00:00Z"  # the minute after the data
