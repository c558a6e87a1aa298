"""Model hot reload: the ``current`` pointer, swaps between batches, refused bundles, rollback.

The watcher tests use real (hand-built, TensorFlow-free) bundles and ONNX Runtime, and drive
:class:`stream.pipeline.processor.SalesProcessor` with the in-memory store as the agent tests do.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

from stream.inference.model_info import ModelInfo
from stream.lifecycle.hot_reload import BundleWatcher, LoadedModel, load_model, resolve_bundle
from stream.monitoring.telemetry import METRICS_REGISTRY
from stream.pipeline.processor import SalesProcessor
from stream.settings.worker import WorkerSettings
from stream.state.memory import MemoryWindowStore
from stream.worker.app import create_app
from trendcast.exceptions import BundleError
from trendcast.freq import parse_freq
from trendcast.testkit.bundles import make_fake_bundle
from trendcast.testkit.doubles import (
    FREQ,
    MODEL,
    FakeForecaster,
    Feed,
    ListSink,
    bundle_reload_failures,
    processor,
    sale,
)

WINDOW = 7


def _point(location: Path, target: str) -> None:
    # How an operator deploys: write aside, rename over (atomic on POSIX).
    tmp = location / "current.tmp"
    tmp.write_text(target + "\n", encoding="utf-8")
    tmp.replace(location / "current")


@pytest.fixture
def bundles(tmp_path: Path) -> Path:
    location = tmp_path / "bundles"
    # Different horizons give different ONNX files, hence different model versions.
    make_fake_bundle(location / "v1", window=WINDOW, horizon=3)
    make_fake_bundle(location / "v2", window=WINDOW, horizon=4)
    _point(location, "v1")
    return location


def _served(location: Path) -> tuple[LoadedModel, SalesProcessor, ListSink, BundleWatcher]:
    loaded = load_model(location)
    sink = ListSink()
    proc = SalesProcessor(
        MemoryWindowStore(FREQ),
        loaded.forecaster,
        loaded.model,
        sink,
        max_future_ms=None,
        allowed_lateness_ms=86_400_000,
        catchup="every",
    )
    return loaded, proc, sink, BundleWatcher(location, loaded)


def _swap_into(proc: SalesProcessor) -> Callable[[LoadedModel], None]:
    def swap(loaded: LoadedModel) -> None:
        proc.swap_model(loaded.forecaster, loaded.model)

    return swap


def _version(location: Path, name: str) -> str:
    return load_model(location / name).model.model_version


# --- the pointer -------------------------------------------------------------------------------


def test_a_plain_bundle_directory_is_its_own_live_bundle(tmp_path: Path) -> None:
    make_fake_bundle(tmp_path / "b", window=WINDOW, horizon=3)
    assert resolve_bundle(tmp_path / "b") == tmp_path / "b"
    assert load_model(tmp_path / "b").path == tmp_path / "b"


def test_current_names_the_live_bundle(bundles: Path) -> None:
    assert resolve_bundle(bundles) == bundles / "v1"
    _point(bundles, "v2")
    assert resolve_bundle(bundles) == bundles / "v2"
    assert load_model(bundles).model.model_version == _version(bundles, "v2")


@pytest.mark.parametrize("text", ["", "\n", "/etc/bundle", "v1\nv2"])
def test_a_pointer_that_names_no_relative_directory_is_refused(bundles: Path, text: str) -> None:
    (bundles / "current").write_text(text, encoding="utf-8")
    with pytest.raises(BundleError, match="expected one line naming a bundle directory"):
        resolve_bundle(bundles)


# --- swapping in the processor -----------------------------------------------------------------


def test_a_swap_during_a_batch_waits_for_the_batch_and_loses_or_repeats_no_event() -> None:
    new = ModelInfo(freq=FREQ, window=MODEL.window, horizon=3, model_version="fake-2")
    proc = processor()

    class SwappingSink(ListSink):
        """Requests a swap in the middle of a batch, as the reload timer may."""

        async def send_forecasts(self, records: Sequence[tuple[str, bytes]]) -> None:
            if not self.forecasts:
                proc.swap_model(FakeForecaster(), new)
            await super().send_forecasts(records)

    sink = SwappingSink()
    proc.sink = sink
    feed = Feed()
    days = [0, 1, 2, 3, 4, 5, 6, 7]
    asyncio.run(proc.process(feed(*[sale("a", d) for d in days[:4]])))
    versions_first = {v["model_version"] for _, v in sink.forecasts}
    assert versions_first == {"fake-1"}  # the batch kept its model to the end
    assert proc.model is new  # served from the next batch on
    before = len(sink.forecasts)
    asyncio.run(proc.process(feed(*[sale("a", d) for d in days[4:]])))
    assert {v["model_version"] for _, v in sink.forecasts[before:]} == {"fake-2"}
    # Every closed day forecast exactly once across the swap, every sale counted once.
    pairs = sink.pairs()
    assert len(pairs) == len(set(pairs)) == len(days) - 2  # lateness 1: two days still open
    window = asyncio.run(proc.store.read(["a"]))["a"]
    assert sum(s.quantity for s in window.buckets.values()) == len(days)


def test_the_processor_refuses_a_model_its_windows_cannot_feed() -> None:
    proc = processor()
    for model, match in [
        (ModelInfo(parse_freq("1h"), MODEL.window, 3, "h"), "expected freq 1D"),
        (ModelInfo(FREQ, MODEL.window + 1, 3, "w"), "expected a window of at most 7"),
        (ModelInfo(FREQ, MODEL.window, 3, "p", uses_prices=True), "keep no prices"),
    ]:
        with pytest.raises(BundleError, match=match):
            proc.swap_model(FakeForecaster(), model)
    assert proc.model is MODEL


# --- the watcher -------------------------------------------------------------------------------


def test_the_watcher_swaps_to_a_new_bundle_and_rolls_back(bundles: Path) -> None:
    loaded, proc, sink, watcher = _served(bundles)
    v1, v2 = loaded.model.model_version, _version(bundles, "v2")
    swap = _swap_into(proc)
    feed = Feed()

    async def run() -> None:
        assert not await watcher.poll(swap)  # nothing changed
        await proc.process(feed(*[sale("a", d) for d in range(4)]))
        _point(bundles, "v2")
        assert await watcher.poll(swap)
        assert not await watcher.poll(swap)  # swapped once, not every poll
        await proc.process(feed(*[sale("a", d) for d in range(4, 8)]))
        _point(bundles, "v1")  # rollback
        assert await watcher.poll(swap)
        await proc.process(feed(*[sale("a", d) for d in range(8, 10)]))

    asyncio.run(run())
    versions = [(v["as_of"][:10], v["model_version"]) for _, v in sink.forecasts]
    assert [v for _, v in versions] == [v1, v1] + [v2] * 4 + [v1] * 2
    assert len({d for d, _ in versions}) == len(versions)  # no day forecast twice
    assert watcher.serving.model.model_version == v1


def test_a_corrupt_bundle_is_refused_once_and_the_old_one_keeps_serving(
    bundles: Path, caplog: pytest.LogCaptureFixture
) -> None:
    make_fake_bundle(bundles / "v3", window=WINDOW, horizon=5)
    with (bundles / "v3" / "model.onnx").open("ab") as f:
        f.write(b"tampered")
    loaded, proc, _, watcher = _served(bundles)
    swap = _swap_into(proc)
    before = bundle_reload_failures()
    _point(bundles, "v3")
    with caplog.at_level(logging.ERROR, logger="stream.lifecycle.hot_reload"):
        assert not asyncio.run(watcher.poll(swap))
        assert not asyncio.run(watcher.poll(swap))  # same bad bundle: not counted again
    assert bundle_reload_failures() == before + 1
    [line] = [r.getMessage() for r in caplog.records]
    assert "refused, still serving " + loaded.model.model_version in line
    assert "checksum" in line
    assert proc.model == loaded.model
    # Fixing the pointer recovers without a restart.
    _point(bundles, "v2")
    assert asyncio.run(watcher.poll(swap))
    assert proc.model.model_version == _version(bundles, "v2")


@pytest.mark.parametrize(
    ("kwargs", "reason"),
    [
        ({"freq": "1h"}, "expected freq 1D"),
        ({"window": WINDOW + 7}, f"expected a window of at most {WINDOW}"),
    ],
)
def test_an_incompatible_bundle_is_refused(
    bundles: Path, kwargs: dict[str, object], reason: str, caplog: pytest.LogCaptureFixture
) -> None:
    make_fake_bundle(bundles / "bad", **{"window": WINDOW, "horizon": 3, **kwargs})  # type: ignore[arg-type]
    loaded, proc, _, watcher = _served(bundles)
    before = bundle_reload_failures()
    _point(bundles, "bad")
    with caplog.at_level(logging.ERROR, logger="stream.lifecycle.hot_reload"):
        assert not asyncio.run(watcher.poll(_swap_into(proc)))
    assert bundle_reload_failures() == before + 1
    assert reason in caplog.text
    assert proc.model == loaded.model


def test_a_broken_pointer_is_refused(bundles: Path) -> None:
    loaded, proc, _, watcher = _served(bundles)
    before = bundle_reload_failures()
    (bundles / "current").write_text("/absolute", encoding="utf-8")
    assert not asyncio.run(watcher.poll(_swap_into(proc)))
    assert bundle_reload_failures() == before + 1
    assert proc.model == loaded.model


def test_the_app_polls_the_watcher_and_publishes_the_new_model(
    bundles: Path, tmp_path: Path
) -> None:
    loaded = load_model(bundles)
    settings = WorkerSettings(web_enabled=False, data_dir=tmp_path / "data", bundle=bundles)
    app = create_app(
        settings,
        loaded.forecaster,
        MemoryWindowStore(FREQ),
        loaded.model,
        sink=ListSink(),
        watcher=BundleWatcher(bundles, loaded),
    )
    _point(bundles, "v2")
    asyncio.run(app.trendcast_reload())
    v2 = _version(bundles, "v2")
    assert app.trendcast_processor.model.model_version == v2
    assert app.trendcast_processor.forecaster.name == loaded.forecaster.name  # instrumented
    assert (
        METRICS_REGISTRY.get_sample_value(
            "trendcast_model_info",
            {
                "version": v2,
                "forecaster": loaded.forecaster.name,
                "freq": "1D",
                "window": str(WINDOW),
                "horizon": "4",
            },
        )
        == 1.0
    )


def test_hot_reload_is_off_with_a_zero_poll_interval(bundles: Path, tmp_path: Path) -> None:
    loaded = load_model(bundles)
    settings = WorkerSettings(
        web_enabled=False, data_dir=tmp_path / "data", bundle=bundles, bundle_poll_s=0
    )
    app = create_app(
        settings,
        loaded.forecaster,
        MemoryWindowStore(FREQ),
        loaded.model,
        sink=ListSink(),
        watcher=BundleWatcher(bundles, loaded),
    )
    assert not hasattr(app, "trendcast_reload")


def test_closing_the_watcher_closes_a_source_that_holds_a_client(bundles: Path) -> None:
    class KeySource:  # like versions.RedisKeySource: a client kept between polls
        closed = 0

        async def current(self) -> str | None:
            return "v1"

        async def aclose(self) -> None:
            self.closed += 1

    loaded = load_model(resolve_bundle(bundles))
    source = KeySource()
    asyncio.run(BundleWatcher(bundles, loaded, source=source).aclose())
    assert source.closed == 1
    asyncio.run(BundleWatcher(bundles, loaded).aclose())  # a pointer file holds nothing
