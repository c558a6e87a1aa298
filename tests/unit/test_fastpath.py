"""The Faust internals :mod:`stream.fastpath` relies on, checked against the installed Faust.

The fast path replaces one private method of Faust's consumer and calls a few others. If a
Faust upgrade renames or re-shapes any of them, these tests fail here, with the name, rather
than the worker failing at run time (the integration tests in ``test_worker.py`` then prove
the whole path against a real broker).
"""

from __future__ import annotations

import asyncio
import inspect
from pathlib import Path

import faust
from faust.transport.consumer import Consumer as BaseConsumer
from faust.transport.consumer import Fetcher
from faust.transport.drivers.aiokafka import Consumer as AIOKafkaConsumer

from stream import fastpath
from stream.app import create_app
from stream.config import WorkerSettings
from stream.windows.memory import MemoryWindowStore
from tests.unit.test_agent import FREQ, MODEL, FakeForecaster, ListSink


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


def test_the_app_consumes_through_the_batch_consumer(tmp_path: Path) -> None:
    settings = WorkerSettings(web_enabled=False, data_dir=tmp_path, batch_size=7)
    app = create_app(settings, FakeForecaster(), MemoryWindowStore(FREQ), MODEL, sink=ListSink())
    consumer_class = app.transport.Consumer
    assert issubclass(consumer_class, fastpath.BatchConsumer)
    # staticmethod on the class: reading it back gives the handler itself.
    assert consumer_class.batch_handler == app.trendcast_handle_fetch  # type: ignore[attr-defined]
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
