"""The vectorised batch paths equal their simple references, byte for byte.

``forecast_records`` writes records in C (``stream/inference/_recordfmt.c``) and ``_records_py``,
the
path of a package built without it, joins cached fragments with numbers formatted by orjson
for the whole batch; ``_records_slow`` (a dict per record, then orjson) is the readable
definition of the record and both must give its bytes. ``stack_windows``
assembles a batch of windows with numpy; stacking :meth:`ItemWindow.window` row by row is
its definition. Random inputs include NaN, infinities, negative zero, huge and tiny values,
odd item ids and buckets outside the window or off the frequency grid.
"""

from __future__ import annotations

import asyncio
import math
from typing import Any

import numpy as np
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stream.inference.batching import (
    ForecastRequest,
    _records_py,
    _records_slow,
    build_batch,
    forecast_records,
)
from stream.inference.delivery import forecast, forecast_and_deliver
from stream.inference.model_info import ModelInfo
from stream.inference.stacking import stack_windows
from stream.state.base import BucketSums, ItemWindow
from trendcast.exceptions import BrokerError, ForecastError
from trendcast.forecasting.base import ForecastBatch, WindowBatch
from trendcast.freq import Freq, parse_freq
from trendcast.testkit.doubles import FakeForecaster

DAY = 86_400_000
FREQS = ["1D", "1h", "6h", "7D", "1W"]

# Values as a model may return them, and some it should not (non-finite, huge, tiny).
forecast_values = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True, width=32),
    st.floats(min_value=-1e6, max_value=1e6, width=32),
    st.sampled_from([0.0, -0.0, 5e-5, -5e-5, 1e-4, 0.99995, 1e15, 1e16, 3e38, -1.5]),
)
item_ids = st.text(min_size=0, max_size=6) | st.sampled_from(['a"b', "c\\", "d\ne", "%s%d", "é€"])


def _records(
    rows: list[tuple[str, int, bool, list[float]]], freq: Freq, horizon: int, version: str
) -> tuple[WindowBatch, ForecastBatch, ModelInfo]:
    n = len(rows)
    model = ModelInfo(freq, 4, horizon, version)
    batch = WindowBatch(
        item_ids=[r[0] for r in rows],
        quantities=np.zeros((n, 4), dtype=np.float32),
        prices=None,
        last_start_ms=np.array([r[1] for r in rows], dtype=np.int64).reshape(n),
        history_len=np.full(n, 4, dtype=np.int64),
    )
    values = np.array([r[3] for r in rows], dtype=np.float32).reshape(n, 4, horizon)
    result = ForecastBatch(
        mean=values[:, 0],
        p10=values[:, 1],
        p50=values[:, 2],
        p90=values[:, 3],
        fallback=np.array([r[2] for r in rows], dtype=bool).reshape(n),
    )
    return batch, result, model


@st.composite
def record_cases(draw: st.DrawFn) -> tuple[WindowBatch, ForecastBatch, ModelInfo, int]:
    freq = parse_freq(draw(st.sampled_from(FREQS)))
    horizon = draw(st.integers(1, 5))
    version = draw(st.sampled_from(["v1", 'v"2%s', "ünï"]))
    lasts = [freq.origin_ms + k * freq.step_ms for k in (20_000, 20_001, 20_007)]
    row = st.tuples(
        item_ids,
        st.sampled_from(lasts),
        st.booleans(),
        st.lists(forecast_values, min_size=4 * horizon, max_size=4 * horizon),
    )
    rows = draw(st.lists(row, min_size=0, max_size=6))
    emitted = draw(st.integers(0, 2**62))
    return (*_records(rows, freq, horizon, version), emitted)


#: The worker's path (C where built) and the Python one.
RECORD_PATHS = [pytest.param(forecast_records, id="c"), pytest.param(_records_py, id="python")]


@pytest.mark.parametrize("records", RECORD_PATHS)
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=record_cases())
def test_records_equal_the_dict_path(
    records: Any, case: tuple[WindowBatch, ForecastBatch, ModelInfo, int]
):
    batch, result, model, emitted = case
    assert records(batch, result, model, emitted) == _records_slow(batch, result, model, emitted)


@pytest.mark.parametrize("records", RECORD_PATHS)
def test_records_of_a_bucket_close_equal_the_dict_path(records: Any):
    rng = np.random.default_rng(7)
    n, horizon = 300, 28
    model = ModelInfo(parse_freq("1D"), 56, horizon, "v1")
    lasts = np.where(rng.random(n) < 0.9, 15_000 * DAY, 14_990 * DAY).astype(np.int64)
    batch = WindowBatch(
        item_ids=[f"item-{i}" for i in range(n)],
        quantities=np.zeros((n, 56), dtype=np.float32),
        prices=None,
        last_start_ms=lasts,
        history_len=np.full(n, 56, dtype=np.int64),
    )
    mean = (rng.gamma(0.5, 20.0, (n, horizon)) * rng.choice([-1, 1], (n, horizon))).astype(
        np.float32
    )
    mean[5, 3], mean[9, 0] = np.nan, np.inf
    result = ForecastBatch(mean, mean * 0.5, mean * 0.9, mean * 1.7, rng.random(n) < 0.3)
    fast = records(batch, result, model, 1_700_000_000_123)
    assert fast == _records_slow(batch, result, model, 1_700_000_000_123)
    value = orjson.loads(fast[5][1])
    assert value["horizon"][3]["mean"] is None and value["item_id"] == "item-5"


open_buckets = st.none() | st.fixed_dictionaries(
    {
        "start": st.sampled_from(["2011-01-27", "2011-01-27T06:00:00Z"]),
        "so_far": st.floats(-5, 50),
        "expected_so_far": st.none() | st.floats(0, 50),
        "nowcast": st.none() | st.floats(0, 100),
        "p10": st.none() | st.floats(0, 10),
        "p90": st.none() | st.floats(10, 100),
    }
)
row_extras = st.tuples(st.sampled_from(["close", "late", "refresh"]), open_buckets, st.booleans())


@pytest.mark.parametrize("records", RECORD_PATHS)
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=record_cases(), data=st.data())
def test_records_with_kinds_open_buckets_and_partial_marks_equal_the_dict_path(
    records: Any, case: tuple[WindowBatch, ForecastBatch, ModelInfo, int], data: st.DataObject
):
    batch, result, model, emitted = case
    extras = data.draw(st.lists(row_extras, min_size=len(batch), max_size=len(batch)))
    fast = records(batch, result, model, emitted, extras)
    assert fast == _records_slow(batch, result, model, emitted, extras)
    for (_, value), (_, _, partial) in zip(fast, extras, strict=True):
        # The field is there, true, only on marked records; absent everywhere else.
        assert orjson.loads(value).get("partial_history", False) is partial
        assert (b'"partial_history"' in value) is partial


@pytest.mark.parametrize("records", RECORD_PATHS)
def test_unmarked_extras_write_the_bytes_of_no_extras(records: Any):
    """A batch with ``partial_history`` false everywhere is byte-identical to one without
    extras: records of partitions that were never rebuilt do not change."""
    rng = np.random.default_rng(3)
    n, horizon = 20, 7
    model = ModelInfo(parse_freq("1D"), 4, horizon, "v1")
    batch = build_batch([ForecastRequest(f"i{k}", 9 * DAY) for k in range(n)], {}, model)
    mean = rng.gamma(0.5, 20.0, (n, horizon)).astype(np.float32)
    result = ForecastBatch(mean, mean * 0.5, mean, mean * 2, rng.random(n) < 0.5)
    plain = records(batch, result, model, 5)
    assert records(batch, result, model, 5, [("close", None, False)] * n) == plain
    marked = records(batch, result, model, 5, [("close", None, k % 2 == 0) for k in range(n)])
    for k, ((_, a), (_, b)) in enumerate(zip(plain, marked, strict=True)):
        assert b == (a[:-1] + b',"partial_history":true}' if k % 2 == 0 else a)


# --- windows -------------------------------------------------------------------------------

quantities = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True, width=32),  # (float32 overflow warns)
    st.integers(-5, 50).map(float),
    st.sampled_from([-0.0, 0.0, -1.0]),
)


@st.composite
def stored_windows(draw: st.DrawFn, freq: Freq, span: int) -> ItemWindow:
    """An item with buckets anywhere in ``[0, span)`` steps (sparse), maybe off the grid."""
    step = freq.step_ms
    base = freq.origin_ms + 10_000 * step
    cols = draw(st.lists(st.integers(0, span - 1), max_size=12, unique=True))
    off_grid = draw(st.sampled_from([0] * 9 + [1_000]))
    buckets: dict[int, BucketSums] = {}
    for col in sorted(cols):
        priced = draw(st.sampled_from([0.0, 1.0, 2.5, -1.0, math.nan]))
        buckets[base + col * step + off_grid * (col % 2)] = BucketSums(
            draw(quantities), draw(st.floats(-100, 100, width=32)) * abs(priced), priced
        )
    first = draw(st.one_of(st.none(), st.integers(-2, span + 2)))
    return ItemWindow("x", None if first is None else base + first * step, buckets)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_stacked_windows_equal_row_by_row(data: st.DataObject):
    freq = parse_freq(data.draw(st.sampled_from(FREQS)))
    window = data.draw(st.integers(1, 8))
    span = window + 6
    rows = data.draw(st.lists(stored_windows(freq, span), max_size=8))
    base = freq.origin_ms + 10_000 * freq.step_ms
    ends = [base + data.draw(st.integers(0, span)) * freq.step_ms for _ in range(len(rows))]
    with_prices = data.draw(st.booleans())
    last = np.array(ends, dtype=np.int64)
    q, p, h = stack_windows(rows, last, window, freq, with_prices=with_prices)
    assert q.shape == (len(rows), window) and h.shape == (len(rows),)
    assert (p is None) == (not with_prices)
    for row, (stored, end) in enumerate(zip(rows, ends, strict=True)):
        q1, p1, h1 = stored.window(end, window, freq, with_prices=with_prices)
        assert q[row].tobytes() == q1.tobytes()  # bitwise: -0.0 and NaN included
        assert int(h[row]) == h1
        if p is not None:
            assert p1 is not None and p[row].tobytes() == p1.tobytes()


def test_build_batch_reads_unknown_items_as_empty():
    freq = parse_freq("1D")
    model = ModelInfo(freq, 4, 2, "v1", uses_prices=True)
    known = ItemWindow(
        "a", 8 * DAY, {9 * DAY: BucketSums(3.0, 6.0, 3.0), 10 * DAY: BucketSums(-2.0)}
    )
    batch = build_batch(
        [ForecastRequest("a", 10 * DAY), ForecastRequest("b", 10 * DAY)], {"a": known}, model
    )
    assert batch.item_ids == ["a", "b"]
    assert batch.quantities.tolist() == [[0.0, 0.0, 3.0, 0.0], [0.0] * 4]
    assert batch.prices is not None
    assert batch.prices[0].tolist()[1:] == [2.0, 2.0, 2.0] and math.isnan(batch.prices[0, 0])
    assert np.isnan(batch.prices[1]).all()
    assert batch.history_len.tolist() == [3, 0]
    assert batch.last_start_ms.tolist() == [10 * DAY, 10 * DAY]


@pytest.mark.parametrize("records", RECORD_PATHS)
@pytest.mark.parametrize("n", [0, 1])
def test_tiny_batches(records: Any, n: int):
    model = ModelInfo(parse_freq("1D"), 4, 2, "v1")
    batch = build_batch([ForecastRequest("a", 5 * DAY)] * n, {}, model)
    result = ForecastBatch(*(np.ones((n, 2), np.float32) for _ in range(4)), np.zeros(n, bool))
    assert records(batch, result, model, 1) == _records_slow(batch, result, model, 1)


# --- forecast_and_deliver: inference, records and produce overlapped --------------------------


def _requests(n: int) -> tuple[list[ForecastRequest], dict[str, ItemWindow]]:
    windows = {
        f"i{k:04d}": ItemWindow(f"i{k:04d}", 5 * DAY, {9 * DAY: BucketSums(float(k))})
        for k in range(n)
    }
    return [ForecastRequest(item, 10 * DAY) for item in windows], windows


class _Slow(FakeForecaster):
    """Fails on the ``fail_at``-th call; counts calls in flight (at most one at a time)."""

    def __init__(self, fail_at: int | None = None) -> None:
        super().__init__(horizon=2)
        self.fail_at = fail_at
        self.calls = 0

    def predict(self, batch: WindowBatch) -> ForecastBatch:
        self.calls += 1
        if self.calls == self.fail_at:
            raise RuntimeError("model bug")
        return super().predict(batch)


@pytest.mark.parametrize(("n", "every"), [(0, 4), (3, 4), (10, 4), (10, 1), (37, 8)])
def test_forecast_and_deliver_sends_every_record_in_order(n: int, every: int) -> None:
    requests, windows = _requests(n)
    model = ModelInfo(parse_freq("1D"), 4, 2, "v1")
    sent: list[list[str]] = []
    bodies: list[bytes] = []

    async def deliver(records: list[tuple[str, bytes]]) -> None:
        await asyncio.sleep(0)  # a real send yields to the loop: forecasting goes on
        sent.append([key for key, _ in records])
        bodies.extend(value for _, value in records)

    async def run() -> tuple[int, list[tuple[str, bytes]]]:
        count = await forecast_and_deliver(
            _Slow(), requests, windows, model, 3, deliver, deliver_every=every
        )
        alone = await forecast(_Slow(), requests, windows, model, 3)
        return count, alone

    count, alone = asyncio.run(run())
    assert count == n
    assert [key for chunk in sent for key in chunk] == [r.item_id for r in requests]
    assert all(len(chunk) >= min(every, n) for chunk in sent[:-1])
    # The same records as forecast() makes (their emitted_at_ms aside).
    assert [key for key, _ in alone] == [r.item_id for r in requests]
    strip = [{**orjson.loads(v), "emitted_at_ms": 0} for v in bodies]
    assert strip == [{**orjson.loads(v), "emitted_at_ms": 0} for _, v in alone]


def test_forecast_and_deliver_raises_a_model_failure_and_stops_sending() -> None:
    requests, windows = _requests(20)
    model = ModelInfo(parse_freq("1D"), 4, 2, "v1")
    sent: list[int] = []

    async def deliver(records: list[tuple[str, bytes]]) -> None:
        await asyncio.sleep(0)
        sent.append(len(records))

    async def run() -> None:
        await forecast_and_deliver(
            _Slow(fail_at=4), requests, windows, model, 3, deliver, deliver_every=3
        )

    with pytest.raises(ForecastError, match="model bug"):
        asyncio.run(run())
    assert sum(sent) <= 9  # never more than the chunks predicted before the failure


def test_forecast_and_deliver_raises_a_failed_send() -> None:
    requests, windows = _requests(20)
    model = ModelInfo(parse_freq("1D"), 4, 2, "v1")

    async def deliver(records: list[tuple[str, bytes]]) -> None:
        await asyncio.sleep(0)
        raise BrokerError("broker down")

    async def run() -> None:
        await forecast_and_deliver(_Slow(), requests, windows, model, 3, deliver, deliver_every=3)

    with pytest.raises(BrokerError, match="broker down"):
        asyncio.run(run())
