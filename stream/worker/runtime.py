"""What the worker does between Faust and the processor: one object, one method per hook.

:func:`stream.worker.app.create_app` builds the Faust app and connects its hooks (the fetch
handler of :mod:`stream.worker.batch_consumer`, timers, rebalance and shutdown signals, web
pages) to the methods of a :class:`WorkerRuntime`; everything the worker decides at those
hooks is here:

* a fetched batch goes to :meth:`~stream.pipeline.processor.SalesProcessor.submit` and is
  retried with backoff until it is stored, never skipped (:meth:`WorkerRuntime.handle_fetch`);
  only then are offsets whose partition clock is stored handed back for commit;
* partition clocks are stored, and what they cover committed, every second when idle, at a
  revoke (after the batch in flight) and at shutdown;
* failures of processing and of the state store (pinged every few seconds) are reported to
  one :class:`~stream.monitoring.health.Health` (``/health``, ``/ready``,
  ``trendcast_healthy``);
* accuracy and trends are published every ``publish_interval_s``; new model bundles are
  swapped in when the watcher finds one.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

import faust
from faust.types import TP
from prometheus_client import generate_latest

from stream.inference.model_info import ModelInfo
from stream.lifecycle.hot_reload import BundleWatcher, LoadedModel
from stream.monitoring import telemetry, tracing
from stream.monitoring.health import PROCESSING, STATE_STORE, Health
from stream.monitoring.online_accuracy import AccuracyTracker
from stream.monitoring.trends import TRENDS_KEY, GlobalTrends, TrendTracker
from stream.pipeline.processor import OnLate, Record, SalesProcessor, Sink
from stream.settings.security import KafkaSecurity
from stream.settings.worker import WorkerSettings
from stream.state.base import LatestForecast, PartitionId, WindowStore
from stream.state.candidates import candidate_store_for
from stream.worker.retention import check_retention, required_retention_ms
from trendcast.exceptions import TrendcastError
from trendcast.forecasting.base import Forecaster

__all__ = ["LatestForecastSink", "Publish", "WorkerRuntime"]

logger = logging.getLogger(__name__)

#: Longest pause between retries of a failing batch; long enough not to hammer a Redis that
#: is restarting, short enough that recovery is quick.
_MAX_BACKOFF_S = 10.0
#: A ping slower than this counts as a failure: a hung Redis is as bad as a dead one, and
#: redis-py retries a refused connection with backoff inside ``ping()``, which would hide a
#: short outage from the probe altogether.
_PROBE_TIMEOUT_S = 2.0

#: How often idle partitions' stored clocks are checked for a loss (one HGETALL each).
_VERIFY_IDLE_S = 5.0

#: Sends records to a named topic (accuracy, trends) and returns once they are delivered.
Publish = Callable[[str, Sequence[tuple[bytes | None, bytes]]], Awaitable[None]]


class LatestForecastSink:
    """A sink that, once forecasts are delivered, keeps each item's newest in the store.

    What ``GET /forecasts/{item_id}`` answers from: the store is shared, so any worker
    answers for any item. Wraps whatever sink the worker sends through (the topics, or a
    test's), so the lookup always shows what subscribers got, and is written only *after*
    delivery: a record never appears in a lookup before it is on the topic. A failed write
    fails the batch's delivery step like a failed send, and the batch is sent again
    (forecasts are at-least-once anyway), so the lookup never lags the topic silently.

    Args:
        inner: Where the records go.
        store: Where the latest records are kept (one round trip per call).
        ttl_ms: The items' window TTL (read at each call: the processor derives it).
    """

    def __init__(self, inner: Sink, store: WindowStore, ttl_ms: Callable[[], int]) -> None:
        self._inner = inner
        self._store = store
        self._ttl_ms = ttl_ms

    async def send_forecasts(self, records: Sequence[tuple[str, bytes]]) -> None:
        """Deliver, then keep the newest record of each item (see the class docstring)."""
        await self._inner.send_forecasts(records)
        if not records:
            return
        try:
            latest = [LatestForecast.of(item_id, value) for item_id, value in records]
        except ValueError:
            # Our own writer made these records: a bug, not bad input. The lookup must
            # never hold up the stream, so the well-formed ones are kept and it is logged.
            latest = []
            for item_id, value in records:
                try:
                    latest.append(LatestForecast.of(item_id, value))
                except ValueError as exc:
                    logger.error("not kept for lookups: forecast of %r (%s)", item_id, exc)
        await self._store.save_latest(latest, self._ttl_ms())

    async def send_dead_letters(self, records: Sequence[tuple[bytes | None, bytes]]) -> None:
        """Deliver dead letters (nothing is kept)."""
        await self._inner.send_dead_letters(records)

    async def send_alerts(self, records: Sequence[tuple[str, bytes]]) -> None:
        """Deliver alerts (nothing is kept)."""
        await self._inner.send_alerts(records)


def _partition_ids(records: Mapping[Any, Sequence[Any]]) -> dict[PartitionId, Sequence[Any]]:
    """Faust's topic partitions as ours (the processor never sees a Faust type)."""
    return {PartitionId(tp.topic, tp.partition): recs for tp, recs in records.items()}


class WorkerRuntime:
    """The worker's state and hook handlers; :func:`~stream.worker.app.create_app` wires them.

    Builds the processor and its observers (accuracy, trends) and the readiness checks; the
    Faust app is only asked what Faust alone knows (``should_stop``, the consumer).

    Args:
        app: The Faust app the hooks belong to.
        settings: Worker settings.
        forecaster: The model, already instrumented (:class:`telemetry.InstrumentedForecaster`).
        store: Window state, already timed if remote (:class:`telemetry.TimedWindowStore`).
        model: Freq, window, horizon and version of the forecaster's model.
        sink: Where forecasts and dead letters go.
        publish: Where accuracy and trends records go.
        health: Where failures are reported.
        on_late: Hook called for each late event.
        watcher: Follows the bundle location for hot reload (``None``: the model never
            changes).
        shadow: A second model scored on the live windows, never emitted.
    """

    def __init__(
        self,
        app: faust.App,
        settings: WorkerSettings,
        forecaster: Forecaster,
        store: WindowStore,
        model: ModelInfo,
        *,
        sink: Sink,
        publish: Publish,
        health: Health,
        on_late: OnLate | None = None,
        watcher: BundleWatcher | None = None,
        shadow: tuple[Forecaster, ModelInfo] | None = None,
    ) -> None:
        self.app = app
        self.settings = settings
        self.store = store
        self.health = health
        self.watcher = watcher
        self._publish = publish
        self.accuracy = AccuracyTracker(
            rolling_buckets=settings.accuracy_rolling_buckets,
            max_items=settings.accuracy_max_items,
        )
        self.trends = TrendTracker()
        # The processor derives the window TTL from the model, so it is read when needed.
        sink = LatestForecastSink(sink, store, lambda: self.processor.state_ttl_ms)
        self.processor = SalesProcessor(
            store,
            forecaster,
            model,
            sink,
            observers=[self.accuracy, self.trends],
            shadow=shadow,
            allowed_lateness_ms=int(settings.allowed_lateness_s * 1000),
            grace_buckets=settings.grace_buckets,
            live_window_ms=int(settings.live_window_s * 1000),
            catchup=settings.catchup,
            refresh_ms=int(settings.refresh_s * 1000),
            alert_probability=settings.alert_probability,
            # Stalls are looked for every refresh interval (a minute when refreshes are off).
            stall_every_ms=int((settings.refresh_s or 60.0) * 1000),
            inference_batch_size=settings.inference_batch_size,
            max_message_bytes=settings.max_message_bytes,
            max_future_ms=int(settings.max_future_s * 1000),
            state_ttl_ms=None if settings.state_ttl_s is None else settings.state_ttl_s * 1000,
            on_late=on_late,
        )
        self.readiness = telemetry.Readiness(
            {"redis": telemetry.store_probe(store), "broker": telemetry.broker_probe(app)},
            details={"bundle": {"model_version": model.model_version}},
            health=health,
            timeout_s=settings.ready_timeout_s,
        )
        self._retention_check: asyncio.Future[int | None] | None = None
        self._verified_at = 0.0  # when idle partitions' stored state was last checked
        # Partitions whose lost state is rebuilt from the log show in /health meanwhile.
        self.processor.recovery.on_change = self._rebuild_changed
        #: Names this worker's trends snapshots (one per worker process).
        self.instance = f"{socket.gethostname()}:{os.getpid()}".encode()

    # --- fetched batches ---------------------------------------------------------------

    async def handle_fetch(self, records: Mapping[Any, Sequence[Any]]) -> Mapping[TP, int] | None:
        """Process one fetch (per partition, its records) and say which offsets to commit.

        Called by :mod:`stream.worker.batch_consumer` with every fetch. Returns ``None``
        when the worker is stopping before the batch could be stored: nothing of it may be
        committed, and whoever runs next gets it again.

        With tracing on, the batch's span starts here (linked to its events' ``traceparent``
        headers) and goes with the batch to the processor, which ends it once the batch's
        outputs are delivered (:mod:`stream.monitoring.tracing`).
        """
        if self._retention_check is None:  # once, when the broker is surely reachable
            self._retention_check = asyncio.ensure_future(self._check_retention())
        batch = _partition_ids(records)
        telemetry.observe_batch(sum(len(recs) for recs in batch.values()))
        with tracing.handing_over(tracing.start_batch(batch)):
            if not await self._process_with_retry(batch):
                return None
        return self._committable()

    async def prepare_fetch(self, records: Mapping[Any, Sequence[Any]]) -> None:
        """Parse the next fetch while the current one is processed.

        Gets the same record lists :meth:`handle_fetch` is given next:
        :meth:`~stream.pipeline.processor.SalesProcessor.parse_ahead` finds them by identity.
        """
        await self.processor.parse_ahead(_partition_ids(records))

    async def _process_with_retry(self, batch: Mapping[PartitionId, Sequence[Record]]) -> bool:
        """Submit ``batch`` until it is stored (True) or the worker stops (False).

        Never skips a batch: its offsets must not be committed before its state is stored.
        Our errors (Redis, broker, model) are expected to be transient; a bug retries
        forever too, loudly, rather than silently losing sales.
        """
        backoff = 0.2
        size = sum(len(records) for records in batch.values())
        batch = dict(batch)  # one object for every retry (a failed batch is known by it)
        while True:
            try:
                await self._check_assigned(batch)
                # Returns once the batch's state is stored; its forecasts are made and sent
                # while the next batch is fetched and stored (SalesProcessor.submit).
                await self.processor.submit(batch)
                self.health.recovered(PROCESSING)
                await self._rewind()
                return True
            except Exception as exc:
                self.health.failing(PROCESSING, f"{type(exc).__name__}: {exc}")
                if self.app.should_stop:
                    return False  # uncommitted: re-delivered to whoever runs next
                if isinstance(exc, TrendcastError):
                    logger.error("batch of %d failed (%s); retrying in %.1fs", size, exc, backoff)
                else:
                    logger.exception(
                        "batch of %d failed unexpectedly; retrying in %.1fs", size, backoff
                    )
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, _MAX_BACKOFF_S)

    async def _check_assigned(self, batch: dict[PartitionId, Sequence[Record]]) -> None:
        """Start rebuilding newly assigned partitions whose stored state is lost.

        Lost means: a stored clock missing or behind the group's committed offset (see
        :meth:`~stream.pipeline.recovery.Recovery.check_assigned`). Their records are taken
        out of the batch: they are read again in the replay (:meth:`_rewind`). The oldest
        record timestamp of the batch goes with them: with no clock left, it is the best
        known bound of the partition's newest event time (records are stamped by their
        producers, after the events they carry).
        """
        recovery = self.processor.recovery
        committed: Mapping[TP, int | None] = getattr(self.app.consumer, "_committed_offset", {})
        for pid, records in list(batch.items()):
            offset = committed.get(TP(pid.topic, pid.partition))
            if await recovery.check_assigned(pid, offset, _oldest_timestamp(records)):
                del batch[pid]

    async def _rewind(self) -> None:
        """Seek the partitions whose state is lost back to where their replay starts.

        By time when the recovery knows one (the broker's ListOffsets, checked by the
        consumer and again by the recovery), else to the start of the log.
        """
        recovery = self.processor.recovery
        rewinds = recovery.take_rewinds()
        rewind = getattr(self.app.consumer, "rewind", None)
        for pid, where in rewinds.items():
            if rewind is None:  # not consuming (tests): nothing to seek
                continue
            try:
                start, log_start = await rewind(
                    TP(pid.topic, pid.partition), where.from_ms, where.reached_offset
                )
            except Exception as exc:  # revoked meanwhile: the next owner rebuilds it
                logger.warning("could not seek %s[%d] back (%s)", pid.topic, pid.partition, exc)
                continue
            recovery.rewound(pid, start, log_start)

    async def _check_retention(self) -> int | None:
        """Say in the log whether the sales topic keeps enough to rebuild lost state."""
        settings = self.settings
        recovery = self.processor.recovery
        return await check_retention(
            settings.kafka_brokers,
            settings.sales_topic,
            required_retention_ms(recovery.window_buckets, self.processor.model.freq.step_ms),
            KafkaSecurity.from_settings(settings).aiokafka_kwargs(),
        )

    def _rebuild_changed(self, pid: PartitionId, detail: dict[str, Any] | None) -> None:
        self.health.notice(f"rebuilding {pid.topic}[{pid.partition}]", detail)

    async def advance_idle(self, partitions: Sequence[TP]) -> None:
        """Let the caught-up partitions' clocks follow the wall clock (closes on time).

        Called by :mod:`stream.worker.batch_consumer` between batches with the partitions
        that have nothing left to read; see
        :meth:`~stream.pipeline.processor.SalesProcessor.advance` for which of them move.
        A failure is reported like a batch's and tried again at the next interval.
        """
        try:
            await self._verify_idle(partitions)
            await self.processor.advance(_partition_list(partitions))
        except Exception as exc:
            self.health.failing(PROCESSING, f"{type(exc).__name__}: {exc}")
            raise
        self.health.recovered(PROCESSING)

    async def _verify_idle(self, partitions: Sequence[TP]) -> None:
        """Every few seconds, check that idle partitions' state is still stored.

        An idle partition makes no round trip that would notice a loss; one found lost is
        read again (:meth:`_rewind`) like any other.
        """
        now = time.monotonic()
        if now - self._verified_at < _VERIFY_IDLE_S:
            return
        self._verified_at = now
        if await self.processor.recovery.verify(_partition_list(partitions)):
            await self._rewind()

    def _committable(self) -> dict[TP, int]:
        return {TP(p.topic, p.partition): o for p, o in self.processor.take_committable().items()}

    # --- clocks and commits ------------------------------------------------------------

    async def flush_clocks(self) -> dict[TP, int]:
        """Store the partition clocks of delivered batches; the offsets that makes committable.

        A clock that cannot be stored is only logged: a lagging stored clock is safe (the
        next owner re-emits, never skips), and the next flush stores it.
        """
        try:
            await self.processor.flush()
        except TrendcastError as exc:
            logger.warning("could not store partition clocks (%s); they lag until next time", exc)
        await self._rewind()  # a flush may find a partition's state lost
        return self._committable()

    async def commit_processed(self) -> None:
        """Store the clocks and commit what they allow (every second, and at a revoke).

        Clocks of delivered batches ride along with the next batch; this stores them when
        the worker is idle.
        """
        commit = getattr(self.app.consumer, "commit_processed", None)
        if commit is not None:
            await commit()
        else:  # not consuming (tests): still store the clocks
            await self.flush_clocks()

    # --- Faust signals -----------------------------------------------------------------

    async def on_shutdown(self, sender: Any, /, *args: Any, signal: Any, **kwargs: Any) -> None:
        """Before the app stops: store the clocks and close the bundle source.

        The consumer already committed at stop (:mod:`stream.worker.batch_consumer`).
        """
        await self.flush_clocks()
        if self.watcher is not None:
            try:
                await self.watcher.aclose()
            except Exception as exc:  # stopping anyway: say so, do not fail the stop
                logger.warning("could not close the bundle source (%s)", exc)

    async def on_revoked(self, sender: Any, /, *args: Any, signal: Any, **kwargs: Any) -> None:
        """Hand partitions over between batches, with their clocks stored and committed.

        Lets the batch in flight store its effects first (bounded: a stuck batch must not
        hold up the whole group), then stores the clocks and commits what they cover: the
        next owner starts there.
        """
        revoked = args[0] if args else kwargs.get("revoked", set())
        wait_idle = getattr(self.app.consumer, "wait_idle", None)
        if wait_idle is not None:
            await wait_idle(self.settings.broker_session_timeout_s / 2)
        await self.commit_processed()
        self.processor.release(PartitionId(tp.topic, tp.partition) for tp in revoked)

    async def on_assigned(self, sender: Any, /, *args: Any, signal: Any, **kwargs: Any) -> None:
        """Forget cached clocks of newly assigned partitions (reloaded lazily).

        Another worker may have advanced them meanwhile.
        """
        assigned = args[0] if args else kwargs.get("assigned", set())
        self.processor.forget(PartitionId(tp.topic, tp.partition) for tp in assigned)
        forget_positions = getattr(self.app.consumer, "forget_positions", None)
        if forget_positions is not None:  # the recovery seeks to the committed offsets
            forget_positions()

    # --- health, readiness, metrics (the web pages render these) -----------------------

    async def probe_state_store(self) -> None:
        """Ping the state store and report it failing or recovered (``/health``).

        Run by a timer, so that an idle worker reports an outage too, and a failing one sees
        its end before the next retry of its batch.
        """
        try:
            await asyncio.wait_for(self.store.ping(), timeout=_PROBE_TIMEOUT_S)
        except (TrendcastError, TimeoutError) as exc:
            self.health.failing(STATE_STORE, f"{type(exc).__name__}: {exc}")
        else:
            self.health.recovered(STATE_STORE)

    def metrics_text(self) -> bytes:
        """Every metric in Prometheus text format (``/metrics``), consumer lag refreshed."""
        telemetry.refresh_consumer_lag(self.app)
        return generate_latest(telemetry.METRICS_REGISTRY)

    async def readiness_report(self) -> tuple[int, dict[str, Any]]:
        """``/ready``: 200 when Redis, the broker and a bundle are fine, else 503; the body
        names each check and why it failed."""
        ready, body = await self.readiness.check()
        return 200 if ready else 503, body

    def health_report(self) -> tuple[int, dict[str, Any]]:
        """``/health``: 503 while a component fails, so that a load balancer or orchestrator
        can act on it without parsing the body."""
        return 200 if self.health.healthy else 503, self.health.snapshot()

    async def latest_forecasts(self, item_ids: Sequence[str]) -> dict[str, bytes | None]:
        """``/forecasts``: each item's latest forecast record, as sent (``None``: none).

        Raises:
            StateStoreError: The store failed.
        """
        return await self.store.read_latest(item_ids)

    # --- timers: hot reload, insights --------------------------------------------------

    async def reload_bundle(self) -> None:
        """Ask the watcher for a new bundle and swap it in (every ``bundle_poll_s``)."""
        if self.watcher is not None:
            await self.watcher.poll(self._swap)

    def _swap(self, loaded: LoadedModel) -> None:
        # Raises BundleError for a model the stored windows cannot feed: the watcher counts
        # and logs the refusal, and nothing below runs.
        self.processor.swap_model(telemetry.InstrumentedForecaster(loaded.forecaster), loaded.model)
        telemetry.set_model_info(loaded.model, loaded.forecaster.name)
        self.readiness.set_details("bundle", {"model_version": loaded.model.model_version})

    #: The one trends ranking of all workers (made at the first publish: see below).
    _global_trends: GlobalTrends | None = None

    async def publish_insights(self) -> None:
        """Publish accuracy records and the trends ranking of all workers.

        Trends: this worker's candidates go to the candidate store beside the windows (the
        same Redis and prefix), and the worker holding its lease publishes the merged ranking
        of every worker as one record keyed ``global`` (:class:`GlobalTrends`).

        Accuracy and trends are derived data: a failed send is logged and the next interval
        publishes the then-current figures; it never stops the worker.
        """
        settings = self.settings
        now_ms = int(time.time() * 1000)
        if self._global_trends is None:
            self._global_trends = GlobalTrends(
                self.trends,
                candidate_store_for(self.store),
                # One name per runtime, also for several in one process (tests, benches).
                worker=f"{self.instance.decode()}:{id(self):x}",
                top_k=settings.trends_top_k,
                # Three intervals: one slow publish neither drops a worker's candidates nor
                # hands the lease over; a dead worker's vanish within half a minute.
                ttl_ms=max(3_000 * int(settings.publish_interval_s), 30_000),
            )
        try:
            records = self.accuracy.drain_records(now_ms)
            if records:
                await self._publish(settings.accuracy_topic, [(k.encode(), v) for k, v in records])
            ranking = await self._global_trends.publish(now_ms, _assigned(self.app, settings))
            if ranking is not None:
                await self._publish(settings.trends_topic, [(TRENDS_KEY, ranking)])
        except TrendcastError as exc:
            logger.warning("could not publish accuracy/trends (%s); next time", exc)


def _assigned(app: faust.App, settings: WorkerSettings) -> frozenset[int] | None:
    """The sales partitions this worker consumes now; None before the consumer runs."""
    try:
        assignment = app.consumer.assignment()
    except Exception:  # not started (tests, the first seconds): handovers are not tracked
        return None
    return frozenset(tp.partition for tp in assignment if tp.topic == settings.sales_topic)


def _oldest_timestamp(records: Sequence[Any]) -> int | None:
    """The oldest producer timestamp of ``records`` (``None``: none carries one)."""
    stamps = [t for r in records if isinstance(t := getattr(r, "timestamp", None), int) and t >= 0]
    return min(stamps, default=None)


def _partition_list(partitions: Sequence[TP]) -> list[PartitionId]:
    return [PartitionId(tp.topic, tp.partition) for tp in partitions]
