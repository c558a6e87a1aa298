"""The worker's garbage collector settings (:mod:`stream.worker.gc_tuning`)."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator
from pathlib import Path

import pytest

from stream.settings.worker import WorkerSettings
from stream.worker.gc_tuning import tune_gc


@pytest.fixture
def restore_gc() -> Iterator[None]:
    threshold = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*threshold)


@pytest.mark.usefixtures("restore_gc")
def test_tune_gc_freezes_startup_and_raises_the_young_threshold() -> None:
    _, older, oldest = gc.get_threshold()
    tune_gc(50_000)
    assert gc.get_threshold() == (50_000, older, oldest)
    assert gc.get_freeze_count() > 0


@pytest.mark.usefixtures("restore_gc")
def test_zero_leaves_python_alone() -> None:
    before = gc.get_threshold(), gc.get_freeze_count()
    tune_gc(0)
    assert (gc.get_threshold(), gc.get_freeze_count()) == before


def test_the_setting_defaults_to_a_raised_threshold(monkeypatch: pytest.MonkeyPatch) -> None:
    assert WorkerSettings().gc_threshold == 50_000
    monkeypatch.setenv("TRENDCAST_GC_THRESHOLD", "0")
    assert WorkerSettings().gc_threshold == 0


def test_a_swapped_out_model_is_freed_without_the_collector(tmp_path: Path) -> None:
    """The startup model is frozen: once swapped out, only reference counting can free it,
    so it must not sit in a reference cycle."""
    from stream.lifecycle import hot_reload as reload
    from trendcast.testkit.bundles import make_fake_bundle

    loaded = reload.load_model(make_fake_bundle(tmp_path / "b", window=14, horizon=7))
    forecaster = weakref.ref(loaded.forecaster)
    gc.disable()
    try:
        del loaded
        assert forecaster() is None
    finally:
        gc.enable()
