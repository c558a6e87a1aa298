"""The Faust app of the worker: wiring only (logic lives in :mod:`stream.pipeline.processor`).

The sales topic is read as raw bytes (a message that is not JSON must reach our validator,
not crash Faust's deserializer) through the fast path of :mod:`stream.worker.batch_consumer`: every
fetch, per partition, goes to :meth:`~stream.pipeline.processor.SalesProcessor.process_partitions`
as one batch, and its offsets are committed (through Faust) only after that returned —
i.e. after the batch's state is in Redis and its dead letters and forecasts were delivered.
A failing batch is retried with backoff, never skipped.

While a batch fails (Redis down, broker or model errors) the worker stays up, commits
nothing past that batch and reports itself unhealthy through one
:class:`~stream.monitoring.health.Health`
object: ``GET /health`` answers 503 with the failing components, the ``trendcast_healthy``
gauge drops to 0, and one log line marks each transition. A timer pings the state store too,
so an idle worker also reports an outage. When the batch finally succeeds everything clears
by itself; no operator action is needed.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, cast

import faust
from faust.types import TP
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from stream.inference.model_info import ModelInfo
from stream.lifecycle.hot_reload import BundleWatcher, LoadedModel
from stream.monitoring import telemetry
from stream.monitoring.health import PROCESSING, STATE_STORE, Health
from stream.monitoring.online_accuracy import AccuracyTracker
from stream.monitoring.trends import TrendTracker
from stream.pipeline.processor import OnLate, Record, SalesProcessor, Sink
from stream.settings.security import KafkaSecurity
from stream.settings.worker import WorkerSettings
from stream.state.base import PartitionId, WindowStore
from stream.state.redis_store import RedisWindowStore
from stream.worker import batch_consumer
from trendcast.exceptions import BrokerError, TrendcastError
from trendcast.forecasting.base import Forecaster

__all__ = ["Publish", "TopicSink", "create_app", "send_batches"]

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


#: Keys whose partition the sink remembers per topic (item ids: the catalogue).
_PARTITION_CACHE_MAX = 1_000_000
#: Producer record batches: large enough that a bucket close with thousands of forecasts
#: goes out in a few requests (aiokafka's default is 16 KiB), below Kafka's 1 MB limits.
_PRODUCER_BATCH_BYTES = 512 * 1024

#: Sends records to a named topic (accuracy, trends) and returns once they are delivered.
Publish = Callable[[str, Sequence[tuple[bytes | None, bytes]]], Awaitable[None]]

#: aiohttp refuses a charset inside content_type; Prometheus text is ASCII anyway.
_METRICS_CONTENT_TYPE = "; ".join(
    part.strip() for part in CONTENT_TYPE_LATEST.split(";") if "charset" not in part
)


async def send_batches(
    producer: Any, topic: str, by_partition: Mapping[int, Sequence[tuple[bytes | None, bytes]]]
) -> None:
    """Send records through an aiokafka producer in record batches, one partition at a time,
    and await their delivery (``create_batch``/``send_batch``: no per-record Python send path).
    """
    futures = []
    for partition, records in by_partition.items():
        batch = producer.create_batch()
        for key, value in records:
            if batch.append(key=key, value=value, timestamp=None) is None:  # full: ship it
                futures.append(await producer.send_batch(batch, topic, partition=partition))
                batch = producer.create_batch()
                batch.append(key=key, value=value, timestamp=None)
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
    ) -> None:
        self._app = app
        self._forecasts = forecasts
        self._dead_letters = dead_letters
        self._topics = {t.get_topic_name(): t for t in (forecasts, dead_letters, *others)}
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
        self, topic: faust.types.TopicT, records: Sequence[tuple[bytes | None, bytes]]
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
            await send_batches(producer, name, by_partition)
        except Exception as exc:  # aiokafka raises many types; all mean "not delivered"
            raise BrokerError(f"could not deliver {len(records)} records to {name}: {exc}") from exc

    async def send_forecasts(self, records: Sequence[tuple[str, bytes]]) -> None:
        """See :class:`stream.pipeline.processor.Sink`."""
        await self._send(self._forecasts, [(k.encode(), v) for k, v in records])

    async def send_dead_letters(self, records: Sequence[tuple[bytes | None, bytes]]) -> None:
        """See :class:`stream.pipeline.processor.Sink`."""
        await self._send(self._dead_letters, records)


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
        broker_max_poll_records=settings.batch_size,
        consumer_auto_offset_reset="earliest",
        producer_acks=-1,
        producer_max_batch_size=_PRODUCER_BATCH_BYTES,
        broker_credentials=KafkaSecurity.from_settings(settings).faust_credentials(),
    )
    telemetry.set_model_info(model, forecaster.name)
    forecaster = telemetry.InstrumentedForecaster(forecaster)
    if isinstance(store, RedisWindowStore):  # trendcast_redis_seconds: Redis round trips only
        store = telemetry.TimedWindowStore(store)

    def raw_topic(name: str) -> faust.types.TopicT:
        # Raw bytes both ways: we decode ourselves, so bad bytes become dead letters
        # instead of crashing Faust's deserializer.
        return app.topic(
            name, key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer="raw"
        )

    sales = raw_topic(settings.sales_topic)
    forecasts = raw_topic(settings.forecasts_topic)
    dead_letters = raw_topic(settings.dlq_topic)
    topic_sink = TopicSink(
        app,
        forecasts,
        dead_letters,
        raw_topic(settings.accuracy_topic),
        raw_topic(settings.trends_topic),
    )
    accuracy = AccuracyTracker(
        rolling_buckets=settings.accuracy_rolling_buckets, max_items=settings.accuracy_max_items
    )
    trends = TrendTracker()
    processor = SalesProcessor(
        store,
        forecaster,
        model,
        sink or topic_sink,
        observers=[accuracy, trends],
        shadow=shadow,
        lateness_buckets=settings.lateness_buckets,
        grace_buckets=settings.grace_buckets,
        inference_batch_size=settings.inference_batch_size,
        max_message_bytes=settings.max_message_bytes,
        max_future_ms=int(settings.max_future_s * 1000),
        state_ttl_ms=None if settings.state_ttl_s is None else settings.state_ttl_s * 1000,
        on_late=on_late,
    )

    health = health if health is not None else Health()

    async def process_with_retry(batch: Mapping[PartitionId, Sequence[Record]]) -> bool:
        backoff = 0.2
        size = sum(len(records) for records in batch.values())
        while True:
            try:
                # Returns once the batch's state is stored; its forecasts are made and sent
                # while the next batch is fetched and stored (SalesProcessor.submit).
                await processor.submit(batch)
                health.recovered(PROCESSING)
                return True
            except Exception as exc:
                # Never skip a batch: its offsets must not be committed before its state is
                # stored. Our errors (Redis, broker, model) are expected to be transient; a
                # bug retries forever too, loudly, rather than silently losing sales.
                health.failing(PROCESSING, f"{type(exc).__name__}: {exc}")
                if app.should_stop:
                    return False  # uncommitted: re-delivered to whoever runs next
                if isinstance(exc, TrendcastError):
                    logger.error("batch of %d failed (%s); retrying in %.1fs", size, exc, backoff)
                else:
                    logger.exception(
                        "batch of %d failed unexpectedly; retrying in %.1fs", size, backoff
                    )
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, _MAX_BACKOFF_S)

    def committable() -> dict[TP, int]:
        return {TP(p.topic, p.partition): o for p, o in processor.take_committable().items()}

    async def handle_fetch(records: Mapping[Any, Sequence[Any]]) -> Mapping[TP, int] | None:
        batch = {PartitionId(tp.topic, tp.partition): recs for tp, recs in records.items()}
        telemetry.observe_batch(sum(len(recs) for recs in batch.values()))
        if not await process_with_retry(batch):
            return None
        return committable()

    async def prepare_fetch(records: Mapping[Any, Sequence[Any]]) -> None:
        # The same record lists handle_fetch passes on: parse_ahead finds them by identity.
        await processor.parse_ahead(
            {PartitionId(tp.topic, tp.partition): recs for tp, recs in records.items()}
        )

    async def flush_clocks() -> dict[TP, int]:
        try:
            await processor.flush()
        except TrendcastError as exc:  # a lagging stored clock is safe; say so and go on
            logger.warning("could not store partition clocks (%s); they lag until next time", exc)
        return committable()

    async def commit_processed() -> None:
        commit = getattr(app.consumer, "commit_processed", None)
        if commit is not None:
            await commit()
        else:  # not consuming (tests): still store the clocks
            await flush_clocks()

    # Clocks of delivered batches ride along with the next batch; when idle, store them and
    # commit what that allows every second.
    app.timer(interval=1.0)(commit_processed)

    @app.on_before_shutdown.connect
    async def on_shutdown(sender: Any, /, *args: Any, signal: Any, **kwargs: Any) -> None:
        await (
            flush_clocks()
        )  # the consumer already committed at stop (stream.worker.batch_consumer)
        if watcher is not None:
            try:
                await watcher.aclose()
            except Exception as exc:  # stopping anyway: say so, do not fail the stop
                logger.warning("could not close the bundle source (%s)", exc)

    # The sales topic is subscribed through the conductor, but no agent reads it: fetched
    # batches go straight to handle_fetch (see stream.worker.batch_consumer for why and what it
    # keeps).
    app.topics.add(sales)
    batch_consumer.install(
        app,
        handle_fetch,
        flush_clocks,
        fetch_timeout_s=settings.batch_timeout_s,
        fetch_max_wait_ms=settings.fetch_max_wait_ms,
        preparer=prepare_fetch,
    )

    @app.on_partitions_revoked.connect
    async def on_revoked(sender: Any, /, *args: Any, signal: Any, **kwargs: Any) -> None:
        revoked = args[0] if args else kwargs.get("revoked", set())
        # Let the batch in flight store its effects first, so partitions change hands
        # between batches (bounded: a stuck batch must not hold up the whole group), then
        # store the clocks and commit what they cover: the next owner starts there.
        wait_idle = getattr(app.consumer, "wait_idle", None)
        if wait_idle is not None:
            await wait_idle(settings.broker_session_timeout_s / 2)
        await commit_processed()
        processor.release(PartitionId(tp.topic, tp.partition) for tp in revoked)

    @app.on_partitions_assigned.connect
    async def on_assigned(sender: Any, /, *args: Any, signal: Any, **kwargs: Any) -> None:
        # Another worker may have advanced these clocks meanwhile: reload them lazily.
        assigned = args[0] if args else kwargs.get("assigned", set())
        processor.forget(PartitionId(tp.topic, tp.partition) for tp in assigned)
        forget_positions = getattr(app.consumer, "forget_positions", None)
        if forget_positions is not None:  # the recovery seeks to the committed offsets
            forget_positions()

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
        telemetry.refresh_consumer_lag(app)
        return web.bytes(
            generate_latest(telemetry.METRICS_REGISTRY), content_type=_METRICS_CONTENT_TYPE
        )

    readiness = telemetry.Readiness(
        {"redis": telemetry.store_probe(store), "broker": telemetry.broker_probe(app)},
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
            processor.swap_model(telemetry.InstrumentedForecaster(loaded.forecaster), loaded.model)
            telemetry.set_model_info(loaded.model, loaded.forecaster.name)
            readiness.set_details("bundle", {"model_version": loaded.model.model_version})

        async def reload_bundle() -> None:
            await watcher.poll(swap)

        app.timer(interval=settings.bundle_poll_s)(reload_bundle)
        app.trendcast_reload = reload_bundle  # type: ignore[attr-defined]  # for tests

    publish_to = publish or topic_sink.send
    instance = f"{socket.gethostname()}:{os.getpid()}".encode()

    async def publish_insights() -> None:
        # Accuracy and trends are derived data: a failed send is logged and the next
        # interval publishes the then-current figures; it never stops the worker.
        now_ms = int(time.time() * 1000)
        try:
            records = accuracy.drain_records(now_ms)
            if records:
                await publish_to(settings.accuracy_topic, [(k.encode(), v) for k, v in records])
            snapshot = trends.snapshot(settings.trends_top_k, now_ms)
            if snapshot is not None:
                await publish_to(settings.trends_topic, [(instance, snapshot)])
        except TrendcastError as exc:
            logger.warning("could not publish accuracy/trends (%s); next time", exc)

    if settings.publish_interval_s > 0:
        app.timer(interval=settings.publish_interval_s)(publish_insights)

    app.trendcast_publish = publish_insights  # type: ignore[attr-defined]  # for tests
    app.trendcast_accuracy = accuracy  # type: ignore[attr-defined]  # for tests/inspection
    app.trendcast_trends = trends  # type: ignore[attr-defined]  # for tests/inspection
    app.trendcast_processor = processor  # type: ignore[attr-defined]  # for tests/inspection
    app.trendcast_handle_fetch = handle_fetch  # type: ignore[attr-defined]  # for tests
    app.trendcast_prepare_fetch = prepare_fetch  # type: ignore[attr-defined]  # for tests
    app.trendcast_flush = flush_clocks  # type: ignore[attr-defined]  # for tests
    app.trendcast_health = health  # type: ignore[attr-defined]  # for tests/inspection
    return app
