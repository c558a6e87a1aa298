"""Optional OpenTelemetry traces of the worker: one span per batch, one per stage of it.

Why spans per batch and not per event: the worker's work is per batch (one fetch, one Redis
round trip, one ONNX Runtime call per micro-batch, one record batch per partition sent), so a
batch is the unit whose time means something, and per-event spans would cost more than the
work they describe. A batch's trace::

    batch              (kind CONSUMER; links to the traces of its sale events)
    ├── fetch          the batch consumer hands the fetch over (stream.worker.runtime)
    ├── validate       events checked and classified, writes planned (ingest)
    ├── produce        dead letters delivered (when the batch has any)
    ├── store          the Redis round trip (op=apply), the forecast windows read (op=read)
    ├── infer          ONNX Runtime calls and forecast records
    └── produce        forecasts, then alerts, delivered

A batch is emitted in the background while the next one is staged
(:meth:`stream.pipeline.staging.Staging.submit`), and a batch whose delivery failed is emitted
again later from another batch's task, so the batch's trace is carried explicitly
(:class:`BatchTrace`, kept on the staged batch), never taken from the context at emit time.
The only context variables are the hand-over from :meth:`~stream.worker.runtime.WorkerRuntime.
handle_fetch` to staging (:func:`handing_over`, :func:`current_batch`: same task) and the
batch whose outputs are being delivered (:func:`traceparent_headers`, read by the sink inside
a ``produce`` stage).

Propagation: the W3C ``traceparent`` header of the batch's sale events (Kafka record headers)
becomes one link per distinct value (the first :data:`MAX_LINKS`); the batch span's own
``traceparent`` is written into the headers of the forecast and alert records it produced.

Off by default, and nothing is imported from OpenTelemetry then: the worker image has no
``opentelemetry`` packages (the ``tracing`` extra). :func:`configure` turns it on from
``WorkerSettings.otel_traces_exporter`` (``OTEL_TRACES_EXPORTER``: it decides whether the SDK
is loaded at all); everything else (endpoint, headers, sampler, batch processor, resource) is
read by the SDK from its own standard ``OTEL_*`` variables, that being the SDK's contract.
While off, every hook is a shared no-op (:data:`NO_TRACE`): no per-event work, no header.
"""

from __future__ import annotations

import contextlib
import logging
import operator
from collections.abc import Iterator, Mapping, Sequence
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any, Protocol

from stream.settings.worker import WorkerSettings
from stream.state.base import PartitionId

if TYPE_CHECKING:
    from opentelemetry.context import Context
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.trace import Link, Span, Tracer

__all__ = [
    "MAX_LINKS",
    "NO_TRACE",
    "SERVICE_NAME",
    "TRACEPARENT",
    "BatchFigures",
    "BatchTrace",
    "configure",
    "current_batch",
    "enabled",
    "handing_over",
    "install",
    "reset",
    "start_batch",
    "traceparent_headers",
]

logger = logging.getLogger(__name__)

#: The W3C Trace Context header, as sale events carry it and forecasts and alerts get it.
TRACEPARENT = "traceparent"
#: Links per batch span at most: a batch of 15,000 events from as many traced requests would
#: otherwise carry 15,000 links (exporters and backends cap them far lower anyway).
MAX_LINKS = 32
#: ``service.name`` when neither ``OTEL_SERVICE_NAME`` nor ``OTEL_RESOURCE_ATTRIBUTES`` names one.
SERVICE_NAME = "trendcast-worker"

_NO_HEADERS: tuple[tuple[str, bytes], ...] = ()
_HEADERS = operator.attrgetter("headers")
_NULL = contextlib.nullcontext()

#: The tracer spans are made with, None while tracing is off.
_tracer: Tracer | None = None
#: The provider :func:`configure` made (flushed and shut down by :func:`reset`).
_provider: TracerProvider | None = None
#: The batch handed over to the processor by ``handle_fetch`` (read once, at staging).
_HANDED_OVER: ContextVar[BatchTrace | None] = ContextVar("trendcast_handed_over", default=None)
#: The batch whose outputs are being delivered (read by the sink for the header).
_PRODUCING: ContextVar[BatchTrace | None] = ContextVar("trendcast_producing", default=None)


class BatchFigures(Protocol):
    """What a batch did, as :class:`stream.pipeline.edges.BatchStats` has it (duck-typed here:
    monitoring sits below pipeline)."""

    valid: int
    invalid: int
    late: int
    duplicates: int
    forecasts: int
    refreshes: int
    alerts: int


class BatchTrace:
    """A batch's trace: its span, the stages as child spans, and its ``traceparent``.

    This base class is the no-op used while tracing is off (:data:`NO_TRACE`): every method
    returns at once, so the pipeline's hooks cost a call each per batch.
    """

    __slots__ = ()

    #: Headers for the records the batch produces (empty: no header at all).
    headers: Sequence[tuple[str, bytes]] = _NO_HEADERS

    def stage(self, name: str, **attributes: str | int) -> contextlib.AbstractContextManager[Any]:
        """A child span around one stage (``trendcast.<key>`` attributes); while it runs the
        sink sees this batch as the one producing (:func:`traceparent_headers`)."""
        return _NULL

    def end_fetch(self) -> None:
        """End the ``fetch`` span: the batch is handed over."""

    def finish(self, figures: BatchFigures, model_version: str) -> None:
        """End the batch span once its outputs are delivered, with what it did."""


#: The trace of every batch while tracing is off.
NO_TRACE = BatchTrace()


class _SpanTrace(BatchTrace):
    """A batch's trace with tracing on."""

    __slots__ = ("_context", "_fetch", "_tracer", "headers", "span")

    def __init__(self, tracer: Tracer, span: Span, context: Context, fetch: Span) -> None:
        from opentelemetry.propagate import get_global_textmap

        self._tracer = tracer
        self.span = span
        self._context = context
        self._fetch: Span | None = fetch
        carrier: dict[str, str] = {}
        get_global_textmap().inject(carrier, context=self._context)
        self.headers = [(k, v.encode()) for k, v in carrier.items()] or list(_NO_HEADERS)

    @contextlib.contextmanager
    def stage(self, name: str, **attributes: str | int) -> Iterator[Any]:
        token = _PRODUCING.set(self)
        try:
            with self._tracer.start_as_current_span(
                name,
                context=self._context,
                attributes={f"trendcast.{k}": v for k, v in attributes.items()},
            ) as span:
                yield span
        finally:
            _PRODUCING.reset(token)

    def end_fetch(self) -> None:
        if self._fetch is not None:
            self._fetch.end()
            self._fetch = None

    def finish(self, figures: BatchFigures, model_version: str) -> None:
        self.end_fetch()
        self.span.set_attributes(
            {
                "trendcast.valid": figures.valid,
                "trendcast.invalid": figures.invalid,
                "trendcast.late": figures.late,
                "trendcast.duplicates": figures.duplicates,
                "trendcast.dead_letters": figures.invalid + figures.late,
                "trendcast.forecasts": figures.forecasts,
                "trendcast.refreshes": figures.refreshes,
                "trendcast.alerts": figures.alerts,
                "trendcast.model_version": model_version,
            }
        )
        self.span.end()


def enabled() -> bool:
    """Whether batches are traced."""
    return _tracer is not None


def start_batch(batch: Mapping[PartitionId, Sequence[Any]]) -> BatchTrace:
    """Open a batch's span (and its ``fetch`` span), linked to its sale events' traces.

    Args:
        batch: The fetched records per partition; a record's ``headers`` (aiokafka: a list of
            ``(str, bytes)``) are read for ``traceparent`` only while tracing is on.

    Returns:
        :data:`NO_TRACE` while tracing is off.
    """
    tracer = _tracer
    if tracer is None:
        return NO_TRACE
    from opentelemetry.trace import SpanKind, set_span_in_context

    events = sum(len(records) for records in batch.values())
    topics = sorted({pid.topic for pid in batch})
    span = tracer.start_span(
        "batch",
        kind=SpanKind.CONSUMER,
        links=_links(batch),
        attributes={
            "messaging.system": "kafka",
            "messaging.destination.name": topics[0] if len(topics) == 1 else ",".join(topics),
            "messaging.batch.message_count": events,
            "trendcast.events": events,
            "trendcast.partitions": sorted(pid.partition for pid in batch),
        },
    )
    context = set_span_in_context(span)
    return _SpanTrace(tracer, span, context, tracer.start_span("fetch", context=context))


@contextlib.contextmanager
def handing_over(trace: BatchTrace) -> Iterator[None]:
    """While the fetch handler hands the batch to the processor: staging finds it here."""
    if trace is NO_TRACE:
        yield
        return
    token = _HANDED_OVER.set(trace)
    try:
        yield
    finally:
        _HANDED_OVER.reset(token)


def current_batch() -> BatchTrace:
    """The batch being handed over in this task (:func:`handing_over`), its ``fetch`` ended.

    Staging stores it on the staged batch; a batch staged without one (idle partitions
    moved to the wall clock, tests calling the processor directly) is not traced.
    """
    trace = _HANDED_OVER.get()
    if trace is None:
        return NO_TRACE
    trace.end_fetch()
    return trace


def traceparent_headers() -> Sequence[tuple[str, bytes]]:
    """The headers for records produced now: the ``traceparent`` of the batch delivering
    them (inside one of its ``produce`` stages), else none."""
    trace = _PRODUCING.get()
    return _NO_HEADERS if trace is None else trace.headers


def _links(batch: Mapping[PartitionId, Sequence[Any]]) -> list[Link]:
    """One link per distinct valid ``traceparent`` of the batch's records, the first
    :data:`MAX_LINKS`.

    The only per-event work of tracing, and only while it is on: a loop over the records'
    header lists in C (``map``/``attrgetter``), a Python step only for records that have
    headers at all.
    """
    from opentelemetry.propagate import get_global_textmap
    from opentelemetry.trace import Link, get_current_span

    seen: set[bytes] = set()
    links: list[Link] = []
    propagator = get_global_textmap()
    for records in batch.values():
        if not records or not hasattr(records[0], "headers"):
            continue  # records without headers (RawMessage)
        for headers in filter(None, map(_HEADERS, records)):
            for key, value in headers:
                if key != TRACEPARENT or not value or value in seen:
                    continue
                seen.add(value)
                try:
                    text = value.decode("ascii")
                except (UnicodeDecodeError, AttributeError):
                    continue
                context = get_current_span(propagator.extract({TRACEPARENT: text}))
                span_context = context.get_span_context()
                if span_context.is_valid:
                    links.append(Link(span_context))
                    if len(links) >= MAX_LINKS:
                        return links
    return links


def install(provider: TracerProvider) -> None:
    """Trace batches with ``provider`` (tests: an SDK provider with an in-memory exporter)."""
    global _tracer
    _tracer = provider.get_tracer("trendcast.stream")


def reset() -> None:
    """Stop tracing; the provider :func:`configure` made is flushed and shut down."""
    global _tracer, _provider
    provider, _tracer, _provider = _provider, None, None
    if provider is not None:
        provider.shutdown()


def configure(settings: WorkerSettings) -> bool:
    """Turn tracing on as ``settings.otel_traces_exporter`` says; whether it is on.

    Off for ``none`` (the default) and when the ``opentelemetry`` packages are not installed
    (a warning then: the exporter was asked for). ``otlp`` exports over OTLP/HTTP (protobuf)
    to ``OTEL_EXPORTER_OTLP_ENDPOINT`` or ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` (the SDK
    reads them, and the sampler, headers, timeouts and batch settings); ``console`` prints
    one JSON object per span on stdout (debugging). Spans are exported in the background
    (the SDK's batch span processor) and flushed at exit.
    """
    reset()
    names = [n for n in settings.otel_traces_exporter.split(",") if n != "none"]
    if not names:
        return False
    try:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import (
            BatchSpanProcessor,
            ConsoleSpanExporter,
            SpanExporter,
        )

        exporters: list[SpanExporter] = []
        for name in names:
            if name == "otlp":
                from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
                    OTLPSpanExporter,
                )

                exporters.append(OTLPSpanExporter())
            else:
                exporters.append(ConsoleSpanExporter(formatter=_one_line))
    except ImportError as exc:
        logger.warning(
            "OTEL_TRACES_EXPORTER=%s but OpenTelemetry is not installed (%s): tracing is off; "
            "install trendcast[tracing] to trace batches",
            ",".join(names),
            exc,
        )
        return False
    resource = Resource.create()
    if str(resource.attributes.get("service.name", "")).startswith("unknown_service"):
        resource = resource.merge(Resource({"service.name": SERVICE_NAME}))
    provider = TracerProvider(resource=resource)
    for exporter in exporters:
        provider.add_span_processor(BatchSpanProcessor(exporter))
    global _provider
    _provider = provider
    install(provider)
    logger.info("tracing batches to %s", ",".join(names))
    return True


def _one_line(span: Any) -> str:
    """A span as one JSON line (log shippers read one object per line)."""
    return str(span.to_json(indent=None)) + "\n"
