"""The worker commands: ``worker``, ``inspect`` and ``promote`` (settings from ``TRENDCAST_*``).

Faust, Redis and ONNX Runtime are imported inside the commands, so ``trendcast --help`` stays
instant.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from pydantic import ValidationError

from trendcast.cli.options import worker_settings
from trendcast.exceptions import ConfigError

if TYPE_CHECKING:
    from stream.settings.worker import WorkerSettings

__all__ = ["inspect", "promote", "worker"]

logger = logging.getLogger(__name__)


def worker(
    loglevel: Annotated[str, typer.Option(help="Faust log level.")] = "info",
) -> None:
    """Run the stream worker (settings from TRENDCAST_* environment variables).

    Example: TRENDCAST_KAFKA_BROKERS=kafka://localhost:9092 TRENDCAST_BUNDLE=artifacts/bundle
    trendcast worker
    """
    from stream.worker.runner import run_worker

    run_worker(worker_settings(), loglevel=loglevel)


def inspect(
    item_ids: Annotated[list[str], typer.Argument(help="Item ids to show.")],
    freq: Annotated[str | None, typer.Option(help="Bucket size (default: the bundle's).")] = None,
) -> None:
    """Print each item's window from Redis as one JSON object per line.

    Example: trendcast inspect 85123A 22423
    """
    import orjson

    from stream.worker.runner import inspect_items

    for record in inspect_items(worker_settings(), item_ids, freq=freq):
        typer.echo(orjson.dumps(record).decode())


def promote(
    version: Annotated[
        str,
        typer.Argument(metavar="VERSION", help="Bundle under --bundles to make live, e.g. v3."),
    ],
    bundles: Annotated[
        Path,
        typer.Option(
            "--bundles", metavar="DIR", help="Directory of bundles (workers' TRENDCAST_BUNDLE)."
        ),
    ],
    redis_url: Annotated[
        str | None,
        typer.Option(
            "--redis-url",
            help="Redis holding --key (default: TRENDCAST_REDIS_URL; credentials, TLS and "
            "cluster mode from the TRENDCAST_REDIS_* settings).",
        ),
    ] = None,
    key: Annotated[
        str | None,
        typer.Option(
            "--key",
            help="Set this Redis key (the workers' TRENDCAST_BUNDLE_REDIS_KEY) instead of "
            "writing DIR/current.",
        ),
    ] = None,
) -> None:
    """Verify the bundle DIR/VERSION, then make it live (DIR/current or a Redis key).

    Workers switch at their next poll; roll back by promoting the previous version.

    Example: trendcast promote v3 --bundles /bundles --key trendcast:bundle:current
    """
    from stream.lifecycle.live_pointer import CURRENT_FILE, PointerFile, RedisKey
    from stream.lifecycle.live_pointer import promote as promote_bundle
    from stream.settings.redaction import redact_url
    from trendcast.sync_bridge import run_sync

    if key is None and redis_url is not None:
        raise ConfigError("--redis-url: expected --key with it, got none")
    if key is not None and not key.strip():
        raise ConfigError(f"--key: expected a Redis key name, got {key!r}")
    settings = _promote_settings(redis_url) if key is not None else None

    async def run() -> str:
        if key is None or settings is None:
            return (await promote_bundle(bundles, version, PointerFile(bundles))).meta.model_version
        target = RedisKey.from_settings(settings, key)
        try:
            return (await promote_bundle(bundles, version, target)).meta.model_version
        finally:
            await target.aclose()

    model_version = run_sync(run())
    where = (
        str(bundles / CURRENT_FILE)
        if settings is None
        else f"Redis key {key!r} at {redact_url(settings.redis_url)}"
    )
    typer.echo(f"promoted {version} (model {model_version}): {where} now names it")


def _promote_settings(redis_url: str | None) -> WorkerSettings:
    """The Redis settings ``promote --key`` writes with; a bad ``--redis-url`` names the flag."""
    from stream.settings.worker import WorkerSettings

    try:
        return WorkerSettings(redis_url=redis_url) if redis_url else WorkerSettings()
    except ValidationError as exc:
        first = exc.errors()[0]
        name = str(first["loc"][0]) if first["loc"] else "redis_url"
        flag = "--redis-url" if redis_url is not None and name == "redis_url" else name
        raise ConfigError(f"{flag}: {first['msg']}") from exc
