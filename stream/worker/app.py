"""The Faust app of the worker: wiring only.

What the worker does at each Faust hook is in :class:`stream.worker.runtime.WorkerRuntime`
(whose handlers :func:`create_app` connects here), what it does with a batch in
:mod:`stream.pipeline.processor`; this module also holds the producer side
(:class:`TopicSink`).

The sales topic is read as raw bytes (a message that is not JSON must reach our validator,
not crash Faust's deserializer) through the fast path of :mod:`stream.worker.batch_consumer`:
every fetch, per partition, goes to the processor as one batch
(:meth:`~stream.pipeline.processor.SalesProcessor.submit`), and its offsets are committed
(through Faust) only after that returned — i.e. after the batch's state is in Redis and its
dead letters and forecasts were delivered. A failing batch is retried with backoff, never
skipped.

While a batch fails (Redis down, broker or model errors) the worker stays up, commits
nothing past that batch and reports itself unhealthy through one
:class:`~stream.monitoring.health.Health` object: ``GET /health`` answers 503 with the
failing components, the ``trendcast_healthy`` gauge drops to 0, and one log line marks each
transition. A timer pings the state store too, so an idle worker also reports an outage.
When the batch finally succeeds everything clears by itself; no operator action is needed.

The web server (Faust's, on ``TRENDCAST_WEB_BIND``:``TRENDCAST_WEB_PORT``) also answers
lookups of each item's latest forecast record, kept in the state store once delivered (see
:class:`~stream.worker.runtime.LatestForecastSink`), so any worker answers for any item:

* ``GET /forecasts/{item_id}``: 200 with the record, exactly the bytes on the forecasts
  topic; 404 ``{"error": ...}`` for an item with none;
* ``GET /forecasts?items=a,b``: a JSON object item id -> record or ``null``, for at most
  :data:`MAX_LOOKUP_ITEMS` items (400 beyond, or without ``items``).

With ``TRENDCAST_WEB_TOKEN`` set, both need ``Authorization: Bearer <token>`` (401
otherwise); ``/ready``, ``/health`` and ``/metrics`` stay open for probes and scrapers.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, cast

import faust
import orjson
from faust.web import Request, Response, View
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import SecretStr

from stream.inference.model_info import ModelInfo
from stream.lifecycle.hot_reload import BundleWatcher
from stream.monitoring import telemetry, tracing
from stream.monitoring.health import Health
from stream.pipeline.processor import OnLate, Sink
from stream.settings.security import KafkaSecurity
from stream.settings.worker import WorkerSettings
from stream.state.base import WindowStore
from stream.worker import batch_consumer
from stream.worker.runtime import Publish, WorkerRuntime
from trendcast.exceptions import BrokerError, StateStoreError
from trendcast.forecasting.base import Forecaster

__all__ = ["MAX_LOOKUP_ITEMS", "Publish", "TopicSink", "create_app", "send_batches"]

logger = logging.getLogger(__name__)

#: How often the state store is pinged for ``/health``: an idle worker would otherwise stay
#: "healthy" through a whole Redis outage, and a failing one would only see the end of the
#: outage at its next retry (up to 10 s later, see :mod:`stream.worker.runtime`).
_PROBE_INTERVAL_S = 2.0

#: aiohttp refuses a charset inside content_type; Prometheus text is ASCII anyway.
_METRICS_CONTENT_TYPE = "; ".join(
    part.strip() for part in CONTENT_TYPE_LATEST.split(";") if "charset" not in part
)

#: Most items one ``GET /forecasts?items=...`` may name: one Redis MGET, a response of a few
#: hundred KB; a subscriber wanting more asks several times (or reads the topic).
MAX_LOOKUP_ITEMS = 500

#: Keys whose partition the sink remembers per topic (item ids: the catalogue).
_PARTITION_CACHE_MAX = 1_000_000
#: Producer record batches: large enough that a bucket close with thousands of forecasts
#: goes out in a few requests (aiokafka's default is 16 KiB), below Kafka's 1 MB limits.
_PRODUCER_BATCH_BYTES = 512 * 1024


async def send_batches(
    producer: Any,
    topic: str,
    by_partition: Mapping[int, Sequence[tuple[bytes | None, bytes]]],
    headers: Sequence[tuple[str, bytes]] = (),
) -> None:
    """Send records through an aiokafka producer in record batches, one partition at a time,
    and await their delivery (``create_batch``/``send_batch``: no per-record Python send path).

    ``headers`` go on every record (the batch's ``traceparent`` while tracing); none, the
    default, encodes exactly as aiokafka's own default.
    """
    header_list = list(headers)  # aiokafka's C batch builder takes a list only
    futures = []
    for partition, records in by_partition.items():
        batch = producer.create_batch()
        for key, value in records:
            if batch.append(key=key, value=value, timestamp=None, headers=header_list) is None:
                futures.append(await producer.send_batch(batch, topic, partition=partition))
                batch = producer.create_batch()  # the one before was full: shipped
                batch.append(key=key, value=value, timestamp=None, headers=header_list)
        if batch.record_count():
            futures.append(await producer.send_batch(batch, topic, partition=partition))
    await asyncio.gather(*futures)


class TopicSink:
    """Sends through the app's producer, one record batch per partition, and awaits delivery.

    A bucket close emits thousands of forecasts at once. Sending them one by one
    (``Topic.send`` or ``Producer.send``) cost tens of microseconds each in per-record
    Python (Faust message objects, aiokafka's per-record accumulator path); appending them
    to one aiokafka ``BatchBuilder`` per partition costs a few. Partitions come from
    Faust's ``Producer.key_partition`` (aiokafka's default partitioner, the one every
    Kafka client uses for keyed records), so an item's forecasts always land in the same
    partition. Topics are declared once.
    """

    def __init__(
        self,
        app: faust.App,
        forecasts: faust.types.TopicT,
        dead_letters: faust.types.TopicT,
        *others: faust.types.TopicT,
        alerts: faust.types.TopicT | None = None,
    ) -> None:
        self._app = app
        self._forecasts = forecasts
        self._dead_letters = dead_letters
        self._alerts = alerts
        extra = () if alerts is None else (alerts,)
        self._topics = {t.get_topic_name(): t for t in (forecasts, dead_letters, *others, *extra)}
        self._declared = False
        # key -> partition per topic, valid while the topic's partition count is: the
        # default partitioner is murmur2 in pure Python, and items repeat at every close.
        self._partitions: dict[str, tuple[int, dict[bytes | None, int]]] = {}

    def _partition_of(self, name: str, producer: Any) -> Callable[[bytes | None], int]:
        count = len(producer.client.cluster.partitions_for_topic(name) or ())
        known, cache = self._partitions.get(name, (-1, {}))
        if known != count or len(cache) > _PARTITION_CACHE_MAX:
            cache = {}
            self._partitions[name] = (count, cache)
        key_partition = self._app.producer.key_partition

        def partition_of(key: bytes | None) -> int:
            partition = cache.get(key)
            if partition is None:
                # Unkeyed records (dead letters of keyless messages) share one partition.
                partition = cache[key] = key_partition(name, key or b"").partition
            return partition

        return partition_of

    async def _declare(self) -> None:
        if not self._declared:
            for topic in self._topics.values():
                await topic.maybe_declare()
            self._declared = True

    async def send(self, topic: str, records: Sequence[tuple[bytes | None, bytes]]) -> None:
        """Send records to one of the sink's topics (accuracy, trends) and await delivery."""
        await self._send(self._topics[topic], records)

    async def _send(
        self,
        topic: faust.types.TopicT,
        records: Sequence[tuple[bytes | None, bytes]],
        headers: Sequence[tuple[str, bytes]] = (),
    ) -> None:
        await self._declare()
        name, faust_producer = topic.get_topic_name(), self._app.producer
        try:
            # Faust's Producer wraps an aiokafka producer; its batch API has no Faust
            # counterpart (tests/unit/stream/worker/test_batch_consumer.py pins this private
            # accessor).
            producer = cast(Any, faust_producer)._ensure_producer()
            partition_of = self._partition_of(name, producer)
            by_partition: dict[int, list[tuple[bytes | None, bytes]]] = {}
            for key, value in records:
                by_partition.setdefault(partition_of(key), []).append((key, value))
            await send_batches(producer, name, by_partition, headers)
        except Exception as exc:  # aiokafka raises many types; all mean "not delivered"
            raise BrokerError(f"could not deliver {len(records)} records to {name}: {exc}") from exc

    async def send_forecasts(self, records: Sequence[tuple[str, bytes]]) -> None:
        """See :class:`stream.pipeline.processor.Sink`; with the producing batch's
        ``traceparent`` header while tracing."""
        headers = tracing.traceparent_headers()
        await self._send(self._forecasts, [(k.encode(), v) for k, v in records], headers)

    async def send_dead_letters(self, records: Sequence[tuple[bytes | None, bytes]]) -> None:
        """See :class:`stream.pipeline.processor.Sink`."""
        await self._send(self._dead_letters, records)

    async def send_alerts(self, records: Sequence[tuple[str, bytes]]) -> None:
        """See :class:`stream.pipeline.processor.Sink`: the alerts topic, keyed by item."""
        if self._alerts is None:
            raise BrokerError("this sink was made without an alerts topic")
        headers = tracing.traceparent_headers()  # the surge's batch; none for stall checks
        await self._send(self._alerts, [(key.encode(), value) for key, value in records], headers)


def create_app(
    settings: WorkerSettings,
    forecaster: Forecaster,
    store: WindowStore,
    model: ModelInfo,
    *,
    sink: Sink | None = None,
    on_late: OnLate | None = None,
    health: Health | None = None,
    watcher: BundleWatcher | None = None,
    shadow: tuple[Forecaster, ModelInfo] | None = None,
    publish: Publish | None = None,
) -> faust.App:
    """Build the worker's Faust app.

    Args:
        settings: Worker settings.
        forecaster: Usually ``OnnxForecaster(load_bundle(settings.bundle))``.
        store: Window state (Redis in production).
        model: Freq, window, horizon and version of the forecaster's model.
        sink: Output override for tests; default sends to the forecasts and DLQ topics.
        on_late: Hook called for each late event.
        health: Where failures are reported; a new :class:`~stream.monitoring.health.Health` by
            default.
        watcher: Follows the bundle location for hot reload (every
            ``settings.bundle_poll_s``; 0 or ``None`` = the model never changes).
        shadow: A second model scored on the live windows, never emitted.
        publish: Output override for accuracy and trends records (tests); default sends
            to ``settings.accuracy_topic`` / ``settings.trends_topic``.

    Returns:
        The app; ``app.main()`` / ``Worker(app).execute_from_commandline()`` runs it.
    """
    app = _faust_app(settings)
    telemetry.set_model_info(model, forecaster.name)
    if store.remote:  # trendcast_redis_seconds: Redis round trips only
        store = telemetry.TimedWindowStore(store)

    sales = _raw_topic(app, settings.sales_topic)
    topic_sink = TopicSink(
        app,
        _raw_topic(app, settings.forecasts_topic),
        _raw_topic(app, settings.dlq_topic),
        _raw_topic(app, settings.accuracy_topic),
        _raw_topic(app, settings.trends_topic),
        alerts=_raw_topic(app, settings.alerts_topic),
    )
    runtime = WorkerRuntime(
        app,
        settings,
        telemetry.InstrumentedForecaster(forecaster),
        store,
        model,
        sink=sink or topic_sink,
        publish=publish or topic_sink.send,
        health=health if health is not None else Health(),
        on_late=on_late,
        watcher=watcher,
        shadow=shadow,
    )

    # The sales topic is subscribed through the conductor, but no agent reads it: fetched
    # batches go straight to handle_fetch (see stream.worker.batch_consumer for why and what
    # it keeps).
    app.topics.add(sales)
    batch_consumer.install(
        app,
        runtime.handle_fetch,
        runtime.flush_clocks,
        fetch_timeout_s=settings.batch_timeout_s,
        fetch_max_wait_ms=settings.fetch_max_wait_ms,
        preparer=runtime.prepare_fetch,
        advancer=runtime.advance_idle,
    )
    app.on_partitions_revoked.connect(runtime.on_revoked)
    app.on_partitions_assigned.connect(runtime.on_assigned)
    app.on_before_shutdown.connect(runtime.on_shutdown)

    app.timer(interval=1.0)(runtime.commit_processed)
    app.timer(interval=_PROBE_INTERVAL_S)(runtime.probe_state_store)
    if watcher is not None and settings.bundle_poll_s > 0:
        app.timer(interval=settings.bundle_poll_s)(runtime.reload_bundle)
        app.trendcast_reload = runtime.reload_bundle  # type: ignore[attr-defined]  # for tests
    if settings.publish_interval_s > 0:
        app.timer(interval=settings.publish_interval_s)(runtime.publish_insights)

    _add_pages(app, runtime)

    # For tests and inspection.
    app.trendcast_runtime = runtime  # type: ignore[attr-defined]
    app.trendcast_publish = runtime.publish_insights  # type: ignore[attr-defined]
    app.trendcast_accuracy = runtime.accuracy  # type: ignore[attr-defined]
    app.trendcast_trends = runtime.trends  # type: ignore[attr-defined]
    app.trendcast_processor = runtime.processor  # type: ignore[attr-defined]
    app.trendcast_handle_fetch = runtime.handle_fetch  # type: ignore[attr-defined]
    app.trendcast_prepare_fetch = runtime.prepare_fetch  # type: ignore[attr-defined]
    app.trendcast_flush = runtime.flush_clocks  # type: ignore[attr-defined]
    app.trendcast_health = runtime.health  # type: ignore[attr-defined]
    return app


def _add_pages(app: faust.App, runtime: WorkerRuntime) -> None:
    """``/metrics``, ``/ready`` and ``/health`` on Faust's web server: HTTP only, the answers
    are the runtime's."""

    @app.page("/metrics")
    async def metrics(web: View, request: Request) -> Response:
        return web.bytes(runtime.metrics_text(), content_type=_METRICS_CONTENT_TYPE)

    @app.page("/ready")
    async def ready_page(web: View, request: Request) -> Response:
        status, body = await runtime.readiness_report()
        return web.json(body, status=status)

    @app.page("/health")
    async def health_page(web: View, request: Request) -> Response:
        status, body = runtime.health_report()
        return web.json(body, status=status)

    guard = _bearer_guard(runtime.settings.web_token)

    @app.page("/forecasts/{item_id}")
    async def forecast_page(web: View, request: Request, item_id: str) -> Response:
        refused = guard(web, request)
        if refused is not None:
            return refused

        async def answer() -> Response:
            record = (await runtime.latest_forecasts([item_id]))[item_id]
            if record is None:
                return _error(web, 404, f"no forecast for item {item_id!r}")
            return web.bytes(record, content_type="application/json")

        return await _with_store(web, answer)

    @app.page("/forecasts")
    async def forecasts_page(web: View, request: Request) -> Response:
        refused = guard(web, request)
        if refused is not None:
            return refused
        item_ids = _lookup_items(request.query)
        if isinstance(item_ids, str):
            return _error(web, 400, item_ids)

        async def answer() -> Response:
            found = await runtime.latest_forecasts(item_ids)
            return web.bytes(_json_object(found), content_type="application/json")

        return await _with_store(web, answer)


def _error(web: View, status: int, message: str, **headers: str) -> Response:
    """A JSON error body ``{"error": message}``: what every lookup client parses."""
    return web.json({"error": message}, status=status, headers=headers or None)


def _bearer_guard(token: SecretStr | None) -> Callable[[View, Request], Response | None]:
    """A check of ``Authorization: Bearer <token>``: ``None`` lets the request through.

    The comparison is constant-time (``hmac.compare_digest`` on bytes), so the time a wrong
    token takes tells nothing about how much of it was right. Without a token every request
    passes.
    """
    if token is None:
        return lambda web, request: None
    expected = token.get_secret_value().encode()

    def check(web: View, request: Request) -> Response | None:
        scheme, _, given = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not given.strip():
            return _error(
                web,
                401,
                "expected an Authorization: Bearer <token> header, got none",
                **{"WWW-Authenticate": 'Bearer realm="trendcast"'},
            )
        if not hmac.compare_digest(given.strip().encode(), expected):
            return _error(
                web,
                401,
                "the bearer token is not the one this worker expects",
                **{"WWW-Authenticate": 'Bearer realm="trendcast", error="invalid_token"'},
            )
        return None

    return check


def _lookup_items(query: Mapping[str, str]) -> list[str] | str:
    """The item ids of ``?items=a,b`` (repeating ``items`` works too), or what is wrong.

    Empty names are dropped and repeats kept once, in order, so the answer is a JSON object
    without duplicate keys.

    >>> from multidict import MultiDict
    >>> _lookup_items(MultiDict([("items", "a,b,,a"), ("items", "c")]))
    ['a', 'b', 'c']
    >>> _lookup_items(MultiDict())
    'expected a query parameter items=ID[,ID...], got none'
    """
    getall = getattr(query, "getall", None)
    values = getall("items", []) if getall is not None else [query.get("items", "")]
    item_ids = list(dict.fromkeys(i for v in values for i in v.split(",") if i))
    if not item_ids:
        return "expected a query parameter items=ID[,ID...], got none"
    if len(item_ids) > MAX_LOOKUP_ITEMS:
        return f"expected at most {MAX_LOOKUP_ITEMS} item ids in items, got {len(item_ids)}"
    return item_ids


def _json_object(found: Mapping[str, bytes | None]) -> bytes:
    """``{"id": record-or-null, ...}`` with each record's bytes as they are (never re-encoded).

    >>> _json_object({"a": b'{"x":1}', "b": None})
    b'{"a":{"x":1},"b":null}'
    """
    parts = [orjson.dumps(k) + b":" + (b"null" if v is None else v) for k, v in found.items()]
    return b"{" + b",".join(parts) + b"}"


async def _with_store(web: View, answer: Callable[[], Awaitable[Response]]) -> Response:
    """``answer()``, or 503 while the state store fails (a lookup never raises into Faust).

    The client gets no more than that: the reason (hosts, ports, Redis's words) goes to the
    log, where ``/health`` reports the outage too.
    """
    try:
        return await answer()
    except StateStoreError as exc:
        logger.warning("lookup failed: %s", exc)
        return _error(web, 503, "state store unavailable, try again shortly")


def _raw_topic(app: faust.App, name: str) -> faust.types.TopicT:
    """A topic of raw bytes both ways: we decode ourselves, so bad bytes become dead letters
    instead of crashing Faust's deserializer."""
    return app.topic(
        name, key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer="raw"
    )


def _faust_app(settings: WorkerSettings) -> faust.App:
    """The Faust app with the worker's broker, consumer and producer settings."""
    return faust.App(
        settings.consumer_group,
        broker=settings.kafka_brokers,
        key_serializer="raw",
        value_serializer="raw",
        autodiscover=False,
        datadir=str(settings.data_dir),
        web_enabled=settings.web_enabled,
        web_port=settings.web_port,
        web_bind=settings.web_bind,
        topic_partitions=settings.topic_partitions,
        topic_replication_factor=settings.topic_replicas,
        # No leader-election topic: the worker has no leader tasks, and one topic less to
        # create keeps start-up fast on small brokers.
        topic_disable_leader=True,
        broker_rebalance_timeout=settings.broker_rebalance_timeout_s,
        broker_session_timeout=settings.broker_session_timeout_s,
        broker_heartbeat_interval=settings.broker_heartbeat_interval_s,
        broker_commit_interval=settings.commit_interval_s,
        broker_max_poll_records=settings.batch_size,
        consumer_auto_offset_reset="earliest",
        producer_acks=-1,
        producer_max_batch_size=_PRODUCER_BATCH_BYTES,
        broker_credentials=KafkaSecurity.from_settings(settings).faust_credentials(),
    )
