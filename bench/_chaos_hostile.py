"""Hostile input for the chaos bench: seeded, hypothesis-generated records the worker must refuse.

Two families, drawn from :mod:`hypothesis.strategies` with a seeded random (no ``@given``, no
``find``: the bench needs a fixed list, not a search), so the same seed gives the same records:

* arbitrary bytes (mostly not UTF-8 or not JSON);
* almost-valid events: a well-formed sale with one or two fields broken (wrong type, NaN,
  missing, naive or absurd timestamps, negative price, control characters, huge values,
  overlong ids), or valid JSON cut short, or wrapped in the wrong container.

Every record is checked with the worker's own validator, :func:`stream.pipeline.events.parse_event`,
and kept only if it is invalid; the reason it gives is the one the dead-letter topic must
show. A record the validator accepts would be a real sale, and would silently change the
windows the bench compares, so it is dropped (and counted) instead.
"""

from __future__ import annotations

import json
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from hypothesis import strategies as st
from hypothesis.control import BuildContext
from hypothesis.errors import StopTest
from hypothesis.internal.conjecture.data import ConjectureData

from stream.pipeline.events import parse_event
from trendcast.exceptions import EventError

__all__ = ["BadRecord", "bad_records"]

logger = logging.getLogger(__name__)

#: The worker's default message size limit (``TRENDCAST_MAX_MESSAGE_BYTES``).
_MAX_BYTES = 64 * 1024
_MAX_FUTURE_MS = 86_400_000


@dataclass(frozen=True, slots=True)
class BadRecord:
    """A record to produce and the dead-letter reason the worker must give it."""

    key: bytes | None
    value: bytes | None
    reason: str


_ITEMS = st.sampled_from(["85123A", "22423", "21232", "84879", "47566"])
_GOOD_TS = st.sampled_from(["2010-03-01T10:00:00Z", 1267437600000, "2010-03-01T10:00:00+01:00"])


def _json_text(obj: Any) -> bytes:
    """JSON as Python writes it: with NaN, Infinity and huge integers, which orjson refuses."""
    return json.dumps(obj, allow_nan=True).encode()


@st.composite
def _almost_valid(draw: st.DrawFn) -> bytes:
    event: dict[str, Any] = {
        "event_id": draw(st.text(min_size=1, max_size=12)),
        "item_id": draw(_ITEMS),
        "ts": draw(_GOOD_TS),
        "quantity": draw(st.integers(-5, 50)),
        "price": draw(st.floats(0, 20, allow_nan=False)),
    }
    breakers: dict[str, Callable[[], object]] = {
        "drop": lambda: event.pop(draw(st.sampled_from(["item_id", "ts", "quantity"])), None),
        "quantity": lambda: event.update(
            quantity=draw(
                st.one_of(
                    st.text(max_size=5),
                    st.booleans(),
                    st.none(),
                    st.lists(st.integers(), max_size=2),
                    st.sampled_from([float("nan"), float("inf"), -float("inf"), 1e13, -1e15]),
                )
            )
        ),
        "price": lambda: event.update(
            price=draw(
                st.one_of(
                    st.floats(max_value=-1e-9, allow_nan=False, allow_infinity=False),
                    st.text(max_size=4),
                    st.sampled_from([float("nan"), float("inf"), 1e13]),
                )
            )
        ),
        "ts": lambda: event.update(
            ts=draw(
                st.one_of(
                    st.sampled_from(
                        [
                            "2010-03-01",  # no zone
                            "2010-03-01T10:00:00",  # no zone
                            "2999-01-01T00:00:00Z",  # future
                            "1969-12-31T23:59:59Z",  # before the supported range
                            "not a date",
                            "",
                            12345,  # seconds, not ms: 1970
                            1.5e20,
                            True,
                        ]
                    ),
                    st.text(max_size=20),
                    st.none(),
                )
            )
        ),
        "item_id": lambda: event.update(
            item_id=draw(
                st.one_of(
                    st.just(""),
                    st.just("   "),
                    st.text(min_size=129, max_size=200),
                    st.from_regex(r"\A[A-Z0-9]{0,4}[\x00-\x08\x0b\x1f][A-Z0-9]{0,4}\Z"),
                    st.integers(),
                    st.none(),
                )
            )
        ),
        "event_id": lambda: event.update(
            event_id=draw(st.one_of(st.just(""), st.integers(), st.text(min_size=129)))
        ),
    }
    for name in draw(st.lists(st.sampled_from(sorted(breakers)), min_size=1, max_size=2)):
        breakers[name]()
    text = _json_text(event)
    shape = draw(st.sampled_from(["as_is", "as_is", "truncated", "array", "bad_utf8", "padded"]))
    if shape == "truncated":
        return text[: draw(st.integers(0, len(text) - 1))]
    if shape == "array":
        return b"[" + text + b"]"
    if shape == "bad_utf8":
        at = draw(st.integers(0, len(text)))
        return text[:at] + b"\xff\xfe" + text[at:]
    if shape == "padded":
        return text + draw(st.sampled_from([b" x", b"}", b",", b"\x00"]))
    return text


_VALUES = st.one_of(
    st.binary(min_size=0, max_size=300),
    _almost_valid(),
    _almost_valid(),
    st.builds(
        _json_text,
        st.one_of(
            st.integers(), st.text(max_size=10), st.lists(st.integers(), max_size=3), st.none()
        ),
    ),
)
_KEYS = st.one_of(st.none(), st.binary(min_size=1, max_size=16))


def _draw(strategy: st.SearchStrategy[Any], rng: random.Random) -> Any:
    """One value of ``strategy``, determined by ``rng`` (hypothesis's own drawing machinery).

    ``ConjectureData`` and ``BuildContext`` are internal API (hypothesis 6.x); they are used
    because the public ways to draw a value are either non-deterministic (``.example()``) or a
    search (``find``/``@given``).
    """
    while True:
        data = ConjectureData(random=random.Random(rng.getrandbits(64)))
        try:
            with BuildContext(data, is_final=True, wrapped_test=_draw):
                return data.draw(strategy)
        except StopTest:  # the draw ran out of budget (rare for these sizes): try again
            continue


def bad_records(n: int, *, seed: int = 0, now_ms: int | None = None) -> list[BadRecord]:
    """``n`` records that :func:`stream.pipeline.events.parse_event` refuses, with their reasons.

    Besides the generated ones, the list always holds a tombstone (``empty``) and an
    oversized value (``too_large``), which generation would rarely hit.

    Args:
        n: Records wanted (at least 2).
        seed: Same seed, same records.
        now_ms: Wall clock for the future-timestamp check (default: now).
    """
    now_ms = int(time.time() * 1000) if now_ms is None else now_ms
    rng = random.Random(seed)
    out = [
        BadRecord(b"chaos-empty", None, "empty"),
        BadRecord(b"chaos-huge", b'{"pad": "' + b"x" * (_MAX_BYTES + 10) + b'"}', "too_large"),
    ]
    accepted = 0
    while len(out) < n:
        key, value = _draw(_KEYS, rng), _draw(_VALUES, rng)
        try:
            parse_event(value, max_bytes=_MAX_BYTES, now_ms=now_ms, max_future_ms=_MAX_FUTURE_MS)
        except EventError as exc:
            out.append(BadRecord(key, value, exc.reason))
        else:
            accepted += 1
    if accepted:
        logger.info("dropped %d generated records the validator accepts as sales", accepted)
    return out[:n]
