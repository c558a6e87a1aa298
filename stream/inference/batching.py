"""Micro-batched inference: stored windows -> :class:`WindowBatch` -> forecast records.

The worker forecasts many items at once when a bucket closes; one ``Forecaster.predict`` per
micro-batch amortises the ONNX session call (the per-call overhead dominates for small models)
while bounding memory and latency. Records follow the forecasts topic contract::

    key   item_id (UTF-8)
    value {"item_id", "as_of", "freq", "horizon": [{"date", "mean", "p10", "p50", "p90"}],
           "model_version", "fallback", "emitted_at_ms", "kind", "open_bucket"
           [, "partial_history": true]}

``kind`` is ``close`` (a bucket closed), ``late`` (a closed bucket in grace changed) or
``refresh`` (the open bucket sold: ``open_bucket`` then says what sold so far and the nowcast
of its total; ``null`` otherwise). ``partial_history`` is there (``true``) only on records whose
window reaches back before what the ``sales`` log still held when lost state was rebuilt from
it (:mod:`stream.pipeline.recovery`); every other record is unchanged by it, byte for byte.
``trendcast schema forecasts`` is the contract.

``as_of`` is the end of the last closed bucket the window includes, ISO-8601 UTC; ``date`` is
each forecast bucket's start, spelled like the offline forecast table (``YYYY-MM-DD`` for
daily-or-coarser buckets).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from itertools import chain
from operator import attrgetter
from typing import Literal, TypeVar, cast

import numpy as np
import numpy.typing as npt
import orjson

from stream.inference.model_info import ModelInfo, iso_utc
from stream.inference.stacking import stack_windows
from stream.state.base import ItemWindow
from trendcast.exceptions import ForecastError
from trendcast.forecasting.base import ForecastBatch, WindowBatch

_T = TypeVar("_T")
#: What a forecast record is (its ``kind``).
Kind = Literal["close", "refresh", "late"]
#: A record's fixed text for one last bucket (``_fragments``, ``_separators``): cached.
_RecordText = Callable[[int, int, int, str], _T]
#: ``stream.inference._recordfmt.format_rows`` (see :func:`forecast_records`).
_FormatRows = Callable[
    [npt.NDArray[np.float64], bytes, list[bytes], Sequence[tuple[bytes, ...]], list[bytes]],
    list[bytes | None],
]


def _load_format_rows() -> _FormatRows | None:
    """The C record writer, or None: it is optional at install (no C compiler there), and
    the Python path writes the same bytes."""
    try:
        from stream.inference._recordfmt import format_rows
    except ImportError:  # pragma: no cover - depends on the build
        return None
    return format_rows


_format_rows = _load_format_rows()

__all__ = [
    "ForecastRequest",
    "Kind",
    "OpenBucketRecord",
    "OpenBucketSales",
    "build_batch",
    "check_forecast",
    "forecast_records",
]

logger = logging.getLogger(__name__)

_DAY_MS = 86_400_000
#: The text of every record before its item id (both record paths start with it).
_RECORD_HEAD = b'{"item_id":'
_ITEM_ID = attrgetter("item_id")
_LAST_START = attrgetter("last_start_ms")
#: The window of an item the store does not know (its id is never looked at).
_UNKNOWN = ItemWindow("", None, {})


@dataclass(frozen=True, slots=True)
class ForecastRequest:
    """Forecast ``item_id`` from its window ending with the bucket starting ``last_start_ms``.

    ``kind`` goes into the record; a ``refresh`` carries what the open bucket sold so far
    (``open_bucket``), from which the record's nowcast is made once the forecast is known.
    ``partial_history`` marks the record (see :mod:`stream.pipeline.recovery`).
    """

    item_id: str
    last_start_ms: int
    kind: Kind = "close"
    open_bucket: OpenBucketSales | None = None
    partial_history: bool = False


@dataclass(frozen=True, slots=True)
class OpenBucketSales:
    """The open bucket of a refreshed item: its start, units so far, and how far it is in.

    ``share`` is the expected share of the bucket's units sold by now (the bundle's intraday
    profile at the partition's event time); ``open_bucket_record`` turns it and the
    forecast into the record's ``open_bucket`` object.
    """

    start_ms: int
    so_far: float
    share: float


#: Makes a refresh record's ``open_bucket`` object from the open bucket's sales and the
#: forecast of that bucket (step 1: mean, p10, p50, p90). Set by the worker (it needs the
#: nowcast model of :mod:`trendcast.forecasting.nowcast`); None: ``open_bucket`` is null.
OpenBucketRecord = Callable[[OpenBucketSales, float, float, float, float], dict[str, object]]


def build_batch(
    requests: Sequence[ForecastRequest], windows: Mapping[str, ItemWindow], model: ModelInfo
) -> WindowBatch:
    """Assemble the model input for ``requests`` from the items' stored windows.

    Vectorised over the batch by :func:`~stream.state.base.stack_windows` (the same
    arrays as :meth:`ItemWindow.window` per row, at a fraction of the Python work).
    """
    item_ids = list(map(_ITEM_ID, requests))
    get = windows.get
    stored = [get(item_id) or _UNKNOWN for item_id in item_ids]
    last = np.fromiter(map(_LAST_START, requests), dtype=np.int64, count=len(requests))
    quantities, prices, history = stack_windows(
        stored, last, model.window, model.freq, with_prices=model.uses_prices
    )
    return WindowBatch(
        item_ids=item_ids,
        quantities=quantities,
        prices=prices,
        last_start_ms=last,
        history_len=history,
    )


def check_forecast(result: ForecastBatch, n: int, horizon: int) -> None:
    for name in ("mean", "p10", "p50", "p90"):
        shape = getattr(result, name).shape
        if shape != (n, horizon):
            raise ForecastError(
                f"expected forecaster {name} of shape ({n}, {horizon}), got {shape}"
            )
    if result.fallback.shape != (n,):
        raise ForecastError(f"expected fallback of shape ({n},), got {result.fallback.shape}")


def forecast_records(
    batch: WindowBatch,
    result: ForecastBatch,
    model: ModelInfo,
    emitted_at_ms: int,
    extras: Sequence[RowExtra] | None = None,
) -> list[tuple[str, bytes]]:
    """One ``(key, JSON value)`` per item of the batch.

    ``extras`` gives each row's ``kind``, ``open_bucket`` and ``partial_history`` mark
    (default: every row a ``close`` with no open bucket, unmarked).

    Values are rounded to 4 decimals like the offline forecast table, which also keeps
    float32 noise (``0.10000000149011612``) out of the records.

    A bucket close forecasts thousands of items at once, and making records was the
    largest single cost of the worker's GIL, so the records are written in C
    (``stream/inference/_recordfmt.c``: about 1 µs a record against 8 to 12 in Python) when the
    package was built with it, and by :func:`_records_py` otherwise. Rows with a value
    not finite (and, in C, 10^9 or beyond) take the dict path, :func:`_records_slow`. All
    three give the same bytes (tests compare them).
    """
    if len(batch) == 0:
        return []
    if _format_rows is not None:
        return _records_c(batch, result, model, emitted_at_ms, _format_rows, extras)
    return _records_py(batch, result, model, emitted_at_ms, extras)


#: A row's ``kind``, ``open_bucket`` object (None: ``null``) and whether it is marked
#: ``partial_history`` (False: the field is left out, so the record is as it always was).
RowExtra = tuple[str, dict[str, object] | None, bool]
_CLOSE: RowExtra = ("close", None, False)
#: The end of a marked record (:data:`RowExtra`), after its ``open_bucket``.
_PARTIAL_END = b',"partial_history":true}'


def _row_tails(
    model: ModelInfo,
    emitted_at_ms: int,
    fallback: list[bool],
    extras: Sequence[RowExtra] | None,
) -> list[bytes]:
    """Each row's text after its last number, up to the closing brace."""
    head = b'}],"model_version":' + orjson.dumps(model.model_version) + b',"fallback":'
    middle = b',"emitted_at_ms":%d,"kind":' % emitted_at_ms
    cached: dict[tuple[bool, str, bool], bytes] = {}

    def plain(fb: bool, kind: str, partial: bool = False) -> bytes:
        text = cached.get((fb, kind, partial))
        if text is None:
            text = cached[(fb, kind, partial)] = (
                head
                + (b"true" if fb else b"false")
                + middle
                + orjson.dumps(kind)
                + b',"open_bucket":null'
                + (_PARTIAL_END if partial else b"}")
            )
        return text

    if extras is None:
        return [plain(True, "close") if fb else plain(False, "close") for fb in fallback]
    out = []
    for fb, (kind, bucket, partial) in zip(fallback, extras, strict=True):
        if bucket is None:
            out.append(plain(fb, kind, partial))
        else:
            out.append(
                head
                + (b"true" if fb else b"false")
                + middle
                + orjson.dumps(kind)
                + b',"open_bucket":'
                + orjson.dumps(bucket)
                + (_PARTIAL_END if partial else b"}")
            )
    return out


def _rounded(result: ForecastBatch, horizon: int) -> npt.NDArray[np.float64]:
    """``[n, 4 * horizon]``: each step's mean, p10, p50 and p90, rounded to 4 decimals."""
    stacked = np.stack([result.mean, result.p10, result.p50, result.p90], axis=-1)
    rounded = np.round(stacked.astype(np.float64), 4).reshape(len(result), horizon * 4)
    return cast(npt.NDArray[np.float64], rounded)


def _per_row_text(batch: WindowBatch, model: ModelInfo, text: _RecordText[_T]) -> list[_T]:
    """``text`` (cached per last bucket) of each row's last bucket, in row order."""
    step, horizon, name = model.freq.step_ms, model.horizon, model.freq.name
    lasts: list[int] = batch.last_start_ms.tolist()
    first = lasts[0]
    if lasts.count(first) == len(lasts):  # the usual case: one bucket close per batch
        return [text(first, step, horizon, name)] * len(lasts)
    return [text(last, step, horizon, name) for last in lasts]


def _dict_path_rows(
    out: list[tuple[str, bytes]],
    rows: Iterable[int],
    batch: WindowBatch,
    result: ForecastBatch,
    model: ModelInfo,
    emitted_at_ms: int,
    extras: Sequence[RowExtra] | None,
) -> None:
    """Replace ``rows`` of ``out`` with the records of :func:`_records_slow`."""
    for row in rows:
        one = np.array([row], dtype=np.int64)
        extra = None if extras is None else [extras[row]]
        out[row] = _records_slow(batch.take(one), result.take(one), model, emitted_at_ms, extra)[0]


def _records_py(
    batch: WindowBatch,
    result: ForecastBatch,
    model: ModelInfo,
    emitted_at_ms: int,
    extras: Sequence[RowExtra] | None = None,
) -> list[tuple[str, bytes]]:
    """:func:`forecast_records` in Python (a package built without its C part).

    Written for few Python operations per record (8 to 12 µs for 28 steps; one %-template
    per record, the way before, ~25 µs; a dict per record, :func:`_records_slow`, more
    still): orjson formats every number of the batch in one call and one ``bytes.split``
    cuts them apart; each record is then one ``bytes.join`` of a per-forecast-date list of
    fixed fragments (cached) into which the numbers, the item id and the fallback tail were
    dropped with strided slice assignments (C loops over the batch, not Python loops over
    the numbers). Rows with a non-finite value take the dict path, which writes ``null``.
    """
    n, horizon = len(batch), model.horizon
    if n == 0:
        return []
    per_row = horizon * 4
    values = _rounded(result, horizon).reshape(n * per_row)
    finite: list[bool] = np.isfinite(values).reshape(n, per_row).all(axis=1).astype(bool).tolist()
    # orjson writes a float of an array exactly as the same Python float (shortest repr).
    numbers = orjson.dumps(values, option=orjson.OPT_SERIALIZE_NUMPY)[1:-1].split(b",")
    parts = list(chain.from_iterable(_per_row_text(batch, model, _fragments)))
    width = per_row * 2 + 3
    parts[1::width] = map(orjson.dumps, batch.item_ids)
    for j in range(per_row):
        parts[3 + 2 * j :: width] = numbers[j::per_row]
    parts[width - 1 :: width] = _row_tails(model, emitted_at_ms, result.fallback.tolist(), extras)
    join = b"".join
    out = [
        (item_id, join(parts[start : start + width]))
        for item_id, start in zip(batch.item_ids, range(0, n * width, width), strict=True)
    ]
    rows = (row for row, ok in enumerate(finite) if not ok)
    _dict_path_rows(out, rows, batch, result, model, emitted_at_ms, extras)
    return out


def _records_c(
    batch: WindowBatch,
    result: ForecastBatch,
    model: ModelInfo,
    emitted_at_ms: int,
    format_rows: _FormatRows,
    extras: Sequence[RowExtra] | None = None,
) -> list[tuple[str, bytes]]:
    """:func:`forecast_records` written by ``stream.inference._recordfmt.format_rows`` (C).

    Python passes the fixed text (the same fragments as :func:`_records_py`, cached per
    last bucket) and the rounded numbers; C writes each number as orjson would and joins
    one record per row. Rows it hands back (None: a value not finite, or 10^9 and beyond)
    take the dict path, as non-finite rows do in Python.
    """
    formatted = format_rows(
        _rounded(result, model.horizon),
        _RECORD_HEAD,
        list(map(orjson.dumps, batch.item_ids)),
        _per_row_text(batch, model, _separators),
        _row_tails(model, emitted_at_ms, result.fallback.tolist(), extras),
    )
    out = cast(list[tuple[str, bytes]], list(zip(batch.item_ids, formatted, strict=True)))
    if None in formatted:
        rows = (row for row, value in enumerate(formatted) if value is None)
        _dict_path_rows(out, rows, batch, result, model, emitted_at_ms, extras)
    return out


@functools.lru_cache(maxsize=256)
def _separators(
    last_start_ms: int, step_ms: int, horizon: int, freq_name: str
) -> tuple[bytes, ...]:
    """The text before each number of a record (:func:`_fragments` without the gaps)."""
    parts = _fragments(last_start_ms, step_ms, horizon, freq_name)
    return parts[2 : 2 + 8 * horizon : 2]


@functools.lru_cache(maxsize=256)
def _fragments(last_start_ms: int, step_ms: int, horizon: int, freq_name: str) -> tuple[bytes, ...]:
    """The fixed parts of a record of the window ending ``last_start_ms``, with gaps.

    Layout (``width = 4 * horizon * 2 + 3`` slots): ``{"item_id":``, *id*, the text up
    to the first ``"mean":``, then each number followed by the text up to the next one
    (the last number by nothing: slot ``width - 1`` is the fallback tail). Gaps are
    ``b""``. Cached because every record of a bucket close shares them and formatting
    ``horizon`` dates costs more than a record.
    """
    date_only = step_ms % _DAY_MS == 0
    dates = [
        iso_utc(last_start_ms + (h + 1) * step_ms, date_only=date_only).encode()
        for h in range(horizon)
    ]
    head = (
        b',"as_of":'
        + orjson.dumps(iso_utc(last_start_ms + step_ms))
        + b',"freq":'
        + orjson.dumps(freq_name)
        + b',"horizon":['
    )
    parts: list[bytes] = [_RECORD_HEAD, b""]
    for h, date in enumerate(dates):
        opening = b'{"date":"' + date + b'","mean":'
        parts += [head + opening if h == 0 else b"}," + opening, b"", b',"p10":', b""]
        parts += [b',"p50":', b"", b',"p90":', b""]
    parts.append(b"")  # the fallback tail
    return tuple(parts)


def _records_slow(
    batch: WindowBatch,
    result: ForecastBatch,
    model: ModelInfo,
    emitted_at_ms: int,
    extras: Sequence[RowExtra] | None = None,
) -> list[tuple[str, bytes]]:
    """:func:`forecast_records` built with dicts and orjson (rows with non-finite values)."""
    step = model.freq.step_ms
    date_only = step % _DAY_MS == 0
    columns = [
        np.round(a.astype(np.float64), 4).tolist()
        for a in (result.mean, result.p10, result.p50, result.p90)
    ]
    dates: dict[int, list[str]] = {}  # most rows of a batch share their last bucket
    out: list[tuple[str, bytes]] = []
    for row, item_id in enumerate(batch.item_ids):
        last = int(batch.last_start_ms[row])
        if last not in dates:
            dates[last] = [
                iso_utc(last + (h + 1) * step, date_only=date_only) for h in range(model.horizon)
            ]
        horizon = [
            {"date": d, "mean": m, "p10": lo, "p50": mid, "p90": hi}
            for d, m, lo, mid, hi in zip(dates[last], *(c[row] for c in columns), strict=True)
        ]
        value = {
            "item_id": item_id,
            "as_of": iso_utc(last + step),
            "freq": model.freq.name,
            "horizon": horizon,
            "model_version": model.model_version,
            "fallback": bool(result.fallback[row]),
            "emitted_at_ms": emitted_at_ms,
        }
        kind, bucket, partial = _CLOSE if extras is None else extras[row]
        value["kind"] = kind
        value["open_bucket"] = bucket
        if partial:  # only marked records carry the field (see RowExtra)
            value["partial_history"] = True
        out.append((item_id, orjson.dumps(value)))
    return out
