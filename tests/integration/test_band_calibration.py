"""A tiny trained bundle carries its p10/p90 band calibration in the graph and in bundle.json."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from trendcast.bundle import load_bundle
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


def test_bundle_records_the_band_factors(bundle_dir: Path) -> None:
    extra = load_bundle(bundle_dir).meta.training.extra
    band = extra["band_calibration"]
    assert extra["config"]["calibrate_quantiles"] is True
    assert len(band["p10"]) == len(band["p90"]) == TINY_HORIZON
    assert all(0.8 <= f <= 2.0 for f in band["p10"] + band["p90"])


def test_the_graph_carries_the_factors_and_onnx_equals_keras(bundle_dir: Path) -> None:
    import keras

    bundle = load_bundle(bundle_dir)
    band = bundle.meta.training.extra["band_calibration"]
    model = keras.models.load_model(bundle_dir / "training" / "model.keras", compile=False)
    for name in ("p10", "p90"):
        kernel = model.get_layer(f"{name}_offset_cal").get_weights()[0]
        assert np.allclose(np.diag(kernel), band[name], atol=1e-4)
        assert np.count_nonzero(kernel - np.diag(np.diag(kernel))) == 0
    batch = windows_from_panel(tiny_panel(), TINY_WINDOW)
    x, scale = build_inputs(
        batch,
        bundle.meta.features,
        bundle.scales,
        bundle.prices,
        bundle.freq,
        bundle.meta.scaling.epsilon,
    )
    q = np.maximum(np.asarray(model.predict(x, verbose=0)["quantiles"]) * scale[:, None, None], 0)
    out = OnnxForecaster(bundle, threads=1).predict(batch)
    tol = 1e-4 * max(1.0, float(scale.max()))
    assert np.abs(out.p10 - q[..., 0]).max() <= tol
    assert np.abs(out.p90 - q[..., 2]).max() <= tol
    assert bundle.meta.parity["max_abs_diff"] <= bundle.meta.parity["tolerance"]


def test_validation_coverage_moves_towards_the_target(bundle_dir: Path) -> None:
    meta = load_bundle(bundle_dir).meta
    band = meta.training.extra["band_calibration"]
    before, after = band["coverage_before"], band["coverage_after"]
    # Two epochs leave the band far too narrow; the factors' upper bound limits the move.
    assert abs(after - 0.84) < abs(before - 0.84)
    # The validation scores in bundle.json are those of the calibrated, served model.
    assert meta.metrics["validation"]["lstm"]["coverage"] == pytest.approx(after, abs=1e-3)


def test_switched_off_the_band_stays_as_trained() -> None:
    from rich.console import Console

    from training import TrainConfig, train

    config = TrainConfig(
        window=TINY_WINDOW,
        horizon=TINY_HORIZON,
        epochs=1,
        units=8,
        batch_size=128,
        max_windows=300,
        seed=7,
        calibrate_quantiles=False,
    )
    result = train(tiny_panel(), config, console=Console(quiet=True))
    assert result.extra["band_calibration"] is None
    kernel = result.model.get_layer("p90_offset_cal").get_weights()[0]
    assert np.array_equal(kernel, np.eye(TINY_HORIZON, dtype=np.float32))
