"""Trace context through the worker on Tansu and Redis: sale header in, forecast header out.

A worker (``python -m stream``) with ``OTEL_TRACES_EXPORTER=console`` reads sales that carry
W3C ``traceparent`` headers, as a traced shop service would produce them. Every forecast it
writes must carry a ``traceparent`` header naming the span of the batch that made it, and
that batch span, printed by the SDK's console exporter, must link to the sales' traces. No
collector: the spans are read from the worker's stdout.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import signal
import subprocess
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiokafka import AIOKafkaProducer

from stream.settings.worker import WorkerSettings
from trendcast.devtools.embedded import to_bootstrap
from trendcast.sync_bridge import run_sync
from trendcast.testkit.bundles import make_fake_bundle
from trendcast.testkit.kafka import consume_all, wait_until
from trendcast.testkit.processes import start_worker

pytestmark = pytest.mark.integration
pytest.importorskip("opentelemetry.sdk.trace", reason="the tracing extra")

DAY = 86_400_000
T0 = 1_267_401_600_000  # 2010-03-01
TRACEPARENT = re.compile(rb"^00-([0-9a-f]{32})-([0-9a-f]{16})-[0-9a-f]{2}$")


def _parent(n: int) -> bytes:
    return f"00-{n:032x}-{n:016x}-01".encode()


async def _produce_traced(bootstrap: str, topic: str, events: list[tuple[bytes, bytes]]) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=to_bootstrap(bootstrap), acks="all")
    await producer.start()
    try:
        futures = [
            await producer.send(topic, key=key, value=value, headers=[("traceparent", _parent(n))])
            for n, (key, value) in enumerate(events, start=1)
        ]
        await asyncio.gather(*futures)
    finally:
        await producer.stop()


def _span_id(traceparent: bytes) -> str:
    match = TRACEPARENT.match(traceparent)
    assert match is not None, traceparent
    return match.group(2).decode()


def _spans(log: Path) -> list[dict[str, Any]]:
    """The console exporter's spans: one JSON object per line among the worker's logs."""
    spans = []
    for line in log.read_bytes().splitlines():
        if line.startswith(b'{"name"'):
            with contextlib.suppress(orjson.JSONDecodeError):
                spans.append(orjson.loads(line))
    return spans


def test_forecasts_carry_the_batch_traceparent_and_the_batch_links_the_sales(
    kafka_bootstrap: str,
    redis_url: str,
    redis_prefix: str,
    unique_topic: Callable[..., str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    suffix = uuid.uuid4().hex[:8]
    settings = WorkerSettings(
        kafka_brokers=f"kafka://{kafka_bootstrap}",
        fetch_max_wait_ms=50,  # Tansu holds fetches for the full wait
        redis_url=redis_url,
        bundle=make_fake_bundle(tmp_path / "bundle", window=14, horizon=7),
        sales_topic=unique_topic(prefix="ts"),
        dlq_topic=unique_topic(prefix="td"),
        forecasts_topic=unique_topic(prefix="tf"),
        alerts_topic=unique_topic(prefix="ta"),
        accuracy_topic=f"tacc-{suffix}",
        trends_topic=f"ttr-{suffix}",
        consumer_group=f"trace-{suffix}",
        state_prefix=redis_prefix,
        web_enabled=False,
        data_dir=tmp_path / "faust",
        batch_timeout_s=0.2,
        broker_rebalance_timeout_s=3,
        broker_session_timeout_s=6,
        catchup="every",  # a forecast per item and closed day, however the fetches fall
        otel_traces_exporter="console",
    )
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "100")  # read by the SDK in the worker
    monkeypatch.setenv("OTEL_SERVICE_NAME", "trendcast-test")
    # Items a and b sell on days 0-3, each sale from its own traced request; day 3 closes 0-2.
    events = [
        (
            item.encode(),
            orjson.dumps({"item_id": item, "ts": T0 + d * DAY + 3_600_000, "quantity": 1}),
        )
        for d in range(4)
        for item in ("a", "b")
    ]
    run_sync(_produce_traced(kafka_bootstrap, settings.sales_topic, events))

    log_path = tmp_path / "worker.log"
    with log_path.open("wb") as log:
        proc = start_worker(settings, log)
        try:
            forecasts = wait_until(
                lambda: consume_all(kafka_bootstrap, settings.forecasts_topic, 0.3),
                lambda records: len(records) >= 6 or proc.poll() is not None,
                timeout_s=60,
                what="6 forecasts (a and b as of days 1-3)",
            )
            assert proc.poll() is None, log_path.read_text()[-3000:]
            batch_ids = {_span_id(dict(r.headers)["traceparent"]) for r in forecasts}

            def batch_spans() -> list[dict[str, Any]]:
                return [s for s in _spans(log_path) if s["name"] == "batch"]

            wait_until(
                batch_spans,
                lambda spans: batch_ids <= {s["context"]["span_id"][2:] for s in spans},
                timeout_s=20,
                what="the batch spans of the forecasts on the worker's stdout",
            )
        finally:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    for record in forecasts:
        headers = dict(record.headers)
        assert list(headers) == ["traceparent"]
        assert TRACEPARENT.match(headers["traceparent"])
    spans = _spans(log_path)
    by_id = {s["context"]["span_id"][2:]: s for s in spans}
    linked: set[int] = set()
    for span_id in batch_ids:
        batch = by_id[span_id]
        assert batch["kind"] == "SpanKind.CONSUMER"
        assert batch["resource"]["attributes"]["service.name"] == "trendcast-test"
        assert batch["attributes"]["trendcast.forecasts"] > 0
        assert batch["attributes"]["trendcast.model_version"].startswith("test-")
        linked |= {int(link["context"]["trace_id"], 16) for link in batch["links"]}
        children = {s["name"] for s in spans if s["parent_id"] == f"0x{span_id}"}
        assert {"fetch", "validate", "store", "infer", "produce"} <= children
    # The sales whose batches closed the days are linked from them, and only sales.
    assert linked and linked <= set(range(1, len(events) + 1))
