"""The worker without services: the app's fetch handler, the in-memory store, a fake model.

The first test drives the handler the fast path (``stream.worker.batch_consumer``) calls with
each fetch, with real aiokafka records; the next ones the other hooks of
:class:`stream.worker.runtime.WorkerRuntime` (web pages, store timing, the store probe); the
rest call :class:`stream.pipeline.processor.SalesProcessor` directly for the event-time cases
(late events, re-delivery, restarts, failures) that are awkward to stage through a channel.
"""

from __future__ import annotations

import asyncio
import base64
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from aiokafka.structs import ConsumerRecord
from faust.types import TP

from stream.inference.model_info import ModelInfo
from stream.monitoring.health import STATE_STORE, Health
from stream.monitoring.telemetry import TimedWindowStore
from stream.pipeline.processor import SalesProcessor
from stream.settings.worker import WorkerSettings
from stream.state.base import PartitionId
from stream.state.memory import MemoryWindowStore
from stream.worker.app import create_app
from trendcast.exceptions import BrokerError, ForecastError, StateStoreError
from trendcast.forecasting.base import ForecastBatch, WindowBatch
from trendcast.testkit.doubles import (
    DAY,
    FREQ,
    MODEL,
    T0,
    FakeForecaster,
    Feed,
    ListSink,
    day_iso,
    processor,
    sale,
)

# --- the Faust agent -------------------------------------------------------------------------


async def _wait_for(condition: Any, timeout_s: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not condition():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.01)


def test_agent_stores_valid_dead_letters_invalid_and_forecasts_closed_buckets(
    tmp_path: Path,
) -> None:
    sink, store, forecaster = ListSink(), MemoryWindowStore(FREQ), FakeForecaster()
    settings = WorkerSettings(
        web_enabled=False, data_dir=tmp_path, batch_size=4, batch_timeout_s=0.01
    )
    app = create_app(settings, forecaster, store, MODEL, sink=sink)
    values = [
        (b"a", sale("a", 0.5, 2)),
        (b"a", sale("a", 1.5, 3)),
        (b"x", b"\xffnot utf8"),
        (b"b", sale("b", 1.2, 1, price=2.5, event_id="b-1")),
        (b"a", sale("a", 3.0, 1)),  # watermark day 2: days 0, 1 close
    ]
    records = [
        ConsumerRecord("sales", 0, offset, 0, 0, key, value, None, len(key), len(value), ())
        for offset, (key, value) in enumerate(values)
    ]

    async def scenario() -> None:
        tp = TP("sales", 0)
        assert await app.trendcast_handle_fetch({tp: records[:2]}) is not None
        assert await app.trendcast_handle_fetch({tp: records[2:]}) is not None
        await _wait_for(lambda: len(sink.forecasts) >= 3)
        windows = await store.read(["a", "b"])
        assert {b: s.quantity for b, s in windows["a"].buckets.items()} == {
            T0: 2.0,
            T0 + DAY: 3.0,
            T0 + 3 * DAY: 1.0,
        }
        assert windows["b"].buckets[T0 + DAY].quantity == 1.0

    asyncio.run(scenario())
    assert [d["reason"] for d in sink.dead] == ["not_utf8"]
    dead = sink.dead[0]
    assert dead["source"] == {"topic": "sales", "partition": 0, "offset": 2}
    assert base64.b64decode(dead["value_b64"]) == b"\xffnot utf8"
    # Forecasting started at the first event's open bucket (day -1, no sales yet): day 0 has
    # a; day 1 has a and b.
    assert sorted(sink.pairs()) == [("a", day_iso(1)), ("a", day_iso(2)), ("b", day_iso(2))]
    rec = dict(sink.forecasts)["b"]
    assert rec["freq"] == "1D" and rec["model_version"] == "fake-1"
    assert [h["date"] for h in rec["horizon"]] == ["2011-01-03", "2011-01-04", "2011-01-05"]
    assert rec["horizon"][0] == {
        "date": "2011-01-03",
        "mean": 1.0,
        "p10": 0.5,
        "p50": 1.0,
        "p90": 2.0,
    }
    assert rec["fallback"] is True
    assert isinstance(rec["emitted_at_ms"], int)


# --- the runtime behind the app's hooks --------------------------------------------------------


class _Get:
    """The little of an aiohttp request a Faust view's dispatch reads."""

    method = "GET"
    match_info: dict[str, str] = {}


def _app(tmp_path: Path, store: Any = None, **kwargs: Any) -> Any:
    settings = WorkerSettings(web_enabled=False, data_dir=tmp_path)
    store = store if store is not None else MemoryWindowStore(FREQ)
    return create_app(settings, FakeForecaster(), store, MODEL, sink=ListSink(), **kwargs)


def test_pages_answer_through_faust_views(tmp_path: Path) -> None:
    health = Health()
    app = _app(tmp_path, health=health)

    async def page(path: str) -> Any:
        return await app.web.views[path].dispatch(_Get())

    async def scenario() -> None:
        response = await page("/health")
        assert (response.status, response.content_type) == (200, "application/json")
        health.failing(STATE_STORE, "Redis down")
        response = await page("/health")
        assert response.status == 503
        assert b"Redis down" in response.body
        metrics = await page("/metrics")
        assert metrics.status == 200 and b"# TYPE trendcast_events_in_total" in metrics.body
        ready = await page("/ready")  # no broker in a unit test: not ready, and says why
        assert ready.status == 503 and b'"broker":{"ok":false' in ready.body

    asyncio.run(scenario())


def test_only_a_remote_store_is_timed_as_redis_round_trips(tmp_path: Path) -> None:
    class Remote(MemoryWindowStore):
        @property
        def remote(self) -> bool:
            return True

    local, remote = MemoryWindowStore(FREQ), Remote(FREQ)
    assert _app(tmp_path / "l", local).trendcast_processor.store is local
    timed = _app(tmp_path / "r", remote).trendcast_processor.store
    assert isinstance(timed, TimedWindowStore) and timed.inner is remote


def test_the_state_store_probe_reports_failure_and_recovery(tmp_path: Path) -> None:
    class Flaky(MemoryWindowStore):
        down = True

        async def ping(self) -> None:
            if self.down:
                raise StateStoreError("Redis unavailable: connection refused")

    store, health = Flaky(FREQ), Health()
    runtime = _app(tmp_path, store, health=health).trendcast_runtime
    asyncio.run(runtime.probe_state_store())
    assert not health.healthy and STATE_STORE in health.failures
    store.down = False
    asyncio.run(runtime.probe_state_store())
    assert health.healthy


# --- the processor ---------------------------------------------------------------------------


def test_every_active_item_gets_exactly_one_forecast_per_closed_bucket() -> None:
    sink, forecaster = ListSink(), FakeForecaster()
    proc = processor(sink=sink, forecaster=forecaster, inference_batch_size=2)
    feed = Feed()

    async def scenario() -> None:
        await proc.process(feed(sale("a", 0), sale("b", 0), sale("c", 1)))
        await proc.process(feed(sale("a", 2.5)))  # closes day 0 (open from day 1)
        await proc.process(feed(sale("a", 2.6)))  # nothing new closes
        await proc.process(feed(sale("b", 11)))  # closes days 1..9

    asyncio.run(scenario())
    expected = {("a", day_iso(1)), ("b", day_iso(1))}
    # Window 7: an item is forecast while it sold within the bucket's last 7 buckets.
    for day in range(1, 10):
        for item, sale_days in (("a", {0, 2}), ("b", {0}), ("c", {1})):
            if any(s <= day <= s + 6 for s in sale_days):
                expected.add((item, day_iso(day + 1)))
    assert sorted(sink.pairs()) == sorted(expected)
    assert len(sink.pairs()) == len(set(sink.pairs()))
    assert all(len(b) <= 2 for b in forecaster.batches)  # micro-batches


def test_window_given_to_the_model() -> None:
    forecaster = FakeForecaster()
    proc = processor(forecaster=forecaster)
    feed = Feed()

    async def scenario() -> None:
        await proc.process(
            feed(
                sale("a", 1, 2),
                sale("a", 1.5, 1),
                sale("a", 3, 4),
                sale("a", 3.2, -10),
                sale("a", 5, 1),
            )
        )
        await proc.process(feed(sale("a", 6.1, 7)))  # closes days 0..4

    asyncio.run(scenario())
    batch = forecaster.batches[-1]
    row = [i for i, b in enumerate(batch.last_start_ms) if b == T0 + 4 * DAY][0]
    # Days -2..4; returns are netted and the bucket clipped at zero, as offline.
    assert batch.quantities[row].tolist() == [0, 0, 0, 3, 0, 0, 0]
    assert batch.history_len[row] == 4
    assert batch.prices is None


def test_price_aware_models_get_prices() -> None:
    forecaster = FakeForecaster()
    model = ModelInfo(freq=FREQ, window=3, horizon=3, model_version="p", uses_prices=True)
    proc = SalesProcessor(
        MemoryWindowStore(FREQ),
        forecaster,
        model,
        ListSink(),
        max_future_ms=None,
        allowed_lateness_ms=DAY,
    )
    feed = Feed()

    async def scenario() -> None:
        await proc.process(
            feed(
                sale("a", 0, 1, price=2.0),
                sale("a", 0, 3, price=4.0),
                sale("a", 1, 1),
                sale("a", 3),
            )
        )

    asyncio.run(scenario())
    batch = forecaster.batches[-1]
    assert batch.prices is not None
    # Window of day 1 = days -1..1: padding is NaN, day 1 (no price) carries day 0's forward.
    np.testing.assert_array_equal(batch.prices[-1], [np.nan, 3.5, 3.5])


def test_late_events_go_to_the_dead_letter_topic_and_grace_updates_reforecast() -> None:
    sink = ListSink()
    late: list[int] = []
    proc = processor(sink=sink, grace_buckets=1, on_late=lambda e, m, by: late.append(by))
    feed = Feed()

    async def scenario() -> None:
        await proc.process(feed(sale("a", 0), sale("b", 0), sale("a", 4)))  # closes -1..2
        before = len(sink.forecasts)
        # Open from day 3; grace 1 -> day 2 still writable, day 1 late.
        await proc.process(feed(sale("a", 2.5, 5), sale("b", 1.5, 9)))
        assert sink.pairs()[before:] == [("a", day_iso(3))]  # re-forecast as of day 2's end

    asyncio.run(scenario())
    assert [d["reason"] for d in sink.dead] == ["late"]
    dead = sink.dead[0]
    assert (dead["item_id"], dead["source"]["offset"]) == ("b", 4)
    assert dead["late_by_ms"] == late[0] == 3 * DAY - int(1.5 * DAY)
    windows = asyncio.run(proc.store.read(["a", "b"]))
    assert windows["a"].buckets[T0 + 2 * DAY].quantity == 5.0
    assert T0 + DAY not in windows["b"].buckets


def test_redelivered_batch_changes_nothing() -> None:
    sink, store = ListSink(), MemoryWindowStore(FREQ)
    proc = processor(store=store, sink=sink)
    feed = Feed()
    batch = feed(sale("a", 0, 1), sale("a", 1, 2), sale("b", 1, 3, event_id="x"), sale("a", 3, 1))

    async def scenario() -> None:
        await proc.process(batch)
        before = (await store.read(["a", "b"]), list(sink.pairs()))
        stats = await proc.process(batch)  # same offsets: dedupe by partition/offset
        assert stats.forecasts == 0
        # The same event_id under a new offset is a duplicate too.
        stats = await proc.process(feed(sale("b", 2, 3, event_id="x")))
        assert (await store.read(["a", "b"]), sink.pairs()) == before

    asyncio.run(scenario())


def test_restarted_worker_continues_from_stored_partition_state() -> None:
    store = MemoryWindowStore(FREQ)
    sink1, sink2 = ListSink(), ListSink()
    feed = Feed()

    async def scenario() -> None:
        proc1 = processor(store=store, sink=sink1)
        await proc1.process(feed(sale("a", 0), sale("a", 3)))
        await proc1.flush()  # what the worker does at revoke and at stop
        # A new worker (empty caches) takes the partition over.
        proc2 = processor(store=store, sink=sink2)
        await proc2.process(feed(sale("a", 0.5, 9), sale("a", 5)))

    asyncio.run(scenario())
    assert sink1.pairs() == [("a", day_iso(1)), ("a", day_iso(2))]
    # Day 0 is late for the new worker (it knows the watermark); days 2..3 close now.
    assert sink2.pairs() == [("a", day_iso(3)), ("a", day_iso(4))]
    assert [d["reason"] for d in sink2.dead] == ["late"]


def test_clock_stored_with_the_next_batch_and_a_lost_one_only_re_emits() -> None:
    store = MemoryWindowStore(FREQ)
    sink1, sink2 = ListSink(), ListSink()
    feed = Feed()
    pid = PartitionId("sales", 0)

    async def scenario() -> None:
        proc1 = processor(store=store, sink=sink1)
        await proc1.process(feed(sale("a", 0), sale("a", 3)))  # days 0, 1 close
        await proc1.flush()
        await proc1.process(feed(sale("a", 4)))  # day 2 closes
        # Outputs delivered, clock not stored yet: it rides with the next round trip.
        assert (await store.load_partition(pid)).emitted_to_ms == T0 + 2 * DAY
        # A crash now (no flush): the next worker re-emits day 2, it never skips it.
        await processor(store=store, sink=sink2).process(feed(sale("a", 4.5)))

    asyncio.run(scenario())
    assert sink1.pairs() == [("a", day_iso(1)), ("a", day_iso(2)), ("a", day_iso(3))]
    assert sink2.pairs() == [("a", day_iso(3))]


def test_failed_batch_is_retried_without_losing_or_doubling_forecasts() -> None:
    sink, store = ListSink(fail_forecasts=1), MemoryWindowStore(FREQ)
    proc = processor(store=store, sink=sink)
    feed = Feed()
    batch = feed(sale("a", 0), sale("a", 3))

    async def scenario() -> None:
        with pytest.raises(BrokerError):
            await proc.process(batch)
        await proc.process(batch)  # the un-acked batch comes again
        window = (await store.read(["a"]))["a"]
        assert {b: s.quantity for b, s in window.buckets.items()} == {T0: 1, T0 + 3 * DAY: 1}

    asyncio.run(scenario())
    assert sink.pairs() == [("a", day_iso(1)), ("a", day_iso(2))]


def test_partitions_have_independent_clocks() -> None:
    sink = ListSink()
    proc = processor(sink=sink)
    feed = Feed()

    async def scenario() -> None:
        await proc.process(
            feed(sale("a", 0), partition=0) + feed(sale("b", 0), sale("b", 5), partition=1)
        )
        # Partition 0's clock has not moved: day 1 is on time there.
        await proc.process(feed(sale("a", 1), partition=0))
        await proc.flush()

    asyncio.run(scenario())
    assert {k for k, _ in sink.pairs()} == {"b"}
    assert sink.dead == []
    assert asyncio.run(proc.store.load_partition(PartitionId("sales", 0))).max_event_ms == T0 + DAY


def test_one_round_trip_per_batch_plus_a_read_at_closes() -> None:
    """Sums and the previous batch's clock together; windows read only when buckets close."""
    calls: list[str] = []

    class Counting(MemoryWindowStore):
        async def apply(self, items, partitions):
            calls.append("apply")
            return await super().apply(items, partitions)

        async def read(self, item_ids):
            calls.append("read")
            return await super().read(item_ids)

    proc = processor(store=Counting(FREQ))
    feed = Feed()
    many = [sale(f"i{n}", day / 10) for day in range(20) for n in range(5)]

    async def scenario() -> None:
        await proc.process(feed(*many[:50]))  # no bucket closes: one write
        assert calls == ["apply"]
        calls.clear()
        await proc.process(feed(*many[50:]))  # buckets close: read windows too
        assert calls == ["apply", "read"]
        calls.clear()
        await proc.flush()  # idle: the last clock on its own
        assert calls == ["apply"]

    asyncio.run(scenario())


def test_forecaster_errors_surface_as_forecast_errors() -> None:
    class Broken(FakeForecaster):
        def predict(self, batch: WindowBatch) -> ForecastBatch:
            raise RuntimeError("boom")

    proc = processor(forecaster=Broken())

    with pytest.raises(ForecastError, match="boom"):
        asyncio.run(proc.process(Feed()(sale("a", 0), sale("a", 3))))


# --- start-up ------------------------------------------------------------------------------


def test_worker_refuses_to_start_without_a_verifiable_bundle(tmp_path: Path) -> None:
    from stream.worker.runner import build_worker_app
    from trendcast.exceptions import BundleError
    from trendcast.testkit.bundles import make_fake_bundle

    def settings(bundle: Path) -> WorkerSettings:
        return WorkerSettings(
            bundle=bundle,
            web_enabled=False,
            data_dir=tmp_path / "d",
            redis_url="redis://127.0.0.1:1/0",
        )

    with pytest.raises(BundleError, match="not found"):
        build_worker_app(settings(tmp_path / "missing"))
    bundle = make_fake_bundle(tmp_path / "bundle", window=7, horizon=3)
    (bundle / "model.onnx").write_bytes(b"tampered")
    with pytest.raises(BundleError, match="checksum"):
        build_worker_app(settings(bundle))


def test_worker_refuses_to_start_without_redis(tmp_path: Path) -> None:
    from stream.worker.runner import build_worker_app
    from trendcast.exceptions import StateStoreError
    from trendcast.testkit.bundles import make_fake_bundle

    bundle = make_fake_bundle(tmp_path / "bundle", window=7, horizon=3)
    settings = WorkerSettings(
        bundle=bundle, web_enabled=False, data_dir=tmp_path / "d", redis_url="redis://127.0.0.1:1/0"
    )
    with pytest.raises(StateStoreError, match="unavailable"):
        build_worker_app(settings)


def test_only_offsets_whose_clock_is_stored_become_committable() -> None:
    """Whoever continues a partition from its committed offset must find a clock that far."""
    store = MemoryWindowStore(FREQ)
    proc = processor(store=store)
    feed = Feed()
    pid = PartitionId("sales", 0)

    async def scenario() -> None:
        await proc.process(feed(sale("a", 0), sale("a", 3)))  # offsets 0, 1
        assert proc.take_committable() == {}  # clock not stored yet: nothing to commit
        await proc.process(feed(sale("a", 3.5)))  # offset 2; stores the first batch's clock
        assert proc.take_committable() == {pid: 2}
        assert (await store.load_partition(pid)).next_offset == 2
        await proc.flush()  # idle: the second batch's clock, and its offset
        assert proc.take_committable() == {pid: 3}
        assert proc.take_committable() == {}

    asyncio.run(scenario())


def test_a_failed_batch_keeps_the_previous_clock_pending_and_nothing_committable() -> None:
    sink = ListSink()
    proc = processor(sink=sink)
    feed = Feed()

    async def scenario() -> None:
        await proc.process(feed(sale("a", 0), sale("a", 3)))
        sink.fail_forecasts = 2
        with pytest.raises(BrokerError):
            await proc.process(feed(sale("a", 5)))  # closes buckets, forecasts fail
        # The first batch's clock went out with the failed batch's round trip: stored.
        assert proc.take_committable() == {PartitionId("sales", 0): 2}
        await proc.flush()  # sends the failed batch's forecasts again: they fail again
        assert proc.take_committable() == {}  # the failed batch advanced nothing
        await proc.flush()  # the broker is back: delivered, then the clock is stored
        assert proc.take_committable() == {PartitionId("sales", 0): 3}

    asyncio.run(scenario())
    assert sink.pairs() == [("a", day_iso(d)) for d in (1, 2, 3, 4)]  # each once
