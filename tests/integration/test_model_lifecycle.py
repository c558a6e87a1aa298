"""The live bundle named by a Redis key: deploy, refusal, rollback, outage, start-up, promote.

Everything runs against the real Redis of the session (tests/services.py) with hand-built,
TensorFlow-free bundles; an outage is a client pointed at a closed port.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
from pathlib import Path

import pytest
import redis
import redis.asyncio as aioredis
from rich.console import Console
from typer.testing import CliRunner

from stream.lifecycle.hot_reload import BundleWatcher, LoadedModel
from stream.lifecycle.hot_reload import load_model as load_bundle_model
from stream.lifecycle.live_pointer import PointerFile, RedisKey, write_pointer
from stream.settings.worker import WorkerSettings
from stream.state.memory import MemoryWindowStore
from stream.worker.runner import build_worker_app, load_model
from trendcast.cli import app
from trendcast.devtools.embedded import free_port
from trendcast.devtools.up import live_bundle, run_up
from trendcast.exceptions import BundleError, StateStoreError
from trendcast.testkit.bundles import make_fake_bundle
from trendcast.testkit.cli import assert_one_line_error, run_cli
from trendcast.testkit.doubles import FREQ, ListSink, bundle_reload_failures
from trendcast.testkit.kafka import delete_topics

pytestmark = pytest.mark.integration

WINDOW = 7


@pytest.fixture
def bundles(tmp_path: Path) -> Path:
    location = tmp_path / "bundles"
    # Different horizons give different ONNX files, hence different model versions.
    for name, horizon in [("v1", 3), ("v2", 4), ("v3", 5)]:
        make_fake_bundle(location / name, window=WINDOW, horizon=horizon)
    write_pointer(location, "v1")
    return location


@pytest.fixture
def key(redis_prefix: str) -> str:
    return f"{redis_prefix}:bundle:current"


def _version(bundles: Path, name: str) -> str:
    return load_bundle_model(bundles / name).model.model_version


class Served:
    """A watcher following ``source`` and the model its swaps installed."""

    def __init__(self, bundles: Path, source: RedisKey, first: str) -> None:
        self.source = source
        self.model = load_bundle_model(bundles / first)
        self.watcher = BundleWatcher(bundles, self.model, source=source)

    def swap(self, loaded: LoadedModel) -> None:
        self.model = loaded

    async def poll(self) -> bool:
        return await self.watcher.poll(self.swap)


def _source(url: str, key: str, bundles: Path | None = None) -> RedisKey:
    fallback = PointerFile(bundles) if bundles is not None else None
    return RedisKey(lambda: aioredis.Redis.from_url(url), key, fallback=fallback)


# --- the source --------------------------------------------------------------------------------


def test_the_key_names_the_live_bundle_and_the_file_decides_while_it_is_absent(
    bundles: Path, key: str, redis_url: str, redis_client: redis.Redis,
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    source = _source(redis_url, key, bundles)

    async def run() -> list[str | None]:
        try:
            seen = [await source.current(), await source.current()]
            redis_client.set(key, "v2")
            seen.append(await source.current())
            redis_client.set(key, "/etc")
            with pytest.raises(BundleError, match="expected one line naming a bundle"):
                await source.current()
            return seen
        finally:
            await source.aclose()

    with caplog.at_level(logging.WARNING, logger="stream.lifecycle.live_pointer"):
        assert asyncio.run(run()) == ["v1", "v1", "v2"]
    [line] = [r.getMessage() for r in caplog.records]  # said once, not at every poll
    assert f"Redis key {key!r} is not set" in line and str(bundles / "current") in line


# --- the watcher -------------------------------------------------------------------------------


def test_changing_the_key_deploys_and_pointing_it_back_rolls_back(
    bundles: Path, key: str, redis_url: str, redis_client: redis.Redis
) -> None:
    redis_client.set(key, "v1")
    served = Served(bundles, _source(redis_url, key, bundles), "v1")
    v1, v2 = _version(bundles, "v1"), _version(bundles, "v2")

    async def run() -> None:
        try:
            assert not await served.poll()  # nothing changed
            redis_client.set(key, "v2")
            assert await served.poll()
            assert served.model.model.model_version == v2
            assert not await served.poll()  # swapped once, not at every poll
            redis_client.set(key, "v1")  # rollback
            assert await served.poll()
            assert served.model.model.model_version == v1
        finally:
            await served.source.aclose()

    asyncio.run(run())


@pytest.mark.parametrize(("name", "reason"), [("v9", "not found"), ("v3", "checksum")])
def test_a_key_naming_a_missing_or_corrupt_bundle_is_refused_and_the_old_keeps_serving(
    bundles: Path, key: str, redis_url: str, redis_client: redis.Redis, name: str, reason: str,
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    with (bundles / "v3" / "model.onnx").open("ab") as f:
        f.write(b"tampered")
    redis_client.set(key, "v1")
    served = Served(bundles, _source(redis_url, key, bundles), "v1")
    v1 = served.model.model.model_version
    before = bundle_reload_failures()

    async def run() -> None:
        try:
            redis_client.set(key, name)
            assert not await served.poll()
            assert not await served.poll()  # the same bad name: not counted again
            redis_client.set(key, "v2")  # fixing the key recovers without a restart
            assert await served.poll()
        finally:
            await served.source.aclose()

    with caplog.at_level(logging.ERROR, logger="stream.lifecycle.hot_reload"):
        asyncio.run(run())
    assert bundle_reload_failures() == before + 1
    [line] = [r.getMessage() for r in caplog.records]
    assert f"refused, still serving {v1}" in line and reason in line
    assert served.model.model.model_version == _version(bundles, "v2")


def test_a_redis_outage_during_a_poll_swaps_nothing_and_is_logged_once(
    bundles: Path, key: str, redis_url: str, redis_client: redis.Redis,
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    urls = [f"redis://127.0.0.1:{free_port()}/0"]  # nothing listens there
    source = RedisKey(lambda: aioredis.Redis.from_url(urls[0]), key)
    served = Served(bundles, source, "v1")
    v1 = served.model.model.model_version
    redis_client.set(key, "v2")
    before = bundle_reload_failures()

    async def run() -> None:
        try:
            assert not await served.poll()
            assert not await served.poll()
            assert served.model.model.model_version == v1
            urls[0] = redis_url  # Redis is back: the next client reaches it
            await source.aclose()
            assert await served.poll()
        finally:
            await source.aclose()

    with caplog.at_level(logging.INFO, logger="stream.lifecycle.hot_reload"):
        asyncio.run(run())
    assert bundle_reload_failures() == before  # an outage is not a refused bundle
    messages = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(messages) == 1
    assert f"still serving {v1}" in messages[0] and "cannot read the Redis key" in messages[0]
    assert "readable again" in caplog.text
    assert served.model.model.model_version == _version(bundles, "v2")


# --- start-up ----------------------------------------------------------------------------------


def test_the_key_decides_the_first_model_and_the_worker_follows_it(
    bundles: Path, key: str, redis_url: str, redis_client: redis.Redis, tmp_path: Path
) -> None:
    redis_client.set(key, "v2")  # while `current` names v1
    settings = WorkerSettings(
        bundle=bundles, bundle_redis_key=key, redis_url=redis_url, web_enabled=False,
        data_dir=tmp_path / "d",
    )  # fmt: skip
    v1, v2 = _version(bundles, "v1"), _version(bundles, "v2")
    assert load_model(settings)[1].model_version == v2
    worker = build_worker_app(settings, store=MemoryWindowStore(FREQ), sink=ListSink())
    assert worker.trendcast_processor.model.model_version == v2
    redis_client.set(key, "v1")
    asyncio.run(worker.trendcast_reload())
    assert worker.trendcast_processor.model.model_version == v1

    down = settings.model_copy(update={"redis_url": f"redis://127.0.0.1:{free_port()}/0"})
    with pytest.raises(StateStoreError, match="cannot read the Redis key"):
        load_model(down)


# --- promote -----------------------------------------------------------------------------------


def test_promote_sets_the_key_after_verifying_the_bundle(
    bundles: Path, key: str, redis_url: str, redis_client: redis.Redis,
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    result = CliRunner().invoke(
        app, ["promote", "v2", "--bundles", str(bundles), "--redis-url", redis_url, "--key", key]
    )
    assert result.exit_code == 0, result.output
    assert f"Redis key {key!r}" in result.output
    assert redis_client.get(key) == b"v2"
    assert (bundles / "current").read_text() == "v1\n"  # the file is left alone

    # The URL and credentials default to the worker's settings.
    monkeypatch.setenv("TRENDCAST_REDIS_URL", redis_url)
    result = CliRunner().invoke(app, ["promote", "v1", "--bundles", str(bundles), "--key", key])
    assert result.exit_code == 0, result.output
    assert redis_client.get(key) == b"v1"

    with (bundles / "v3" / "model.onnx").open("ab") as f:
        f.write(b"tampered")
    code, _, err = run_cli(["promote", "v3", "--bundles", str(bundles), "--key", key],
                           monkeypatch, capsys)  # fmt: skip
    assert code == 1
    assert_one_line_error(err, "checksum mismatch")
    assert redis_client.get(key) == b"v1"


# --- trendcast up ------------------------------------------------------------------------------


def test_up_follows_the_key_or_current_of_a_directory_of_bundles(
    bundles: Path, key: str, redis_url: str, redis_client: redis.Redis
) -> None:
    settings = WorkerSettings(bundle=bundles, redis_url=redis_url)
    assert live_bundle(settings) == (bundles / "v1").resolve()
    with_key = settings.model_copy(update={"bundle_redis_key": key})
    assert live_bundle(with_key) == (bundles / "v1").resolve()  # key absent: the file
    redis_client.set(key, "v2")
    assert live_bundle(with_key) == (bundles / "v2").resolve()


def test_up_serves_the_live_bundle_of_a_directory_of_bundles(
    bundles: Path, key: str, redis_url: str, redis_client: redis.Redis, redis_prefix: str,
    kafka_bootstrap: str, tmp_path: Path,
) -> None:  # fmt: skip
    redis_client.set(key, "v2")
    env_file = tmp_path / "env"
    # A stand-in worker that records the bundle settings it was given and waits.
    command = [
        sys.executable, "-c",
        "import os, time\n"
        f"open({str(env_file)!r}, 'w').write(os.environ['TRENDCAST_BUNDLE'] + '|' + "
        "os.environ['TRENDCAST_BUNDLE_REDIS_KEY'])\n"
        "time.sleep(60)",
    ]  # fmt: skip
    settings = WorkerSettings(
        bundle=bundles, bundle_redis_key=key, redis_url=redis_url, state_prefix=redis_prefix,
        kafka_brokers=f"kafka://{kafka_bootstrap}", sales_topic=f"{redis_prefix}-sales",
        dlq_topic=f"{redis_prefix}-dlq", forecasts_topic=f"{redis_prefix}-forecasts",
    )  # fmt: skip
    try:
        report = run_up(
            settings, train_bundle=None, speed=None, live_weeks=1, warmup_weeks=0,
            max_seconds=1.0, work_dir=tmp_path / "work", worker_command=command,
            console=Console(quiet=True),
        )  # fmt: skip
    finally:
        topics = [settings.sales_topic, settings.dlq_topic, settings.forecasts_topic]
        with contextlib.suppress(Exception):
            delete_topics(kafka_bootstrap, topics)
    assert report.bundle == (bundles / "v2").resolve()
    # The worker gets the location and the key, so it keeps following them (hot reload).
    assert env_file.read_text() == f"{bundles.resolve()}|{key}"
