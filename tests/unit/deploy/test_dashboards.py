"""Grafana dashboard and Prometheus alert rules (deploy/grafana) against the worker's metrics.

Both files must load, and every ``trendcast_*`` series they name must be one the worker
exports. The exported names are read from the worker's own registry
(:data:`stream.monitoring.telemetry.METRICS_REGISTRY`, after importing every module of
:mod:`stream.monitoring`), expanded the way Prometheus exposes each type (a counter
``x`` as ``x_total``, a histogram as ``x_bucket``/``x_sum``/``x_count``, an info as
``x_info``), never from a hand-written list. Names in queries are read by parsing PromQL
(the PyPI package ``promql-parser``), so a name inside a function, an aggregation, a
``{__name__=...}`` matcher or a subquery counts like any other.
"""

from __future__ import annotations

import fnmatch
import importlib
import json
import pkgutil
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import promql_parser
import pytest
import yaml

import stream.monitoring
from stream.monitoring.telemetry import METRICS_REGISTRY

ROOT = Path(__file__).resolve().parents[3]
GRAFANA = ROOT / "deploy" / "grafana"
DASHBOARD = GRAFANA / "trendcast-dashboard.json"
RULES = GRAFANA / "trendcast-alerts.yml"
#: How Prometheus exposes each metric type (prometheus-client's own suffixes).
_SUFFIXES = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "summary": ("", "_sum", "_count", "_created"),
    "info": ("_info",),
    "gauge": ("",),
}
#: Grafana's variables, replaced by something PromQL accepts before parsing.
_GRAFANA_INTERVALS = re.compile(r"\$__(rate_interval|interval|range)\b")
_GRAFANA_VARIABLES = re.compile(r"\$\{?\w+\}?")


def exported_names() -> set[str]:
    """Every series name the worker can expose on ``/metrics``."""
    for module in pkgutil.walk_packages(stream.monitoring.__path__, "stream.monitoring."):
        importlib.import_module(module.name)
    names = set()
    for family in METRICS_REGISTRY.collect():
        suffixes = _SUFFIXES.get(family.type, ("",))
        names.update(family.name + suffix for suffix in suffixes)
    return names


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (Grafana variables substituted)."""
    expr = _GRAFANA_INTERVALS.sub("5m", expr)
    expr = _GRAFANA_VARIABLES.sub("x", expr)
    names: set[str] = set()

    def visit(node: Any) -> None:
        if isinstance(node, promql_parser.VectorSelector):
            if node.name:
                names.add(node.name)
            for matcher in node.matchers.matchers:
                if matcher.name == "__name__":
                    names.add(matcher.value)

    promql_parser.walk(promql_parser.parse(expr), visit)
    return names


def _panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from _panels(panel.get("panels", []))


def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return loaded


def dashboard_queries() -> dict[str, list[str]]:
    """Panel title -> its PromQL expressions (template-variable queries under ``$var``)."""
    out: dict[str, list[str]] = {}
    for panel in _panels(dashboard()["panels"]):
        exprs = [t["expr"] for t in panel.get("targets", [])]
        if exprs:
            assert panel["title"] not in out, f"two panels titled {panel['title']!r}"
            out[panel["title"]] = exprs
    for variable in dashboard()["templating"]["list"]:
        if variable["type"] == "query":
            # label_values(METRIC, LABEL) is Grafana's, not PromQL: its first argument is.
            match = re.fullmatch(r"label_values\((.+),\s*\w+\)", variable["definition"])
            assert match, variable["definition"]
            out[f"${variable['name']}"] = [match.group(1)]
    return out


def rules() -> list[dict[str, Any]]:
    loaded = yaml.safe_load(RULES.read_text())
    return [rule for group in loaded["groups"] for rule in group["rules"]]


def test_name_extraction_sees_every_form() -> None:
    expr = (
        'histogram_quantile(0.99, sum by (le) (rate(a_bucket{job=~"$job"}[$__rate_interval])))'
        ' / on() group_left count({__name__="b"}) + c offset 7d + max_over_time(d[1h:1m])'
    )
    assert metric_names(expr) == {"a_bucket", "b", "c", "d"}


def test_exported_names_follow_the_metric_types() -> None:
    names = exported_names()
    assert {"trendcast_events_total", "trendcast_events_in_total"} <= names  # counters
    assert {"trendcast_batch_seconds_bucket", "trendcast_batch_seconds_count"} <= names
    assert "trendcast_model_info" in names  # an Info
    assert {"trendcast_healthy", "trendcast_online_wape"} <= names  # gauges of other modules
    assert "trendcast_events" not in names and "trendcast_batch_seconds" not in names


def test_dashboard_loads_and_names_only_exported_metrics() -> None:
    board = dashboard()
    assert board["uid"] == "trendcast-workers"
    exported = exported_names()
    unknown = {
        title: sorted(n for e in exprs for n in metric_names(e) if n not in exported)
        for title, exprs in dashboard_queries().items()
    }
    assert not {t: n for t, n in unknown.items() if n}, unknown
    every = {n for exprs in dashboard_queries().values() for e in exprs for n in metric_names(e)}
    assert every <= {n for n in exported if n.startswith("trendcast_")}


@pytest.mark.parametrize(
    ("title", "needed"),
    [
        ("Events/s", {"trendcast_events_in_total", "trendcast_events_total"}),
        ("Consumer lag", {"trendcast_consumer_lag"}),
        ("Forecasts/s", {"trendcast_forecasts_total"}),
        ("Batch latency", {"trendcast_batch_seconds_bucket"}),
        ("Dead letters by reason", {"trendcast_dead_letters_total"}),
        ("RMSSE", {"trendcast_online_rmsse"}),
        ("WAPE", {"trendcast_online_wape"}),
        ("Coverage p10-p90", {"trendcast_online_coverage"}),
        ("Model version serving", {"trendcast_model_info"}),
        ("Workers healthy", {"trendcast_healthy"}),
    ],
)
def test_dashboard_has_the_panel(title: str, needed: set[str]) -> None:
    exprs = dashboard_queries()[title]
    assert needed <= {n for e in exprs for n in metric_names(e)}


def test_dashboard_latency_shows_p50_and_p99() -> None:
    exprs = dashboard_queries()["Batch latency"]
    assert any(e.startswith("histogram_quantile(0.5,") for e in exprs)
    assert any(e.startswith("histogram_quantile(0.99,") for e in exprs)
    dlq = dashboard_queries()["Dead letters by reason"]
    assert dlq == [
        'sum by (reason) (rate(trendcast_dead_letters_total{job=~"$job"}[$__rate_interval]))'
    ]


def test_rules_load_and_name_only_exported_metrics() -> None:
    exported = exported_names()
    alerts = {rule["alert"]: rule for rule in rules()}
    assert set(alerts) >= {
        "TrendcastConsumerLagGrowing",
        "TrendcastDeadLetterRate",
        "TrendcastWorkerUnhealthy",
        "TrendcastNoForecasts",
        "TrendcastAccuracyDrop",
    }
    for name, rule in alerts.items():
        assert set(rule) == {"alert", "expr", "for", "labels", "annotations"}, name
        assert rule["labels"]["severity"] in ("warning", "critical"), name
        assert rule["annotations"]["summary"], name
        used = metric_names(rule["expr"])
        assert used, f"{name} names no metric"
        assert used <= exported, f"{name}: not exported: {sorted(used - exported)}"


def test_prometheus_loads_the_rules_in_compose() -> None:
    config = yaml.safe_load((ROOT / "deploy" / "prometheus.yml").read_text())
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    mounts = compose["services"]["prometheus"]["volumes"]
    targets = [
        m.split(":")[1] for m in mounts if m.startswith("./deploy/grafana/trendcast-alerts.yml:")
    ]
    assert len(targets) == 1, mounts
    assert any(fnmatch.fnmatch(targets[0], pattern) for pattern in config["rule_files"])
