"""Shared test configuration: a clean environment, and service fixtures for integration tests."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest_plugins = ["tests.services"]


@pytest.fixture(autouse=True)
def clean_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests configure through constructor arguments, never through a leaked TRENDCAST_* env."""
    import os

    for key in list(os.environ):
        if key.startswith("TRENDCAST_") and not key.startswith("TRENDCAST_TEST_"):
            monkeypatch.delenv(key)


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny *trained* bundle (real Keras LSTM -> tf2onnx), trained once per session.

    Shared read-only by the training, export, band-calibration and explain tests; a test that
    changes a bundle copies it first.
    """
    pytest.importorskip("tensorflow")
    pytest.importorskip("tf2onnx")
    from trendcast.testkit.trained_bundle import train_tiny_bundle

    return train_tiny_bundle(tmp_path_factory.mktemp("tiny"))
