"""The Faust internals :mod:`stream.worker.batch_consumer` relies on, checked against the installed
Faust.

The fast path replaces one private method of Faust's consumer and calls a few others. If a
Faust upgrade renames or re-shapes any of them, these tests fail here, with the name, rather
than the worker failing at run time (the integration tests in ``test_worker.py`` then prove
the whole path against a real broker).
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import faust
from faust.transport.consumer import Consumer as BaseConsumer
from faust.transport.consumer import Fetcher
from faust.transport.drivers.aiokafka import Consumer as AIOKafkaConsumer
from faust.types import TP

from stream.settings.worker import WorkerSettings
from stream.state.memory import MemoryWindowStore
from stream.worker import batch_consumer as fastpath
from stream.worker.app import create_app
from trendcast.testkit.doubles import FREQ, MODEL, FakeForecaster, ListSink


def _params(fn: object) -> list[str]:
    return list(inspect.signature(fn).parameters)  # type: ignore[arg-type]


def test_faust_still_drains_through_the_method_we_replace() -> None:
    assert _params(BaseConsumer._drain_messages) == ["self", "fetcher"]
    # The fetcher service still calls consumer._drain_messages(fetcher).
    assert "consumer._drain_messages(self)" in inspect.getsource(Fetcher)


def test_faust_private_calls_keep_their_shape() -> None:
    assert _params(BaseConsumer._wait_next_records) == ["self", "timeout"]
    assert inspect.iscoroutinefunction(BaseConsumer._wait_next_records)
    assert _params(BaseConsumer._commit_offsets) == ["self", "offsets", "start_new_transaction"]
    assert inspect.iscoroutinefunction(BaseConsumer._commit_offsets)
    assert inspect.iscoroutinefunction(BaseConsumer.perform_seek)
    source = inspect.getsource(BaseConsumer.__init__)
    for attribute in ("_buffered_partitions", "_read_offset"):
        assert attribute in source, attribute
    assert issubclass(fastpath.BatchConsumer, AIOKafkaConsumer)


def test_the_fetch_wait_still_reaches_aiokafka_through_the_attribute_we_set() -> None:
    from aiokafka import AIOKafkaConsumer as RawConsumer
    from faust.transport.drivers.aiokafka import AIOKafkaConsumerThread

    assert "_create_worker_consumer" in vars(AIOKafkaConsumerThread)
    assert "fetch_max_wait_ms=self._fetch_max_wait_ms" in inspect.getsource(RawConsumer.start)
    assert "_new_consumer_thread" in vars(AIOKafkaConsumer)


def test_the_rewind_by_time_still_finds_the_consumer_thread_and_its_client() -> None:
    from aiokafka import AIOKafkaConsumer as RawConsumer
    from faust.transport.consumer import ThreadDelegateConsumer
    from faust.transport.drivers.aiokafka import AIOKafkaConsumerThread

    # BatchConsumer._offset_for_time: self._thread.offsets_for_times -> call_thread(
    # self._ensure_consumer().offsets_for_times, ...).
    assert issubclass(fastpath.BatchConsumer, ThreadDelegateConsumer)
    assert "self._thread = self._new_consumer_thread()" in inspect.getsource(
        ThreadDelegateConsumer.__init__
    )
    assert "_ensure_consumer" in vars(AIOKafkaConsumerThread)
    assert inspect.iscoroutinefunction(AIOKafkaConsumerThread.call_thread)
    assert _params(RawConsumer.offsets_for_times) == ["self", "timestamps"]


def _fetched_partition(value_deserializer: Any) -> list[Any]:
    """Records of one fetched partition, as aiokafka's fetcher iterates them."""
    from aiokafka.record.default_records import DefaultRecordBatchBuilder
    from aiokafka.record.memory_records import MemoryRecords
    from aiokafka.structs import TopicPartition

    builder = DefaultRecordBatchBuilder(
        magic=2,
        compression_type=0,
        is_transactional=0,
        producer_id=-1,
        producer_epoch=-1,
        base_sequence=-1,
        batch_size=1 << 20,
    )
    for i in range(3):
        builder.append(
            i, timestamp=1_700_000_000_000 + i, key=b"k%d" % i, value=b"v%d" % i, headers=[]
        )
    records = MemoryRecords(bytes(builder.build()))
    cls = fastpath.fetcher_module.PartitionRecords
    partition = cls(TopicPartition("t", 0), records, [], 1, None, value_deserializer, True, 0)
    return list(partition)


def test_aiokafka_still_builds_its_records_through_the_hook_we_replace() -> None:
    from aiokafka.consumer import fetcher
    from aiokafka.structs import ConsumerRecord

    fastpath._install_raw_records()
    # The fetcher finds the class in its module when it makes one, with the consumer's
    # value deserializer, and makes each record with _consumer_record(tp, record).
    assert "PartitionRecords(" in inspect.getsource(fetcher.Fetcher)
    assert "self._value_deserializer," in inspect.getsource(fetcher.Fetcher)
    assert "self._consumer_record(tp, record)" in inspect.getsource(
        fetcher.PartitionRecords._unpack_records
    )
    assert _params(fetcher.PartitionRecords._consumer_record) == ["self", "tp", "record"]
    # Marked: the C records, with what the worker reads (offset 0 is below the fetch offset).
    raw = _fetched_partition(fastpath._raw_value)
    assert [(r.offset, r.key, r.value, r.timestamp) for r in raw] == [
        (1, b"k1", b"v1", 1_700_000_000_001),
        (2, b"k2", b"v2", 1_700_000_000_002),
    ]
    assert not isinstance(raw[0], ConsumerRecord)
    # Unmarked consumers (any other in the process) get ConsumerRecords as before.
    plain = _fetched_partition(None)
    assert all(isinstance(r, ConsumerRecord) for r in plain)
    assert [(r.topic, r.offset, r.value) for r in plain] == [("t", 1, b"v1"), ("t", 2, b"v2")]


def test_the_worker_consumer_is_marked_for_raw_records(tmp_path: Path) -> None:
    settings = WorkerSettings(web_enabled=False, data_dir=tmp_path)
    app = create_app(settings, FakeForecaster(), MemoryWindowStore(FREQ), MODEL, sink=ListSink())

    async def made() -> Any:
        thread = app.consumer._new_consumer_thread()  # type: ignore[attr-defined]
        return thread._create_worker_consumer(app.transport)  # aiokafka's, not started

    raw = asyncio.run(made())
    assert raw._value_deserializer is fastpath._raw_value
    assert fastpath.fetcher_module.PartitionRecords is fastpath._RawPartitionRecords


def test_the_app_consumes_through_the_batch_consumer(tmp_path: Path) -> None:
    settings = WorkerSettings(web_enabled=False, data_dir=tmp_path, batch_size=7)
    app = create_app(settings, FakeForecaster(), MemoryWindowStore(FREQ), MODEL, sink=ListSink())
    consumer_class = app.transport.Consumer
    assert issubclass(consumer_class, fastpath.BatchConsumer)
    # staticmethod on the class: reading it back gives the handler itself.
    assert consumer_class.batch_handler == app.trendcast_handle_fetch  # type: ignore[attr-defined]
    assert consumer_class.batch_preparer == app.trendcast_prepare_fetch  # type: ignore[attr-defined]
    assert any(settings.sales_topic in t.topics for t in app.topics)
    assert app.conf.broker_max_poll_records == 7
    assert consumer_class.fetch_max_wait_ms == settings.fetch_max_wait_ms
    assert not app.agents  # nothing reads the sales topic message by message


def test_wait_idle_is_immediate_without_a_batch() -> None:
    class Probe(fastpath.BatchConsumer):  # no __init__: only the idle event is exercised
        def __init__(self) -> None:
            pass

    async def scenario() -> bool:
        return await Probe().wait_idle(0.1)

    assert asyncio.run(scenario())
    assert isinstance(faust.App, type)


_TP = TP("sales", 0)


def _records(*offsets: int) -> dict[TP, list[SimpleNamespace]]:
    return {_TP: [SimpleNamespace(offset=o) for o in offsets]}


class _Scripted(fastpath.BatchConsumer):
    """The consumer's surroundings, scripted: ``fetch(n)`` answers the n-th fetch."""

    def __init__(self, fetch: Callable[[int], Awaitable[Any]]) -> None:
        self._stopped = asyncio.Event()
        self.app = SimpleNamespace(
            consumer_generation_id=1,
            monitor=SimpleNamespace(track_tp_end_offset=lambda tp, offset: None),
        )
        self.flow_active = True
        self._buffered_partitions = set()
        self._read_offset = {}
        self.fetches = 0
        self.fetch = fetch
        self.seeks: list[tuple[TP, int]] = []
        self.handed: list[list[int]] = []

    @property
    def should_stop(self) -> bool:
        return self._stopped.is_set()

    def assignment(self) -> set[TP]:
        return {_TP}

    def highwater(self, tp: TP) -> int:
        return 100

    async def seek(self, partition: TP, offset: int) -> None:
        self.seeks.append((partition, offset))

    async def _wait_next_records(self, timeout: float) -> Any:
        self.fetches += 1
        got = await self.fetch(self.fetches)
        if not got:
            self._stopped.set()
        return got, None

    def drain(self) -> None:
        fetcher = SimpleNamespace(_stopped=asyncio.Event())
        asyncio.run(asyncio.wait_for(self._drain_messages(fetcher), timeout=5))


def test_a_batch_fetched_ahead_across_a_rebalance_is_sought_back_not_handed_over() -> None:
    """The fetch that runs during a batch is handed over only in its own generation."""
    rebalanced = asyncio.Event()

    async def fetch(n: int) -> dict[TP, list[SimpleNamespace]]:
        if n == 1:
            return _records(0, 1, 2)
        if n == 2:  # fetched ahead, comes back after the rebalance
            await rebalanced.wait()
            return _records(3, 4, 5)
        if n == 3:  # read again after the seek
            return _records(3, 4, 5)
        return {}

    probe = _Scripted(fetch)

    async def handle(batch: Mapping[TP, Sequence[Any]]) -> Mapping[TP, int]:
        probe.handed.append([r.offset for r in batch[_TP]])
        if len(probe.handed) == 1:  # a rebalance while the first batch is processed
            probe.app.consumer_generation_id = 2
            rebalanced.set()
            await asyncio.sleep(0.01)
        return {}

    probe.batch_handler = handle  # type: ignore[assignment]
    probe.drain()
    assert probe.handed == [[0, 1, 2], [3, 4, 5]]
    assert probe.seeks == [(_TP, 3)]


def test_the_batch_fetched_ahead_is_prepared_while_the_one_before_is_handled() -> None:
    """The preparer sees each batch before the handler does, and the next one overlaps."""
    batches = [_records(0, 1), _records(2, 3), _records(4)]

    async def fetch(n: int) -> dict[TP, list[SimpleNamespace]]:
        return batches[n - 1] if n <= len(batches) else {}

    probe = _Scripted(fetch)
    log: list[tuple[str, list[int], bool]] = []
    handling = asyncio.Event()

    async def prepare(batch: Mapping[TP, Sequence[Any]]) -> None:
        await asyncio.sleep(0)  # validation steps yield to the batch in flight
        offsets = [r.offset for r in batch[_TP]]
        log.append(("prepare", offsets, handling.is_set()))
        if offsets == [2, 3]:
            raise RuntimeError("a failing preparer only loses its head start")

    async def handle(batch: Mapping[TP, Sequence[Any]]) -> Mapping[TP, int]:
        offsets = [r.offset for r in batch[_TP]]
        handling.set()
        await asyncio.sleep(0.01)  # awaiting Redis
        log.append(("handle", offsets, True))
        handling.clear()
        return {}

    probe.batch_handler = handle  # type: ignore[assignment]
    probe.batch_preparer = prepare  # type: ignore[assignment]
    probe.drain()
    # (what, offsets, whether a batch was being handled at that moment)
    assert log == [
        ("prepare", [0, 1], False),  # the first fetch: nothing in flight yet
        ("prepare", [2, 3], True),
        ("handle", [0, 1], True),
        ("prepare", [4], True),
        ("handle", [2, 3], True),  # handed over although its preparation failed
        ("handle", [4], True),
    ]
