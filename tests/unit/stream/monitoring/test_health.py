"""The worker's health object, and the agent reporting a failing state store through it."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest
from aiokafka.structs import ConsumerRecord
from faust.types import TP
from prometheus_client import REGISTRY

from stream.monitoring.health import PROCESSING, STATE_STORE, Health
from stream.settings.worker import WorkerSettings
from stream.state.memory import MemoryWindowStore
from stream.worker.app import create_app
from trendcast.exceptions import StateStoreError
from trendcast.testkit.doubles import FREQ, MODEL, FakeForecaster, ListSink, sale


def _gauge(name: str, **labels: str) -> float | None:
    return REGISTRY.get_sample_value(name, labels)


def test_healthy_until_a_component_fails_and_again_when_all_recovered() -> None:
    now = [100.0]
    h = Health(clock=lambda: now[0])
    assert h.healthy and h.snapshot() == {"healthy": True, "failing": {}}
    assert _gauge("trendcast_healthy") == 1.0

    h.failing(PROCESSING, "StateStoreError: Redis unavailable")
    now[0] = 101.0
    h.failing(STATE_STORE, "connection refused")
    now[0] = 104.0
    h.failing(PROCESSING, "StateStoreError: still down\n  (second line)")
    snap = h.snapshot()
    assert snap["healthy"] is False
    assert snap["failing"][PROCESSING] == {
        "reason": "StateStoreError: still down (second line)",  # one line
        "for_s": 4.0,  # since the first failure, not the latest
        "attempts": 2,
    }
    assert _gauge("trendcast_healthy") == 0.0
    assert _gauge("trendcast_component_healthy", component=PROCESSING) == 0.0

    h.recovered(PROCESSING)
    assert list(h.failures) == [STATE_STORE]  # the store probe still fails
    h.recovered(STATE_STORE)
    assert h.snapshot() == {"healthy": True, "failing": {}}
    assert _gauge("trendcast_healthy") == 1.0
    assert _gauge("trendcast_component_healthy", component=STATE_STORE) == 1.0


def test_only_transitions_are_logged(caplog: pytest.LogCaptureFixture) -> None:
    h = Health(clock=lambda: 0.0)
    with caplog.at_level(logging.INFO, logger="stream.monitoring.health"):
        for _ in range(50):  # a minute of retries
            h.failing(PROCESSING, "Redis down")
        h.recovered(PROCESSING)
        h.recovered(PROCESSING)  # no-op
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2, messages
    assert "unhealthy: processing failing (Redis down)" in messages[0]
    assert "processing recovered after 0.0s and 50 failed attempts; healthy again" in messages[1]


def test_reasons_are_bounded() -> None:
    h = Health()
    h.failing(PROCESSING, "x" * 10_000)
    assert len(h.failures[PROCESSING].reason) == 500


class _FlakyStore(MemoryWindowStore):
    """Refuses ``failures`` writes, like a Redis that is down and comes back."""

    def __init__(self, failures: int) -> None:
        super().__init__(FREQ)
        self.failures = failures

    async def apply(self, items, partitions):
        if self.failures:
            self.failures -= 1
            raise StateStoreError("Redis unavailable: connection refused")
        return await super().apply(items, partitions)


def test_the_worker_reports_a_failing_store_retries_and_recovers_by_itself(
    tmp_path: Path,
) -> None:
    store, sink, health = _FlakyStore(failures=3), ListSink(), Health()
    settings = WorkerSettings(web_enabled=False, data_dir=tmp_path, batch_size=2)
    app = create_app(settings, FakeForecaster(), store, MODEL, sink=sink, health=health)
    seen_unhealthy = []
    records = [
        ConsumerRecord("sales", 0, offset, 0, 0, b"a", value, None, 1, len(value), ())
        for offset, value in enumerate([sale("a", 0.5, 2), sale("a", 1.5, 3)])
    ]

    async def scenario() -> None:
        # The fetch handler retries until the store recovers; watch health meanwhile.
        handled = asyncio.ensure_future(app.trendcast_handle_fetch({TP("sales", 0): records}))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 10
        while store.failures or not health.healthy:
            seen_unhealthy.append(not health.healthy)
            assert loop.time() < deadline, health.snapshot()
            await asyncio.sleep(0.02)
        assert await handled is not None
        windows = await store.read(["a"])
        assert sum(s.quantity for s in windows["a"].buckets.values()) == 5.0

    asyncio.run(scenario())
    assert any(seen_unhealthy)
    assert health.healthy and store.failures == 0
    assert app.trendcast_health is health  # type: ignore[attr-defined]
