"""Kafka helpers for integration tests and the chaos bench: read a topic to its true end,
produce, committed offsets.

"To the end" means the high watermark reported by Fetch responses, not ListOffsets(latest):
Tansu under-reports the latter (see :mod:`trendcast.devtools.embedded`), so a test that trusted it
would
read a handful of records and pass or fail by accident.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any, TypeVar

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from trendcast.devtools.embedded import to_bootstrap
from trendcast.sync_bridge import run_sync

__all__ = [
    "committed_offsets",
    "consume_all",
    "consume_values",
    "delete_topics",
    "offsets_total",
    "produce",
    "wait_until",
]

T = TypeVar("T")


async def _consume_all(bootstrap: str, topic: str, idle_timeout_s: float) -> list[Any]:
    consumer = AIOKafkaConsumer(
        bootstrap_servers=to_bootstrap(bootstrap),
        group_id=None,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        fetch_max_wait_ms=100,
        max_partition_fetch_bytes=4 * 1024 * 1024,  # the chaos bench reads 100k+ forecasts
    )
    await consumer.start()
    try:
        topics = await consumer.topics()  # full listing: naming one topic would create it
        if topic not in topics:
            raise AssertionError(f"topic {topic!r} does not exist (topics: {sorted(topics)})")
        tps = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic))]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        records: list[Any] = []
        loop = asyncio.get_running_loop()
        last_data = loop.time()
        while True:
            batch = await consumer.getmany(*tps, timeout_ms=200, max_records=20_000)
            for messages in batch.values():
                records.extend(messages)
            if batch:
                last_data = loop.time()
            highs = [consumer.highwater(tp) for tp in tps]
            positions = [await consumer.position(tp) for tp in tps]
            if all(h is not None and p >= h for h, p in zip(highs, positions, strict=True)):
                break
            if loop.time() - last_data >= idle_timeout_s:
                break
        records.sort(key=lambda r: (r.partition, r.offset))
        return records
    finally:
        await consumer.stop()


def consume_all(bootstrap: str, topic: str, idle_timeout_s: float = 3.0) -> list[Any]:
    """Every record of ``topic`` (aiokafka ``ConsumerRecord``), by partition then offset."""
    return run_sync(_consume_all(bootstrap, topic, idle_timeout_s))


def consume_values(bootstrap: str, topic: str, idle_timeout_s: float = 3.0) -> list[Any]:
    """The JSON-decoded values of every record of ``topic``, by partition then offset."""
    return [orjson.loads(r.value) for r in consume_all(bootstrap, topic, idle_timeout_s)]


async def _produce(
    bootstrap: str, topic: str, records: Iterable[tuple[bytes | str | None, Any]]
) -> int:
    producer = AIOKafkaProducer(bootstrap_servers=to_bootstrap(bootstrap), acks="all")
    await producer.start()
    try:
        futures = []
        for key, value in records:
            raw_key = key.encode("utf-8") if isinstance(key, str) else key
            raw_value = value if isinstance(value, bytes | None) else orjson.dumps(value)
            futures.append(await producer.send(topic, key=raw_key, value=raw_value))
        await asyncio.gather(*futures)
        return len(futures)
    finally:
        await producer.stop()


def produce(bootstrap: str, topic: str, records: Iterable[tuple[bytes | str | None, Any]]) -> int:
    """Send ``(key, value)`` pairs (values: bytes as is, anything else as JSON); wait for acks."""
    return run_sync(_produce(bootstrap, topic, records))


async def _committed(bootstrap: str, group: str, topic: str) -> dict[int, int | None]:
    consumer = AIOKafkaConsumer(
        bootstrap_servers=to_bootstrap(bootstrap), group_id=group, enable_auto_commit=False
    )
    await consumer.start()
    try:
        topics = await consumer.topics()
        if topic not in topics:
            return {}
        partitions = sorted(consumer.partitions_for_topic(topic))
        # committed() asks the group coordinator (OffsetFetch) without joining the group,
        # so reading offsets does not trigger a rebalance of the worker under test.
        return {p: await consumer.committed(TopicPartition(topic, p)) for p in partitions}
    finally:
        await consumer.stop()


def committed_offsets(bootstrap: str, group: str, topic: str) -> dict[int, int | None]:
    """Partition -> committed offset of ``group`` on ``topic`` (None when never committed)."""
    return run_sync(_committed(bootstrap, group, topic))


async def _delete(bootstrap: str, topics: list[str]) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=to_bootstrap(bootstrap))
    await admin.start()
    try:
        await admin.delete_topics(topics)
    finally:
        await admin.close()


def delete_topics(bootstrap: str, topics: list[str]) -> None:
    """Delete topics (best effort is up to the caller)."""
    if topics:
        run_sync(_delete(bootstrap, topics))


def wait_until(
    probe: Callable[[], T],
    done: Callable[[T], bool],
    *,
    timeout_s: float = 30.0,
    interval_s: float = 0.25,
    what: str = "condition",
) -> T:
    """Call ``probe`` until ``done(result)``; return the last result or fail with it.

    For end-to-end tests that wait for the worker, e.g.
    ``wait_until(lambda: consume_values(b, "forecasts"), lambda v: len(v) >= 40)``.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        result = probe()
        if done(result):
            return result
        if time.monotonic() >= deadline:
            raise AssertionError(
                f"timed out after {timeout_s}s waiting for {what}; last: {result!r}"[:2000]
            )
        time.sleep(interval_s)


def offsets_total(offsets: Mapping[int, int | None]) -> int:
    """Sum of committed offsets, counting never-committed partitions as 0."""
    return sum(o or 0 for o in offsets.values())
