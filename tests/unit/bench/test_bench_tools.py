"""The benches' small helpers (steady rates, CPU shares, the A/B order) keep their doctests.

``bench/`` is not among pytest's doctest paths (its scripts need ``../shared`` to run), so
the examples in its docstrings are run here.
"""

from __future__ import annotations

import doctest
from types import ModuleType

import pytest

from bench import ab_worker, throughput


@pytest.mark.parametrize("module", [throughput, ab_worker], ids=lambda m: m.__name__)
def test_bench_doctests_pass(module: ModuleType) -> None:
    failed, attempted = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert attempted > 0
    assert failed == 0


def test_ab_order_alternates_so_drift_favours_neither() -> None:
    runs = ab_worker.order(4)
    assert runs.count("a") == runs.count("b") == 4
    first_half = runs[:4]
    assert first_half.count("a") == first_half.count("b")
