"""Metrics, readiness and JSON logs of the worker, without services.

The served pages themselves are tested on a real worker in
tests/integration/test_web_endpoints.py; here each piece is checked on its own.
"""

from __future__ import annotations

import asyncio
import io
import logging
import logging.config
import sys
from collections import namedtuple
from types import SimpleNamespace
from typing import Any

import numpy as np
import orjson
import pytest
from prometheus_client import generate_latest

from stream.monitoring import telemetry as obs
from stream.pipeline.processor import RawMessage, SalesProcessor
from stream.state.base import PartitionId
from stream.state.memory import MemoryWindowStore
from trendcast.exceptions import StateStoreError
from trendcast.forecasting.base import WindowBatch
from trendcast.testkit.doubles import DAY, MODEL, FakeForecaster, ListSink

TP = namedtuple("TP", "topic partition")


def sample(name: str, **labels: str) -> float:
    value = obs.METRICS_REGISTRY.get_sample_value(name, labels or None)
    return 0.0 if value is None else value


def test_every_metric_is_on_the_one_registry() -> None:
    obs.set_model_info(MODEL, "fake")
    text = generate_latest(obs.METRICS_REGISTRY).decode()
    for name in (
        "trendcast_events_in_total",
        "trendcast_events_total",
        "trendcast_dead_letters_total",
        "trendcast_late_by_ms",
        "trendcast_forecasts_total",
        "trendcast_predictions_total",
        "trendcast_batch_size",
        "trendcast_batch_seconds",
        "trendcast_inference_seconds",
        "trendcast_inference_batch_size",
        "trendcast_redis_seconds",
        "trendcast_consumer_lag",
        "trendcast_watermark_ms",
        "trendcast_model_info",
    ):
        assert f"# TYPE {name}" in text or f"# HELP {name}" in text, name
    assert 'trendcast_model_info{forecaster="fake",freq="1D",horizon="3"' in text
    # Series with known labels exist before the first event (rate() needs them).
    assert 'trendcast_predictions_total{source="fallback"}' in text
    assert 'trendcast_redis_seconds_count{operation="apply"}' in text


def test_observe_batch_counts_once() -> None:
    before_in = sample("trendcast_events_in_total")
    before_n = sample("trendcast_batch_size_count")
    obs.observe_batch(7)
    assert sample("trendcast_events_in_total") == before_in + 7
    assert sample("trendcast_batch_size_count") == before_n + 1


def test_instrumented_forecaster_times_and_splits_model_and_fallback() -> None:
    inner = FakeForecaster()
    forecaster = obs.InstrumentedForecaster(inner)
    assert (forecaster.name, forecaster.horizon) == ("fake", 3)
    batch = WindowBatch(
        item_ids=["a", "b", "c"],
        quantities=np.ones((3, 7), dtype=np.float32),
        prices=None,
        last_start_ms=np.zeros(3, dtype=np.int64),
        history_len=np.array([7, 2, 7], dtype=np.int64),  # b: too short -> fallback
    )
    model_before = sample("trendcast_predictions_total", source="model")
    fallback_before = sample("trendcast_predictions_total", source="fallback")
    calls_before = sample("trendcast_inference_seconds_count")
    result = forecaster.predict(batch)
    assert len(result) == 3
    assert sample("trendcast_predictions_total", source="model") == model_before + 2
    assert sample("trendcast_predictions_total", source="fallback") == fallback_before + 1
    assert sample("trendcast_inference_seconds_count") == calls_before + 1


def test_timed_store_records_each_operation() -> None:
    store = obs.TimedWindowStore(MemoryWindowStore(MODEL.freq))
    before = sample("trendcast_redis_seconds_count", operation="read")
    asyncio.run(store.read(["a"]))
    asyncio.run(store.ping())  # no ping on the memory store: a no-op
    assert sample("trendcast_redis_seconds_count", operation="read") == before + 1
    assert store.freq == MODEL.freq


def test_processor_keeps_its_metrics_and_logs_context(caplog: pytest.LogCaptureFixture) -> None:
    store = MemoryWindowStore(MODEL.freq)
    proc = SalesProcessor(store, FakeForecaster(), MODEL, ListSink(), allowed_lateness_ms=DAY)
    before = sample("trendcast_dead_letters_total", reason="not_json")
    msg = RawMessage("sales", 3, 41, b"k", b"{nope")
    with caplog.at_level(logging.WARNING, logger="stream.pipeline.processor"):
        asyncio.run(proc.process([msg]))
    assert sample("trendcast_dead_letters_total", reason="not_json") == before + 1
    (record,) = [r for r in caplog.records if r.name == "stream.pipeline.processor"]
    assert (record.topic, record.partition, record.offset, record.reason) == (  # type: ignore[attr-defined]
        "sales",
        3,
        41,
        "not_json",
    )
    line = orjson.loads(obs.JsonFormatter().format(record))
    assert line["topic"] == "sales" and line["partition"] == 3 and line["offset"] == 41
    assert line["level"] == "WARNING" and line["logger"] == "stream.pipeline.processor"
    assert "sales[3]@41" in line["message"]


def test_json_formatter_keeps_one_line_per_record() -> None:
    try:
        raise ValueError("boom\nsecond line")
    except ValueError:
        record = logging.LogRecord(
            "x", logging.ERROR, "f.py", 1, "failed %d", (3,), exc_info=sys.exc_info()
        )
    text = obs.JsonFormatter().format(record)
    assert "\n" not in text
    line = orjson.loads(text)
    assert line["message"] == "failed 3"
    assert "ValueError: boom" in line["exc_info"]
    assert line["ts"].endswith("+00:00")


def test_logging_config_json(monkeypatch: pytest.MonkeyPatch) -> None:
    assert obs.logging_config("text") is None
    config = obs.logging_config("json", "info")
    assert config is not None
    out = io.StringIO()
    monkeypatch.setattr("sys.stdout", out)
    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    try:
        logging.config.dictConfig(config)
        logging.getLogger("aiokafka").info("joined group %s", "g")
        logging.getLogger("aiokafka").debug("hidden")
    finally:
        root.handlers[:], _ = saved
        root.setLevel(saved[1])
    lines = out.getvalue().splitlines()
    assert len(lines) == 1
    assert orjson.loads(lines[0])["message"] == "joined group g"


def _fake_app(highwater: dict[Any, int | None], committed: dict[Any, int | None]) -> Any:
    consumer = SimpleNamespace(
        assignment=lambda: set(highwater),
        highwater=lambda tp: highwater[tp],
        _committed_offset=committed,
    )
    return SimpleNamespace(consumer=consumer, monitor=SimpleNamespace(tp_read_offsets={}))


def test_consumer_lag_from_highwater_and_committed() -> None:
    a, b, c = (TP("sales", p) for p in range(3))
    obs.refresh_consumer_lag(_fake_app({a: 120, b: 50, c: None}, {a: 100, b: None}))
    assert sample("trendcast_consumer_lag", topic="sales", partition="0") == 20
    assert (
        obs.METRICS_REGISTRY.get_sample_value(
            "trendcast_consumer_lag", {"topic": "sales", "partition": "1"}
        )
        is None
    )  # never committed, nothing read: unknown rather than a made-up number
    # After a rebalance the old partitions' series disappear.
    obs.refresh_consumer_lag(_fake_app({b: 50}, {b: 45}))
    assert sample("trendcast_consumer_lag", topic="sales", partition="1") == 5
    assert (
        obs.METRICS_REGISTRY.get_sample_value(
            "trendcast_consumer_lag", {"topic": "sales", "partition": "0"}
        )
        is None
    )
    # A consumer that is not started leaves the gauge empty instead of failing /metrics.
    obs.refresh_consumer_lag(SimpleNamespace())


class _Failure:
    reason = "StateStoreError: Redis unavailable"


def test_readiness() -> None:
    calls = {"redis": 0}

    async def ok() -> None:
        calls["redis"] += 1

    async def down() -> None:
        raise StateStoreError("Redis unavailable: connection refused")

    async def hung() -> None:
        await asyncio.sleep(10)

    now = [0.0]

    async def scenario() -> None:
        ready = obs.Readiness(
            {"redis": ok}, details={"bundle": {"model_version": "v1"}}, clock=lambda: now[0]
        )
        assert await ready.check() == (
            True,
            {
                "ready": True,
                "checks": {"redis": {"ok": True}, "bundle": {"ok": True, "model_version": "v1"}},
            },
        )
        await ready.check()
        assert calls["redis"] == 1  # cached
        now[0] = 5.0
        await ready.check()
        assert calls["redis"] == 2

        is_ready, body = await obs.Readiness({"redis": down, "broker": ok}).check()
        assert not is_ready
        assert body["checks"]["redis"] == {
            "ok": False,
            "error": "StateStoreError: Redis unavailable: connection refused",
        }
        assert body["checks"]["broker"] == {"ok": True}

        is_ready, body = await obs.Readiness({"broker": hung}, timeout_s=0.05).check()
        assert not is_ready and "no answer within 0.05s" in body["checks"]["broker"]["error"]

        health = SimpleNamespace(failures={"processing": _Failure()})
        is_ready, body = await obs.Readiness({"redis": ok}, health=health).check()
        assert not is_ready
        assert body["checks"]["processing"]["error"].startswith("StateStoreError")

    asyncio.run(scenario())


def test_store_probe_uses_ping_when_there_is_one() -> None:
    pinged = []

    class Pingable(MemoryWindowStore):
        async def ping(self) -> None:
            pinged.append(True)

    asyncio.run(obs.store_probe(Pingable(MODEL.freq))())
    asyncio.run(obs.store_probe(MemoryWindowStore(MODEL.freq))())
    assert pinged == [True]


def test_broker_probe_needs_a_started_producer() -> None:
    app = SimpleNamespace(producer=SimpleNamespace(_producer=None))
    with pytest.raises(Exception, match="not started"):
        asyncio.run(obs.broker_probe(app)())


def test_partition_id_labels_are_strings() -> None:
    # Watermark labels are what dashboards join on: partition as a string, like Kafka's.
    store = MemoryWindowStore(MODEL.freq)
    proc = SalesProcessor(store, FakeForecaster(), MODEL, ListSink(), allowed_lateness_ms=DAY)
    value = orjson.dumps({"item_id": "a", "ts": 14_975 * 86_400_000, "quantity": 1})
    asyncio.run(proc.process([RawMessage("wm-topic", 2, 0, b"a", value)]))
    assert sample("trendcast_watermark_ms", topic="wm-topic", partition="2") > 0
    assert PartitionId("wm-topic", 2) in proc._clocks
