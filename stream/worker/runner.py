"""Plain functions behind ``trendcast worker`` and ``trendcast inspect`` (wired by typer).

Importing this module is cheap: Faust, Redis and ONNX Runtime are imported inside the
functions, so ``trendcast --help`` does not pay for them.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from stream.settings.worker import WorkerSettings
from stream.worker.gc_tuning import tune_gc
from trendcast.exceptions import StateStoreError
from trendcast.sync_bridge import run_sync

if TYPE_CHECKING:
    import faust

    from stream.inference.model_info import ModelInfo
    from stream.pipeline.processor import OnLate, Sink
    from stream.state.base import WindowStore
    from trendcast.bundle import Bundle
    from trendcast.forecasting.base import Forecaster

__all__ = ["build_worker_app", "inspect_items", "load_model", "model_info", "run_worker"]

logger = logging.getLogger(__name__)


def model_info(bundle: Bundle) -> ModelInfo:
    """What the worker needs from a bundle besides the forecaster."""
    from stream.lifecycle import hot_reload

    return hot_reload.model_info(bundle)


def load_model(settings: WorkerSettings) -> tuple[Forecaster, ModelInfo]:
    """Load and verify the live bundle (following the Redis key or ``current``) and open its
    ONNX model.

    Raises:
        BundleError: The bundle is missing, corrupt or inconsistent; the worker must not
            start on a model it cannot verify.
        StateStoreError: ``bundle_redis_key`` is set and Redis cannot be read.
    """
    from stream.lifecycle import hot_reload, live_pointer

    source = live_pointer.version_source(settings)
    loaded = hot_reload.load_model(
        live_pointer.resolve_now(settings.bundle, source), settings.onnx_threads or None
    )
    return loaded.forecaster, loaded.model


def _check_redis(
    url: str, fields_per_item: int, *, cluster: bool = False, **client_kwargs: Any
) -> None:
    """Fail fast when Redis is down; warn when item hashes would leave the compact encoding.

    Redis keeps a hash in a listpack (tens of bytes per bucket) only up to
    ``hash-max-listpack-entries`` fields; a larger window silently switches to a hash table
    several times bigger. On a cluster every primary is asked (items live on all of them) and
    the smallest limit counts. Wrong credentials get their own message naming the settings,
    and the URL is shown without its password.
    """
    from redis.cluster import RedisCluster
    from redis.exceptions import RedisClusterException, RedisError

    from stream.settings.redaction import redact_url
    from stream.state.redis_clients import CLIENT_ERRORS, sync_client

    try:
        # The cluster client connects here already, to discover the slots.
        client = sync_client(url, cluster=cluster, socket_connect_timeout=5, **client_kwargs)
    except CLIENT_ERRORS as exc:
        raise _redis_error(redact_url(url), exc) from exc
    try:
        client.ping()
        try:
            configs: list[Mapping[Any, Any]]
            if isinstance(client, RedisCluster):
                # Several nodes answer {node name: {parameter: value}}; redis-py unwraps a
                # single answer, so both shapes occur.
                raw: Mapping[Any, Any] = client.config_get(
                    "hash-max-listpack-entries", target_nodes=RedisCluster.PRIMARIES
                )
                configs = [v for v in raw.values() if isinstance(v, Mapping)] or [raw]
            else:
                configs = [client.config_get("hash-max-listpack-entries")]
            values = [v for config in configs for v in config.values() if v is not None]
            limit = min(int(v) for v in values) if values else None
        except (RedisError, RedisClusterException, ValueError):
            limit = None  # managed Redis often forbids CONFIG; not worth failing for
        if limit is not None and limit < fields_per_item:
            logger.warning(
                "Redis hash-max-listpack-entries is %d but items keep up to %d buckets: "
                "raise it (CONFIG SET hash-max-listpack-entries %d) or items take ~4x memory",
                limit,
                fields_per_item,
                fields_per_item,
            )
    except CLIENT_ERRORS as exc:
        raise _redis_error(redact_url(url), exc) from exc
    finally:
        client.close()


def _redis_error(shown_url: str, exc: Exception) -> StateStoreError:
    """A StateStoreError telling "refused our credentials" apart from "unreachable"."""
    from redis.exceptions import AuthenticationError, NoPermissionError, ResponseError

    text = str(exc)
    if isinstance(exc, AuthenticationError | NoPermissionError) or (
        isinstance(exc, ResponseError) and text.startswith(("NOAUTH", "WRONGPASS", "NOPERM"))
    ):
        return StateStoreError(
            f"Redis at {shown_url} refused the credentials ({text}); check the user and "
            "password in TRENDCAST_REDIS_URL or TRENDCAST_REDIS_USERNAME/TRENDCAST_REDIS_PASSWORD"
        )
    return StateStoreError(f"Redis at {shown_url} is unavailable: {text}")


def build_worker_app(
    settings: WorkerSettings,
    forecaster: Forecaster | None = None,
    model: ModelInfo | None = None,
    *,
    store: WindowStore | None = None,
    sink: Sink | None = None,
    on_late: OnLate | None = None,
) -> faust.App:
    """The Faust app for ``settings``: the bundle's model and a Redis store by default.

    Raises:
        BundleError: The bundle cannot be verified (when no forecaster is given).
        StateStoreError: Redis is unreachable (when no store is given, or the bundle's Redis
            key cannot be read).
    """
    from stream.lifecycle import hot_reload, live_pointer
    from stream.settings.security import redis_client_kwargs
    from stream.state.redis_clients import async_client
    from stream.state.redis_store import RedisWindowStore
    from stream.worker.app import create_app

    watcher: hot_reload.BundleWatcher | None = None
    if forecaster is None or model is None:
        # The Redis key (if configured) or ``current`` decides the first model as it decides
        # every later one; the same source object goes on to the watcher, so "key absent,
        # following current" is logged once, not once at start and again at the first poll.
        source = live_pointer.version_source(settings)
        threads = settings.onnx_threads or None
        loaded = hot_reload.load_model(live_pointer.resolve_now(settings.bundle, source), threads)
        forecaster, model = loaded.forecaster, loaded.model
        # Hot reload follows the bundle location the worker loaded from; a caller that
        # hands in its own forecaster owns the model.
        watcher = hot_reload.BundleWatcher(
            settings.bundle,
            loaded,
            source=source,
            loader=functools.partial(hot_reload.load_model, threads=threads),
        )
    if store is None:
        # Kept buckets: the window, the open ones (lateness) and the writable closed ones
        # (grace), a margin for the batch that closes buckets, and the first-sale field.
        client_kwargs = redis_client_kwargs(settings)
        _check_redis(
            settings.redis_url,
            model.window
            + math.ceil(settings.allowed_lateness_s * 1000 / model.freq.step_ms)
            + settings.grace_buckets
            + 4,
            cluster=settings.redis_cluster,
            **client_kwargs,
        )
        client = async_client(settings.redis_url, cluster=settings.redis_cluster, **client_kwargs)
        store = RedisWindowStore(client, model.freq, settings.state_prefix)
    shadow = None
    if settings.shadow_bundle is not None:
        # Verified like the live bundle; refused here (one line, no start) if it is broken
        # or if the live windows cannot feed it (checked by the processor).
        shadow_model = hot_reload.load_model(settings.shadow_bundle, settings.onnx_threads or None)
        shadow = (shadow_model.forecaster, shadow_model.model)
    return create_app(
        settings,
        forecaster,
        store,
        model,
        sink=sink,
        on_late=on_late,
        watcher=watcher,
        shadow=shadow,
    )


def run_worker(settings: WorkerSettings, *, loglevel: str = "info") -> None:
    """Run the worker until Ctrl-C or SIGTERM (Faust stops cleanly and commits acked offsets).

    Raises:
        BundleError: Missing, corrupt or mismatched bundle (checked before connecting).
        StateStoreError: Redis unreachable at start.
    """
    import faust

    from stream.monitoring import tracing
    from stream.monitoring.telemetry import logging_config

    app = build_worker_app(settings)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    tune_gc(settings.gc_threshold)
    tracing.configure(settings)  # off unless OTEL_TRACES_EXPORTER asks (docs/tracing.md)
    json_logs = settings.log_format == "json"
    worker = faust.Worker(
        app,
        loglevel=loglevel,
        redirect_stdouts=False,
        logging_config=logging_config(settings.log_format, loglevel),
        # The startup banner is a text table on stdout: it would break one-JSON-per-line.
        quiet=json_logs,
    )
    try:
        worker.execute_from_commandline()
    except SystemExit as exc:  # mode's worker always exits; a clean stop is a return for us
        if exc.code not in (None, 0):
            raise


async def _inspect(
    settings: WorkerSettings, item_ids: Sequence[str], freq_name: str
) -> list[dict[str, Any]]:
    from stream.inference.model_info import iso_utc
    from stream.settings.security import redis_client_kwargs
    from stream.state.redis_clients import async_client
    from stream.state.redis_store import RedisWindowStore
    from trendcast.freq import parse_freq

    freq = parse_freq(freq_name)
    client = async_client(
        settings.redis_url, cluster=settings.redis_cluster, **redis_client_kwargs(settings)
    )
    store = RedisWindowStore(client, freq, settings.state_prefix)
    try:
        windows = await store.read(list(item_ids))
    finally:
        await store.aclose()
    out = []
    for item_id in item_ids:
        w = windows[item_id]
        buckets = []
        if w.buckets:
            start = min(w.buckets)
            if w.first_ms is not None:
                start = max(start, w.first_ms)
            for b in range(start, max(w.buckets) + freq.step_ms, freq.step_ms):
                sums = w.buckets.get(b)
                buckets.append(
                    {"start": iso_utc(b), "quantity": max(sums.quantity, 0.0) if sums else 0.0}
                )
        out.append(
            {
                "item_id": item_id,
                "freq": freq.name,
                "first": None if w.first_ms is None else iso_utc(w.first_ms),
                "buckets": buckets,
            }
        )
    return out


def inspect_items(
    settings: WorkerSettings, item_ids: Sequence[str], *, freq: str | None = None
) -> Iterator[dict[str, Any]]:
    """The stored window of each item, for operators and checks.

    Yields one ``{"item_id", "freq", "first", "buckets": [{"start", "quantity"}]}`` per item:
    every kept bucket from the oldest kept to the latest with a sale, zeros included, net
    quantities clipped at zero as the model sees them (``first``: first sale ever seen;
    unknown items have no buckets).

    Args:
        settings: Worker settings (Redis URL and key prefix).
        item_ids: Items to show.
        freq: Bucket frequency; default: the live bundle's (``settings.bundle``, followed
            like the worker follows it).

    Raises:
        BundleError: ``freq`` not given and the bundle cannot be read.
        StateStoreError: Redis unreachable.
    """
    if freq is None:
        from stream.lifecycle.live_pointer import resolve_now, version_source
        from trendcast.bundle import load_bundle

        bundle = resolve_now(settings.bundle, version_source(settings))
        freq = load_bundle(bundle, check_model=False).meta.freq
    yield from run_sync(_inspect(settings, item_ids, freq))
