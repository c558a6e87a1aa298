"""What the worker tells operators: Prometheus metrics, readiness checks, JSON log lines.

Every metric of the worker is defined here, on one registry — prometheus-client's process
default, so a metric another module defines on its own (``trendcast_healthy`` in
:mod:`stream.monitoring.health`) is still served by the same ``/metrics`` page. The worker's web
server
(Faust's, ``TRENDCAST_WEB_PORT``) serves:

* ``/metrics`` — the metrics below in Prometheus text format;
* ``/ready`` — 200 when Redis answers, the broker answers and a model bundle is loaded, else
  503; the JSON body names each check and why it failed (:class:`Readiness`).

Metrics (``{labels}``)::

    trendcast_events_in_total                     messages read from the sales topic
    trendcast_events_total{outcome}               valid / invalid / late / duplicate
    trendcast_dead_letters_total{reason}          dead-lettered messages by reason
    trendcast_late_by_ms                          how far late events were (histogram)
    trendcast_forecasts_total{kind}               forecast records sent: closed / late
    trendcast_predictions_total{source}           forecast rows by model / fallback
    trendcast_batch_size                          events per processed batch (histogram)
    trendcast_batch_seconds                       batch staged -> forecasts delivered (histogram)
    trendcast_inference_seconds                   one Forecaster.predict call (histogram)
    trendcast_inference_batch_size                windows per predict call (histogram)
    trendcast_redis_seconds{operation}            window store round trips (histogram)
    trendcast_consumer_lag{topic,partition}       high watermark - committed offset
    trendcast_watermark_ms{topic,partition}       event-time watermark
    trendcast_model_info{version,freq,...}        the serving bundle (always 1)
    trendcast_bundle_reload_failures_total        new bundles refused (see
    stream.lifecycle.hot_reload)

Consumer lag is refreshed when ``/metrics`` is scraped, from the Faust consumer's own view:
the high watermark carried by the last Fetch response (right on Tansu too, whose
ListOffsets under-reports, see :mod:`trendcast.devtools.tail`) minus the committed offset, which
Faust
reads from the broker on assignment and updates on every commit. Lag is what a crash would
re-process, so it is measured against the committed offset, not the read position.

>>> record = logging.LogRecord("stream.pipeline.processor", logging.WARNING, "f.py", 1,
...     "dead-lettering %s", ("x",), None)
>>> record.topic, record.partition, record.offset = "sales", 0, 41
>>> line = orjson.loads(JsonFormatter().format(record))
>>> line["level"], line["logger"], line["message"], line["topic"], line["offset"]
('WARNING', 'stream.pipeline.processor', 'dead-lettering x', 'sales', 41)
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, Literal

import orjson
from prometheus_client import REGISTRY, Counter, Gauge, Histogram, Info
from prometheus_client.registry import CollectorRegistry

from stream.inference.model_info import ModelInfo
from stream.state.base import (
    ApplyResult,
    ItemUpdate,
    ItemWindow,
    LatestForecast,
    PartitionId,
    PartitionState,
    PartitionUpdate,
    WindowStore,
)
from trendcast.forecasting.base import ForecastBatch, Forecaster, WindowBatch
from trendcast.freq import Freq

__all__ = [
    "BATCH_SECONDS",
    "BATCH_SIZE",
    "BUNDLE_RELOAD_FAILURES",
    "SHADOW_FAILURES",
    "CONSUMER_LAG",
    "DEAD_LETTERS",
    "EVENTS",
    "EVENTS_IN",
    "EVENT_OUTCOMES",
    "FORECASTS",
    "FORECAST_KINDS",
    "ALERTS",
    "ALERT_KINDS",
    "INFERENCE_BATCH_SIZE",
    "INFERENCE_SECONDS",
    "LATE_BY",
    "MODEL_INFO",
    "PREDICTIONS",
    "PREDICTION_SOURCES",
    "REDIS_OPERATIONS",
    "REBUILDING_PARTITIONS",
    "REBUILDS",
    "REDIS_SECONDS",
    "METRICS_REGISTRY",
    "WATERMARK",
    "InstrumentedForecaster",
    "Probe",
    "JsonFormatter",
    "Readiness",
    "TimedWindowStore",
    "logging_config",
    "broker_probe",
    "observe_batch",
    "refresh_consumer_lag",
    "set_model_info",
    "store_probe",
]

logger = logging.getLogger(__name__)

#: The one registry ``/metrics`` serves (the process default, see the module docstring).
METRICS_REGISTRY: CollectorRegistry = REGISTRY

EVENTS_IN = Counter("trendcast_events_in_total", "Messages read from the sales topic")
EVENTS = Counter("trendcast_events_total", "Sale messages by outcome", ["outcome"])
DEAD_LETTERS = Counter("trendcast_dead_letters_total", "Dead-lettered messages", ["reason"])
LATE_BY = Histogram(
    "trendcast_late_by_ms",
    "How far late events lay behind the watermark",
    buckets=(1e3, 6e4, 3.6e6, 8.64e7, 6.048e8, float("inf")),
)
FORECASTS = Counter("trendcast_forecasts_total", "Forecast records sent", ["kind"])
ALERTS = Counter("trendcast_alerts_total", "Surge and stall alerts sent", ["kind"])
PREDICTIONS = Counter(
    "trendcast_predictions_total",
    "Forecast rows produced, by the model or by its fallback (e.g. too short a history)",
    ["source"],
)
#: Batches are at most TRENDCAST_BATCH_SIZE (default 15,000); a worker keeping up takes less.
BATCH_SIZE = Histogram(
    "trendcast_batch_size",
    "Events per processed batch",
    buckets=(1, 10, 50, 100, 250, 500, 1000, 2500, 5000, 10_000, 15_000, 25_000, float("inf")),
)
BATCH_SECONDS = Histogram(
    "trendcast_batch_seconds",
    "Time from a batch's staging to its forecasts delivered (once per batch, retries included)",
)
INFERENCE_SECONDS = Histogram(
    "trendcast_inference_seconds",
    "Duration of one Forecaster.predict call",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, float("inf")),
)
INFERENCE_BATCH_SIZE = Histogram(
    "trendcast_inference_batch_size",
    "Windows per Forecaster.predict call",
    buckets=(1, 8, 32, 64, 128, 256, 512, 1024, float("inf")),
)
REDIS_SECONDS = Histogram(
    "trendcast_redis_seconds",
    "Duration of one window-store operation on Redis (a pipelined round trip)",
    ["operation"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, float("inf")),
)
CONSUMER_LAG = Gauge(
    "trendcast_consumer_lag",
    "Records behind: high watermark of the last fetch minus the committed offset",
    ["topic", "partition"],
)
WATERMARK = Gauge(
    "trendcast_watermark_ms", "Event-time watermark per source partition", ["topic", "partition"]
)
MODEL_INFO = Info("trendcast_model", "The model bundle the worker serves")
BUNDLE_RELOAD_FAILURES = Counter(
    "trendcast_bundle_reload_failures_total",
    "New bundles refused by hot reload (unverifiable or incompatible); the old one serves on",
)
REBUILDING_PARTITIONS = Gauge(
    "trendcast_rebuilding_partitions",
    "Source partitions whose lost window state is being rebuilt from the sales log",
)
REBUILDS = Counter(
    "trendcast_rebuilds_total",
    "Rebuilds of a partition's window state from the sales log (state lost in Redis)",
)
SHADOW_FAILURES = Counter(
    "trendcast_shadow_failures_total",
    "Micro-batches the shadow model failed on (live forecasts are unaffected)",
)

#: ``trendcast_events_total{outcome}``: every outcome of a sale message.
EVENT_OUTCOMES = ("valid", "invalid", "late", "duplicate")
#: ``trendcast_forecasts_total{kind}``: first forecasts at a bucket close, re-forecasts after
#: in-grace late events, refreshes of open buckets.
FORECAST_KINDS = ("closed", "late", "refresh")
#: ``trendcast_alerts_total{kind}``: surges and stalls of open buckets.
ALERT_KINDS = ("surge", "stall")
#: ``trendcast_predictions_total{source}``: rows from the model, rows from its fallback.
PREDICTION_SOURCES = ("model", "fallback")
#: ``trendcast_redis_seconds{operation}``: the timed window-store operations.
REDIS_OPERATIONS = (
    "apply",
    "read",
    "load_partition",
    "save_partition",
    "save_latest",
    "read_latest",
)

# Known label values start at 0, so dashboards and alerts see a series before the first
# event of its kind: an absent series makes `rate()` silently empty, not zero, and an
# alert on it never fires. tests/unit/deploy/test_metrics.py checks that every label value
# the code passes is one of these. The dead-letter reasons are the validator's vocabulary:
# they start at 0 where they are defined (stream.pipeline.events.REASONS), since monitoring
# may not import the pipeline above it.
for _metric, _values in (
    (EVENTS, EVENT_OUTCOMES),
    (FORECASTS, FORECAST_KINDS),
    (ALERTS, ALERT_KINDS),
    (PREDICTIONS, PREDICTION_SOURCES),
    (REDIS_SECONDS, REDIS_OPERATIONS),
):
    for _value in _values:
        _metric.labels(_value)


def observe_batch(size: int) -> None:
    """Count a batch taken from the sales topic (once, not once per retry)."""
    EVENTS_IN.inc(size)
    BATCH_SIZE.observe(size)


def set_model_info(model: ModelInfo, forecaster_name: str) -> None:
    """Publish which bundle is loaded (``trendcast_model_info``)."""
    MODEL_INFO.info(
        {
            "version": model.model_version,
            "forecaster": forecaster_name,
            "freq": model.freq.name,
            "window": str(model.window),
            "horizon": str(model.horizon),
        }
    )


class InstrumentedForecaster:
    """A forecaster that times each ``predict`` and counts model vs fallback rows.

    A wrapper rather than code in the processor, so every forecaster is measured the same
    way and the time is the call itself (it runs in a worker thread; prometheus-client is
    thread-safe). Rows of a batch that is retried are counted again, like every retry.
    """

    def __init__(self, inner: Forecaster) -> None:
        self.inner = inner

    @property
    def name(self) -> str:
        """The wrapped forecaster's name."""
        return self.inner.name

    @property
    def horizon(self) -> int:
        """The wrapped forecaster's horizon."""
        return self.inner.horizon

    def predict(self, batch: WindowBatch) -> ForecastBatch:
        """Forecast with the wrapped forecaster, recording duration and row sources."""
        started = time.perf_counter()
        result = self.inner.predict(batch)
        INFERENCE_SECONDS.observe(time.perf_counter() - started)
        n = len(result.fallback)
        fallback = int(result.fallback.sum())
        INFERENCE_BATCH_SIZE.observe(n)
        PREDICTIONS.labels("model").inc(n - fallback)
        PREDICTIONS.labels("fallback").inc(fallback)
        return result


class TimedWindowStore:
    """A window store whose every operation is recorded in ``trendcast_redis_seconds``.

    Failed operations are timed too: a Redis that times out is exactly what the histogram
    must show. Wrap only a store that is :attr:`~stream.state.base.WindowStore.remote` (the
    worker does): the histogram is of Redis round trips. ``ping`` is passed through, untimed
    (it is the health probe, not the work).
    """

    def __init__(self, inner: WindowStore) -> None:
        self.inner = inner

    @property
    def freq(self) -> Freq:
        """Bucket frequency of the wrapped store."""
        return self.inner.freq

    @property
    def remote(self) -> bool:
        """Whether the wrapped store is remote."""
        return self.inner.remote

    async def apply(
        self, items: Sequence[ItemUpdate], partitions: Sequence[PartitionUpdate]
    ) -> ApplyResult:
        """See :meth:`stream.state.base.WindowStore.apply`."""
        with REDIS_SECONDS.labels("apply").time():
            return await self.inner.apply(items, partitions)

    async def read(self, item_ids: Sequence[str]) -> dict[str, ItemWindow]:
        """See :meth:`stream.state.base.WindowStore.read`."""
        with REDIS_SECONDS.labels("read").time():
            return await self.inner.read(item_ids)

    async def load_partition(self, partition: PartitionId) -> PartitionState:
        """See :meth:`stream.state.base.WindowStore.load_partition`."""
        with REDIS_SECONDS.labels("load_partition").time():
            return await self.inner.load_partition(partition)

    async def save_partition(self, partition: PartitionId, state: PartitionState) -> None:
        """See :meth:`stream.state.base.WindowStore.save_partition`."""
        with REDIS_SECONDS.labels("save_partition").time():
            await self.inner.save_partition(partition, state)

    async def save_latest(self, forecasts: Sequence[LatestForecast], ttl_ms: int) -> int:
        """See :meth:`stream.state.base.WindowStore.save_latest`."""
        with REDIS_SECONDS.labels("save_latest").time():
            return await self.inner.save_latest(forecasts, ttl_ms)

    async def read_latest(self, item_ids: Sequence[str]) -> dict[str, bytes | None]:
        """See :meth:`stream.state.base.WindowStore.read_latest`."""
        with REDIS_SECONDS.labels("read_latest").time():
            return await self.inner.read_latest(item_ids)

    async def ping(self) -> None:
        """The wrapped store's ``ping``."""
        await self.inner.ping()

    async def aclose(self) -> None:
        """Release the wrapped store's connections."""
        await self.inner.aclose()

    def __getattr__(self, name: str) -> Any:
        # Anything beyond the WindowStore protocol (e.g. RedisWindowStore.memory_usage) is
        # the wrapped store's, untimed: the wrapper must never hide a capability.
        return getattr(self.inner, name)


def refresh_consumer_lag(app: Any) -> None:
    """Set ``trendcast_consumer_lag`` for the partitions assigned to ``app`` right now.

    Reads Faust internals (``_committed_offset``: committed offsets fetched on assignment
    and updated on commit) because Faust has no public accessor; any failure leaves the
    gauge empty rather than breaking ``/metrics``. Series of partitions no longer assigned
    are dropped, so a rebalance does not leave stale lag behind.
    """
    CONSUMER_LAG.clear()
    try:
        consumer = app.consumer
        assignment = consumer.assignment()
        committed: Mapping[Any, int | None] = getattr(consumer, "_committed_offset", {})
        read: Mapping[Any, int] = app.monitor.tp_read_offsets or {}
        for tp in assignment:
            high = consumer.highwater(tp)
            if high is None:
                continue  # nothing fetched yet
            done = committed.get(tp)
            if done is None and tp in read:
                done = read[tp] + 1  # never committed: at least what was read is known
            if done is None:
                continue
            CONSUMER_LAG.labels(tp.topic, str(tp.partition)).set(max(0, high - done))
    except Exception as exc:  # consumer not started yet, or Faust changed its internals
        logger.debug("consumer lag unavailable: %s", exc)


#: A readiness probe: returns (anything) when the dependency works, raises otherwise.
Probe = Callable[[], Awaitable[object]]


def store_probe(store: WindowStore) -> Probe:
    """Readiness probe of the window store: its ``ping`` (PING + script load on Redis; the
    in-memory store is always ready)."""
    return store.ping


def broker_probe(app: Any) -> Probe:
    """Readiness probe of Kafka: a metadata request on the Faust producer's connection.

    The producer's own client is reused so the probe goes through the same listeners,
    SASL and TLS as the records do, and opens no extra connection. It asks every known
    broker in turn and fails only when none answers. Reads ``app.producer._producer``
    (Faust has no public accessor for the aiokafka producer); a producer that has not
    started yet means "not ready".
    """

    async def probe() -> None:
        from trendcast.exceptions import BrokerError

        producer = getattr(app.producer, "_producer", None)
        if producer is None:
            raise BrokerError("Kafka producer not started yet")
        await producer.client.fetch_all_metadata()

    return probe


class Readiness:
    """Whether the worker can do its job now: every probe passes and nothing is failing.

    Probes run concurrently, each bounded by ``timeout_s`` (a hung Redis counts as down).
    The result is cached for ``cache_s`` so a burst of probes from several load balancers
    costs one round trip per dependency. Failures that the worker itself reported (an
    object with ``failures``, e.g. :class:`stream.monitoring.health.Health`) also make it not ready.

    Args:
        probes: Check name -> probe (e.g. ``{"redis": store.ping, "broker": ...}``).
        details: Check name -> extra facts shown when it passes (e.g. the model version).
        health: Source of reported failures (``.failures``: name -> object with ``reason``).
        timeout_s: Longest wait for one probe.
        cache_s: How long a result is reused.
        clock: Monotonic seconds (injectable for tests).
    """

    def __init__(
        self,
        probes: Mapping[str, Probe],
        *,
        details: Mapping[str, Mapping[str, Any]] | None = None,
        health: Any = None,
        timeout_s: float = 2.0,
        cache_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._probes = dict(probes)
        self._details = {k: dict(v) for k, v in (details or {}).items()}
        self._health = health
        self._timeout_s = timeout_s
        self._cache_s = cache_s
        self._clock = clock
        self._cached: tuple[float, bool, dict[str, Any]] | None = None
        self._lock = asyncio.Lock()

    async def _run(self, name: str, probe: Probe) -> dict[str, Any]:
        try:
            await asyncio.wait_for(probe(), timeout=self._timeout_s)
        except TimeoutError:
            return {"ok": False, "error": f"no answer within {self._timeout_s:g}s"}
        except Exception as exc:  # any failure means "not ready"; the reason is the body
            return {"ok": False, "error": " ".join(f"{type(exc).__name__}: {exc}".split())[:500]}
        return {"ok": True, **self._details.get(name, {})}

    def set_details(self, name: str, facts: Mapping[str, Any]) -> None:
        """Replace the facts shown for check ``name`` (e.g. the version after a reload)."""
        self._details[name] = dict(facts)
        self._cached = None

    async def check(self) -> tuple[bool, dict[str, Any]]:
        """``(ready, JSON-ready body)``; see the class docstring."""
        async with self._lock:
            now = self._clock()
            if self._cached is not None and now - self._cached[0] < self._cache_s:
                return self._cached[1], self._cached[2]
            names = list(self._probes)
            results = await asyncio.gather(*(self._run(n, self._probes[n]) for n in names))
            checks: dict[str, Any] = dict(zip(names, results, strict=True))
            for name, facts in self._details.items():
                checks.setdefault(name, {"ok": True, **facts})
            failing = getattr(self._health, "failures", None) or {}
            for name, failure in failing.items():
                checks.setdefault(name, {"ok": False, "error": getattr(failure, "reason", "")})
            ready = all(c["ok"] for c in checks.values())
            body = {"ready": ready, "checks": checks}
            self._cached = (now, ready, body)
            return ready, body


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ``ts``, ``level``, ``logger``, ``message`` and context.

    Context comes from ``extra=`` (``topic``, ``partition``, ``offset``, ``reason``…), so a
    log pipeline can filter on ``partition`` instead of parsing messages. Exceptions are
    kept as one string field, so a traceback never breaks the one-object-per-line contract.
    """

    #: ``extra`` keys copied into the object when a record carries them.
    CONTEXT: tuple[str, ...] = ("topic", "partition", "offset", "reason", "component", "item_id")

    def format(self, record: logging.LogRecord) -> str:
        """Render ``record`` as one line of JSON."""
        out: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, tz=UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key in self.CONTEXT:
            value = record.__dict__.get(key)
            if value is not None:
                out[key] = value
        if record.exc_info:
            out["exc_info"] = self.formatException(record.exc_info)
        elif record.exc_text:
            out["exc_info"] = record.exc_text
        return orjson.dumps(out, default=str).decode("utf-8")


def logging_config(
    log_format: Literal["text", "json"], level: str | int = "INFO"
) -> dict[str, Any] | None:
    """A :func:`logging.config.dictConfig` for the worker, or None for the default.

    None keeps mode's (Faust's) own colored text logging; ``json`` sends every record,
    Faust's and aiokafka's included, through :class:`JsonFormatter` to stdout.
    """
    if log_format == "text":
        return None
    if isinstance(level, str):
        level = level.upper()
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"json": {"()": f"{__name__}.JsonFormatter"}},
        "handlers": {
            "default": {
                "class": "logging.StreamHandler",
                "formatter": "json",
                "stream": "ext://sys.stdout",
                "level": level,
            }
        },
        "root": {"level": level, "handlers": ["default"]},
    }
