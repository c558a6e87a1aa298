"""Replay a sales file into Kafka as the live event stream the worker consumes.

Canonical lines (:func:`trendcast.data.read_lines`) become events on the ``sales`` topic,
in event-time order (stable, so lines with the same timestamp keep their file order), keyed
by ``item_id``. Each value is the event contract of :mod:`stream.pipeline.events`::

    {"event_id": "...", "item_id": "85123A", "ts": "2011-01-05T00:00:00Z",
     "quantity": 6.0, "price": 2.55}

``event_id`` is deterministic (:func:`event_ids`): replaying the same file twice produces the
same ids, so the worker's de-duplication counts nothing twice. It is a hash of the source
identity (the file name by default), the line's content and its occurrence number among
identical lines; it does not use the row number, because ``--item-pattern``, ``--returns``
or ``--from/--to`` shift row numbers and the same sale must keep its id whatever the filter.

Pacing:

* ``speed=None, rate=None`` (``--speed max``): as fast as the broker acknowledges.
* ``speed=N``: N× real time, i.e. the wall-clock pause between two events is their
  event-time gap divided by N (``86400`` plays a day per second). Each pause is capped at
  ``max_pause_s`` so a shop's closed weeks (UCI Online Retail closes over Christmas) do not
  stall a demo; the events still carry their true timestamps, so the worker sees the gap.
* ``rate=N``: at most N events per second.

Both may be combined (each event waits for both). The Kafka record timestamp is left to the
producer (wall clock) on purpose: stamping 2010 event times on records would make a real
Kafka delete the segments at once under time-based retention.

Every send uses ``acks=all``; the call returns after every event is acknowledged.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pandas as pd
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from stream.settings.security import KafkaSecurity
from trendcast.devtools.embedded import (
    ensure_topics_async,
    list_topics_async,
    sasl_refused,
    to_bootstrap,
)
from trendcast.exceptions import BrokerError, ConfigError, DataError
from trendcast.sync_bridge import blocking

__all__ = [
    "DEFAULT_MAX_PAUSE_S",
    "ReplayReport",
    "encode_events",
    "event_ids",
    "parse_speed",
    "replay",
    "replay_async",
    "select_window",
    "source_identity",
]

logger = logging.getLogger(__name__)

#: Longest wall-clock pause between two events at ``--speed N`` (see the module docstring).
DEFAULT_MAX_PAUSE_S = 2.0
# Events handed to the producer before awaiting their acknowledgements: large enough to
# fill aiokafka's batches, small enough that a broker failure surfaces within a second.
_CHUNK = 2_000
_NS_PER_MS = 1_000_000


@dataclass(frozen=True)
class ReplayReport:
    """What a replay published.

    Attributes:
        topic: Destination topic.
        events: Events acknowledged by the broker.
        items: Distinct item ids among them.
        first_ts: Event time of the first event (UTC, tz-naive), None when nothing was sent.
        last_ts: Event time of the last event.
        elapsed_s: Wall-clock duration of the publishing.
    """

    topic: str
    events: int
    items: int
    first_ts: pd.Timestamp | None
    last_ts: pd.Timestamp | None
    elapsed_s: float

    @property
    def events_per_s(self) -> float:
        """Average publishing rate."""
        return self.events / self.elapsed_s if self.elapsed_s > 0 else float(self.events)


def parse_speed(text: str) -> float | None:
    """Parse ``--speed``: ``max`` (None: as fast as possible) or a positive factor.

    >>> parse_speed("max"), parse_speed("86400"), parse_speed("1e3")
    (None, 86400.0, 1000.0)
    """
    if text.strip().lower() == "max":
        return None
    try:
        value = float(text)
    except ValueError as exc:
        raise ConfigError(f"expected --speed max or a positive number, got {text!r}") from exc
    _check_positive("--speed", value)
    return value


def _check_positive(name: str, value: float | None) -> None:
    if value is not None and not (math.isfinite(value) and value > 0):
        raise ConfigError(f"expected {name} to be a positive number, got {value!r}")


def source_identity(path: Path | str) -> str:
    """The source part of event ids: the file name.

    The name rather than a content hash, so that re-replaying a file that has grown keeps the
    ids of its old lines (and the worker skips them); renaming a file changes every id.
    """
    return Path(path).name


def _to_utc_naive(value: str | datetime | pd.Timestamp, name: str) -> pd.Timestamp:
    try:
        stamp = pd.Timestamp(value)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"expected {name} as an ISO date like 2011-01-31, got {value!r}") from exc
    if pd.isna(stamp):
        raise ConfigError(f"expected {name} as an ISO date like 2011-01-31, got {value!r}")
    if stamp.tzinfo is not None:
        stamp = stamp.tz_convert("UTC").tz_localize(None)
    return stamp


def select_window(
    lines: pd.DataFrame,
    start: str | datetime | pd.Timestamp | None = None,
    end: str | datetime | pd.Timestamp | None = None,
) -> pd.DataFrame:
    """Lines with ``start <= ts < end``, in stable event-time order, index kept.

    Dates without a zone are UTC, like the canonical ``ts``.

    >>> lines = pd.DataFrame({"item_id": ["a", "b", "c"], "quantity": [1.0, 2.0, 3.0],
    ...     "ts": pd.to_datetime(["2011-01-02", "2011-01-01", "2011-01-03"])})
    >>> select_window(lines, "2011-01-01", "2011-01-03")["item_id"].tolist()
    ['b', 'a']
    """
    begin = _to_utc_naive(start, "--from") if start is not None else None
    stop = _to_utc_naive(end, "--to") if end is not None else None
    if begin is not None and stop is not None and stop <= begin:
        raise ConfigError(f"expected --from before --to, got {begin} >= {stop}")
    mask = np.ones(len(lines), dtype=bool)
    if begin is not None:
        mask &= (lines["ts"] >= begin).to_numpy()
    if stop is not None:
        mask &= (lines["ts"] < stop).to_numpy()
    return lines[mask].sort_values("ts", kind="stable")


def event_ids(lines: pd.DataFrame, source: str) -> pd.Series:
    """Deterministic event ids: blake2b of source, item, ts, quantity, price, occurrence.

    The occurrence number tells identical lines apart (two identical sales in one file are
    two sales) while staying independent of filters, which keep or drop identical lines
    together.

    >>> lines = pd.DataFrame({"item_id": ["a", "a"], "quantity": [1.0, 1.0],
    ...     "ts": pd.to_datetime(["2011-01-01", "2011-01-01"])})
    >>> ids = event_ids(lines, "f.csv")
    >>> ids.iloc[0] != ids.iloc[1], ids.equals(event_ids(lines, "f.csv")), len(ids.iloc[0])
    (True, True, 32)
    """
    has_price = "price" in lines.columns
    keys = ["item_id", "ts", "quantity"] + (["price"] if has_price else [])
    occurrence = lines.groupby(keys, sort=False, dropna=False).cumcount().to_numpy()
    ts_ns = lines["ts"].to_numpy(dtype="datetime64[ns]").astype("int64")
    items = lines["item_id"].astype(str).to_numpy()
    quantities = lines["quantity"].to_numpy(dtype="float64")
    prices = lines["price"].to_numpy(dtype="float64") if has_price else None
    out: list[str] = []
    for i in range(len(lines)):
        price = "" if prices is None or np.isnan(prices[i]) else repr(float(prices[i]))
        text = "\x1f".join(
            (source, items[i], str(int(ts_ns[i])), repr(float(quantities[i])), price,
             str(int(occurrence[i])))
        )  # fmt: skip
        out.append(hashlib.blake2b(text.encode("utf-8"), digest_size=16).hexdigest())
    return pd.Series(out, index=lines.index, dtype=object)


def _iso_z(ts_ns: int) -> str:
    """ISO-8601 UTC with ``Z``, milliseconds only when not zero.

    >>> _iso_z(1_294_185_600_000_000_000), _iso_z(1_294_185_600_250_000_000)
    ('2011-01-05T00:00:00Z', '2011-01-05T00:00:00.250Z')
    """
    ms_total = ts_ns // _NS_PER_MS
    seconds, ms = divmod(ms_total, 1000)
    base = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))
    return f"{base}.{ms:03d}Z" if ms else f"{base}Z"


def encode_events(lines: pd.DataFrame, source: str) -> list[tuple[bytes, bytes, int]]:
    """Kafka ``(key, value, ts_ns)`` for each line, in the frame's order.

    >>> lines = pd.DataFrame({"item_id": ["a"], "quantity": [2.0], "price": [float("nan")],
    ...     "ts": pd.to_datetime(["2011-01-05"])})
    >>> key, value, _ = encode_events(lines, "f.csv")[0]
    >>> key, sorted(orjson.loads(value))
    (b'a', ['event_id', 'item_id', 'quantity', 'ts'])
    """
    ids = event_ids(lines, source).to_numpy()
    ts_ns = lines["ts"].to_numpy(dtype="datetime64[ns]").astype("int64")
    items = lines["item_id"].astype(str).to_numpy()
    quantities = lines["quantity"].to_numpy(dtype="float64")
    prices = lines["price"].to_numpy(dtype="float64") if "price" in lines.columns else None
    events: list[tuple[bytes, bytes, int]] = []
    for i in range(len(lines)):
        value: dict[str, Any] = {
            "event_id": ids[i],
            "item_id": items[i],
            "ts": _iso_z(int(ts_ns[i])),
            "quantity": float(quantities[i]),
        }
        if prices is not None and math.isfinite(prices[i]):
            value["price"] = float(prices[i])
        events.append((items[i].encode("utf-8"), orjson.dumps(value), int(ts_ns[i])))
    return events


def _schedule(
    ts_ns: Sequence[int], speed: float | None, rate: float | None, max_pause_s: float
) -> list[float]:
    """Wall-clock offset (s from the start) at which each event is due.

    >>> _schedule([0, 86_400 * 10**9, 10 * 86_400 * 10**9], 86_400.0, None, 2.0)
    [0.0, 1.0, 3.0]
    >>> _schedule([0, 0, 0], None, 10.0, 2.0)
    [0.0, 0.1, 0.2]
    """
    offsets: list[float] = []
    due = 0.0
    for i, ts in enumerate(ts_ns):
        if i:
            step = 0.0
            if speed is not None:
                step = min((ts - ts_ns[i - 1]) / 1e9 / speed, max_pause_s)
            if rate is not None:
                step = max(step, 1.0 / rate)
            due += max(step, 0.0)
        offsets.append(round(due, 9))
    return offsets


def _chunks(n: int, due: list[float] | None, started: float) -> Iterator[tuple[int, int, float]]:
    """(begin, end, wait_until) ranges of events to send together."""
    i = 0
    while i < n:
        if due is None:
            yield i, min(n, i + _CHUNK), started
            i = min(n, i + _CHUNK)
            continue
        j = i + 1
        # Send together everything due within 10 ms of the first one: sleeping less than
        # that is below the loop's timer resolution anyway.
        while j < n and j - i < _CHUNK and due[j] - due[i] <= 0.01:
            j += 1
        yield i, j, started + due[i]
        i = j


async def replay_async(
    lines: pd.DataFrame,
    *,
    bootstrap: str,
    topic: str = "sales",
    speed: float | None = None,
    rate: float | None = None,
    start: str | datetime | pd.Timestamp | None = None,
    end: str | datetime | pd.Timestamp | None = None,
    source: str = "",
    progress: bool = False,
    create_partitions: int | None = None,
    max_pause_s: float = DEFAULT_MAX_PAUSE_S,
    console: Console | None = None,
    on_sent: Callable[[int], None] | None = None,
    security: KafkaSecurity | None = None,
) -> ReplayReport:
    """Publish canonical lines to ``topic`` as sale events; see the module docstring.

    Args:
        lines: Canonical lines (``item_id, ts, quantity[, price]``), any order.
        bootstrap: Kafka bootstrap servers (``host:port,...``; ``kafka://`` URLs accepted).
        topic: Destination topic.
        speed: Event-time speed-up factor, or None for no pacing by event time.
        rate: Maximum events per second, or None for no cap.
        start: Keep lines with ``ts >= start`` (UTC if no zone).
        end: Keep lines with ``ts < end``.
        source: Source identity mixed into event ids (see :func:`source_identity`).
        progress: Show a rich progress bar (on stderr).
        create_partitions: Create ``topic`` with this many partitions if it does not exist;
            when None a missing topic is an error, because a broker would otherwise
            auto-create it with whatever partition count it defaults to (Tansu: 4).
        max_pause_s: Cap of one wall-clock pause at ``speed`` (see the module docstring).
        console: Where the progress bar is drawn (default: stderr).
        on_sent: Called with the number of newly acknowledged events after each chunk
            (``trendcast up`` counts events of a replay that Ctrl-C cuts short).
        security: SASL/TLS of the cluster (``KafkaSecurity.from_settings(settings)``);
            PLAINTEXT when None.

    Returns:
        What was published.

    Raises:
        ConfigError: Bad speed/rate/window.
        DataError: Missing canonical columns, or no line in the window.
        BrokerError: The broker is unreachable, the topic is missing, or a send failed.
    """
    _check_positive("--speed", speed)
    _check_positive("--rate", rate)
    if not (math.isfinite(max_pause_s) and max_pause_s >= 0):
        raise ConfigError(f"expected max_pause_s >= 0, got {max_pause_s!r}")
    missing = [c for c in ("item_id", "ts", "quantity") if c not in lines.columns]
    if missing:
        raise DataError(f"expected canonical lines, missing column(s) {', '.join(missing)}")
    window = select_window(lines, start, end)
    if window.empty:
        raise DataError(
            f"no sales lines in [{start or 'start'}, {end or 'end'}) "
            f"(the data spans {lines['ts'].min()} .. {lines['ts'].max()})"
        )
    bootstrap = to_bootstrap(bootstrap)
    security = security or KafkaSecurity()
    try:
        await _check_topic(bootstrap, topic, create_partitions, security)
    except KeyError as exc:  # aiokafka's answer to a refused SCRAM login
        raise sasl_refused(exc, f"cannot replay to {topic} on {bootstrap}") from exc
    events = encode_events(window, source)
    ts_ns = [ev[2] for ev in events]
    due = None if speed is None and rate is None else _schedule(ts_ns, speed, rate, max_pause_s)
    logger.info(
        "replaying %d events of %d items to %s on %s (speed=%s, rate=%s)",
        len(events), window["item_id"].nunique(), topic, bootstrap,
        speed or "max", rate or "unlimited",
    )  # fmt: skip

    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap,
        acks="all",
        linger_ms=5 if due is not None else 20,
        max_batch_size=256 * 1024,
        request_timeout_ms=30_000,
        # Idempotence is off because Tansu rejects InitProducerId; a retried duplicate is
        # harmless since every event carries its event_id.
        enable_idempotence=False,
        **security.aiokafka_kwargs(),
    )
    bar = _progress_bar(console) if progress else None
    task = bar.add_task(f"replay → {topic}", total=len(events)) if bar is not None else None
    loop = asyncio.get_running_loop()
    sent = 0
    started = loop.time()
    try:
        await producer.start()
        if bar is not None:
            bar.start()
        started = loop.time()
        for begin, stop, wait_until in _chunks(len(events), due, started):
            delay = wait_until - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            futures = [
                await producer.send(topic, key=key, value=value)
                for key, value, _ in events[begin:stop]
            ]
            await asyncio.gather(*futures)
            if on_sent is not None:
                on_sent(stop - sent)
            sent = stop
            if bar is not None and task is not None:
                bar.update(task, completed=sent)
    except KafkaError as exc:
        raise BrokerError(
            f"replay to {topic} on {bootstrap} failed after {sent} acknowledged events: {exc}"
        ) from exc
    finally:
        if bar is not None:
            bar.stop()
        await producer.stop()
    elapsed = loop.time() - started
    stamps = window["ts"]
    report = ReplayReport(
        topic=topic,
        events=sent,
        items=int(window["item_id"].nunique()),
        first_ts=pd.Timestamp(stamps.iloc[0]),
        last_ts=pd.Timestamp(stamps.iloc[-1]),
        elapsed_s=elapsed,
    )
    logger.info("replayed %d events in %.2fs (%.0f/s)", sent, elapsed, report.events_per_s)
    return report


#: Blocking :func:`replay_async` (same arguments), for the CLI and tests.
replay = blocking(replay_async)


async def _check_topic(
    bootstrap: str, topic: str, create_partitions: int | None, security: KafkaSecurity
) -> None:
    client_kwargs = security.aiokafka_kwargs()
    if create_partitions is not None:
        await ensure_topics_async(bootstrap, {topic: create_partitions}, **client_kwargs)
        return
    topics = await list_topics_async(bootstrap, **client_kwargs)
    if topic not in topics:
        known = ", ".join(sorted(t for t in topics if not t.startswith("__"))) or "none"
        raise BrokerError(
            f"topic {topic!r} does not exist on {bootstrap} (topics: {known}); start the "
            "worker first (it creates its topics) or pass the partition count to create it"
        )


def _progress_bar(console: Console | None) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TaskProgressColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console or Console(stderr=True),
        transient=False,
    )
