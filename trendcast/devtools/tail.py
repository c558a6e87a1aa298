"""``trendcast tail``: the last records of a topic (or all, or follow new ones) as JSON lines.

Each record becomes one JSON object::

    {"topic": "forecasts", "partition": 0, "offset": 41, "timestamp_ms": 1700000000000,
     "key": "85123A", "value": {...}}

``value`` is the decoded JSON when the bytes are JSON, else ``null`` with the raw bytes in
``value_b64``; ``key`` is the UTF-8 text, else ``null`` with ``key_b64``.

Finding "the end" of a partition: the obvious ListOffsets(latest) request is what Apache
Kafka clients use, but Tansu under-reports it (it answered 1 for partitions holding hundreds
of records), while the high watermark carried by every Fetch response is right on both. So
the reader starts at ``max(log start, reported end - n)`` - never later than the true start
of the last ``n`` records, since the reported end is never above the real one - and after the
first fetch re-seeks to ``high watermark - n``, which makes it cheap on Tansu too. It stops
when every partition's position reaches its high watermark, or when nothing arrives for
``idle_timeout_s`` (a broker that sends no high watermark at all).

The consumer has no group: tailing never commits offsets or disturbs the worker's group.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import sys
from collections import deque
from collections.abc import AsyncGenerator, Iterator
from typing import Any, TextIO

import orjson
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError

from stream.settings.security import KafkaSecurity
from trendcast.devtools.embedded import kafka_failure_reason, sasl_refused, to_bootstrap
from trendcast.exceptions import BrokerError, ConfigError

__all__ = ["atail", "decode_record", "print_tail", "tail"]

logger = logging.getLogger(__name__)

# Long-poll of one fetch: short, so an idle topic is recognised quickly.
_FETCH_WAIT_MS = 100
_POLL_MS = 200


def decode_record(
    topic: str,
    partition: int,
    offset: int,
    timestamp_ms: int | None,
    key: bytes | None,
    value: bytes | None,
) -> dict[str, Any]:
    """A record as a JSON-ready dict (see the module docstring).

    >>> decode_record("t", 0, 5, None, b"k", b'{"a": 1}')["value"]
    {'a': 1}
    >>> rec = decode_record("t", 0, 5, None, b"\\xff", b"\\xff")
    >>> rec["key"], rec["key_b64"], rec["value"], rec["value_b64"]
    (None, '/w==', None, '/w==')
    """
    record: dict[str, Any] = {
        "topic": topic,
        "partition": partition,
        "offset": offset,
        "timestamp_ms": timestamp_ms,
        "key": None,
        "value": None,
    }
    if key is not None:
        try:
            record["key"] = key.decode("utf-8")
        except UnicodeDecodeError:
            record["key_b64"] = base64.b64encode(key).decode("ascii")
    if value is not None:
        try:
            record["value"] = orjson.loads(value)
        except orjson.JSONDecodeError:
            record["value_b64"] = base64.b64encode(value).decode("ascii")
    return record


def _decode(msg: Any) -> dict[str, Any]:
    return decode_record(msg.topic, msg.partition, msg.offset, msg.timestamp, msg.key, msg.value)


async def _assign_all(consumer: Any, topic: str, bootstrap: str) -> list[TopicPartition]:
    # consumer.topics() lists every topic; asking for one unknown topic by name would make
    # Tansu (and a Kafka with auto.create.topics.enable) create it.
    topics = await consumer.topics()
    if topic not in topics:
        known = ", ".join(sorted(t for t in topics if not t.startswith("__"))) or "none"
        raise BrokerError(f"topic {topic!r} does not exist on {bootstrap} (topics: {known})")
    partitions = consumer.partitions_for_topic(topic) or set()
    tps = [TopicPartition(topic, p) for p in sorted(partitions)]
    consumer.assign(tps)
    return tps


async def _backlog(
    consumer: Any, tps: list[TopicPartition], n: int | None, idle_timeout_s: float
) -> list[Any]:
    """Read every partition to its high watermark; return the last ``n`` records overall."""
    begin = await consumer.beginning_offsets(tps)
    end = await consumer.end_offsets(tps)
    for tp in tps:
        start = begin[tp] if n is None else max(begin[tp], end[tp] - n)
        consumer.seek(tp, start)
    kept: dict[TopicPartition, deque[Any]] = {tp: deque(maxlen=n) for tp in tps}
    resought: set[TopicPartition] = set()
    loop = asyncio.get_running_loop()
    last_data = loop.time()
    while True:
        batch = await consumer.getmany(*tps, timeout_ms=_POLL_MS)
        for tp, messages in batch.items():
            kept[tp].extend(messages)
        if batch:
            last_data = loop.time()
        caught_up = True
        for tp in tps:
            high = consumer.highwater(tp)
            if high is None:
                caught_up = False
                continue
            position = await consumer.position(tp)
            if n is not None and tp not in resought:
                resought.add(tp)
                target = max(begin[tp], high - n)
                if position < target:
                    consumer.seek(tp, target)
                    position = target
            if position < high:
                caught_up = False
        if caught_up:
            break
        if loop.time() - last_data >= idle_timeout_s:
            logger.debug("no record for %.1fs; treating the topic as fully read", idle_timeout_s)
            break
    merged = [msg for tp in tps for msg in kept[tp]]
    merged.sort(key=lambda m: (m.timestamp, m.partition, m.offset))
    return merged if n is None else merged[len(merged) - min(n, len(merged)) :]


async def atail(
    bootstrap: str,
    topic: str,
    *,
    n: int | None = 10,
    follow: bool = False,
    timeout_s: float | None = None,
    idle_timeout_s: float = 2.0,
    security: KafkaSecurity | None = None,
) -> AsyncGenerator[dict[str, Any], None]:
    """Yield the last ``n`` records of ``topic`` (all when ``n`` is None), then follow.

    Args:
        bootstrap: Kafka bootstrap servers (``kafka://`` URLs accepted).
        topic: Topic to read.
        n: How many of the most recent records to yield first, merged over partitions in
            record-timestamp order; None for every record, 0 for none.
        follow: Keep yielding new records after the backlog.
        timeout_s: Stop following after this many seconds (None: until cancelled).
        idle_timeout_s: Backlog reading ends when nothing arrives for this long even though
            the high watermark says more exists (defensive; see the module docstring).
        security: SASL/TLS of the cluster (``KafkaSecurity.from_settings(settings)``);
            PLAINTEXT when None.

    Raises:
        ConfigError: Negative ``n``, or unreadable TLS files.
        BrokerError: Unreachable broker or missing topic.
    """
    if n is not None and n < 0:
        raise ConfigError(f"expected -n >= 0, got {n}")
    bootstrap = to_bootstrap(bootstrap)
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        group_id=None,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        fetch_max_wait_ms=_FETCH_WAIT_MS,
        **(security or KafkaSecurity()).aiokafka_kwargs(),
    )
    try:
        try:
            await consumer.start()
            tps = await _assign_all(consumer, topic, bootstrap)
            backlog = await _backlog(consumer, tps, n, idle_timeout_s)
        except KafkaError as exc:
            why = kafka_failure_reason(
                bootstrap, exc, (security or KafkaSecurity()).aiokafka_kwargs()
            )
            raise BrokerError(f"cannot read {topic} on {bootstrap}: {why}") from exc
        except KeyError as exc:  # aiokafka's answer to a refused SCRAM login
            raise sasl_refused(exc, f"cannot read {topic} on {bootstrap}") from exc
        for msg in backlog:
            yield _decode(msg)
        if not follow:
            return
        loop = asyncio.get_running_loop()
        deadline = None if timeout_s is None else loop.time() + timeout_s
        while deadline is None or loop.time() < deadline:
            wait_ms = _POLL_MS if deadline is None else max(1, int((deadline - loop.time()) * 1000))
            try:
                batch = await consumer.getmany(*tps, timeout_ms=min(_POLL_MS, wait_ms))
            except KafkaError as exc:
                raise BrokerError(f"lost {topic} on {bootstrap}: {exc}") from exc
            messages = [m for msgs in batch.values() for m in msgs]
            messages.sort(key=lambda m: (m.timestamp, m.partition, m.offset))
            for msg in messages:
                yield _decode(msg)
    finally:
        await consumer.stop()


def tail(
    bootstrap: str,
    topic: str,
    *,
    n: int | None = 10,
    follow: bool = False,
    timeout_s: float | None = None,
    idle_timeout_s: float = 2.0,
    security: KafkaSecurity | None = None,
) -> Iterator[dict[str, Any]]:
    """Blocking :func:`atail` (same arguments) for synchronous callers.

    It drives its own event loop, so call it from code without a running loop (the CLI,
    plain tests); async code uses :func:`atail`. Closing the iterator early stops the
    consumer cleanly.
    """
    loop = asyncio.new_event_loop()
    agen = atail(
        bootstrap,
        topic,
        n=n,
        follow=follow,
        timeout_s=timeout_s,
        idle_timeout_s=idle_timeout_s,
        security=security,
    )
    try:
        while True:
            step = asyncio.ensure_future(agen.__anext__(), loop=loop)
            try:
                record = loop.run_until_complete(step)
            except StopAsyncIteration:
                return
            except BaseException:
                # Ctrl-C lands here while the generator is suspended inside a fetch: cancel
                # that step so the generator's own cleanup stops the consumer, then re-raise.
                step.cancel()
                with contextlib.suppress(BaseException):
                    loop.run_until_complete(step)
                raise
            yield record
    finally:
        with contextlib.suppress(RuntimeError):
            loop.run_until_complete(agen.aclose())
        loop.close()


def print_tail(
    bootstrap: str,
    topic: str,
    *,
    n: int | None = 10,
    follow: bool = False,
    timeout_s: float | None = None,
    out: TextIO | None = None,
    security: KafkaSecurity | None = None,
) -> int:
    """Write :func:`tail` records to ``out`` (stdout) as JSON lines; return how many.

    Each line is flushed, so ``trendcast tail -f | jq`` shows records as they arrive.
    """
    stream = out or sys.stdout
    count = 0
    records = tail(bootstrap, topic, n=n, follow=follow, timeout_s=timeout_s, security=security)
    for record in records:
        stream.write(orjson.dumps(record).decode("utf-8") + "\n")
        stream.flush()
        count += 1
    return count
