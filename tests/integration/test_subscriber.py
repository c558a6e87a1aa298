"""A Python subscriber on a real broker: the worker's forecast records through ``subscribe``.

The records are what the worker produces (``stream.inference.batching.forecast_records``, the
C writer when built) for a batch of windows, sent to a Tansu topic with the worker's key (the
item id); ``trendcast.client.subscribe`` must hand them back as typed :class:`Forecast`
objects, skip a record that breaks the contract with ``on_invalid="skip"`` and raise
:class:`ContractError` for it with ``on_invalid="raise"`` (the default). The example in
docs/subscribers.md is this test's first half.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
import orjson
import pytest

from stream.inference.batching import forecast_records
from trendcast.client import Forecast, Received, subscribe
from trendcast.devtools.embedded import to_bootstrap
from trendcast.exceptions import ContractError
from trendcast.forecasting.base import WindowBatch
from trendcast.testkit.doubles import MODEL, FakeForecaster
from trendcast.testkit.kafka import produce

pytestmark = pytest.mark.integration

DAY = 86_400_000
T0 = 15_000 * DAY  # 2011-01-26


def worker_records() -> list[tuple[str, bytes]]:
    """Forecast records of three items as the worker writes them: close, late, refresh."""
    n, window = 3, MODEL.window
    batch = WindowBatch(
        item_ids=["85123A", "22423", "ünï-çødé"],
        quantities=np.arange(n * window, dtype=np.float32).reshape(n, window),
        prices=None,
        last_start_ms=np.full(n, T0, dtype=np.int64),
        history_len=np.array([window, window, 2], dtype=np.int64),
    )
    result = FakeForecaster(horizon=MODEL.horizon).predict(batch)
    open_bucket = {
        "start": "2011-01-27",
        "so_far": 4.0,
        "expected_so_far": 3.5,
        "nowcast": 9.25,
        "p10": 6.0,
        "p90": 13.0,
    }
    extras = [("close", None, False), ("late", None, False), ("refresh", open_bucket, False)]
    return forecast_records(batch, result, MODEL, emitted_at_ms=T0 + DAY + 5, extras=extras)


async def first(n: int, records: AsyncIterator[Received[Any]]) -> list[Received[Any]]:
    """The first ``n`` records (closing the subscription), or TimeoutError."""
    out: list[Received[Any]] = []
    async with contextlib.aclosing(records):  # type: ignore[type-var]
        async for record in records:
            out.append(record)
            if len(out) == n:
                break
    return out


def test_subscribe_yields_the_workers_forecasts_typed_and_handles_a_broken_one(
    kafka_bootstrap: str, unique_topic: Any
) -> None:
    bootstrap = to_bootstrap(kafka_bootstrap)
    topic = unique_topic(partitions=1, prefix="forecasts")
    records = worker_records()
    broken = ("85123A", b'{"item_id": "85123A", "as_of": "yesterday"}')
    produce(bootstrap, topic, [records[0], records[1], broken, records[2]])

    async def read(on_invalid: Any, n: int) -> list[Received[Any]]:
        stream = subscribe(topic, bootstrap, from_beginning=True, on_invalid=on_invalid)
        return await asyncio.wait_for(first(n, stream), timeout=30)

    got = asyncio.run(read("skip", 3))
    assert [(r.key, r.offset) for r in got] == [("85123A", 0), ("22423", 1), ("ünï-çødé", 3)]
    assert all(isinstance(r.value, Forecast) and r.topic == topic for r in got)
    for (key, value), record in zip(records, got, strict=True):
        forecast: Forecast = record.value
        raw = orjson.loads(value)
        assert forecast.item_id == key == raw["item_id"]
        assert (forecast.kind, forecast.as_of, forecast.model_version) == (
            raw["kind"],
            raw["as_of"],
            raw["model_version"],
        )
        assert [s.mean for s in forecast.horizon] == [s["mean"] for s in raw["horizon"]]
    assert [r.value.kind for r in got] == ["close", "late", "refresh"]
    refresh = got[2].value.open_bucket
    assert refresh is not None and refresh.nowcast == 9.25
    assert got[2].value.fallback and not got[0].value.fallback  # history of 2 buckets

    with pytest.raises(ContractError, match="forecasts record"):
        asyncio.run(read("raise", 4))
