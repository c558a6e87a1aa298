"""Labelled counters the dashboard and the alerts use start as 0 series for every known label.

An absent series is not a zero: ``rate()`` over it is empty, a panel shows no line and an
alert such as "no forecasts for N hours" never fires. So the worker creates each known label
value at import: dead-letter reasons from :data:`stream.pipeline.events.REASONS`, the other
labels from the constants beside their metrics in :mod:`stream.monitoring.telemetry`. The
first test reads ``/metrics`` as a freshly started worker process would serve it; the others
check that those constants are the code's complete vocabulary, so a new label value cannot
be added in one place and forgotten in the other.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from stream.monitoring import telemetry
from stream.pipeline.events import REASONS

ROOT = Path(__file__).resolve().parents[3]
#: Metric variable in telemetry -> the constant holding all its label values.
LABELS = {
    "EVENTS": ("trendcast_events_total", "outcome", telemetry.EVENT_OUTCOMES),
    "FORECASTS": ("trendcast_forecasts_total", "kind", telemetry.FORECAST_KINDS),
    "PREDICTIONS": ("trendcast_predictions_total", "source", telemetry.PREDICTION_SOURCES),
    "REDIS_SECONDS": ("trendcast_redis_seconds_count", "operation", telemetry.REDIS_OPERATIONS),
    "DEAD_LETTERS": ("trendcast_dead_letters_total", "reason", REASONS),
}


def test_fresh_worker_exposes_a_zero_for_every_known_label() -> None:
    # A new interpreter: nothing counted yet, only what importing the worker created.
    script = (
        "import stream.worker.app\n"
        "from prometheus_client import generate_latest\n"
        "from stream.monitoring.telemetry import METRICS_REGISTRY\n"
        "print(generate_latest(METRICS_REGISTRY).decode())\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    samples = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(result.stdout)
        for sample in family.samples
    }
    for name, label, values in LABELS.values():
        assert values, name
        for value in values:
            key = (name, ((label, value),))
            assert samples.get(key) == 0.0, f"{name}{{{label}={value!r}}}: {samples.get(key)}"
    assert len(set(REASONS)) == len(REASONS)


def _labels_calls(tree: ast.AST) -> list[tuple[str, ast.Call]]:
    """``(metric variable, call)`` of every ``METRIC.labels(...)`` / ``x.METRIC.labels(...)``."""
    found = []
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == "labels"
        ):
            target = node.func.value
            name = target.id if isinstance(target, ast.Name) else getattr(target, "attr", None)
            if name in LABELS:
                found.append((name, node))
    return found


def test_every_literal_label_in_the_code_is_a_known_one() -> None:
    seen: dict[str, set[str]] = {name: set() for name in LABELS}
    for path in sorted((ROOT / "stream").rglob("*.py")):
        for metric, call in _labels_calls(ast.parse(path.read_text(), str(path))):
            for arg in call.args:
                if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                    where = f"{path.relative_to(ROOT)}:{call.lineno}"
                    assert arg.value in LABELS[metric][2], f"{where}: {arg.value!r}"
                    seen[metric].add(arg.value)
    # The code counts every outcome, kind, source and operation it declares.
    for metric in ("EVENTS", "FORECASTS", "PREDICTIONS", "REDIS_SECONDS"):
        assert seen[metric] == set(LABELS[metric][2]), metric


def test_every_dead_letter_reason_in_the_code_is_in_reasons() -> None:
    events = ROOT / "stream" / "pipeline" / "events.py"
    raised = {
        node.args[0].value
        for node in ast.walk(ast.parse(events.read_text()))
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Name)
        and node.func.id == "EventError"
        and node.args
        and isinstance(node.args[0], ast.Constant)
    }
    # The processor dead-letters late events itself (`_dead_letter(..., "late", ...)`).
    added = set()
    for path in sorted((ROOT / "stream").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr == "_dead_letter"
            ):
                added.update(
                    a.value
                    for a in node.args
                    if isinstance(a, ast.Constant) and isinstance(a.value, str)
                )
    assert raised, "no EventError raised with a literal reason: is the check still right?"
    assert added == {"late"}
    assert raised | added == set(REASONS)
