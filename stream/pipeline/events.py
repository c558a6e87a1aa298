"""Sale events: validating raw Kafka bytes into :class:`SaleEvent`, and dead-letter records.

The worker never trusts its input. :func:`parse_event` turns any byte string into either a
:class:`SaleEvent` or an :class:`~trendcast.exceptions.EventError` whose ``reason`` is a short
code (below) that the worker writes, with the original bytes, to the dead-letter topic. It
raises nothing else for any input, which the unit tests check with hypothesis: one exotic
message must never stop a partition.

Event contract (JSON object, unknown fields ignored)::

    item_id   str, 1..128 chars after stripping, no control characters   (required)
    ts        ISO-8601 with a zone ("2011-01-05T10:00:00Z"), or epoch ms  (required)
    quantity  finite number (negative = return, netted into its bucket)   (required)
    price     finite number >= 0, or null                                 (optional)
    event_id  str, 1..128 chars; the dedupe key of re-delivered events    (optional)

Reason codes: ``empty``, ``too_large``, ``not_utf8``, ``not_json``, ``not_object``,
``missing_field``, ``bad_type``, ``too_long``, ``bad_item_id``, ``not_finite``,
``out_of_range``, ``negative_price``, ``bad_timestamp``; the worker adds ``late``.
"""

from __future__ import annotations

import base64
import json
import logging
import math
from collections.abc import Iterable
from datetime import datetime, timezone
from typing import Annotated, Any

import msgspec
import orjson

from stream.monitoring.telemetry import DEAD_LETTERS
from trendcast.exceptions import EventError

__all__ = [
    "MAX_DEAD_LETTER_BYTES",
    "MAX_ID_CHARS",
    "MAX_TS_MS",
    "MIN_TS_MS",
    "REASONS",
    "SaleEvent",
    "dead_letter_value",
    "parse_event",
    "parse_events",
]

logger = logging.getLogger(__name__)

MAX_ID_CHARS = 128
#: Event times outside [1990-01-01, 2100-01-01) are typos or unit mix-ups (seconds vs ms).
MIN_TS_MS = 631_152_000_000
MAX_TS_MS = 4_102_444_800_000
#: Quantities and prices beyond this are data errors, and sums of them would lose precision.
MAX_ABS_VALUE = 1e12
#: Original bytes kept in a dead letter. Beyond this the copy is cut (``value_truncated``):
#: a dead letter larger than the broker's record limit could never be delivered, and the
#: worker, which retries rather than skips, would stall on it.
MAX_DEAD_LETTER_BYTES = 256 * 1024
_MAX_TS_CHARS = 64
_PREVIEW_CHARS = 256

#: Every dead-letter reason: the validator's codes, then ``late`` (the processor's). The one
#: list: tests/unit/deploy/test_metrics.py checks that each ``EventError`` raised here uses one.
REASONS = (
    "empty",
    "too_large",
    "not_utf8",
    "not_json",
    "not_object",
    "missing_field",
    "bad_type",
    "too_long",
    "bad_item_id",
    "not_finite",
    "out_of_range",
    "negative_price",
    "bad_timestamp",
    "late",
)

# Each reason starts as a 0 series of trendcast_dead_letters_total, so the dashboard's
# DLQ-by-reason panel and the DLQ alert see a reason before its first dead letter (an absent
# series is no line and no alert, not a zero). Here rather than beside the counter, because
# monitoring may not import the pipeline above it.
for _reason in REASONS:
    DEAD_LETTERS.labels(_reason)


class SaleEvent(msgspec.Struct, frozen=True, gc=False):
    """One validated sale.

    A msgspec struct: the worker makes one per event, in C (a NamedTuple's ``__new__`` is
    Python code and cost four times as much). Immutable and compared by value like a
    tuple; ``gc=False`` because it holds only strings and numbers, so it can never be part
    of a reference cycle.

    Attributes:
        item_id: The series key (stripped).
        ts_ms: Event time, epoch milliseconds UTC.
        quantity: Units sold (negative for returns).
        price: Unit price, or ``None`` when not given.
        event_id: Producer-assigned id used to drop re-deliveries, or ``None``.
    """

    item_id: str
    ts_ms: int
    quantity: float
    price: float | None = None
    event_id: str | None = None


def _is_number(value: Any) -> bool:
    # bool is an int subclass, but `true` is not a quantity.
    return isinstance(value, int | float) and not isinstance(value, bool)


def _number(obj: dict[str, Any], name: str) -> float:
    value = obj[name]
    if not _is_number(value):
        raise EventError("bad_type", f"expected {name} to be a number, got {type(value).__name__}")
    number = float(value) if isinstance(value, float) else value
    if isinstance(number, float) and not math.isfinite(number):
        raise EventError("not_finite", f"expected a finite {name}, got {number!r}")
    if abs(number) > MAX_ABS_VALUE:
        raise EventError("out_of_range", f"expected |{name}| <= {MAX_ABS_VALUE:g}, got {number!r}")
    return float(number)


def _text(obj: dict[str, Any], name: str) -> str:
    value = obj[name]
    if not isinstance(value, str):
        raise EventError("bad_type", f"expected {name} to be a string, got {type(value).__name__}")
    if len(value) > MAX_ID_CHARS:
        raise EventError(
            "too_long", f"expected {name} of at most {MAX_ID_CHARS} chars, got {len(value)}"
        )
    return value


def _item_id(obj: dict[str, Any]) -> str:
    item_id = _text(obj, "item_id").strip()
    if not item_id:
        raise EventError("bad_item_id", "expected a non-blank item_id")
    if not item_id.isprintable():
        raise EventError("bad_item_id", f"expected printable item_id, got {item_id!r}")
    return item_id


def _timestamp(value: Any, now_ms: int | None, max_future_ms: int | None) -> int:
    if isinstance(value, str):
        if len(value) > _MAX_TS_CHARS:
            raise EventError("bad_timestamp", f"expected an ISO-8601 ts, got {len(value)} chars")
        try:
            parsed = datetime.fromisoformat(value)
        except ValueError as exc:
            raise EventError("bad_timestamp", f"expected ISO-8601 ts, got {value!r}") from exc
        if parsed.tzinfo is None or parsed.utcoffset() is None:
            raise EventError(
                "bad_timestamp", f"expected a ts with a time zone (e.g. Z), got {value!r}"
            )
        try:
            ts_ms = round(parsed.timestamp() * 1000)
        except (OverflowError, ValueError, OSError) as exc:
            raise EventError("bad_timestamp", f"ts out of range: {value!r}") from exc
    elif _is_number(value):
        if isinstance(value, float) and not math.isfinite(value):
            raise EventError("bad_timestamp", f"expected a finite epoch-ms ts, got {value!r}")
        if not MIN_TS_MS <= value < MAX_TS_MS:
            raise EventError(
                "bad_timestamp", f"expected epoch milliseconds in 1990..2100, got {value!r}"
            )
        ts_ms = round(value)
    else:
        raise EventError(
            "bad_type",
            f"expected ts to be an ISO-8601 string or epoch ms, got {type(value).__name__}",
        )
    if not MIN_TS_MS <= ts_ms < MAX_TS_MS:
        raise EventError("bad_timestamp", f"expected a ts in 1990..2100, got {value!r}")
    if now_ms is not None and max_future_ms is not None and ts_ms > now_ms + max_future_ms:
        raise EventError(
            "bad_timestamp", f"ts {value!r} is {ts_ms - now_ms} ms ahead of the wall clock"
        )
    return int(ts_ms)


def _lenient_json(raw: bytes, error: orjson.JSONDecodeError) -> Any:
    """Second chance for what strict JSON rejects but producers commonly write.

    Python's ``json.dumps`` writes ``NaN``/``Infinity`` and integers beyond 64 bits, which
    orjson refuses; parsing them leniently lets the validator name the real problem
    (``not_finite``, ``out_of_range``) instead of a generic ``not_json``.
    """
    try:
        return json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise EventError("not_json", str(error)[:200]) from exc


def parse_event(
    raw: bytes | None,
    *,
    max_bytes: int = 64 * 1024,
    now_ms: int | None = None,
    max_future_ms: int | None = None,
) -> SaleEvent:
    """Validate one message value.

    Args:
        raw: The Kafka record value (``None`` for a tombstone).
        max_bytes: Larger values are rejected before decoding (``too_large``).
        now_ms: Wall clock for the future check; ``None`` disables it.
        max_future_ms: How far ahead of ``now_ms`` an event may be.

    Returns:
        The validated event.

    Raises:
        EventError: The value is invalid; ``reason`` is one of :data:`REASONS`.

    >>> parse_event(b'{"item_id": " A1 ", "ts": "1999-01-01T00:00:00Z", "quantity": 2}')
    SaleEvent(item_id='A1', ts_ms=915148800000, quantity=2.0, price=None, event_id=None)
    >>> parse_event(b'{"item_id": "A1", "ts": "1999-01-01", "quantity": 2}')  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    trendcast.exceptions.EventError: bad_timestamp: expected a ts with a time zone (e.g. Z), ...
    """
    event = parse_events([raw], max_bytes=max_bytes, now_ms=now_ms, max_future_ms=max_future_ms)[0]
    if isinstance(event, EventError):
        raise event
    return event


#: What the checked path accepts, as msgspec constraints, so that the decoder checks them in
#: C. msgspec counts a string's length in code points, as ``len`` does; a ``float`` field
#: takes JSON integers too (as ``float(int)``, exactly, within these bounds) and refuses
#: ``true``/``false``; a number beyond the float range fails to decode.
_Id = Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_ID_CHARS)]
_Quantity = Annotated[float, msgspec.Meta(ge=-MAX_ABS_VALUE, le=MAX_ABS_VALUE)]
_Price = Annotated[float, msgspec.Meta(ge=0.0, le=MAX_ABS_VALUE)]


class _Sale(msgspec.Struct, gc=False):
    """The event contract, for msgspec's decoder (unknown fields ignored).

    The types and the length and range constraints (:data:`_Id`, :data:`_Quantity`,
    :data:`_Price`) are checked in C while decoding; what fails them goes to the checked
    path, which names the problem. ``ts`` stays ``str | int | float`` (a JSON integer
    stays an int, as orjson makes it): :func:`_fast` checks it.
    """

    item_id: _Id
    ts: str | int | float
    quantity: _Quantity
    price: _Price | None = None
    event_id: _Id | None = None


_DECODE_SALE = msgspec.json.Decoder(_Sale).decode

#: Epoch ms of ISO-8601 time stamps already seen, for the fast path. Time stamps repeat:
#: the lines of one order share theirs, and a busy shop sells many times per second (in
#: the UCI data, 95% of lines have the time stamp of the line before them). A lookup costs
#: a tenth of parsing. Only strings :func:`_iso_ms` accepted are kept, and the
#: cache is cleared when full, so it stays small.
_TS_CACHE: dict[str, int] = {}
_TS_CACHE_SIZE = 4096


def _iso_ms(ts: str) -> int | None:
    """Epoch ms of a zone-aware ISO-8601 ``ts`` in range, or None (the checked path decides)."""
    if len(ts) > _MAX_TS_CHARS:
        return None
    try:
        moment = datetime.fromisoformat(ts)
        # fromisoformat only makes fixed-offset zones, whose utcoffset() is never None.
        if type(moment.tzinfo) is not timezone:
            return None
        ts_ms = round(moment.timestamp() * 1000)
    except (ValueError, OverflowError, OSError):
        return None
    if not MIN_TS_MS <= ts_ms < MAX_TS_MS:
        return None
    if len(_TS_CACHE) >= _TS_CACHE_SIZE:
        _TS_CACHE.clear()
    _TS_CACHE[ts] = ts_ms
    return ts_ms


def _fast(sale: _Sale, now_ms: int | None, max_future_ms: int | None) -> SaleEvent | None:
    """The event if ``sale`` (types, lengths and ranges checked by the decoder) is plainly
    valid, else None (the checked path decides)."""
    item_id, ts = sale.item_id, sale.ts
    # Printable excludes every white space but " ", so that is the only one to look for at
    # the ends (the checked path strips them: this one leaves such ids to it).
    if not item_id.isprintable() or item_id[0] == " " or item_id[-1] == " ":
        return None
    if isinstance(ts, str):
        ts_ms = _TS_CACHE.get(ts)
        if ts_ms is None:
            ts_ms = _iso_ms(ts)
            if ts_ms is None:
                return None
    elif isinstance(ts, float) and ts - ts != 0.0:  # NaN, inf
        return None
    else:
        if not MIN_TS_MS <= ts < MAX_TS_MS:
            return None
        ts_ms = int(round(ts))
        if not MIN_TS_MS <= ts_ms < MAX_TS_MS:
            return None
    if now_ms is not None and max_future_ms is not None and ts_ms > now_ms + max_future_ms:
        return None
    return SaleEvent(item_id, ts_ms, sale.quantity, sale.price, sale.event_id)


def parse_events(
    raws: Iterable[bytes | None],
    *,
    max_bytes: int = 64 * 1024,
    now_ms: int | None = None,
    max_future_ms: int | None = None,
) -> list[SaleEvent | EventError]:
    """:func:`parse_event` of each value: the event, or the error that says why it is invalid.

    The worker's per-event loop, and :func:`parse_event`'s too. Fast path for the
    well-formed common case (this runs once per event, and the checks one by one cost
    several times the JSON decoding): msgspec decodes straight into a typed struct in C
    (types, required fields, lengths and ranges, UTF-8), which leaves a few checks to
    :func:`_fast`. It accepts exactly what the checked path accepts, with the same result
    (tests/unit/stream/pipeline/test_events.py compares them on generated input); anything unusual
    goes to
    the checked path, which names the problem. The errors are kept without their
    tracebacks: the frames they hold would tie the list into a cycle.

    >>> [type(e).__name__ for e in parse_events([b'{"item_id":"A","ts":0,"quantity":1}', b"x"])]
    ['EventError', 'EventError']
    """
    out: list[SaleEvent | EventError] = []
    append = out.append
    decode, fast = _DECODE_SALE, _fast
    for raw in raws:
        try:
            event = None
            if raw and len(raw) <= max_bytes:
                try:
                    if not raw.isascii():
                        # msgspec checks the UTF-8 of the fields it reads, not of those it skips.
                        raw.decode("utf-8")
                    sale = decode(raw)
                except (msgspec.DecodeError, ValueError, RecursionError):  # ValueError: UTF-8
                    sale = None
                if sale is not None:
                    event = fast(sale, now_ms, max_future_ms)
            if event is None:
                event = _parse_checked(
                    raw, max_bytes=max_bytes, now_ms=now_ms, max_future_ms=max_future_ms
                )
            append(event)
        except EventError as exc:
            append(exc.with_traceback(None))
    return out


def _parse_checked(
    raw: bytes | None,
    *,
    max_bytes: int = 64 * 1024,
    now_ms: int | None = None,
    max_future_ms: int | None = None,
) -> SaleEvent:
    """:func:`parse_event`, check by check: the path every unusual message takes, and the
    one that names what is wrong."""
    if not raw:
        raise EventError("empty", "expected a JSON object, got an empty value")
    if len(raw) > max_bytes:
        raise EventError("too_large", f"expected at most {max_bytes} bytes, got {len(raw)}")
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise EventError("not_utf8", f"invalid UTF-8 at byte {exc.start}") from exc
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        obj = _lenient_json(raw, exc)
    if not isinstance(obj, dict):
        raise EventError("not_object", f"expected a JSON object, got {type(obj).__name__}")
    missing = [name for name in ("item_id", "ts", "quantity") if name not in obj]
    if missing:
        raise EventError("missing_field", f"missing {', '.join(missing)}")
    item_id = _item_id(obj)
    quantity = _number(obj, "quantity")
    ts_ms = _timestamp(obj["ts"], now_ms, max_future_ms)
    price: float | None = None
    if obj.get("price") is not None:
        price = _number(obj, "price")
        if price < 0:
            raise EventError("negative_price", f"expected price >= 0, got {price!r}")
    event_id: str | None = None
    if obj.get("event_id") is not None:
        event_id = _text(obj, "event_id")
        if not event_id:
            raise EventError("bad_type", "expected a non-empty event_id")
    return SaleEvent(
        item_id=item_id, ts_ms=ts_ms, quantity=quantity, price=price, event_id=event_id
    )


def dead_letter_value(
    raw: bytes | None,
    *,
    reason: str,
    detail: str,
    topic: str,
    partition: int,
    offset: int,
    key: bytes | None = None,
    timestamp_ms: int | None = None,
    dead_lettered_at_ms: int | None = None,
    extra: dict[str, Any] | None = None,
) -> bytes:
    """The JSON value of a dead-letter record: where it came from, why, and its exact bytes.

    The original bytes travel base64-encoded (they may not be UTF-8) next to a readable
    preview, so an operator can read the DLQ and a script can re-publish fixed records.

    >>> rec = orjson.loads(dead_letter_value(b"\\xff", reason="not_utf8", detail="d",
    ...     topic="sales", partition=1, offset=7))
    >>> rec["reason"], rec["value_b64"], rec["source"]
    ('not_utf8', '/w==', {'topic': 'sales', 'partition': 1, 'offset': 7})
    """
    truncated = raw is not None and len(raw) > MAX_DEAD_LETTER_BYTES
    if raw is not None and truncated:
        raw = raw[:MAX_DEAD_LETTER_BYTES]
    record: dict[str, Any] = {
        "reason": reason,
        "detail": detail,
        "source": {"topic": topic, "partition": partition, "offset": offset},
        "key_b64": None if key is None else base64.b64encode(key).decode("ascii"),
        "value_b64": None if raw is None else base64.b64encode(raw).decode("ascii"),
        "value_preview": None
        if raw is None
        else raw[: _PREVIEW_CHARS * 4].decode("utf-8", errors="replace")[:_PREVIEW_CHARS],
        "timestamp_ms": timestamp_ms,
        "dead_lettered_at_ms": dead_lettered_at_ms,
        "value_truncated": truncated,
    }
    if extra:
        record.update(extra)
    return orjson.dumps(record)
