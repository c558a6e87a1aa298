"""The Faust app of the worker: wiring only (logic lives in :mod:`stream.processor`).

One agent reads the sales topic as raw bytes (``value_serializer="raw"``: a message that is
not JSON must reach our validator, not crash Faust's deserializer), takes batches of up to
``batch_size`` events with ``noack_take`` and acks them only after
:meth:`~stream.processor.SalesProcessor.process` returned — i.e. after their state is in
Redis and their dead letters and forecasts were delivered — so Faust commits offsets only
for events whose effects are stored. A failing batch is retried with backoff, never skipped.

While a batch fails (Redis down, broker or model errors) the worker stays up, commits
nothing past that batch and reports itself unhealthy through one :class:`~stream.health.Health`
object: ``GET /health`` answers 503 with the failing components, the ``trendcast_healthy``
gauge drops to 0, and one log line marks each transition. A timer pings the state store too,
so an idle worker also reports an outage. When the batch finally succeeds everything clears
by itself; no operator action is needed.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any, cast

import faust
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from stream import observability
from stream.config import WorkerSettings
from stream.health import PROCESSING, STATE_STORE, Health
from stream.inference.batching import ModelInfo
from stream.processor import OnLate, RawMessage, SalesProcessor, Sink
from stream.reload import BundleWatcher, LoadedModel
from stream.security import KafkaSecurity
from stream.windows.base import PartitionId, WindowStore
from stream.windows.redis import RedisWindowStore
from trendcast.exceptions import BrokerError, TrendcastError
from trendcast.forecasting.base import Forecaster

__all__ = ["TopicSink", "create_app"]

logger = logging.getLogger(__name__)

#: Longest pause between retries of a failing batch; long enough not to hammer a Redis that
#: is restarting, short enough that recovery is quick.
_MAX_BACKOFF_S = 10.0
#: How often the state store is pinged for ``/health``: an idle worker would otherwise stay
#: "healthy" through a whole Redis outage, and a failing one would only see the end of the
#: outage at its next retry (up to ``_MAX_BACKOFF_S`` later).
_PROBE_INTERVAL_S = 2.0
#: A ping slower than this counts as a failure: a hung Redis is as bad as a dead one, and
#: redis-py retries a refused connection with backoff inside ``ping()``, which would hide a
#: short outage from the probe altogether.
_PROBE_TIMEOUT_S = 2.0


#: aiohttp refuses a charset inside content_type; Prometheus text is ASCII anyway.
_METRICS_CONTENT_TYPE = "; ".join(
    part.strip() for part in CONTENT_TYPE_LATEST.split(";") if "charset" not in part
)


class TopicSink:
    """Sends to Faust topics immediately (``force=True``: not attached to the current event,
    which would delay them until the ack) and awaits each record's delivery."""

    def __init__(self, forecasts: faust.types.TopicT, dead_letters: faust.types.TopicT) -> None:
        self._forecasts = forecasts
        self._dead_letters = dead_letters
        self._declared = False

    async def _declare(self) -> None:
        if not self._declared:
            await self._forecasts.maybe_declare()
            await self._dead_letters.maybe_declare()
            self._declared = True

    async def _send(
        self, topic: faust.types.TopicT, records: Sequence[tuple[bytes | None, bytes]]
    ) -> None:
        await self._declare()
        try:
            futures = [await topic.send(key=key, value=value, force=True) for key, value in records]
            await asyncio.gather(*futures)
        except Exception as exc:  # aiokafka raises many types; all mean "not delivered"
            raise BrokerError(
                f"could not deliver {len(records)} records to {topic.get_topic_name()}: {exc}"
            ) from exc

    async def send_forecasts(self, records: Sequence[tuple[str, bytes]]) -> None:
        """See :class:`stream.processor.Sink`."""
        await self._send(self._forecasts, [(k.encode(), v) for k, v in records])

    async def send_dead_letters(self, records: Sequence[tuple[bytes | None, bytes]]) -> None:
        """See :class:`stream.processor.Sink`."""
        await self._send(self._dead_letters, records)


def _raw(event: Any) -> RawMessage:
    message = event.message
    timestamp = message.timestamp
    return RawMessage(
        topic=message.topic,
        partition=message.partition,
        offset=message.offset,
        key=message.key,
        value=message.value,
        timestamp_ms=None if timestamp is None else int(timestamp * 1000),
    )


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
) -> faust.App:
    """Build the worker's Faust app.

    Args:
        settings: Worker settings.
        forecaster: Usually ``OnnxForecaster(load_bundle(settings.bundle))``.
        store: Window state (Redis in production).
        model: Freq, window, horizon and version of the forecaster's model.
        sink: Output override for tests; default sends to the forecasts and DLQ topics.
        on_late: Hook called for each late event.
        health: Where failures are reported; a new :class:`~stream.health.Health` by default.
        watcher: Follows the bundle location for hot reload (every
            ``settings.bundle_poll_s``; 0 or ``None`` = the model never changes).

    Returns:
        The app; ``app.main()`` / ``Worker(app).execute_from_commandline()`` runs it.
    """
    app = faust.App(
        settings.consumer_group,
        broker=settings.kafka_brokers,
        key_serializer="raw",
        value_serializer="raw",
        autodiscover=False,
        datadir=str(settings.data_dir),
        web_enabled=settings.web_enabled,
        web_port=settings.web_port,
        topic_partitions=settings.topic_partitions,
        topic_replication_factor=settings.topic_replicas,
        # No leader-election topic: the worker has no leader tasks, and one topic less to
        # create keeps start-up fast on small brokers.
        topic_disable_leader=True,
        broker_rebalance_timeout=settings.broker_rebalance_timeout_s,
        broker_session_timeout=settings.broker_session_timeout_s,
        broker_heartbeat_interval=settings.broker_heartbeat_interval_s,
        broker_commit_interval=settings.commit_interval_s,
        consumer_auto_offset_reset="earliest",
        producer_acks=-1,
        broker_credentials=KafkaSecurity.from_settings(settings).faust_credentials(),
    )
    observability.set_model_info(model, forecaster.name)
    forecaster = observability.InstrumentedForecaster(forecaster)
    if isinstance(store, RedisWindowStore):  # trendcast_redis_seconds: Redis round trips only
        store = observability.TimedWindowStore(store)

    def raw_topic(name: str) -> faust.types.TopicT:
        # Raw bytes both ways: we decode ourselves, so bad bytes become dead letters
        # instead of crashing Faust's deserializer.
        return app.topic(
            name, key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer="raw"
        )

    sales = raw_topic(settings.sales_topic)
    forecasts = raw_topic(settings.forecasts_topic)
    dead_letters = raw_topic(settings.dlq_topic)
    processor = SalesProcessor(
        store,
        forecaster,
        model,
        sink or TopicSink(forecasts, dead_letters),
        lateness_buckets=settings.lateness_buckets,
        grace_buckets=settings.grace_buckets,
        inference_batch_size=settings.inference_batch_size,
        max_message_bytes=settings.max_message_bytes,
        max_future_ms=int(settings.max_future_s * 1000),
        state_ttl_ms=None if settings.state_ttl_s is None else settings.state_ttl_s * 1000,
        on_late=on_late,
    )

    health = health if health is not None else Health()

    async def process_with_retry(stream: faust.Stream[Any], events: Sequence[Any]) -> bool:
        backoff = 0.2
        messages = [_raw(e) for e in events]
        while True:
            try:
                await processor.process(messages)
                health.recovered(PROCESSING)
                return True
            except Exception as exc:
                # Never skip a batch: its offsets must not be committed before its state is
                # stored. Our errors (Redis, broker, model) are expected to be transient; a
                # bug retries forever too, loudly, rather than silently losing sales.
                health.failing(PROCESSING, f"{type(exc).__name__}: {exc}")
                if stream.should_stop:
                    return False
                if isinstance(exc, TrendcastError):
                    logger.error(
                        "batch of %d failed (%s); retrying in %.1fs", len(messages), exc, backoff
                    )
                else:
                    logger.exception(
                        "batch of %d failed unexpectedly; retrying in %.1fs",
                        len(messages),
                        backoff,
                    )
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, _MAX_BACKOFF_S)

    @app.agent(sales, name="trendcast.sales")
    async def process_sales(source: faust.types.StreamT[Any]) -> None:
        stream = cast(faust.Stream[Any], source)
        # noack_take yields the events themselves; acking is ours, after the state is stored.
        async for events in stream.noack_take(settings.batch_size, within=settings.batch_timeout_s):
            observability.observe_batch(len(events))
            if await process_with_retry(stream, events):
                for event in events:
                    await stream.ack(event)

    @app.on_partitions_revoked.connect
    async def on_revoked(sender: Any, /, *args: Any, signal: Any, **kwargs: Any) -> None:
        revoked = args[0] if args else kwargs.get("revoked", set())
        processor.forget(PartitionId(tp.topic, tp.partition) for tp in revoked)

    @app.on_partitions_assigned.connect
    async def on_assigned(sender: Any, /, *args: Any, signal: Any, **kwargs: Any) -> None:
        # Another worker may have advanced these clocks meanwhile: reload them lazily.
        assigned = args[0] if args else kwargs.get("assigned", set())
        processor.forget(PartitionId(tp.topic, tp.partition) for tp in assigned)

    ping = getattr(store, "ping", None)
    if callable(ping):

        async def probe_state_store() -> None:
            try:
                await asyncio.wait_for(ping(), timeout=_PROBE_TIMEOUT_S)
            except (TrendcastError, TimeoutError) as exc:
                health.failing(STATE_STORE, f"{type(exc).__name__}: {exc}")
            else:
                health.recovered(STATE_STORE)

        app.timer(interval=_PROBE_INTERVAL_S)(probe_state_store)

    @app.page("/metrics")
    async def metrics(web: Any, request: Any) -> Any:
        observability.refresh_consumer_lag(app)
        return web.bytes(
            generate_latest(observability.METRICS_REGISTRY), content_type=_METRICS_CONTENT_TYPE
        )

    readiness = observability.Readiness(
        {"redis": observability.store_probe(store), "broker": observability.broker_probe(app)},
        details={"bundle": {"model_version": model.model_version}},
        health=health,
        timeout_s=settings.ready_timeout_s,
    )

    @app.page("/ready")
    async def ready_page(web: Any, request: Any) -> Any:
        ready, body = await readiness.check()
        return web.json(body, status=200 if ready else 503)

    @app.page("/health")
    async def health_page(web: Any, request: Any) -> Any:
        # 503 lets a load balancer or orchestrator act on it without parsing the body.
        return web.json(health.snapshot(), status=200 if health.healthy else 503)

    if watcher is not None and settings.bundle_poll_s > 0:

        def swap(loaded: LoadedModel) -> None:
            # Raises BundleError for a model the stored windows cannot feed: the watcher
            # counts and logs the refusal, and nothing below runs.
            processor.swap_model(
                observability.InstrumentedForecaster(loaded.forecaster), loaded.model
            )
            observability.set_model_info(loaded.model, loaded.forecaster.name)
            readiness.set_details("bundle", {"model_version": loaded.model.model_version})

        async def reload_bundle() -> None:
            await watcher.poll(swap)

        app.timer(interval=settings.bundle_poll_s)(reload_bundle)
        app.trendcast_reload = reload_bundle  # type: ignore[attr-defined]  # for tests

    app.trendcast_processor = processor  # type: ignore[attr-defined]  # for tests/inspection
    app.trendcast_health = health  # type: ignore[attr-defined]  # for tests/inspection
    return app
