"""Test doubles of the worker: a fake forecaster, a list sink, sale events, a processor.

Shared by the unit tests of the pipeline, the monitors and the worker, and by integration
tests that drive :class:`~stream.pipeline.processor.SalesProcessor` without a broker. No
pytest here: benches may use them too.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import orjson

from stream.inference.model_info import ModelInfo
from stream.inference.observers import Role, ScoredBatch
from stream.monitoring.online_accuracy import AccuracyTracker
from stream.monitoring.telemetry import METRICS_REGISTRY
from stream.pipeline.processor import RawMessage, SalesProcessor
from stream.state.memory import MemoryWindowStore
from trendcast.exceptions import BrokerError
from trendcast.forecasting.base import ForecastBatch, WindowBatch
from trendcast.freq import parse_freq

__all__ = [
    "DAY",
    "FREQ",
    "MODEL",
    "T0",
    "FakeForecaster",
    "Feed",
    "ListSink",
    "bundle_reload_failures",
    "day_iso",
    "processor",
    "sale",
    "tracker_records",
]

DAY = 86_400_000
FREQ = parse_freq("1D")
T0 = 14_975 * DAY  # 2011-01-01
MODEL = ModelInfo(freq=FREQ, window=7, horizon=3, model_version="fake-1")


class FakeForecaster:
    """Forecasts the last window value for every step, and remembers every batch."""

    def __init__(self, horizon: int = 3) -> None:
        self.batches: list[WindowBatch] = []
        self._horizon = horizon

    @property
    def name(self) -> str:
        return "fake"

    @property
    def horizon(self) -> int:
        return self._horizon

    def predict(self, batch: WindowBatch) -> ForecastBatch:
        self.batches.append(batch)
        last = np.repeat(batch.quantities[:, -1:], self._horizon, axis=1)
        return ForecastBatch(
            mean=last,
            p10=last * 0.5,
            p50=last,
            p90=last * 2,
            fallback=batch.history_len < batch.window,
        )


class ListSink:
    """Collects forecasts, dead letters and alerts; fails the first ``fail_forecasts`` sends."""

    def __init__(self, fail_forecasts: int = 0) -> None:
        self.forecasts: list[tuple[str, dict[str, Any]]] = []
        self.dead: list[dict[str, Any]] = []
        self.alerts: list[dict[str, Any]] = []
        self.fail_forecasts = fail_forecasts

    async def send_forecasts(self, records: Sequence[tuple[str, bytes]]) -> None:
        if self.fail_forecasts:
            self.fail_forecasts -= 1
            raise BrokerError("broker down")
        self.forecasts += [(k, orjson.loads(v)) for k, v in records]

    async def send_dead_letters(self, records: Sequence[tuple[bytes | None, bytes]]) -> None:
        self.dead += [orjson.loads(v) for _, v in records]

    async def send_alerts(self, records: Sequence[tuple[str, bytes]]) -> None:
        self.alerts += [orjson.loads(v) for _, v in records]

    def pairs(self) -> list[tuple[str, str]]:
        return [(k, v["as_of"]) for k, v in self.forecasts]


def sale(item: str, day: float, qty: float = 1.0, **extra: Any) -> bytes:
    """A sale event ``day`` days after 2011-01-01, as the bytes a producer sends."""
    return orjson.dumps({"item_id": item, "ts": int(T0 + day * DAY), "quantity": qty, **extra})


def day_iso(day: int) -> str:
    """``as_of`` of the bucket ``day`` days after 2011-01-01."""
    return f"2011-01-{day + 1:02d}T00:00:00Z"


class Feed:
    """Builds RawMessages with increasing offsets per partition."""

    def __init__(self) -> None:
        self.offsets: dict[int, int] = {}

    def __call__(self, *values: bytes, partition: int = 0) -> list[RawMessage]:
        out = []
        for value in values:
            offset = self.offsets.get(partition, 0)
            self.offsets[partition] = offset + 1
            out.append(RawMessage("sales", partition, offset, b"k", value))
        return out


def processor(
    store: MemoryWindowStore | None = None,
    sink: ListSink | None = None,
    forecaster: FakeForecaster | None = None,
    **kwargs: Any,
) -> SalesProcessor:
    """A processor over the in-memory store, the fake forecaster and a list sink.

    The allowed lateness is one day unless given: the scenarios count closes in whole days
    (an event of day N closes day N-2), which keeps them short. Catch-up is ``every``
    unless given: the scenarios check one forecast per item and closed bucket.
    """
    kwargs.setdefault("allowed_lateness_ms", DAY)
    kwargs.setdefault("catchup", "every")
    return SalesProcessor(
        store or MemoryWindowStore(FREQ),
        forecaster or FakeForecaster(),
        MODEL,
        sink or ListSink(),
        max_future_ms=None,
        **kwargs,
    )


def bundle_reload_failures() -> float:
    """``trendcast_bundle_reload_failures_total`` so far (0 before the first failure)."""
    value = METRICS_REGISTRY.get_sample_value("trendcast_bundle_reload_failures_total")
    return value or 0.0


def tracker_records(days: int = 12) -> list[dict[str, Any]]:
    """Records a tracker drains while a live and a shadow model forecast 20 items daily."""
    rng = np.random.default_rng(3)
    window, horizon, n = 7, 3, 20
    series = rng.poisson(4.0, size=(n, days + window)).astype(np.float32)
    tracker = AccuracyTracker(rolling_buckets=5, instance="w1")
    out: list[dict[str, Any]] = []
    for day in range(window, window + days):
        q = series[:, day - window + 1 : day + 1]
        batch = WindowBatch(
            item_ids=[f"i{k}" for k in range(n)],
            quantities=q,
            prices=None,
            last_start_ms=np.full(n, day * DAY, np.int64),
            history_len=np.full(n, window, np.int64),
        )
        for role, bias in (("live", 0.0), ("shadow", 2.0)):
            level = np.repeat(q.mean(axis=1, keepdims=True) + bias, horizon, axis=1).astype(
                np.float32
            )
            result = ForecastBatch(
                mean=level, p10=level * 0.5, p50=level, p90=level * 1.5, fallback=np.zeros(n, bool)
            )
            info = ModelInfo(parse_freq("1D"), window, horizon, f"m-{role}")
            r: Role = "live" if role == "live" else "shadow"
            tracker.on_forecasts(ScoredBatch(info, r, batch, result))
        out += [orjson.loads(v) for _, v in tracker.drain_records(day * 1000)]
    return out
