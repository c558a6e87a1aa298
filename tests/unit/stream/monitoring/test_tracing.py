"""Traces of the worker's batches (stream.monitoring.tracing), with the SDK's in-memory exporter.

The fetch handler of a worker app over the in-memory store and a fake model gets real aiokafka
records, some carrying a W3C ``traceparent`` header, as the batch consumer hands them over. The
span tree of each batch, the links to the events' traces, the header the sink sees while a
batch delivers its outputs (also for a batch delivered again from a later batch's task), and
that nothing changes with tracing off or without the packages.
"""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from aiokafka.producer.message_accumulator import BatchBuilder
from aiokafka.record.default_records import DefaultRecordBatch
from aiokafka.structs import ConsumerRecord
from faust.types import TP
from pydantic import ValidationError

from stream.monitoring import tracing
from stream.settings.worker import WorkerSettings
from stream.state.base import PartitionId
from stream.state.memory import MemoryWindowStore
from stream.worker.app import create_app, send_batches
from trendcast.testkit.doubles import (
    DAY,
    FREQ,
    MODEL,
    T0,
    FakeForecaster,
    Feed,
    ListSink,
    processor,
    sale,
)

sdk_trace = pytest.importorskip("opentelemetry.sdk.trace", reason="the tracing extra")
from opentelemetry.sdk.trace.export import SimpleSpanProcessor  # noqa: E402
from opentelemetry.sdk.trace.export.in_memory_span_exporter import (  # noqa: E402
    InMemorySpanExporter,
)
from opentelemetry.trace import StatusCode  # noqa: E402

TP0 = TP("sales", 0)


def _traceparent(n: int) -> bytes:
    return f"00-{n + 1:032x}-{n + 1:016x}-01".encode()


class HeaderSink(ListSink):
    """A list sink that also records the headers the worker's sink would put on each send."""

    def __init__(self, fail_forecasts: int = 0) -> None:
        super().__init__(fail_forecasts)
        self.headers: dict[str, list[Sequence[tuple[str, bytes]]]] = {
            "forecasts": [],
            "dead": [],
            "alerts": [],
        }

    async def send_forecasts(self, records: Sequence[tuple[str, bytes]]) -> None:
        self.headers["forecasts"].append(tracing.traceparent_headers())
        await super().send_forecasts(records)

    async def send_dead_letters(self, records: Sequence[tuple[bytes | None, bytes]]) -> None:
        self.headers["dead"].append(tracing.traceparent_headers())
        await super().send_dead_letters(records)

    async def send_alerts(self, records: Sequence[tuple[str, bytes]]) -> None:
        self.headers["alerts"].append(tracing.traceparent_headers())
        await super().send_alerts(records)


class Records:
    """aiokafka ``ConsumerRecord`` objects with increasing offsets."""

    def __init__(self) -> None:
        self.offset = 0

    def __call__(self, *values: tuple[bytes, bytes, bytes | None]) -> list[Any]:
        out = []
        for key, value, parent in values:
            headers = () if parent is None else (("traceparent", parent),)
            out.append(
                ConsumerRecord(
                    "sales", 0, self.offset, 0, 0, key, value, None, 1, len(value), headers
                )
            )
            self.offset += 1
        return out


@pytest.fixture
def exporter() -> Iterator[InMemorySpanExporter]:
    memory = InMemorySpanExporter()
    provider = sdk_trace.TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(memory))
    tracing.install(provider)
    try:
        yield memory
    finally:
        tracing.reset()


def _app(tmp_path: Path, sink: ListSink) -> Any:
    settings = WorkerSettings(web_enabled=False, data_dir=tmp_path)
    return create_app(settings, FakeForecaster(), MemoryWindowStore(FREQ), MODEL, sink=sink)


def _fetch_two_batches(app: Any, records: Records) -> None:
    """Batch 1: sales of days 0-1 (one trace twice, one bad), closes day 0; batch 2 day 1."""
    first = records(
        (b"a", sale("a", 0.5, 2), _traceparent(1)),
        (b"b", sale("b", 1.2), _traceparent(1)),  # the same request's trace: one link
        (b"x", b"\xffnot utf8", _traceparent(2)),
        (b"a", sale("a", 1.5), None),
    )
    second = records((b"a", sale("a", 3.0), _traceparent(3)))

    async def scenario() -> None:
        assert await app.trendcast_handle_fetch({TP0: first}) is not None
        assert await app.trendcast_handle_fetch({TP0: second}) is not None
        await app.trendcast_processor.drain()

    asyncio.run(scenario())


def header(span: Any) -> list[tuple[str, bytes]]:
    """The header of records a batch produced: its span's own W3C context."""
    ctx = span.context
    value = f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{ctx.trace_flags:02x}"
    return [("traceparent", value.encode())]


def _children(spans: Sequence[Any], parent: Any) -> list[str]:
    return [
        s.name for s in spans if s.parent is not None and s.parent.span_id == parent.context.span_id
    ]


def test_each_batch_is_one_span_with_a_child_per_stage(
    tmp_path: Path, exporter: InMemorySpanExporter
) -> None:
    sink = HeaderSink()
    _fetch_two_batches(_app(tmp_path, sink), Records())
    spans = exporter.get_finished_spans()
    batches = [s for s in spans if s.name == "batch"]
    assert len(batches) == 2
    first, second = batches
    assert first.parent is None and second.parent is None
    assert first.context.trace_id != second.context.trace_id
    # In order of their ends: forecasts are produced while inference goes on (their
    # "produce" ends within "infer").
    stages = ["fetch", "validate", "store", "store", "produce", "infer"]
    assert _children(spans, first) == stages[:2] + ["produce"] + stages[2:]  # + dead letters
    assert _children(spans, second) == stages
    assert dict(first.attributes or {}) == {
        "messaging.system": "kafka",
        "messaging.destination.name": "sales",
        "messaging.batch.message_count": 4,
        "trendcast.events": 4,
        "trendcast.partitions": (0,),
        "trendcast.valid": 3,
        "trendcast.invalid": 1,
        "trendcast.late": 0,
        "trendcast.duplicates": 0,
        "trendcast.dead_letters": 1,
        "trendcast.forecasts": 1,
        "trendcast.refreshes": 0,
        "trendcast.alerts": 0,
        "trendcast.model_version": "fake-1",
    }
    assert (second.attributes or {})["trendcast.forecasts"] == 2 and len(sink.forecasts) == 3
    produce = [s for s in spans if s.name == "produce"]
    assert [dict(s.attributes or {}) for s in produce] == [
        {"trendcast.output": "dead_letters", "trendcast.records": 1},
        {"trendcast.output": "forecasts", "trendcast.records": 1},
        {"trendcast.output": "forecasts", "trendcast.records": 2},
    ]
    # Pipelined: the first batch is inferred while (after) the second one is staged, and
    # its stages still belong to it.
    by_name = {(s.name, s.parent.span_id if s.parent else 0): s for s in spans}
    infer_first = by_name[("infer", first.context.span_id)]
    assert infer_first.start_time >= by_name[("validate", second.context.span_id)].start_time
    # A stage lies within its batch; a batch ends once its outputs are delivered.
    for span in spans:
        if span.parent is not None:
            batch = first if span.parent.span_id == first.context.span_id else second
            assert batch.start_time <= span.start_time <= span.end_time <= batch.end_time


def test_batch_spans_link_to_each_distinct_traceparent_of_their_events(
    tmp_path: Path, exporter: InMemorySpanExporter
) -> None:
    _fetch_two_batches(_app(tmp_path, HeaderSink()), Records())
    first, second = [s for s in exporter.get_finished_spans() if s.name == "batch"]
    assert [link.context.trace_id for link in first.links] == [2, 3]
    assert [link.context.span_id for link in first.links] == [2, 3]
    assert [link.context.trace_id for link in second.links] == [4]


def test_links_are_capped_and_bad_traceparents_ignored(exporter: InMemorySpanExporter) -> None:
    records = Records()
    batch = records(
        *[(b"a", b"{}", _traceparent(n)) for n in range(tracing.MAX_LINKS + 8)],
        (b"a", b"{}", b"00-nonsense"),
    )
    bad = records((b"a", b"{}", b"garbage"), (b"a", b"{}", b"\xff\xfe"))
    trace = tracing.start_batch({PartitionId("sales", 0): batch})
    trace.end_fetch()
    assert isinstance(trace, tracing.BatchTrace) and trace is not tracing.NO_TRACE
    nothing = tracing.start_batch({PartitionId("sales", 0): bad})
    nothing.end_fetch()
    for span in (trace, nothing):
        span.span.end()  # type: ignore[attr-defined]
    first, second = [s for s in exporter.get_finished_spans() if s.name == "batch"]
    assert len(first.links) == tracing.MAX_LINKS
    assert [link.context.trace_id for link in first.links] == list(range(1, 33))
    assert second.links == ()


def test_forecasts_carry_the_traceparent_of_the_batch_that_made_them(
    tmp_path: Path, exporter: InMemorySpanExporter
) -> None:
    sink = HeaderSink()
    _fetch_two_batches(_app(tmp_path, sink), Records())
    first, second = [s for s in exporter.get_finished_spans() if s.name == "batch"]

    assert sink.headers["dead"] == [header(first)]
    assert sink.headers["forecasts"] == [header(first), header(second)]
    # Outside a batch's delivery (stall checks, accuracy, trends): no header.
    assert tracing.traceparent_headers() == ()


def test_a_surge_alert_carries_the_traceparent_of_the_batch_that_crossed_the_line(
    exporter: InMemorySpanExporter,
) -> None:
    wall = [T0 + DAY - 60_000]
    sink = HeaderSink()
    proc = processor(
        sink=sink,
        allowed_lateness_ms=60_000,
        clock_ms=lambda: wall[0],
        refresh_ms=60_000,
        alert_probability=0.001,
    )
    feed = Feed()

    async def fetched(*values: bytes) -> None:  # as handle_fetch hands a fetch over
        batch = {PartitionId("sales", 0): feed(*values)}
        with tracing.handing_over(tracing.start_batch(batch)):
            await proc.process_partitions(batch)

    async def scenario() -> None:
        await fetched(sale("a", 0.998, 2.0), sale("z", 0.998, 1.0))  # 2 a day, live
        wall[0] = T0 + DAY + 120_000
        await proc.advance([PartitionId("sales", 0)])  # day 0 closes by the wall clock
        wall[0] = T0 + DAY + 10 * 3_600_000
        await fetched(sale("a", 1 + 10 / 24, 60.0))  # a surge
        await proc.drain()

    asyncio.run(scenario())
    assert [a["kind"] for a in sink.alerts] == ["surge"]
    spans = exporter.get_finished_spans()
    surge = [s for s in spans if s.name == "batch"][-1]
    assert sink.headers["alerts"] == [header(surge)]
    assert (surge.attributes or {})["trendcast.alerts"] == 1
    produce = [
        s for s in spans if s.name == "produce" and s.parent.span_id == surge.context.span_id
    ]
    assert {"trendcast.output": "alerts", "trendcast.records": 1} in [
        dict(s.attributes or {}) for s in produce
    ]
    # The close by the wall clock had no fetch: its forecasts carry no header.
    assert () in sink.headers["forecasts"]


def test_a_batch_delivered_again_later_keeps_its_own_trace(
    tmp_path: Path, exporter: InMemorySpanExporter
) -> None:
    sink = HeaderSink(fail_forecasts=1)  # the closing batch's first delivery fails
    app = _app(tmp_path, sink)
    records = Records()
    first = records((b"a", sale("a", 0.5), None), (b"a", sale("a", 3.0), None))  # closes 0-1
    second = records((b"b", sale("b", 3.2), _traceparent(7)))

    async def scenario() -> None:
        await app.trendcast_handle_fetch({TP0: first})
        # Staging the second batch raises the first one's failure, then the runtime retries:
        # the first batch's forecasts go out from the second batch's task.
        await app.trendcast_handle_fetch({TP0: second})
        await app.trendcast_processor.drain()

    asyncio.run(scenario())
    spans = exporter.get_finished_spans()
    batches = [s for s in spans if s.name == "batch"]
    assert len(batches) == 2  # each ended once
    one, two = sorted(batches, key=lambda s: s.start_time)
    produce = [s for s in spans if s.name == "produce" and s.parent.span_id == one.context.span_id]
    assert [p.status.status_code for p in produce] == [StatusCode.ERROR, StatusCode.UNSET]
    # The failed send and the good one; then the second batch's own.
    assert sink.headers["forecasts"] == [header(one), header(one), header(two)]
    assert [(s.attributes or {})["trendcast.forecasts"] for s in (one, two)] == [1, 1]
    assert len(sink.forecasts) == 2
    assert [link.context.trace_id for link in two.links] == [8]


def test_with_tracing_off_nothing_is_traced_and_no_header_added(tmp_path: Path) -> None:
    tracing.reset()
    assert not tracing.enabled()
    assert tracing.start_batch({}) is tracing.NO_TRACE
    sink = HeaderSink()
    _fetch_two_batches(_app(tmp_path, sink), Records())
    assert len(sink.forecasts) == 3 and len(sink.dead) == 1
    assert sink.headers == {"forecasts": [(), ()], "dead": [()], "alerts": []}


def test_configure_is_off_by_default_and_without_the_packages(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    assert tracing.configure(WorkerSettings()) is False
    # The packages missing (the worker image): asked for, still off, said once, batches run.
    for name in [m for m in sys.modules if m == "opentelemetry" or m.startswith("opentelemetry.")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, "opentelemetry", None)
    with caplog.at_level(logging.WARNING, logger="stream.monitoring.tracing"):
        assert tracing.configure(WorkerSettings(otel_traces_exporter="otlp")) is False
    assert "not installed" in caplog.text
    assert not tracing.enabled()
    sink = HeaderSink()
    _fetch_two_batches(_app(tmp_path, sink), Records())
    assert len(sink.forecasts) == 3 and sink.headers["forecasts"] == [(), ()]


def test_the_worker_loads_no_opentelemetry_while_tracing_is_off() -> None:
    # What the worker image relies on: with the packages absent nothing may import them.
    # redis-py imports OpenTelemetry itself when it is installed (redis.observability): what
    # it loads is the baseline, and our code may add nothing to it.
    code = (
        "import sys; import redis, redis.asyncio, redis.cluster; "
        "base = {m for m in sys.modules if m.startswith('opentelemetry')}; "
        "import stream.worker.runner, stream.worker.app; "
        "from stream.monitoring import tracing; from stream.settings.worker import WorkerSettings; "
        "assert not tracing.configure(WorkerSettings()); "
        "print(sorted(m for m in sys.modules if m.startswith('opentelemetry') and m not in base))"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "TRENDCAST_"))}
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=Path(__file__).resolve().parents[4],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.strip() == "[]"


def test_configure_exports_with_the_sdk_and_names_the_service(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("OTEL_SERVICE_NAME", raising=False)
    monkeypatch.delenv("OTEL_RESOURCE_ATTRIBUTES", raising=False)
    try:
        assert tracing.configure(WorkerSettings(otel_traces_exporter="console")) is True
        assert tracing.enabled()
        provider = tracing._provider
        assert provider is not None
        assert provider.resource.attributes["service.name"] == tracing.SERVICE_NAME
        monkeypatch.setenv("OTEL_SERVICE_NAME", "shop-forecasts")  # read by the SDK
        assert tracing.configure(WorkerSettings(otel_traces_exporter="otlp,console")) is True
        provider = tracing._provider
        assert provider is not None
        assert provider.resource.attributes["service.name"] == "shop-forecasts"
    finally:
        tracing.reset()
    assert not tracing.enabled()


def test_the_exporter_comes_from_the_standard_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OTEL_TRACES_EXPORTER", raising=False)
    assert WorkerSettings().otel_traces_exporter == "none"
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "OTLP, console")
    assert WorkerSettings().otel_traces_exporter == "otlp,console"
    monkeypatch.setenv("TRENDCAST_OTEL_TRACES_EXPORTER", "none")  # ours wins (child processes)
    assert WorkerSettings().otel_traces_exporter == "none"
    monkeypatch.delenv("TRENDCAST_OTEL_TRACES_EXPORTER")
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "jaeger")
    with pytest.raises(ValidationError, match="expected OTEL_TRACES_EXPORTER of otlp"):
        WorkerSettings()


class _Producer:
    """The two methods of an aiokafka producer that send_batches uses, with real batches."""

    def __init__(self) -> None:
        self.sent: list[bytes] = []

    def create_batch(self) -> BatchBuilder:
        return BatchBuilder(120, 0)  # small: the records spill over several batches

    async def send_batch(self, batch: BatchBuilder, topic: str, *, partition: int) -> Any:
        self.sent.append(bytes(batch._build()))
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        done.set_result(None)
        return done


def _send(headers: Sequence[tuple[str, bytes]] | None) -> list[bytes]:
    producer = _Producer()
    records = {0: [(f"item-{i}".encode(), b'{"x": %d}' % i) for i in range(6)]}
    if headers is None:
        asyncio.run(send_batches(producer, "forecasts", records))
    else:
        asyncio.run(send_batches(producer, "forecasts", records, headers))
    return producer.sent


def _decoded(raw_batches: list[bytes]) -> list[list[tuple[Any, ...]]]:
    return [[(r.key, r.value, r.headers) for r in DefaultRecordBatch(raw)] for raw in raw_batches]


def test_produced_records_get_the_header_and_stay_identical_without() -> None:
    plain = _send(None)
    assert len(plain) > 1
    # What aiokafka itself writes when no headers are given (the code before tracing).
    builder, before = BatchBuilder(120, 0), []
    for i in range(6):
        key, value = f"item-{i}".encode(), b'{"x": %d}' % i
        if builder.append(key=key, value=value, timestamp=None) is None:
            before.append(bytes(builder._build()))
            builder = BatchBuilder(120, 0)
            builder.append(key=key, value=value, timestamp=None)
    before.append(bytes(builder._build()))
    # Byte for byte but the wall-clock timestamps (and so the CRC) of the batch headers.
    assert [len(b) for b in before] == [len(b) for b in plain] == [len(b) for b in _send(())]
    assert _decoded(plain) == _decoded(before) == _decoded(_send(()))
    assert all(headers == [] for batch in _decoded(plain) for _, _, headers in batch)
    tp = [("traceparent", _traceparent(5))]
    traced = _decoded(_send(tp))
    assert [key for batch in traced for key, _, _ in batch] == [
        f"item-{i}".encode() for i in range(6)
    ]
    assert all(headers == tp for batch in traced for _, _, headers in batch)
