"""Event validation: every reason code, and no input can raise anything but EventError."""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stream.pipeline.events import (
    MAX_ID_CHARS,
    REASONS,
    SaleEvent,
    dead_letter_value,
    parse_event,
    parse_events,
)
from trendcast.exceptions import EventError

TS = "2011-01-05T10:00:00Z"
TS_MS = 1_294_221_600_000
NOW_MS = 1_800_000_000_000


def ev(**fields: object) -> bytes:
    base: dict[str, object] = {"item_id": "85123A", "ts": TS, "quantity": 3}
    base.update(fields)
    return orjson.dumps({k: v for k, v in base.items() if v is not ...})


def reason(raw: bytes | None, **kwargs: object) -> str:
    with pytest.raises(EventError) as info:
        parse_event(raw, **kwargs)  # type: ignore[arg-type]
    assert info.value.reason in REASONS
    return info.value.reason


def test_valid_event_with_all_fields() -> None:
    got = parse_event(ev(price=2.5, event_id="e-1", extra={"ignored": True}))
    assert got == SaleEvent(item_id="85123A", ts_ms=TS_MS, quantity=3.0, price=2.5, event_id="e-1")


@pytest.mark.parametrize(
    ("ts", "expected"),
    [
        (TS, TS_MS),
        ("2011-01-05T11:00:00+01:00", TS_MS),
        ("2011-01-05 10:00:00.000+00:00", TS_MS),
        (TS_MS, TS_MS),
        (float(TS_MS), TS_MS),
    ],
)
def test_timestamp_forms(ts: object, expected: int) -> None:
    assert parse_event(ev(ts=ts)).ts_ms == expected


def test_item_id_is_stripped_and_price_null_means_unknown() -> None:
    got = parse_event(ev(item_id="  A 1 ", price=None, event_id=None))
    assert (got.item_id, got.price, got.event_id) == ("A 1", None, None)


def test_negative_quantity_is_a_return() -> None:
    assert parse_event(ev(quantity=-2)).quantity == -2.0


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (None, "empty"),
        (b"", "empty"),
        (b"\xff\xfe{}", "not_utf8"),
        (b'{"item_id": "a\xed\xa0\x80"}', "not_utf8"),  # UTF-8-encoded surrogate
        (b"{not json", "not_json"),
        (b'{"item_id": "a", "ts": NaN, "quantity": 1}', "bad_timestamp"),
        (b'{"item_id": "a", "ts": 1, "quantity": 1', "not_json"),
        (b"[" * 50_000, "not_json"),
        (b"[1, 2]", "not_object"),
        (b'"text"', "not_object"),
        (b"42", "not_object"),
        (ev(item_id=...), "missing_field"),
        (ev(ts=...), "missing_field"),
        (ev(quantity=...), "missing_field"),
        (ev(item_id=5), "bad_type"),
        (ev(quantity="3"), "bad_type"),
        (ev(quantity=True), "bad_type"),
        (ev(quantity=None), "bad_type"),
        (ev(price="1.0"), "bad_type"),
        (ev(event_id=7), "bad_type"),
        (ev(event_id=""), "bad_type"),
        (ev(ts=[2011]), "bad_type"),
        (ev(item_id="x" * (MAX_ID_CHARS + 1)), "too_long"),
        (ev(event_id="x" * (MAX_ID_CHARS + 1)), "too_long"),
        (ev(item_id="   "), "bad_item_id"),
        (ev(item_id="a\nb"), "bad_item_id"),
        (b'{"item_id": "a", "ts": "2011-01-05T10:00:00Z", "quantity": 1e400}', "not_finite"),
        (b'{"item_id": "a", "ts": "2011-01-05T10:00:00Z", "quantity": NaN}', "not_finite"),
        (b'{"item_id": "a", "ts": "2011-01-05T10:00:00Z", "quantity": -Infinity}', "not_finite"),
        (
            b'{"item_id": "a", "ts": "2011-01-05T10:00:00Z", "quantity": 1, "price": NaN}',
            "not_finite",
        ),
        (
            b'{"item_id": "a", "ts": "2011-01-05T10:00:00Z", "quantity": 1' + b"0" * 30 + b"}",
            "out_of_range",
        ),
        (ev(quantity=1e13), "out_of_range"),
        (ev(price=-0.5), "negative_price"),
        (ev(ts="2011-01-05"), "bad_timestamp"),  # no zone
        (ev(ts="2011-01-05T10:00:00"), "bad_timestamp"),
        (ev(ts="yesterday"), "bad_timestamp"),
        (ev(ts="9999-12-31T23:59:59Z"), "bad_timestamp"),
        (ev(ts="1970-01-01T00:00:00Z"), "bad_timestamp"),
        (ev(ts=TS_MS // 1000), "bad_timestamp"),  # seconds, not ms
        (ev(ts=-1), "bad_timestamp"),
        (ev(ts="2" * 100), "bad_timestamp"),
    ],
)
def test_reasons(raw: bytes | None, expected: str) -> None:
    assert reason(raw) == expected


def test_too_large_is_checked_before_decoding() -> None:
    assert reason(b"\xff" * 100, max_bytes=10) == "too_large"


def test_future_events_are_bad_timestamps() -> None:
    ahead = orjson.dumps({"item_id": "a", "ts": NOW_MS + 2 * 86_400_000, "quantity": 1})
    assert reason(ahead, now_ms=NOW_MS, max_future_ms=86_400_000) == "bad_timestamp"
    near = orjson.dumps({"item_id": "a", "ts": NOW_MS + 1000, "quantity": 1})
    assert parse_event(near, now_ms=NOW_MS, max_future_ms=86_400_000).ts_ms == NOW_MS + 1000


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=300))
def test_any_bytes_raise_only_event_error(raw: bytes) -> None:
    try:
        parse_event(raw, max_bytes=200, now_ms=NOW_MS, max_future_ms=0)
    except EventError as exc:
        assert exc.reason in REASONS


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=5), children, max_size=3)
    ),
    max_leaves=8,
)


@settings(max_examples=400, deadline=None)
@given(
    st.fixed_dictionaries(
        {},
        optional={
            "item_id": json_values | st.text(max_size=200),
            "ts": json_values | st.datetimes().map(lambda d: d.isoformat()),
            "quantity": json_values,
            "price": json_values,
            "event_id": json_values,
        },
    )
)
def test_any_json_object_raises_only_event_error(obj: dict[str, object]) -> None:
    try:
        raw = orjson.dumps(obj)
    except (TypeError, orjson.JSONEncodeError):
        return  # e.g. integers beyond 64 bits: not representable, so not a test input
    try:
        got = parse_event(raw, now_ms=NOW_MS, max_future_ms=0)
    except EventError as exc:
        assert exc.reason in REASONS
    else:
        assert 1 <= len(got.item_id) <= MAX_ID_CHARS


def test_dead_letter_keeps_original_bytes_and_source() -> None:
    raw = b"\x00\xffnot json"
    rec = orjson.loads(
        dead_letter_value(
            raw,
            reason="not_utf8",
            detail="bad byte",
            topic="sales",
            partition=2,
            offset=41,
            key=b"k",
            extra={"late_by_ms": 5},
        )
    )
    assert base64.b64decode(rec["value_b64"]) == raw
    assert base64.b64decode(rec["key_b64"]) == b"k"
    assert rec["source"] == {"topic": "sales", "partition": 2, "offset": 41}
    assert (rec["reason"], rec["detail"], rec["late_by_ms"]) == ("not_utf8", "bad byte", 5)
    assert "not json" in rec["value_preview"]


def test_dead_letter_of_a_huge_message_is_truncated() -> None:
    from stream.pipeline.events import MAX_DEAD_LETTER_BYTES

    raw = b"x" * (MAX_DEAD_LETTER_BYTES + 10)
    rec = orjson.loads(
        dead_letter_value(raw, reason="too_large", detail="", topic="s", partition=0, offset=0)
    )
    assert rec["value_truncated"] is True
    assert len(base64.b64decode(rec["value_b64"])) == MAX_DEAD_LETTER_BYTES


# --- the fast path agrees with the checked one ----------------------------------------------
_texts = st.one_of(
    st.text(max_size=6),
    st.sampled_from(["85123A", " 85123A ", "a\tb", "\u00a0x", "x" * MAX_ID_CHARS, "y" * 129]),
)
_numbers = st.one_of(
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0, -1, 1e12, 1e12 + 1, -1e12, 2.5]),
)
_times = st.one_of(
    st.sampled_from(
        [
            "2011-01-05T10:00:00Z",
            "2011-01-05T10:00:00.123+02:00",
            "2011-01-05T10:00:00",
            "2011-01-05",
            "1989-12-31T23:59:59Z",
            "2099-12-31T23:59:59Z",
            "2100-01-01T00:00:00Z",
            "9999-12-31T23:59:59+14:00",
            "2011-13-05T10:00:00Z",
        ]
    ),
    st.text(max_size=30),
    _numbers,
)
_values = st.one_of(st.none(), st.booleans(), _texts, _numbers, st.lists(st.integers(), max_size=2))
_events = st.fixed_dictionaries(
    {},
    optional={
        "item_id": st.one_of(_texts, _values),
        "ts": st.one_of(_times, _values),
        "quantity": st.one_of(_numbers, _values),
        "price": st.one_of(_numbers, _values),
        "event_id": st.one_of(_texts, _values),
    },
)


def _outcome(fn: object, raw: bytes, **kwargs: object) -> object:
    try:
        return fn(raw, **kwargs)  # type: ignore[operator]
    except EventError as exc:
        return ("error", exc.reason)


def _outcomes_in_a_batch(raw: bytes, **kwargs: Any) -> list[object]:
    """What :func:`parse_events` (the worker's loop) makes of ``raw``, twice: the second
    time its time stamp, if it was valid, comes from the cache."""
    out = parse_events([raw, raw], **kwargs)
    return [("error", e.reason) if isinstance(e, EventError) else e for e in out]


@settings(max_examples=600, deadline=None)
@given(_events, st.sampled_from([None, 1_700_000_000_000]))
def test_the_fast_path_accepts_and_returns_exactly_what_the_checked_path_does(
    obj: dict[str, object], now_ms: int | None
) -> None:
    from stream.pipeline.events import _parse_checked

    try:
        raw = orjson.dumps(obj)
    except (TypeError, orjson.JSONEncodeError):  # NaN/inf/huge ints: orjson will not write them
        import json

        raw = json.dumps(obj).encode()
    kwargs = {"max_bytes": 4096, "now_ms": now_ms, "max_future_ms": 86_400_000}
    fast, checked = _outcome(parse_event, raw, **kwargs), _outcome(_parse_checked, raw, **kwargs)
    assert fast == checked
    assert _outcomes_in_a_batch(raw, **kwargs) == [checked, checked]
    if isinstance(fast, SaleEvent):
        assert type(fast.quantity) is float and type(fast.ts_ms) is int
        assert fast.price is None or type(fast.price) is float


_VALID_RAW = orjson.dumps(
    {
        "event_id": "e1",
        "item_id": "85123A",
        "extra": {"note": "\u00e9t\u00e9", "n": [1, 2.5e3, None, True]},
        "ts": "2011-01-05T10:00:00Z",
        "quantity": 2.0,
    }
)


@st.composite
def _mangled(draw: st.DrawFn) -> bytes:
    """A valid event with bytes spliced in or cut out (bad UTF-8, BOMs, stray characters)."""
    raw = bytearray(_VALID_RAW)
    for _ in range(draw(st.integers(1, 3))):
        at = draw(st.integers(0, len(raw)))
        if draw(st.booleans()):
            raw[at:at] = draw(
                st.one_of(
                    st.binary(min_size=1, max_size=3),
                    st.sampled_from(
                        [b"\xef\xbb\xbf", b" ", b"\\ud800", b"\\x", b"\xff", b"}", b",", b"0", b"e"]
                    ),
                )
            )
        else:
            del raw[at : at + draw(st.integers(1, 3))]
    return bytes(raw)


@settings(max_examples=600, deadline=None)
@given(st.one_of(_mangled(), st.binary(max_size=40)))
def test_the_fast_path_agrees_with_the_checked_path_on_raw_bytes(raw: bytes) -> None:
    from stream.pipeline.events import _parse_checked

    kwargs = {"max_bytes": 4096, "now_ms": None, "max_future_ms": None}
    checked = _outcome(_parse_checked, raw, **kwargs)
    assert _outcome(parse_event, raw, **kwargs) == checked
    assert _outcomes_in_a_batch(raw, **kwargs) == [checked, checked]


def test_a_cached_time_stamp_is_still_checked_against_the_wall_clock() -> None:
    raw = b'{"item_id": "A", "ts": "2030-01-01T00:00:00Z", "quantity": 1}'
    far_past, day = 1_700_000_000_000, 86_400_000
    assert isinstance(parse_events([raw])[0], SaleEvent)  # now cached
    late = parse_events([raw], now_ms=far_past, max_future_ms=day)[0]
    assert isinstance(late, EventError) and late.reason == "bad_timestamp"


def test_the_time_stamp_cache_stays_bounded() -> None:
    from stream.pipeline import events

    n = events._TS_CACHE_SIZE + 1000  # more distinct time stamps than it keeps
    start = 1_294_221_600_000  # 2011-01-05T10:00:00Z
    stamps = [datetime.fromtimestamp(start / 1000 + i, UTC).isoformat() for i in range(n)]
    raws = [orjson.dumps({"item_id": "A", "ts": ts, "quantity": 1}) for ts in stamps]
    for _ in range(3):
        got = parse_events(raws)
        assert [e.ts_ms for e in got if isinstance(e, SaleEvent)] == [
            start + i * 1000 for i in range(n)
        ]
        assert len(events._TS_CACHE) <= events._TS_CACHE_SIZE


_BASE = {"item_id": "85123A", "ts": "2011-01-05T10:00:00Z", "quantity": 2, "event_id": "e1"}
_EDGES = (
    [
        ("item_id", v)
        for v in ["a ", " a", "a\u00a0", "x" * MAX_ID_CHARS, "y" * (MAX_ID_CHARS + 1), "", "\u00e9"]
    ]
    + [
        ("event_id", v)
        for v in [
            "",
            "e" * MAX_ID_CHARS,
            "e" * (MAX_ID_CHARS + 1),
            None,
            7,
            "\u00e9" * MAX_ID_CHARS,
        ]
    ]
    + [
        (field, v)
        for field in ("quantity", "price")
        for v in [0, -0.0, -1, -1e-9, 1e12, -1e12, 10**12 + 1, 1e12 + 0.5, 2**64, True, "1", None]
    ]
    + [
        ("ts", v)
        for v in [
            631_152_000_000,
            631_151_999_999,
            4_102_444_799_999,
            4_102_444_800_000,
            631_152_000_000.4,
            "2011-01-05T10:00:00+00:00",
            "2011-01-05 10:00:00Z",
            "2011-01-05T10:00:00",
            "x" * 65,
        ]
    ]
)


@pytest.mark.parametrize(("field", "value"), _EDGES)
def test_the_fast_paths_agree_with_the_checked_path_at_the_edges(field: str, value: object) -> None:
    from stream.pipeline.events import _parse_checked

    raw = json.dumps({**_BASE, field: value}).encode()  # json: it writes 2**64 too
    kwargs: dict[str, Any] = {"max_bytes": 4096, "now_ms": None, "max_future_ms": None}
    checked = _outcome(_parse_checked, raw, **kwargs)
    assert _outcome(parse_event, raw, **kwargs) == checked
    assert _outcomes_in_a_batch(raw, **kwargs) == [checked, checked]
