"""Redis loses the worker's state mid-stream; the worker rebuilds it from the log (issue 19).

A real worker, a Tansu broker and Redis: three weeks of the shipped sample are produced in
three parts. After the first part is committed the worker's keys are deleted while it runs
(what ``FLUSHALL`` does to it); after the second, the worker is stopped, the keys deleted
again and a new worker started (a Redis restart without persistence while no worker ran).
Each time every item's window must equal the offline aggregation (``bucketize``) of all the
events produced so far, and the worker must have said it rebuilt the state.
"""

from __future__ import annotations

import signal
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import redis
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from faust.types import TP

from stream.settings.worker import WorkerSettings
from stream.worker.batch_consumer import BatchConsumer
from stream.worker.runner import inspect_items
from tests.integration.test_worker import END, START, WINDOW, _offline_windows, _settings
from trendcast.data import read_lines, sample_data_path
from trendcast.devtools.embedded import to_bootstrap
from trendcast.devtools.replay import encode_events
from trendcast.sync_bridge import run_sync
from trendcast.testkit.kafka import committed_offsets, consume_all, produce, wait_until
from trendcast.testkit.processes import start_worker

pytestmark = pytest.mark.integration


def _delete_state(client: redis.Redis, prefix: str) -> int:
    keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
    if keys:
        client.delete(*keys)
    return len(keys)


def _produce_throttled(bootstrap: str, topic: str, events: list[Any], chunks: int = 4) -> None:
    """Produce in a few chunks with pauses, so the worker meets them in several batches."""
    size = -(-len(events) // chunks)
    for start in range(0, len(events), size):
        produce(bootstrap, topic, [(k, v) for k, v, _ in events[start : start + size]])
        time.sleep(0.3)


def _wait_committed(bootstrap: str, settings: WorkerSettings, what: str) -> None:
    ends: dict[int, int] = Counter()
    for rec in consume_all(bootstrap, settings.sales_topic, idle_timeout_s=0.5):
        ends[rec.partition] = max(ends[rec.partition], rec.offset + 1)
    wait_until(
        lambda: committed_offsets(bootstrap, settings.consumer_group, settings.sales_topic),
        lambda c: all((c.get(p) or 0) >= end for p, end in ends.items()),
        timeout_s=60,
        what=what,
    )


def _check_windows(settings: WorkerSettings, lines: pd.DataFrame) -> int:
    """Every item's stored buckets equal the offline sums, and none of the recent ones is
    missing (an empty window would otherwise pass). Returns the buckets compared."""
    offline = _offline_windows(lines)
    end = lines["ts"].max().floor("D")
    recent_from = (end - pd.Timedelta(days=WINDOW - 1)).strftime("%Y-%m-%dT%H:%M:%SZ")
    items = sorted(lines["item_id"].unique())
    compared = 0
    for item in inspect_items(settings, items, freq="1D"):
        shown = {b["start"]: b["quantity"] for b in item["buckets"]}
        for start, quantity in shown.items():
            assert quantity == offline[(item["item_id"], start)], (item["item_id"], start)
            compared += 1
        for (i, start), quantity in offline.items():
            if i == item["item_id"] and start >= recent_from and quantity != 0:
                assert shown.get(start) == quantity, (i, start)
    return compared


def test_state_lost_in_redis_is_rebuilt_from_the_log(
    kafka_bootstrap: str,
    redis_url: str,
    unique_topic: Any,
    tmp_path: Path,
) -> None:
    topics = {
        "sales": unique_topic(2, "sales"),
        "dlq": unique_topic(1, "dlq"),
        "forecasts": unique_topic(2, "fc"),
    }
    settings = _settings(kafka_bootstrap, redis_url, tmp_path, topics).model_copy(
        update={"batch_size": 50, "batch_timeout_s": 0.05}
    )
    lines, _ = read_lines(sample_data_path())
    lines = lines[(lines["ts"] >= START) & (lines["ts"] < END)].sort_values("ts", kind="stable")
    events = encode_events(lines, "sample")
    cut1, cut2 = len(events) // 3, 2 * len(events) // 3
    client = redis.Redis.from_url(redis_url)
    prefix = settings.state_prefix
    log_a, log_b = tmp_path / "a.log", tmp_path / "b.log"
    try:
        with log_a.open("wb") as out:
            worker = start_worker(settings, out)
            try:
                _produce_throttled(kafka_bootstrap, settings.sales_topic, events[:cut1])
                _wait_committed(kafka_bootstrap, settings, "the first part committed")
                assert _check_windows(settings, lines.iloc[:cut1]) > 100
                assert _delete_state(client, prefix) > 0  # Redis loses everything
                _produce_throttled(kafka_bootstrap, settings.sales_topic, events[cut1:cut2])
                _wait_committed(kafka_bootstrap, settings, "the second part committed")
                wait_until(
                    lambda: log_a.read_text(),
                    lambda text: text.count("rebuilt from the log") >= 2,
                    timeout_s=30,
                    what="both partitions rebuilt",
                )
                assert _check_windows(settings, lines.iloc[:cut2]) > 100
            finally:
                worker.send_signal(signal.SIGTERM)
                assert worker.wait(timeout=30) == 0
        # Redis restarts empty while no worker runs; the next worker finds out at assignment.
        assert _delete_state(client, prefix) > 0
        produce(kafka_bootstrap, settings.sales_topic, [(k, v) for k, v, _ in events[cut2:]])
        with log_b.open("wb") as out:
            worker = start_worker(settings, out)
            try:
                _wait_committed(kafka_bootstrap, settings, "everything committed")
                wait_until(
                    lambda: log_b.read_text(),
                    lambda text: text.count("rebuilt from the log") >= 2,
                    timeout_s=30,
                    what="both partitions rebuilt at assignment",
                )
                assert "(missing)" in log_b.read_text()
                assert _check_windows(settings, lines) > 100
            finally:
                worker.send_signal(signal.SIGTERM)
                assert worker.wait(timeout=30) == 0
    finally:
        _delete_state(client, prefix)
        client.close()
    text = log_a.read_text()
    assert text.count("lost in the store") == 2, text[-3000:]
    # Found mid-run, the loss knew the partitions' newest event times: the replay was asked
    # to start by time (Tansu answers ListOffsets by time with the log start: see below).
    assert text.count("from the records of time") == 2, text[-3000:]
    # The retention check ran at start (Tansu does not report retention.ms: said so).
    assert "retention" in text and "rebuilding lost state needs" in text


class _Thread:
    """What ``BatchConsumer._offset_for_time`` asks: a consumer thread's offsets_for_times."""

    def __init__(self, consumer: AIOKafkaConsumer) -> None:
        self.consumer = consumer

    async def offsets_for_times(self, timestamps: dict[TP, int]) -> Any:
        return await self.consumer.offsets_for_times(timestamps)


def test_the_broker_answer_to_a_rewind_by_time_is_never_past_the_records_asked_for(
    kafka_bootstrap: str, unique_topic: Any
) -> None:
    """ListOffsets by time against the real broker, through the worker's checks.

    Records stamped half a day apart: for any time, the offset the worker seeks to must be
    at or before the first record stamped at or after it (a later one would skip events).
    Tansu 0.6 answers every such query with offset 0 and a timestamp of its own (the
    rebuild then reads the whole log: right, only slower); a broker with a real time index
    (Apache Kafka) answers the exact offset. Either passes; both are written down here.
    """
    topic = unique_topic(1, "times")
    base, half_day = 1_700_000_000_000, 43_200_000
    stamps = [base + i * half_day for i in range(30)]

    async def run() -> dict[int, int]:
        producer = AIOKafkaProducer(bootstrap_servers=to_bootstrap(kafka_bootstrap))
        await producer.start()
        try:
            for i, stamp in enumerate(stamps):
                await producer.send_and_wait(topic, b"%d" % i, partition=0, timestamp_ms=stamp)
        finally:
            await producer.stop()
        consumer = AIOKafkaConsumer(bootstrap_servers=to_bootstrap(kafka_bootstrap))
        await consumer.start()
        try:
            fake = type("Fake", (), {"_thread": _Thread(consumer)})()
            tp = TP(topic, 0)
            found = {}
            for target in (base - half_day, base + 1, base + 10 * half_day, base + 40 * half_day):
                found[target] = await BatchConsumer._offset_for_time(
                    fake,  # type: ignore[arg-type]
                    tp,
                    target,
                    0,
                    len(stamps),
                )
            return found
        finally:
            await consumer.stop()

    found = run_sync(run())
    for target, offset in found.items():
        exact = next((i for i, s in enumerate(stamps) if s >= target), 0)
        assert 0 <= offset <= exact, (target, offset, exact)
