"""Kafka over TLS for real: the worker, ``replay`` and ``tail`` against a TLS listener.

Certificates are made in the test (:mod:`trendcast.testkit.certs`: a CA, a server certificate
for 127.0.0.1/localhost). The broker is :class:`TansuBroker` with ``cert``/``key``: Tansu 0.6
cannot terminate TLS itself, so TLS ends in a front on the advertised port and every client
below meets a real TLS handshake with the hostname check on (``127.0.0.1`` must be in the
certificate's names). A second CA, which signed nothing the broker shows, must be refused
quickly with a clear message, never a hang.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

from bench._chaos_harness import WorkerPool
from stream.settings.security import KafkaSecurity
from stream.settings.worker import WorkerSettings
from trendcast.data import sample_data_path
from trendcast.devtools.embedded import TansuBroker, ensure_topics_async
from trendcast.devtools.tail import tail
from trendcast.sync_bridge import run_sync
from trendcast.testkit.bundles import make_fake_bundle
from trendcast.testkit.certs import TlsFiles, make_tls_files, openssl_available
from trendcast.testkit.cli import assert_one_line_error, run_cli
from trendcast.testkit.kafka import wait_until

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not openssl_available(), reason="needs the openssl command"),
]

FROM, TO = "2010-03-01", "2010-03-20"


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    return make_tls_files(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="module")
def wrong_ca(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tls_files(tmp_path_factory.mktemp("other-ca")).ca


@pytest.fixture(scope="module")
def tls_broker(tls: TlsFiles, kafka_bootstrap: str) -> Iterator[TansuBroker]:
    # kafka_bootstrap: skips the module (with the reason) when Tansu is not installed.
    broker = TansuBroker(cert=tls.server_cert, key=tls.server_key).start()
    try:
        yield broker
    finally:
        broker.stop()


def _security(cafile: Path) -> KafkaSecurity:
    return KafkaSecurity(protocol="SSL", cafile=cafile, check_hostname=True)


def _tls_env(monkeypatch: pytest.MonkeyPatch, broker: TansuBroker, cafile: Path) -> None:
    monkeypatch.setenv("TRENDCAST_KAFKA_BROKERS", f"kafka://{broker.bootstrap}")
    monkeypatch.setenv("TRENDCAST_KAFKA_SECURITY_PROTOCOL", "SSL")
    monkeypatch.setenv("TRENDCAST_KAFKA_SSL_CAFILE", str(cafile))


def test_the_listener_speaks_tls_only(tls_broker: TansuBroker, tls: TlsFiles) -> None:
    """A plaintext client gets nowhere on the TLS port (so the tests below really use TLS)."""
    with pytest.raises(Exception):  # noqa: B017 - whichever KafkaError aiokafka raises
        run_sync(ensure_topics_async(tls_broker.bootstrap, {"plain": 1}, timeout_s=3))
    created = run_sync(
        ensure_topics_async(
            tls_broker.bootstrap, {"tls-probe": 1}, **_security(tls.ca).aiokafka_kwargs()
        )
    )
    assert created == ["tls-probe"]


def test_replay_and_tail_over_tls(
    tls_broker: TansuBroker,
    tls: TlsFiles,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    _tls_env(monkeypatch, tls_broker, tls.ca)
    topic = f"sales-tls-{time.monotonic_ns()}"
    code, out, err = run_cli(
        ["replay", "--data", str(sample_data_path()), "--from", FROM, "--to", TO,
         "--topic", topic],
        monkeypatch, capsys,
    )  # fmt: skip
    assert code == 0, err
    published = int(out.split()[1].replace(",", ""))
    assert published > 100
    code, out, err = run_cli(["tail", "--topic", topic, "-n", "5"], monkeypatch, capsys)
    assert code == 0, err
    rows = [orjson.loads(line) for line in out.splitlines() if line.strip()]
    assert len(rows) == 5
    assert all(FROM <= r["value"]["ts"][:10] < TO for r in rows), rows


@pytest.mark.parametrize("command", ["replay", "tail"])
def test_a_wrong_ca_is_one_clear_line_not_a_hang(
    command: str,
    tls_broker: TansuBroker,
    wrong_ca: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    _tls_env(monkeypatch, tls_broker, wrong_ca)
    args = {
        "replay": ["replay", "--data", str(sample_data_path()), "--from", FROM, "--to", TO,
                   "--topic", "never"],
        "tail": ["tail", "--topic", "never", "-n", "1"],
    }[command]  # fmt: skip
    started = time.monotonic()
    code, _, err = run_cli(args, monkeypatch, capsys)
    assert time.monotonic() - started < 30
    assert code != 0
    assert_one_line_error(err, "")
    assert "certificate" in err.lower() or "tls" in err.lower(), err


def _worker_settings(
    broker: TansuBroker, cafile: Path, tmp_path: Path, redis_url: str, prefix: str
) -> WorkerSettings:
    return WorkerSettings(
        kafka_brokers=f"kafka://{broker.bootstrap}",
        kafka_security_protocol="SSL",
        kafka_ssl_cafile=cafile,
        kafka_ssl_check_hostname=True,
        fetch_max_wait_ms=50,
        redis_url=redis_url,
        bundle=make_fake_bundle(tmp_path / "bundle", window=14, horizon=7),
        sales_topic=f"sales-{prefix}",
        dlq_topic=f"dlq-{prefix}",
        forecasts_topic=f"fc-{prefix}",
        consumer_group=f"group-{prefix}",
        state_prefix=prefix,
        topic_partitions=2,
        batch_timeout_s=0.2,
        broker_rebalance_timeout_s=4,
        broker_session_timeout_s=6,
        commit_interval_s=0.5,
        web_enabled=True,
        data_dir=tmp_path,
    )


def test_the_worker_consumes_and_forecasts_over_tls(
    tls_broker: TansuBroker,
    tls: TlsFiles,
    redis_url: str,
    redis_prefix: str,
    tmp_path: Path,
) -> None:
    from trendcast.data import read_lines
    from trendcast.devtools.replay import replay

    settings = _worker_settings(tls_broker, tls.ca, tmp_path, redis_url, redis_prefix)
    security = _security(tls.ca)
    run_sync(
        ensure_topics_async(
            tls_broker.bootstrap,
            {settings.sales_topic: 2, settings.dlq_topic: 1, settings.forecasts_topic: 1},
            **security.aiokafka_kwargs(),
        )
    )
    lines, _ = read_lines(sample_data_path())
    report = replay(
        lines, bootstrap=tls_broker.bootstrap, topic=settings.sales_topic, start=FROM, end=TO,
        security=security,
    )  # fmt: skip
    assert report.events > 100
    pool = WorkerPool(settings, tmp_path)
    try:
        name = pool.start()
        wait_until(
            lambda: list(tail(tls_broker.bootstrap, settings.forecasts_topic, n=None,
                              security=security)),
            lambda rows: len(rows) > 0,
            timeout_s=90,
            what="forecasts over TLS",
        )  # fmt: skip
        assert pool.health(name) == 200, pool.log_tail()
    finally:
        pool.stop_all()
    assert pool.graceful_exit_codes == [0], pool.log_tail()


def test_the_worker_with_a_wrong_ca_says_so_and_is_unhealthy(
    tls_broker: TansuBroker,
    wrong_ca: Path,
    redis_url: str,
    redis_prefix: str,
    tmp_path: Path,
) -> None:
    settings = _worker_settings(tls_broker, wrong_ca, tmp_path, redis_url, redis_prefix)
    pool = WorkerPool(settings, tmp_path)
    name = pool.start()
    try:
        deadline = time.monotonic() + 60
        log = tmp_path / f"{name}.log"
        while time.monotonic() < deadline:
            text = log.read_text(errors="replace") if log.exists() else ""
            if "CERTIFICATE_VERIFY_FAILED" in text:
                break
            time.sleep(0.5)
        else:
            pytest.fail(f"no certificate error logged within 60s:\n{pool.log_tail()}")
        # Then it either gives up with an error exit or stays up and says it is unhealthy:
        # never "healthy", never a silent hang.
        settle = time.monotonic() + 20
        status = pool.health(name)
        while time.monotonic() < settle:
            pool.check_unexpected_exits()
            status = pool.health(name)
            if pool.unexpected_exits or status == 503:
                break
            time.sleep(0.5)
        print(f"\nwrong CA: /health {status}, exits {pool.unexpected_exits}")
        assert status != 200, pool.log_tail()
    finally:
        pool.stop_all()
