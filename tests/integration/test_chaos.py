"""Short versions of bench/chaos.py (slow): nothing lost through crashes, rebalances, an outage.

``test_combined_chaos`` replays ~20k real sales with every disruption at once — two SIGKILLs,
a worker joining and one leaving with SIGTERM, a 3 s Redis outage (own ``redis-server`` with
an fsynced AOF, not the session Redis) and 200 hypothesis-generated bad records — and checks
what the bench checks: windows equal to the offline aggregation, every bad record in the DLQ
with its reason, a forecast for every closed bucket, no worker dying on its own.

``test_sigterm_finishes_the_batch_commits_and_leaves`` stops a worker mid-stream: it must
exit 0, its committed offsets must equal what it processed (the partition clocks' stored
``next_offset``), and its successor must see no event twice.

Both use the session Tansu broker; the data is the shared UCI file when present, else the
shipped sample.
"""

from __future__ import annotations

import re
import time
import urllib.request
from pathlib import Path

import pandas as pd
import pytest
import redis

from bench._chaos_harness import (
    Checks,
    Monitor,
    WorkerPool,
    check_forecasts,
    check_windows,
    iter_valid,
    produce_tracked,
)
from bench.chaos import DATA, FREQ, HORIZON, WINDOW, ChaosPlan, format_table, load_lines, run_chaos
from stream.settings.worker import WorkerSettings
from stream.state.base import PartitionId, PartitionState
from trendcast.data import read_lines, sample_data_path
from trendcast.devtools.replay import encode_events
from trendcast.testkit.bundles import make_fake_bundle
from trendcast.testkit.kafka import committed_offsets, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.integration]


def _lines(n: int) -> pd.DataFrame:
    if DATA.exists():
        lines = load_lines(DATA)
        return lines[lines["ts"] >= pd.Timestamp("2010-09-01")].head(n).reset_index(drop=True)
    lines, _ = read_lines(sample_data_path())
    return lines.sort_values("ts", kind="stable").head(n).reset_index(drop=True)


def test_combined_chaos() -> None:
    lines = _lines(20_000)
    plan = ChaosPlan(
        events=len(lines),
        partitions=4,
        kills=2,
        outage_s=3.0,
        bad=200,
        seed=11,
        scenarios=("combined",),
        timeout_s=240,
        batch_size=2,  # slow enough that every disruption lands mid-stream
    )
    started = time.monotonic()
    (result,) = run_chaos(lines, plan)
    print(f"\n{format_table([result])}\n({time.monotonic() - started:.0f}s)")
    assert result.kills == 2 and result.rebalances >= 6
    c = result.checks
    assert c.items > 500 and c.buckets_compared > 5_000
    assert c.forecasts_expected > 5_000 and c.bad_records == 200
    assert result.ok, format_table([result])


def _partition_state(url: str, prefix: str, topic: str, partition: int) -> PartitionState:
    from stream.state.redis_store import partition_keys

    client = redis.Redis.from_url(url, decode_responses=True)
    try:
        raw = client.hgetall(partition_keys(prefix, PartitionId(topic, partition))[0])
    finally:
        client.close()
    fields = {str(k): int(v) for k, v in raw.items()}
    return PartitionState(fields.get("m"), fields.get("e"), fields.get("o"))


def _duplicates(port: int) -> float:
    url = f"http://127.0.0.1:{port}/metrics"
    body = urllib.request.urlopen(url, timeout=5).read().decode()  # noqa: S310 - local URL
    match = re.search(r'^trendcast_events_total\{outcome="duplicate"\} (\S+)$', body, re.M)
    return float(match.group(1)) if match else 0.0


def test_sigterm_finishes_the_batch_commits_and_leaves(
    kafka_bootstrap: str,
    redis_url: str,
    redis_prefix: str,
    unique_topic,
    tmp_path: Path,
) -> None:
    lines = _lines(20_000)
    sales, dlq, fc = unique_topic(3, "sales"), unique_topic(1, "dlq"), unique_topic(2, "fc")
    settings = WorkerSettings(
        kafka_brokers=f"kafka://{kafka_bootstrap}",
        fetch_max_wait_ms=50,  # Tansu holds fetches for the full wait
        redis_url=redis_url,
        bundle=make_fake_bundle(tmp_path / "bundle", window=WINDOW, horizon=HORIZON),
        sales_topic=sales,
        dlq_topic=dlq,
        forecasts_topic=fc,
        consumer_group=f"group-{redis_prefix}",
        state_prefix=redis_prefix,
        topic_partitions=3,
        # Many small batches, so that SIGTERM lands mid-stream, likely mid-batch (with 100
        # per batch the worker became fast enough to finish before the signal landed).
        batch_size=20,
        batch_timeout_s=0.1,
        broker_rebalance_timeout_s=4,
        broker_session_timeout_s=6,
        commit_interval_s=0.5,
        catchup="every",  # the checks expect a forecast per item and closed bucket
        data_dir=tmp_path,
    )
    placed = produce_tracked(
        kafka_bootstrap, sales, [(k, v) for k, v, _ in encode_events(lines, "t")]
    )
    ends: dict[int, int] = {}
    for where in placed:
        ends[where.partition] = max(ends.get(where.partition, 0), where.offset + 1)
    pool = WorkerPool(settings, tmp_path)
    try:
        first = pool.start()
        with Monitor(kafka_bootstrap, settings.consumer_group, sales, ends) as monitor:
            wait_until(monitor.progress, lambda p: p >= 0.1, timeout_s=90, what="10% processed")
        t0 = time.monotonic()
        code = pool.terminate(first)
        stop_s = time.monotonic() - t0
        assert code == 0, pool.log_tail()
        committed = committed_offsets(kafka_bootstrap, settings.consumer_group, sales)
        processed = {
            p: _partition_state(redis_url, redis_prefix, sales, p).next_offset or 0 for p in ends
        }
        assert {p: o or 0 for p, o in committed.items()} == processed, pool.log_tail()
        assert sum(processed.values()) < sum(ends.values())  # it really stopped mid-stream

        second = pool.start()
        wait_until(
            lambda: committed_offsets(kafka_bootstrap, settings.consumer_group, sales),
            lambda c: all((c.get(p) or 0) >= end for p, end in ends.items()),
            timeout_s=120,
            what="the successor to finish",
        )
        assert _duplicates(pool.web_port(second)) == 0.0  # nothing was processed twice
        pool.check_unexpected_exits()
        assert pool.unexpected_exits == []
    finally:
        pool.stop_all()
    assert pool.graceful_exit_codes == [0, 0]
    print(f"\nSIGTERM to exit: {stop_s:.1f}s; committed {committed} == processed")
    checks = Checks()
    check_windows(settings, lines, FREQ, checks)
    check_forecasts(
        kafka_bootstrap, settings, list(iter_valid(lines, placed)), FREQ, WINDOW, checks
    )
    assert checks.ok, checks
