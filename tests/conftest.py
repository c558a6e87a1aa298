"""Shared test configuration: a clean environment, and service fixtures for integration tests."""

from __future__ import annotations

import pytest

pytest_plugins = ["tests.services"]


@pytest.fixture(autouse=True)
def clean_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests configure through constructor arguments, never through a leaked TRENDCAST_* env."""
    import os

    for key in list(os.environ):
        if key.startswith("TRENDCAST_") and not key.startswith("TRENDCAST_TEST_"):
            monkeypatch.delenv(key)
