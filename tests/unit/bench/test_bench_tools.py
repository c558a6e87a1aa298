"""The benches' small helpers (steady rates, CPU shares, the A/B order) keep their doctests.

``bench/`` is not among pytest's doctest paths (its scripts need ``../shared`` to run), so
the examples in its docstrings are run here.
"""

from __future__ import annotations

import doctest
from pathlib import Path
from types import ModuleType

import pytest

from bench import _bundles, ab_worker, offline, scale, throughput


@pytest.mark.parametrize("module", [throughput, ab_worker, offline], ids=lambda m: m.__name__)
def test_bench_doctests_pass(module: ModuleType) -> None:
    failed, attempted = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert attempted > 0
    assert failed == 0


def test_ab_order_alternates_so_drift_favours_neither() -> None:
    runs = ab_worker.order(4)
    assert runs.count("a") == runs.count("b") == 4
    first_half = runs[:4]
    assert first_half.count("a") == first_half.count("b")


def test_counters_of_the_measured_part_leave_the_warm_up_out() -> None:
    samples = [
        (0.0, {"model": 0.0, "fallback": 500.0}),  # warm-up: fallback forecasts
        (1.0, {"model": 10.0, "fallback": 600.0}),
        (2.0, {"model": 1010.0, "fallback": 600.0}),
    ]
    measured = throughput.counter_deltas(samples, 0.5, 2.5)
    assert measured == {"model": 1000.0, "fallback": 0.0}
    assert throughput.fallback_share(measured) == 0.0
    assert throughput.fallback_share({}) is None


def test_bundle_cache_key_changes_with_the_flags_and_the_data(tmp_path: Path) -> None:
    data = tmp_path / "sales.parquet"
    data.write_bytes(b"x")
    key = _bundles.cache_key(data, ("--freq", "1D"))
    assert key == _bundles.cache_key(data, ("--freq", "1D"))
    assert key != _bundles.cache_key(data, ("--freq", "1min"))
    data.write_bytes(b"xy")
    assert key != _bundles.cache_key(data, ("--freq", "1D"))


def test_scale_report_has_a_growth_row_per_step(tmp_path: Path) -> None:
    def close(items: int, seconds: float) -> scale.CloseResult:
        return scale.CloseResult(
            items, 1, seconds, items, 0, items * 400, [250.0], [900.0], 1.0, []
        )

    lines = scale.report([close(10_000, 1.0), close(100_000, 9.0)], 2766, "model")
    growth = [line for line in lines if line.startswith("| 1 worker(s), 10,000 -> 100,000")]
    assert growth == ["| 1 worker(s), 10,000 -> 100,000 | ×10 | ×9.0 | ×10.0 | ×1.0 |"]


def test_close_timings_come_from_the_largest_batch(tmp_path: Path) -> None:
    log = tmp_path / "worker.log"
    log.write_text(
        "[x] batch: 4 valid, 0 invalid, 0 late, 0 duplicate, 3 forecasts (...); seconds: read 0.1\n"
        "[x] batch: 8 valid, 0 invalid, 0 late, 0 duplicate, 900 forecasts (...); seconds: read 2\n"
    )
    assert scale._close_timings(log) == "read 2"
