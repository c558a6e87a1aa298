"""``trendcast up`` orchestration: services, worker child, replay, forecasts, clean shutdown.

The fast tests run a stand-in worker (a few lines of aiokafka that answer each sale with a
forecast) so they check the orchestration - env handed to the worker, stop order, deadline,
exit-when-done, a dying worker - in seconds. The slow test runs the real worker
(``python -m stream``) on a hand-built ONNX bundle, end to end.
"""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import orjson
import pytest
from rich.console import Console

from stream.settings.worker import WorkerSettings
from trendcast.devtools.embedded import kafka_answers, to_bootstrap
from trendcast.devtools.up import run_up, worker_env
from trendcast.exceptions import ConfigError, StreamError
from trendcast.testkit.bundles import make_fake_bundle

pytestmark = pytest.mark.integration

ECHO_WORKER = textwrap.dedent(
    """
    import asyncio, os, signal, orjson
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

    async def main():
        env = os.environ
        brokers = env["TRENDCAST_KAFKA_BROKERS"].replace("kafka://", "").replace(";", ",")
        with open(env["ECHO_ENV_FILE"], "wb") as f:
            f.write(orjson.dumps({k: v for k, v in env.items() if k.startswith("TRENDCAST_")}))
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        consumer = AIOKafkaConsumer(env["TRENDCAST_SALES_TOPIC"], bootstrap_servers=brokers,
                                    group_id=env["TRENDCAST_CONSUMER_GROUP"],
                                    auto_offset_reset="earliest")
        producer = AIOKafkaProducer(bootstrap_servers=brokers)
        await consumer.start(); await producer.start()
        try:
            while not stop.is_set():
                batch = await consumer.getmany(timeout_ms=100)
                for records in batch.values():
                    for r in records:
                        sale = orjson.loads(r.value)
                        value = {"item_id": sale["item_id"], "as_of": sale["ts"],
                                 "fallback": False,
                                 "horizon": [{"date": sale["ts"][:10], "mean": 1.0,
                                              "p10": 0.5, "p50": 1.0, "p90": 2.0}]}
                        await producer.send(env["TRENDCAST_FORECASTS_TOPIC"], key=r.key,
                                            value=orjson.dumps(value))
                await producer.flush()
        finally:
            await consumer.stop(); await producer.stop()

    asyncio.run(main())
    """
)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_fake_bundle(tmp_path_factory.mktemp("up") / "bundle", window=14)


def _quiet() -> Console:
    return Console(quiet=True)


def test_worker_env_carries_every_setting():
    env = worker_env(WorkerSettings(), {"kafka_brokers": "kafka://h:1"}, base={"PATH": "/bin"})
    assert env["PATH"] == "/bin"
    assert env["TRENDCAST_KAFKA_BROKERS"] == "kafka://h:1"
    assert env["TRENDCAST_SALES_TOPIC"] == "sales"
    assert (
        WorkerSettings.model_validate(
            {k.removeprefix("TRENDCAST_").lower(): v for k, v in env.items() if k != "PATH"}
        ).kafka_brokers
        == "kafka://h:1"
    )
    with pytest.raises(ConfigError, match="unknown"):
        worker_env(WorkerSettings(), {"nope": 1}, base={})


def test_up_runs_to_done_and_cleans_up(
    bundle: Path, tmp_path: Path, redis_prefix: str, monkeypatch: pytest.MonkeyPatch
):
    env_file = tmp_path / "env.json"
    monkeypatch.setenv("ECHO_ENV_FILE", str(env_file))  # the worker inherits our environment
    settings = WorkerSettings(state_prefix=redis_prefix)

    report = run_up(
        settings, train_bundle=None, bundle=bundle, speed=None, live_weeks=1,
        warmup_weeks=1, max_seconds=60, exit_when_done=True, idle_exit_s=1.0,
        worker_command=[sys.executable, "-c", ECHO_WORKER], console=_quiet(),
    )  # fmt: skip

    assert report.stopped_by == "done"
    assert report.events > 50
    assert report.forecasts == report.events  # the echo worker answers every sale once
    assert report.worker_exit_code == 0
    env = orjson.loads(env_file.read_bytes())
    assert env["TRENDCAST_STATE_PREFIX"] == redis_prefix  # configured: kept
    assert env["TRENDCAST_BUNDLE"] == str(bundle.resolve())
    assert env["TRENDCAST_REDIS_URL"] == report.redis_url
    assert to_bootstrap(env["TRENDCAST_KAFKA_BROKERS"]) == report.bootstrap
    assert not kafka_answers(report.bootstrap, timeout_s=0.5), "the embedded broker is stopped"


def test_up_deadline_stops_a_silent_worker(bundle: Path, tmp_path: Path):
    command = [sys.executable, "-c", "import time\nwhile True: time.sleep(1)"]

    report = run_up(
        WorkerSettings(), train_bundle=None, bundle=bundle, speed=None, live_weeks=1,
        warmup_weeks=0, max_seconds=2.0, work_dir=tmp_path / "work", worker_command=command,
        console=_quiet(),
    )  # fmt: skip

    assert report.stopped_by == "deadline"
    assert report.forecasts == 0
    assert report.worker_exit_code == -15  # SIGTERM
    assert (tmp_path / "work" / "logs" / "tansu.log").is_file(), "a given work_dir is kept"


def test_up_reports_a_dying_worker_with_its_log(bundle: Path):
    command = [sys.executable, "-c", "print('boom: no bundle here'); raise SystemExit(3)"]

    with pytest.raises(StreamError, match=r"(?s)exited with code 3.*boom: no bundle here"):
        run_up(WorkerSettings(), train_bundle=None, bundle=bundle, speed=None, live_weeks=1,
               max_seconds=30, worker_command=command, console=_quiet())  # fmt: skip


def test_up_trains_a_bundle_when_none_is_given(bundle: Path):
    seen: list[Path] = []

    def train(where: Path) -> Path:
        seen.append(where)
        return bundle

    report = run_up(
        WorkerSettings(), train_bundle=train, speed=None, live_weeks=1, warmup_weeks=0,
        max_seconds=1.0, worker_command=[sys.executable, "-c", "import time; time.sleep(60)"],
        console=_quiet(),
    )  # fmt: skip
    assert len(seen) == 1 and report.bundle == bundle.resolve()
    with pytest.raises(ConfigError, match="no bundle"):
        run_up(WorkerSettings(), train_bundle=None, console=_quiet())


@pytest.mark.slow
def test_up_end_to_end_with_the_real_worker(bundle: Path):
    report = run_up(
        WorkerSettings(), train_bundle=None, bundle=bundle, speed=7 * 86_400.0, live_weeks=1,
        warmup_weeks=3, max_seconds=120, exit_when_done=True, idle_exit_s=3.0,
        console=_quiet(),
    )  # fmt: skip

    assert report.stopped_by == "done", report
    assert report.forecasts > 0
    assert report.items > 10
    assert report.worker_exit_code == 0


def test_worker_env_passes_secrets_in_clear() -> None:
    from pydantic import SecretStr

    settings = WorkerSettings(redis_password=SecretStr("s3cret"), web_token=SecretStr("tok"))
    env = worker_env(settings, {"kafka_sasl_password": SecretStr("k")}, base={})
    assert env["TRENDCAST_REDIS_PASSWORD"] == "s3cret"  # noqa: S105
    assert env["TRENDCAST_WEB_TOKEN"] == "tok"  # noqa: S105
    assert env["TRENDCAST_KAFKA_SASL_PASSWORD"] == "k"  # noqa: S105
