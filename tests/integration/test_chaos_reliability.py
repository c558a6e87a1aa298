"""Short versions of bench/chaos.py's ``broker-restart`` and ``failover`` scenarios (slow).

``test_broker_restart`` SIGKILLs the broker mid-stream and restarts it on the same port with
the same storage (Tansu on ``s3://``, served from local disk by
:mod:`trendcast.testkit.object_store`); the workers must reconnect by themselves and the
windows must equal the offline aggregation: nothing lost, nothing counted twice, a forecast
for every closed bucket.

``test_redis_failover`` (below) kills a Redis Cluster primary mid-stream.
"""

from __future__ import annotations

import time

import pandas as pd
import pytest

from bench.chaos import DATA, ChaosPlan, format_table, load_lines, run_chaos
from trendcast.data import read_lines, sample_data_path

pytestmark = [pytest.mark.slow, pytest.mark.integration]


def _lines(n: int) -> pd.DataFrame:
    if DATA.exists():
        lines = load_lines(DATA)
        return lines[lines["ts"] >= pd.Timestamp("2010-09-01")].head(n).reset_index(drop=True)
    lines, _ = read_lines(sample_data_path())
    return lines.sort_values("ts", kind="stable").head(n).reset_index(drop=True)


def test_broker_restart(kafka_bootstrap: str) -> None:  # kafka_bootstrap: skips without Tansu
    lines = _lines(4_000)
    plan = ChaosPlan(
        events=len(lines),
        partitions=4,
        broker_down_s=3.0,
        seed=13,
        scenarios=("broker-restart",),
        timeout_s=240,
        batch_size=5,  # slow enough that the restart lands mid-stream
    )
    started = time.monotonic()
    (result,) = run_chaos(lines, plan)
    print(f"\n{format_table([result])}\n({time.monotonic() - started:.0f}s)")
    assert result.kills == 1
    c = result.checks
    assert c.items > 30 and c.buckets_compared > 500 and c.forecasts_expected > 1_000
    assert result.ok, format_table([result])


def test_redis_failover(kafka_bootstrap: str) -> None:
    """Kill a Redis Cluster primary mid-stream; the replica takes over, the worker follows."""
    from trendcast.testkit.redis_cluster import cluster_binaries

    if isinstance(cluster_binaries(), str):
        pytest.skip(f"needs redis-server and redis-cli: {cluster_binaries()}")
    lines = _lines(4_000)
    plan = ChaosPlan(
        events=len(lines),
        partitions=4,
        seed=17,
        scenarios=("failover",),
        timeout_s=240,
        batch_size=5,
    )
    started = time.monotonic()
    (result,) = run_chaos(lines, plan)
    print(f"\n{format_table([result])}\n({time.monotonic() - started:.0f}s)")
    assert result.kills == 1
    assert not result.problems, format_table([result])  # kept going: no exit, recovered
    c = result.checks
    assert c.items > 30 and c.buckets_compared > 500 and c.forecasts_expected > 1_000
    assert c.forecasts_missing == 0, format_table([result])
    if c.mismatching_items:
        pytest.xfail(
            "windows lost writes the replica had not received; rebuilding them from the log is "
            "issue 19 part 1: " + format_table([result])
        )
    assert result.ok, format_table([result])
