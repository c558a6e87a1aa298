"""The worker's garbage collector settings (:mod:`stream.gc_tuning`)."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from stream.config import WorkerSettings
from stream.gc_tuning import tune_gc


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
