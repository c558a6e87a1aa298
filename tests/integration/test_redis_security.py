"""Redis with passwords, ACL users and TLS: the store works with the right settings and fails
with one clear StateStoreError (and no password in it) with the wrong ones.

Each server is a real ``redis-server`` on a free port: one with ``requirepass`` and two ACL
users (one allowed everything on the worker's keys, one read-only), and one serving TLS only
with certificates made by ``openssl`` for this module. The TLS tests need a redis-server
built with TLS (Debian's is; they are skipped otherwise).
"""

from __future__ import annotations

import asyncio
import shutil
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from pydantic import SecretStr

from stream.settings.security import redis_client_kwargs
from stream.settings.worker import WorkerSettings
from stream.state.base import BucketDelta, ItemUpdate, PartitionId, PartitionState, PartitionUpdate
from stream.state.redis_clients import async_client
from stream.state.redis_store import RedisWindowStore
from stream.worker.runner import _check_redis
from trendcast.devtools.embedded import RedisServer
from trendcast.exceptions import StateStoreError
from trendcast.freq import parse_freq
from trendcast.testkit.certs import TlsFiles, make_tls_files, openssl_available

pytestmark = pytest.mark.integration

FREQ = parse_freq("1D")
DAY = FREQ.step_ms
ADMIN_PW = "admin-Pw-1"
APP_PW = "app-Pw-2"
RO_PW = "ro-Pw-3"
WRONG_PW = "wrong-Pw-4"


def _system_redis() -> str:
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("no redis-server on PATH")
    return binary


class _ExtraArgsRedis(RedisServer):
    """A RedisServer with extra command-line options and a probe that can log in."""

    def __init__(self, extra: list[str], probe: dict[str, Any], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._extra = extra
        self._probe = probe

    def _command(self, port: int) -> list[str]:
        return [*super()._command(port), *self._extra]

    def _ready(self, port: int) -> bool:
        client = redis.Redis(host=self.host, port=port, socket_timeout=0.5, **self._probe)
        try:
            return bool(client.ping())
        except (redis.RedisError, OSError):
            return False
        finally:
            client.close()


class _TlsRedis(_ExtraArgsRedis):
    """TLS only: the plain port is off and the chosen port serves TLS."""

    def _command(self, port: int) -> list[str]:
        command = RedisServer._command(self, port)
        i = command.index("--port")
        command[i : i + 2] = ["--port", "0", "--tls-port", str(port)]
        return [*command, *self._extra]


@pytest.fixture(scope="module")
def acl_redis() -> Iterator[RedisServer]:
    server = _ExtraArgsRedis(
        [
            "--requirepass",
            ADMIN_PW,
            # The worker's user: every command its scripts and checks need, on any key.
            "--user",
            "app",
            "on",
            f">{APP_PW}",
            "~*",
            "&*",
            "+@all",
            # A user that may only read: the worker's writes must fail with NOPERM.
            "--user",
            "ro",
            "on",
            f">{RO_PW}",
            "~*",
            "+ping",
            "+@read",
            "+config|get",
        ],  # fmt: skip
        {"password": ADMIN_PW},
        binary=_system_redis(),
    ).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    if not openssl_available():
        pytest.skip("openssl command not found")
    return make_tls_files(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="module")
def tls_redis(tls_files: TlsFiles) -> Iterator[RedisServer]:
    binary = _system_redis()
    server = _TlsRedis(
        [
            "--tls-cert-file",
            str(tls_files.server_cert),
            "--tls-key-file",
            str(tls_files.server_key),
            "--tls-ca-cert-file",
            str(tls_files.ca),
            "--tls-auth-clients",
            "optional",
        ],  # fmt: skip
        {"ssl": True, "ssl_ca_certs": str(tls_files.ca)},
        binary=binary,
        startup_timeout_s=5,
    )
    try:
        server.start()
    except StateStoreError as exc:
        # A redis-server built without TLS refuses the tls-* options at startup.
        if "tls" in str(exc).lower():
            pytest.skip(f"{binary} cannot serve TLS: {str(exc)[-200:]}")
        raise
    yield server
    server.stop()


def _roundtrip(settings: WorkerSettings) -> None:
    """Write one event through the store, read it back, and run the startup check."""
    kwargs = redis_client_kwargs(settings)
    _check_redis(settings.redis_url, 20, **kwargs)
    prefix = f"sec-{uuid.uuid4().hex[:8]}"

    async def run() -> None:
        store = RedisWindowStore(async_client(settings.redis_url, **kwargs), FREQ, prefix)
        try:
            await store.ping()
            pid = PartitionId("sales", 0)
            update = ItemUpdate(
                "item-1",
                [BucketDelta(bucket_ms=10 * DAY, dedupe_key="e:1", quantity=3.0)],
                keep_from_ms=0,
                dedupe_from_ms=0,
                ttl_ms=60_000,
            )
            await store.apply([update], [PartitionUpdate(pid, PartitionState(10 * DAY, None))])
            window = (await store.read(["item-1"]))["item-1"]
            assert window.buckets[10 * DAY].quantity == 3.0
        finally:
            await store.aclose()

    asyncio.run(run())


def _refused(settings: WorkerSettings, *secrets: str) -> StateStoreError:
    """The startup check and the store both raise StateStoreError; return the first."""
    kwargs = redis_client_kwargs(settings)
    with pytest.raises(StateStoreError) as info:
        _check_redis(settings.redis_url, 20, **kwargs)

    async def ping() -> None:
        store = RedisWindowStore(async_client(settings.redis_url, **kwargs), FREQ, "sec")
        try:
            await store.ping()
        finally:
            await store.aclose()

    with pytest.raises(StateStoreError) as store_info:
        asyncio.run(ping())
    for text in (str(info.value), str(store_info.value)):
        for secret in secrets:
            assert secret not in text
    return info.value


def test_acl_user_in_the_url(acl_redis: RedisServer) -> None:
    _roundtrip(WorkerSettings(redis_url=f"redis://app:{APP_PW}@127.0.0.1:{acl_redis.port}/0"))


def test_acl_user_in_separate_settings(acl_redis: RedisServer) -> None:
    _roundtrip(
        WorkerSettings(
            redis_url=acl_redis.url, redis_username="app", redis_password=SecretStr(APP_PW)
        )
    )


def test_requirepass_default_user(acl_redis: RedisServer) -> None:
    _roundtrip(WorkerSettings(redis_url=acl_redis.url, redis_password=SecretStr(ADMIN_PW)))


def test_wrong_password_is_a_clear_error(acl_redis: RedisServer) -> None:
    url = f"redis://app:{WRONG_PW}@127.0.0.1:{acl_redis.port}/0"
    error = _refused(WorkerSettings(redis_url=url), WRONG_PW)
    assert "refused the credentials" in str(error)
    assert f"redis://app:***@127.0.0.1:{acl_redis.port}/0" in str(error)
    assert "TRENDCAST_REDIS_PASSWORD" in str(error)


def test_missing_password_is_a_clear_error(acl_redis: RedisServer) -> None:
    error = _refused(WorkerSettings(redis_url=acl_redis.url))
    assert "refused the credentials" in str(error)


def test_user_without_write_permission(acl_redis: RedisServer) -> None:
    settings = WorkerSettings(
        redis_url=acl_redis.url, redis_username="ro", redis_password=SecretStr(RO_PW)
    )
    # PING and CONFIG GET pass the startup check; the first script load is refused.
    _check_redis(settings.redis_url, 20, **redis_client_kwargs(settings))
    error = _refused_store_only(settings)
    assert "NOPERM" in str(error) or "permission" in str(error).lower()


def _refused_store_only(settings: WorkerSettings) -> StateStoreError:
    async def ping() -> None:
        kwargs = redis_client_kwargs(settings)
        store = RedisWindowStore(async_client(settings.redis_url, **kwargs), FREQ, "sec")
        try:
            await store.ping()
        finally:
            await store.aclose()

    with pytest.raises(StateStoreError) as info:
        asyncio.run(ping())
    return info.value


def test_tls_with_the_ca(tls_redis: RedisServer, tls_files: TlsFiles) -> None:
    url = f"rediss://127.0.0.1:{tls_redis.port}/0"
    _roundtrip(WorkerSettings(redis_url=url, redis_ssl_ca_certs=tls_files.ca))


def test_tls_with_a_client_certificate(tls_redis: RedisServer, tls_files: TlsFiles) -> None:
    _roundtrip(
        WorkerSettings(
            redis_url=f"rediss://localhost:{tls_redis.port}/0",
            redis_ssl_ca_certs=tls_files.ca,
            redis_ssl_certfile=tls_files.client_cert,
            redis_ssl_keyfile=tls_files.client_key,
        )
    )


def test_tls_without_the_ca_is_refused(tls_redis: RedisServer) -> None:
    # The system CAs do not know the test CA: certificate verification must fail.
    error = _refused(WorkerSettings(redis_url=f"rediss://127.0.0.1:{tls_redis.port}/0"))
    assert "certificate" in str(error).lower()


def test_plain_client_on_a_tls_port_fails(tls_redis: RedisServer) -> None:
    _refused(WorkerSettings(redis_url=f"redis://127.0.0.1:{tls_redis.port}/0"))
