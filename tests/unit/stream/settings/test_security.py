"""Kafka SASL/TLS and Redis credential settings, translated into client arguments.

Tansu (the test broker) speaks neither SASL nor TLS, so Kafka security is tested here at the
unit level: the settings must become exactly the arguments Faust and aiokafka take, and the
Faust path and the aiokafka path (replay, tail) must agree. Redis credentials and TLS are
tested against real servers in tests/integration/test_redis_security.py.
"""

from __future__ import annotations

import logging
import ssl
from pathlib import Path
from typing import Any

import faust
import pytest
from faust.transport.drivers.aiokafka import credentials_to_aiokafka_auth
from pydantic import SecretStr, ValidationError

from stream.settings.redaction import redact_url
from stream.settings.security import KafkaSecurity, redis_client_kwargs
from stream.settings.worker import WorkerSettings
from trendcast.exceptions import BrokerError, ConfigError
from trendcast.testkit.certs import TlsFiles, make_tls_files, openssl_available

KAFKA_PW = "kafka-Secret-123"
REDIS_PW = "redis-Secret-456"


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    if not openssl_available():
        pytest.skip("openssl command not found")
    return make_tls_files(tmp_path_factory.mktemp("tls"))


def test_default_is_plaintext() -> None:
    security = KafkaSecurity.from_settings(WorkerSettings())
    assert security.aiokafka_kwargs() == {"security_protocol": "PLAINTEXT"}
    assert security.faust_credentials() is None
    assert security.ssl_context() is None
    # What Faust hands aiokafka without credentials is the same.
    assert credentials_to_aiokafka_auth(None, None) == security.aiokafka_kwargs()


@pytest.mark.parametrize("mechanism", ["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"])
def test_sasl_plaintext(mechanism: Any) -> None:
    settings = WorkerSettings(
        kafka_security_protocol="SASL_PLAINTEXT",
        kafka_sasl_mechanism=mechanism,
        kafka_sasl_username="svc",
        kafka_sasl_password=SecretStr(KAFKA_PW),
    )
    security = KafkaSecurity.from_settings(settings)
    kwargs = security.aiokafka_kwargs()
    assert kwargs == {
        "security_protocol": "SASL_PLAINTEXT",
        "sasl_mechanism": mechanism,
        "sasl_plain_username": "svc",
        "sasl_plain_password": KAFKA_PW,
    }
    creds = security.faust_credentials()
    assert isinstance(creds, faust.SASLCredentials)
    assert creds.mechanism.value == mechanism
    assert creds.protocol.value == "SASL_PLAINTEXT"
    faust_kwargs = dict(credentials_to_aiokafka_auth(creds, None))
    assert faust_kwargs.pop("ssl_context") is None
    assert faust_kwargs == kwargs  # the worker and replay/tail log in the same way
    assert KAFKA_PW not in repr(creds)


def test_sasl_ssl_with_ca(tls: TlsFiles) -> None:
    settings = WorkerSettings(
        kafka_security_protocol="SASL_SSL",
        kafka_sasl_mechanism="SCRAM-SHA-256",
        kafka_sasl_username="svc",
        kafka_sasl_password=SecretStr(KAFKA_PW),
        kafka_ssl_cafile=tls.ca,
    )
    security = KafkaSecurity.from_settings(settings)
    kwargs = security.aiokafka_kwargs()
    context = kwargs.pop("ssl_context")
    assert isinstance(context, ssl.SSLContext)
    assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname
    assert context.get_ca_certs()[0]["subject"] == ((("commonName", "trendcast-test-ca"),),)
    assert kwargs["security_protocol"] == "SASL_SSL"
    creds = security.faust_credentials()
    auth = credentials_to_aiokafka_auth(creds, None)
    assert auth["security_protocol"] == "SASL_SSL"
    assert auth["sasl_mechanism"] == "SCRAM-SHA-256"
    assert isinstance(auth["ssl_context"], ssl.SSLContext)


def test_ssl_mutual_tls(tls: TlsFiles) -> None:
    settings = WorkerSettings(
        kafka_security_protocol="SSL",
        kafka_ssl_cafile=tls.ca,
        kafka_ssl_certfile=tls.client_cert,
        kafka_ssl_keyfile=tls.client_key,
        kafka_ssl_check_hostname=False,
    )
    security = KafkaSecurity.from_settings(settings)
    kwargs = security.aiokafka_kwargs()
    assert kwargs["security_protocol"] == "SSL"
    assert not kwargs["ssl_context"].check_hostname
    creds = security.faust_credentials()
    assert isinstance(creds, faust.SSLCredentials)
    assert credentials_to_aiokafka_auth(creds, None)["security_protocol"] == "SSL"


def test_unreadable_tls_file_is_a_config_error(tmp_path: Path) -> None:
    security = KafkaSecurity(protocol="SSL", cafile=tmp_path / "missing.pem")
    with pytest.raises(ConfigError, match="Kafka TLS files"):
        security.aiokafka_kwargs()


def test_faust_app_gets_the_credentials() -> None:
    from stream.state.memory import MemoryWindowStore
    from stream.worker.app import create_app
    from trendcast.testkit.doubles import MODEL, FakeForecaster

    settings = WorkerSettings(
        kafka_security_protocol="SASL_PLAINTEXT",
        kafka_sasl_mechanism="SCRAM-SHA-512",
        kafka_sasl_username="svc",
        kafka_sasl_password=SecretStr(KAFKA_PW),
        web_enabled=False,
    )
    app = create_app(settings, FakeForecaster(), MemoryWindowStore(MODEL.freq), MODEL)
    auth = credentials_to_aiokafka_auth(app.conf.broker_credentials, app.conf.ssl_context)
    assert auth["security_protocol"] == "SASL_PLAINTEXT"
    assert auth["sasl_mechanism"] == "SCRAM-SHA-512"
    assert auth["sasl_plain_password"] == KAFKA_PW


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"kafka_security_protocol": "SASL_SSL", "kafka_sasl_username": "u"}, "no password"),
        ({"kafka_security_protocol": "SASL_PLAINTEXT"}, "no username"),
        ({"kafka_sasl_username": "u", "kafka_sasl_password": "p"}, "got PLAINTEXT"),
        ({"kafka_ssl_cafile": "/ca.pem"}, "SSL or SASL_SSL with kafka_ssl_"),
        (
            {"kafka_security_protocol": "SSL", "kafka_ssl_keyfile": "/k.pem"},
            "kafka_ssl_certfile with kafka_ssl_keyfile",
        ),
        ({"kafka_security_protocol": "TLS"}, "PLAINTEXT"),
        ({"kafka_sasl_mechanism": "GSSAPI"}, "SCRAM-SHA-256"),
        ({"redis_ssl_ca_certs": "/ca.pem"}, "rediss://"),
        ({"redis_url": "redis://:a@h:6379", "redis_password": "b"}, "got both"),
        ({"redis_url": "redis://u:a@h:6379", "redis_username": "v"}, "got both"),
    ],
)
def test_inconsistent_security_settings_are_refused(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        WorkerSettings(**kwargs)


def test_settings_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRENDCAST_KAFKA_SECURITY_PROTOCOL", "SASL_SSL")
    monkeypatch.setenv("TRENDCAST_KAFKA_SASL_MECHANISM", "SCRAM-SHA-512")
    monkeypatch.setenv("TRENDCAST_KAFKA_SASL_USERNAME", "svc")
    monkeypatch.setenv("TRENDCAST_KAFKA_SASL_PASSWORD", KAFKA_PW)
    monkeypatch.setenv("TRENDCAST_REDIS_URL", "rediss://redis:6380/0")
    monkeypatch.setenv("TRENDCAST_REDIS_USERNAME", "worker")
    monkeypatch.setenv("TRENDCAST_REDIS_PASSWORD", REDIS_PW)
    monkeypatch.setenv("TRENDCAST_LOG_FORMAT", "json")
    settings = WorkerSettings()
    assert settings.kafka_sasl_password is not None
    assert settings.kafka_sasl_password.get_secret_value() == KAFKA_PW
    assert settings.log_format == "json"
    assert redis_client_kwargs(settings) == {
        "username": "worker",
        "password": REDIS_PW,
        "ssl_check_hostname": True,
    }


def test_redis_kwargs_only_carry_what_is_set(tmp_path: Path) -> None:
    assert redis_client_kwargs(WorkerSettings()) == {}
    assert redis_client_kwargs(WorkerSettings(redis_url="redis://u:p@h:1/0")) == {}
    settings = WorkerSettings(
        redis_url="rediss://h:6380/0",
        redis_ssl_ca_certs=tmp_path / "ca.pem",
        redis_ssl_certfile=tmp_path / "c.pem",
        redis_ssl_keyfile=tmp_path / "k.pem",
        redis_ssl_check_hostname=False,
    )
    assert redis_client_kwargs(settings) == {
        "ssl_check_hostname": False,
        "ssl_ca_certs": str(tmp_path / "ca.pem"),
        "ssl_certfile": str(tmp_path / "c.pem"),
        "ssl_keyfile": str(tmp_path / "k.pem"),
    }


def test_secrets_stay_out_of_repr_and_logs(caplog: pytest.LogCaptureFixture) -> None:
    settings = WorkerSettings(
        redis_url=f"redis://worker:{REDIS_PW}@redis:6379/0",
        kafka_security_protocol="SASL_SSL",
        kafka_sasl_username="svc",
        kafka_sasl_password=SecretStr(KAFKA_PW),
        kafka_ssl_keyfile_password=SecretStr("key-Secret-789"),
        kafka_ssl_certfile=Path("/c.pem"),
    )
    security = KafkaSecurity.from_settings(settings)
    with caplog.at_level(logging.DEBUG):
        logging.getLogger("test").info("settings: %s / %r / %s", settings, settings, security)
    for text in (repr(settings), str(settings), repr(security), caplog.text):
        assert KAFKA_PW not in text
        assert REDIS_PW not in text
        assert "key-Secret-789" not in text
    assert "redis://worker:***@redis:6379/0" in repr(settings)


def test_invalid_url_message_hides_the_password() -> None:
    with pytest.raises(ValidationError) as info:
        WorkerSettings(redis_url=f"http://u:{REDIS_PW}@h:1")
    assert REDIS_PW not in info.value.errors()[0]["msg"]


def test_redact_url() -> None:
    assert redact_url("redis://u:p%40ss@h:1/0") == "redis://u:***@h:1/0"
    assert redact_url("redis://u@h:1/0") == "redis://u@h:1/0"
    assert redact_url("unix:///tmp/redis.sock") == "unix:///tmp/redis.sock"


class _RecordingConsumer:
    """Stands in for AIOKafkaConsumer/Producer: remembers its arguments, fails on start."""

    seen: dict[str, Any] = {}

    def __init__(self, **kwargs: Any) -> None:
        type(self).seen = kwargs

    async def start(self) -> None:
        from aiokafka.errors import KafkaConnectionError

        raise KafkaConnectionError("no broker in unit tests")

    async def stop(self) -> None:
        return None


def test_tail_passes_security_to_aiokafka(monkeypatch: pytest.MonkeyPatch) -> None:
    import trendcast.devtools.tail

    monkeypatch.setattr(trendcast.devtools.tail, "AIOKafkaConsumer", _RecordingConsumer)
    security = KafkaSecurity(protocol="SASL_PLAINTEXT", username="svc", password=SecretStr("pw"))
    with pytest.raises(BrokerError):
        list(trendcast.devtools.tail.tail("kafka://h:9092", "forecasts", security=security))
    assert _RecordingConsumer.seen["security_protocol"] == "SASL_PLAINTEXT"
    assert _RecordingConsumer.seen["sasl_plain_username"] == "svc"
    # The old call signature still works and means PLAINTEXT.
    with pytest.raises(BrokerError):
        list(trendcast.devtools.tail.tail("kafka://h:9092", "forecasts"))
    assert _RecordingConsumer.seen["security_protocol"] == "PLAINTEXT"


def test_replay_passes_security_to_admin_and_producer(monkeypatch: pytest.MonkeyPatch) -> None:
    import pandas as pd

    import trendcast.devtools.replay

    admin_kwargs: dict[str, Any] = {}

    async def fake_list_topics(bootstrap: str, **kwargs: Any) -> set[str]:
        admin_kwargs.update(kwargs)
        return {"sales"}

    monkeypatch.setattr(trendcast.devtools.replay, "list_topics_async", fake_list_topics)
    monkeypatch.setattr(trendcast.devtools.replay, "AIOKafkaProducer", _RecordingConsumer)
    lines = pd.DataFrame(
        {"item_id": ["a"], "quantity": [1.0], "ts": pd.to_datetime(["2011-01-01"])}
    )
    security = KafkaSecurity(
        protocol="SASL_PLAINTEXT",
        sasl_mechanism="SCRAM-SHA-512",
        username="svc",
        password=SecretStr("pw"),
    )
    with pytest.raises(BrokerError):
        trendcast.devtools.replay.replay(
            lines, bootstrap="h:9092", topic="sales", security=security
        )
    for seen in (admin_kwargs, _RecordingConsumer.seen):
        assert seen["security_protocol"] == "SASL_PLAINTEXT"
        assert seen["sasl_mechanism"] == "SCRAM-SHA-512"
