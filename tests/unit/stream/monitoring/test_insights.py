"""The worker's shadow model, online accuracy and trends, wired through the processor and app.

The trackers themselves are tested in ``test_accuracy.py`` and ``test_trends.py``; these tests
check what the worker does with them: observers see live and shadow batches, the shadow is
never emitted and cannot fail a batch, and the app publishes accuracy and trends records.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path

import orjson
import pytest
from aiokafka.structs import ConsumerRecord
from faust.types import TP

from stream.inference.model_info import ModelInfo
from stream.inference.observers import ScoredBatch
from stream.monitoring.telemetry import SHADOW_FAILURES
from stream.settings.worker import WorkerSettings
from stream.state.memory import MemoryWindowStore
from stream.worker.app import create_app
from trendcast.exceptions import BundleError
from trendcast.forecasting.base import ForecastBatch, WindowBatch
from trendcast.testkit.doubles import (
    FREQ,
    MODEL,
    FakeForecaster,
    Feed,
    ListSink,
    processor,
    sale,
)

SHADOW = ModelInfo(freq=FREQ, window=5, horizon=3, model_version="shadow-1")


class Recorder:
    def __init__(self) -> None:
        self.seen: list[ScoredBatch] = []

    def on_forecasts(self, scored: ScoredBatch) -> None:
        self.seen.append(scored)


class Doubling(FakeForecaster):
    def predict(self, batch: WindowBatch) -> ForecastBatch:
        result = super().predict(batch)
        return ForecastBatch(
            result.mean * 2, result.p10 * 2, result.p50 * 2, result.p90 * 2, result.fallback
        )


class Broken(FakeForecaster):
    def predict(self, batch: WindowBatch) -> ForecastBatch:
        raise RuntimeError("candidate bug")


def test_observers_see_live_and_shadow_batches_and_only_live_is_emitted() -> None:
    sink, recorder = ListSink(), Recorder()
    proc = processor(sink=sink)
    proc.observers.append(recorder)
    proc.set_shadow(Doubling(), SHADOW)
    asyncio.run(proc.process(Feed()(sale("a", 0, 2), sale("b", 0.5, 1), sale("a", 3))))
    roles = {(s.role, s.model.model_version) for s in recorder.seen}
    assert roles == {("live", "fake-1"), ("shadow", "shadow-1")}
    live = [s for s in recorder.seen if s.role == "live"]
    shadow = [s for s in recorder.seen if s.role == "shadow"]
    # Same requests, the shadow with its own (shorter) window.
    assert [s.batch.item_ids for s in live] == [s.batch.item_ids for s in shadow]
    assert shadow[0].batch.window == SHADOW.window
    assert {v["model_version"] for _, v in sink.forecasts} == {"fake-1"}


def test_a_failing_shadow_never_fails_the_batch() -> None:
    sink = ListSink()
    proc = processor(sink=sink)
    proc.set_shadow(Broken(), SHADOW)
    before = SHADOW_FAILURES._value.get()
    stats = asyncio.run(proc.process(Feed()(sale("a", 0), sale("a", 3))))
    assert stats.forecasts == len(sink.forecasts) > 0
    assert SHADOW_FAILURES._value.get() > before


def test_a_shadow_the_windows_cannot_feed_is_refused() -> None:
    proc = processor()
    too_long = ModelInfo(freq=FREQ, window=MODEL.window + 1, horizon=3, model_version="big")
    with pytest.raises(BundleError, match="window of at most"):
        proc.set_shadow(FakeForecaster(), too_long)
    assert proc.shadow is None


def test_the_app_publishes_accuracy_and_trends(tmp_path: Path) -> None:
    published: list[tuple[str, Sequence[tuple[bytes | None, bytes]]]] = []

    async def publish(topic: str, records: Sequence[tuple[bytes | None, bytes]]) -> None:
        published.append((topic, records))

    settings = WorkerSettings(web_enabled=False, data_dir=tmp_path, publish_interval_s=0)
    app = create_app(
        settings,
        FakeForecaster(),
        MemoryWindowStore(FREQ),
        MODEL,
        sink=ListSink(),
        shadow=(Doubling(), SHADOW),
        publish=publish,
    )
    # Ten days of steady sales: forecasts made at early closes come true at later ones.
    values = [sale(item, day + 0.5, 1 + day % 3) for day in range(10) for item in ("a", "b")]
    records = [
        ConsumerRecord("sales", 0, offset, 0, 0, b"k", value, None, 1, len(value), ())
        for offset, value in enumerate(values)
    ]

    async def scenario() -> None:
        for start in range(0, len(records), 4):
            assert (
                await app.trendcast_handle_fetch({TP("sales", 0): records[start : start + 4]})
                is not None
            )
        await app.trendcast_publish()

    asyncio.run(scenario())
    topics = {topic for topic, _ in published}
    assert topics == {settings.accuracy_topic, settings.trends_topic}
    accuracy = [
        orjson.loads(v)
        for topic, recs in published
        if topic == settings.accuracy_topic
        for _, v in recs
    ]
    assert {(r["role"], r["model_version"]) for r in accuracy} == {
        ("live", "fake-1"),
        ("shadow", "shadow-1"),
    }
    assert all(r["n"] > 0 for r in accuracy)
    (trend,) = [
        orjson.loads(v)
        for topic, recs in published
        if topic == settings.trends_topic
        for _, v in recs
    ]
    assert trend["items_considered"] == 2
