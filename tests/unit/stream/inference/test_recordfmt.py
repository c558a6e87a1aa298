"""``stream.inference._recordfmt``: forecast records written in C, byte for byte as in Python.

The C module writes each number from its integer count of 10^-4 (``stream/inference/_recordfmt.c``
explains why that is the shortest repr orjson writes). These tests compare it with orjson on
dense samples of every magnitude it accepts (float32 and float64 inputs, both signs, ties at
the fifth decimal, both sides of its 10^9 limit), check that the rows it hands back are the
ones it must, and that bad arguments raise instead of writing garbage. The record-level
equality with the dict path is in ``test_batching_fast.py``.
"""

from __future__ import annotations

import numpy as np
import orjson
import pytest

from stream.inference import batching
from stream.inference.batching import _records_py, forecast_records
from stream.inference.model_info import ModelInfo
from trendcast.forecasting.base import ForecastBatch, WindowBatch
from trendcast.freq import parse_freq

format_rows = pytest.importorskip("stream.inference._recordfmt").format_rows

DAY = 86_400_000


def test_the_worker_writes_records_in_c():
    # `make install` builds it (pyproject: optional, for machines without a C compiler);
    # this says so when a change breaks the build instead of silently going slower.
    assert batching._format_rows is format_rows


def _written(values: np.ndarray) -> list[bytes | None]:
    """Each value written alone by the C module (None: handed back)."""
    column = np.ascontiguousarray(values, dtype=np.float64).reshape(-1, 1)
    n = len(column)
    return format_rows(column, b"", [b""] * n, [(b"",)] * n, [b""] * n)


def _reference(values: np.ndarray) -> list[bytes]:
    return [orjson.dumps(float(v)) for v in values]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_numbers_are_written_as_orjson_writes_them(dtype: type):
    rng = np.random.default_rng(11)
    raw = rng.standard_normal(200_000) * 10.0 ** rng.uniform(-7, 9.2, 200_000)
    exact = rng.integers(-(10**13), 10**13, 50_000) / 1e4  # every 4-decimal shape
    ties = (rng.integers(-(10**8), 10**8, 50_000) + 0.5) / 1e4  # half a 10^-4 step
    edges = np.array(
        [0.0, -0.0, 1e-4, -1e-4, 5e-5, -5e-5, 4.9999e-5, 0.99995, 9.99995, 7.0, 123.45675]
        + [999_999_999.9999, -999_999_999.9999, 999_999_999.99994, 1e8, 2.0**29]
    )
    values = np.round(np.concatenate([raw, exact, ties, edges]).astype(dtype).astype(np.float64), 4)
    written = _written(values)
    inside = np.abs(values) < 1e9
    assert all(w is None for w, ok in zip(written, inside, strict=True) if not ok)
    got = [w for w, ok in zip(written, inside, strict=True) if ok]
    assert got == _reference(values[inside])
    assert inside.sum() > 290_000


def test_rows_it_cannot_write_are_handed_back():
    values = np.array(
        [[1.0, 2.0], [np.nan, 1.0], [1.0, np.inf], [-np.inf, 0.0], [1e9, 0.0], [-1e9, 0], [3, 4]]
    )
    n = len(values)
    rows = format_rows(values, b"<", [b"i"] * n, [(b"[", b",")] * n, [b"]>"] * n)
    assert rows == [b"<i[1.0,2.0]>", None, None, None, None, None, b"<i[3.0,4.0]>"]


def test_fragments_go_where_they_belong():
    values = np.array([[0.5, -0.25, 10.0], [1.0, 2.0, 3.0]])
    seps_a, seps_b = (b"A", b"B", b"C"), (b"", b"--", b"\xc3\xa9")
    rows = format_rows(values, b"P", [b'"x"', b""], [seps_a, seps_b], [b"T1", b""])
    assert rows == [b'P"x"A0.5B-0.25C10.0T1', b"P1.0--2.0\xc3\xa93.0"]
    assert format_rows(np.zeros((0, 3)), b"P", [], [], []) == []


@pytest.mark.parametrize(
    ("args", "error"),
    [
        ((np.zeros((2, 2), np.float32), b"", [b""] * 2, [(b"", b"")] * 2, [b""] * 2), ValueError),
        ((np.zeros(4), b"", [b""] * 4, [(b"",)] * 4, [b""] * 4), ValueError),
        ((np.zeros((2, 4))[:, ::2], b"", [b""] * 2, [(b"", b"")] * 2, [b""] * 2), ValueError),
        ((np.zeros((2, 2)), b"", [b""], [(b"", b"")] * 2, [b""] * 2), ValueError),
        ((np.zeros((2, 2)), b"", [b""] * 2, [(b"", b"")] * 2, [b""] * 3), ValueError),
        ((np.zeros((2, 2)), b"", [b""] * 2, [(b"",)] * 2, [b""] * 2), ValueError),
        ((np.zeros((2, 2)), b"", ["x", "y"], [(b"", b"")] * 2, [b""] * 2), TypeError),
        ((np.zeros((2, 2)), b"", [b""] * 2, [(b"", "x")] * 2, [b""] * 2), TypeError),
        ((np.zeros((2, 2)), b"", [b""] * 2, (b"ab", b"cd"), [b""] * 2), TypeError),
        ((np.zeros((2, 2)), "", [b""] * 2, [(b"", b"")] * 2, [b""] * 2), TypeError),
        ((np.zeros((2, 2)), b"", iter([b"", b""]), [(b"", b"")] * 2, [b""] * 2), TypeError),
    ],
)
def test_bad_arguments_raise(args: tuple[object, ...], error: type[Exception]):
    with pytest.raises(error):
        format_rows(*args)


def test_a_bucket_close_in_c_equals_python_and_hands_back_huge_rows():
    rng = np.random.default_rng(3)
    n, horizon = 1_000, 28
    model = ModelInfo(parse_freq("1D"), 56, horizon, "v7")
    batch = WindowBatch(
        item_ids=[f"item-{i}" for i in range(n)],
        quantities=np.zeros((n, 56), dtype=np.float32),
        prices=None,
        last_start_ms=np.where(rng.random(n) < 0.8, 20_000 * DAY, 19_999 * DAY).astype(np.int64),
        history_len=np.full(n, 56, dtype=np.int64),
    )
    mean = rng.gamma(0.5, 30.0, (n, horizon)).astype(np.float32)
    mean[7, 2], mean[8, 0] = 3e9, np.nan  # handed back to Python: the dict path
    result = ForecastBatch(mean, mean * 0.3, mean * 0.8, mean * 2.1, rng.random(n) < 0.5)
    c = forecast_records(batch, result, model, 1_700_000_000_000)
    assert c == _records_py(batch, result, model, 1_700_000_000_000)
    assert orjson.loads(c[7][1])["horizon"][2]["mean"] == float(np.float32(3e9))
