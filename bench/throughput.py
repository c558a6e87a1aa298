"""Throughput bench: raw Kafka ceiling, Faust floor and the trendcast worker, one topic.

Run::

    python bench/throughput.py [--events 500000] [--partitions 4] [--days 14] [--quick]
                               [--bundle DIR] [--profile FILE] [--group-workers N]

One pre-filled topic (``--partitions`` partitions on a local Tansu broker) holds ``--events``
sale events built from UCI Online Retail II: items, quantities, prices and the order of sales
are real; event times keep the data's order and spacing but are spread over ``--days`` days
(a platform with the data's catalogue and ``events / days`` sales a day), with distinct
``event_id`` values. The same topic is read three ways:

* ``a``: aiokafka ``getmany`` + ``orjson.loads`` of every value, no group: the ceiling (the
  median of three reads);
* ``b``: a plain Faust agent (``bench/_throughput_faust.py``) that only decodes: the
  framework's floor, measured from the agent's own counter;
* ``c``: the trendcast worker (``python -m stream``, a fresh consumer group and Redis key
  prefix): events validated, windows in Redis, forecasts emitted at every bucket close;
  measured from its ``/metrics`` counter ``trendcast_events_in_total`` and, as a cross-check,
  from the group's committed offsets; the median of ``--worker-runs`` reads (3), each with a
  fresh group and key prefix, because this machine's rates swing by a third between runs;
* ``c×N``: ``--group-workers`` worker processes (default: one per core) in one consumer
  group, with a fresh group and key prefix, sharing the partitions and the Redis state: how
  the worker scales out (``--scale worker=N``), measured from their summed counters (median
  of ``--worker-runs`` too). Reads of ``c`` and ``c×N`` take turns, and all come before the
  last read of ``c``, whose later phases add events to the topic.

Every rate is the steady-state one: events between 20% and 80% of the topic divided by the
time between those points, so start-up, group joins and the tail are left out. Then, with the
worker still running: produce -> committed-offset latency at 50% of ``c`` (the worker commits a
batch only after its state is in Redis), and the time from a bucket close to the last forecast
of ``--close-items`` new items. Also printed: Redis round trips per batch, where the worker's
batch time went, ``MEMORY USAGE`` of item keys (and of full 56-day windows), and ONNX Runtime
windows/s at the batch sizes the worker uses. ``--profile`` runs the worker under pyinstrument
(slower: use it for where the time goes, not for the rates).

Issue 18 (honest figures): the model is the daily bundle of ``trendcast train`` on the shared
data (``bench/_bundles.py``: trained once, cached under ``artifacts/bench-bundle/``; or
``--bundle``; ``--fake-bundle`` only to debug the bench). The topic above is the *live*
workload and starts with warm-up history (:func:`build_history`) so that its items have full
windows; a second topic holds the *catch-up* workload (:func:`build_catchup`: a year of the
data at its real times after two months of warm-up), read ``--catchup-runs`` times. Rates and
the counters of the measured part (fallback share, forecasts per event, ONNX seconds) leave
the warm-up out. One extra read starts past the warm-up (no full windows): the fallback-only
figure of earlier rounds. The close phase closes ``--close-items`` (20,000) items with full
windows at once, against ONNX Runtime's one-core windows/s at batch 256; then the real-time
part (``bench/_realtime.py``; ``--no-realtime`` skips it).

The exit code is 1 on any error (a service that does not start, a reader that does not reach
the end in time, a worker that dead-letters valid events or exits non-zero).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import math
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable, Coroutine, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, TypeVar, cast

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `python bench/throughput.py` puts bench/, not the repo, first
    sys.path.insert(0, str(REPO))

import aiohttp  # noqa: E402
import numpy as np  # noqa: E402
import numpy.typing as npt  # noqa: E402
import orjson  # noqa: E402
import redis  # noqa: E402
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition  # noqa: E402
from aiokafka.partitioner import DefaultPartitioner  # noqa: E402

from stream.settings.worker import WorkerSettings  # noqa: E402
from stream.state.redis_store import item_keys  # noqa: E402
from stream.worker.app import send_batches  # noqa: E402
from trendcast.data import ColumnMap, read_lines  # noqa: E402
from trendcast.devtools.embedded import (  # noqa: E402
    RedisServer,
    TansuBroker,
    ensure_topics,
    free_port,
    resolve_redis,
)
from trendcast.devtools.up import worker_env  # noqa: E402
from trendcast.exceptions import TrendcastError  # noqa: E402

__all__ = ["Rate", "build_events", "main", "steady_rate"]

logger = logging.getLogger(__name__)

DATA = (
    Path(__file__).resolve().parents[2]
    / "shared/data/online_retail/online_retail_2009-12_2011-08.parquet"
)
COLUMNS = ColumnMap(item="StockCode", time="InvoiceDate", quantity="Quantity", price="UnitPrice")
ITEM_PATTERN = r"^\d{5}[A-Z]?$"
DAY_MS = 86_400_000
#: Window of the bench's model (the fake bundle's, and the usual real one's), in days.
WINDOW_DAYS = 56
#: 2023-11-13, a Monday: event times of the bench start here.
START_MONDAY_MS = 1_699_833_600_000
#: Steady state: the rate between these fractions of the topic.
LOW, HIGH = 0.2, 0.8
#: Items whose keys get a ``MEMORY USAGE``.
MEMORY_SAMPLE = 20
INFERENCE_BATCH = 256
#: The live workload's warm-up history: this many days of the data from this date.
WARM_FROM = "2010-09-01"
WARM_DAYS = 61
#: The catch-up workload: two months of warm-up, then a year replayed at full speed.
CATCHUP_WARM = ("2010-07-01", "2010-09-01")
CATCHUP_YEAR = ("2010-09-01", "2011-09-01")

T = TypeVar("T")


class BenchError(TrendcastError):
    """A measurement could not be taken (timeout, wrong count, failed process)."""


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` on a fresh event loop."""
    return asyncio.run(coro)


# -- rates -----------------------------------------------------------------------------------
@dataclass
class Rate:
    """Events/s in steady state, with the progress it came from."""

    events_per_s: float
    seconds: float  # wall time from the first to the last sample
    samples: int


def _crossing(progress: Sequence[tuple[float, int]], target: float) -> float:
    """Time at which the count reached ``target``, interpolated between samples.

    >>> _crossing([(0.0, 0), (1.0, 100), (2.0, 300)], 200)
    1.5
    """
    prev_t, prev_n = progress[0]
    for t, n in progress:
        if n >= target:
            if n == prev_n:
                return t
            return prev_t + (t - prev_t) * (target - prev_n) / (n - prev_n)
        prev_t, prev_n = t, n
    raise BenchError(f"expected progress to reach {target:.0f}, got {progress[-1][1]}")


def steady_rate(progress: Sequence[tuple[float, int]], total: int, base: int = 0) -> Rate:
    """Events/s between ``LOW`` and ``HIGH`` of ``total`` events after the first ``base``.

    ``base`` is the warm-up part of a topic (history read before the measured part).

    >>> round(steady_rate([(0.0, 0), (5.0, 0), (6.0, 50), (7.0, 100)], 100).events_per_s, 6)
    50.0
    >>> round(steady_rate([(0.0, 0), (5.0, 100), (6.0, 150), (7.0, 200)], 100, 100).events_per_s)
    50
    """
    t_low = _crossing(progress, base + LOW * total)
    t_high = _crossing(progress, base + HIGH * total)
    if t_high <= t_low:
        raise BenchError(f"expected progress over time, got {len(progress)} samples")
    return Rate(
        (HIGH - LOW) * total / (t_high - t_low), progress[-1][0] - progress[0][0], len(progress)
    )


def cpu_jiffies() -> tuple[int, int] | None:
    """The machine's (total, idle) CPU time so far from ``/proc/stat`` (None without it)."""
    try:
        with open("/proc/stat") as stat:
            fields = [int(v) for v in stat.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    return sum(fields), fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait


def busy_share(cpu: Sequence[tuple[float, int, int]], start: float, end: float) -> float | None:
    """Share of the machine's CPU time spent busy between the samples in ``[start, end]``.

    >>> busy_share([(0.0, 0, 0), (1.0, 200, 50), (2.0, 400, 100), (3.0, 600, 300)], 0.5, 2.5)
    0.75
    """
    inside = [sample for sample in cpu if start <= sample[0] <= end]
    if len(inside) < 2 or inside[-1][1] == inside[0][1]:
        return None
    (_, total0, idle0), (_, total1, idle1) = inside[0], inside[-1]
    return 1 - (idle1 - idle0) / (total1 - total0)


def process_cpu_s(pid: int) -> float | None:
    """CPU seconds (user + system, all threads) a process used so far, from ``/proc``."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def redis_cpu_s(client: Any) -> float | None:
    """CPU seconds the Redis server used so far (``INFO cpu``), None if it cannot tell."""
    try:
        info = client.info("cpu")
        return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])
    except Exception:  # a diagnostic only: the bench goes on without it
        return None


def cores_used(
    samples: Sequence[tuple[float, float | None]], start: float, end: float
) -> float | None:
    """CPU seconds per second between the samples in ``[start, end]``: cores kept busy.

    >>> cores_used([(0.0, 1.0), (1.0, 1.5), (3.0, 2.5), (4.0, 9.0)], 0.5, 3.5)
    0.5
    """
    inside = [(t, v) for t, v in samples if start <= t <= end and v is not None]
    if len(inside) < 2 or inside[-1][0] == inside[0][0]:
        return None
    (t0, v0), (t1, v1) = inside[0], inside[-1]
    return (v1 - v0) / (t1 - t0)


class Watch(NamedTuple):
    """What watching a worker (or a group) read: progress, last metrics, CPU samples."""

    by_metric: list[tuple[float, int]]
    by_commit: list[tuple[float, int]]
    metrics: dict[str, float]
    wall_s: float
    cpu: list[tuple[float, int, int]]
    #: CPU seconds used so far by the worker processes (summed) and by Redis, per sample.
    worker_cpu: list[tuple[float, float | None]]
    redis_cpu: list[tuple[float, float | None]]
    #: The counters of ``COUNTERS`` summed over the workers, per sample.
    counters: Sequence[tuple[float, dict[str, float]]] = ()

    def result(self, total: int, exit_code: int = 0, base: int = 0) -> WorkerResult:
        """Steady-state rates (by the workers' counters and by commits) and CPU share.

        ``base`` events of warm-up history come first; ``total`` are measured after them.
        """
        by_metric = steady_rate(self.by_metric, total, base)
        t_low = _crossing(self.by_metric, base + LOW * total)
        t_high = _crossing(self.by_metric, base + HIGH * total)
        return WorkerResult(
            by_metric,
            steady_rate(self.by_commit, total, base),
            self.metrics,
            self.wall_s,
            exit_code,
            cpu_busy=busy_share(self.cpu, t_low, t_high),
            worker_cores=cores_used(self.worker_cpu, t_low, t_high),
            redis_cores=cores_used(self.redis_cpu, t_low, t_high),
            measured=counter_deltas(self.counters, t_low, t_high),
        )


#: Counters the watcher keeps per sample (summed over the workers): what the measured part
#: of a read did (forecasts by source, ONNX seconds, events).
COUNTERS = {
    "events": "trendcast_events_in_total",
    "model": 'trendcast_predictions_total{source="model"}',
    "fallback": 'trendcast_predictions_total{source="fallback"}',
    "onnx_s": "trendcast_inference_seconds_sum",
    "batch_s": "trendcast_batch_seconds_sum",
}


def counter_deltas(
    samples: Sequence[tuple[float, dict[str, float]]], start: float, end: float
) -> dict[str, float]:
    """How much each counter grew between the first and last sample in ``[start, end]``.

    >>> counter_deltas([(0.0, {"x": 1.0}), (1.0, {"x": 3.0}), (2.0, {"x": 7.0})], 0.5, 2.5)
    {'x': 4.0}
    """
    inside = [values for t, values in samples if start <= t <= end]
    if len(inside) < 2:
        return {}
    first, last = inside[0], inside[-1]
    return {k: last.get(k, 0.0) - first.get(k, 0.0) for k in last}


def fallback_share(measured: dict[str, float]) -> float | None:
    """Share of forecast rows made by the fallback in ``measured`` (None: no forecasts).

    >>> fallback_share({"model": 99.0, "fallback": 1.0})
    0.01
    """
    rows = measured.get("model", 0.0) + measured.get("fallback", 0.0)
    return measured.get("fallback", 0.0) / rows if rows else None


# -- data ------------------------------------------------------------------------------------
def build_events(path: Path, n: int, days: int) -> tuple[list[tuple[bytes, bytes]], int]:
    """``n`` sale events ``(key, JSON value)`` from the data file, in event-time order.

    Items, quantities, prices and the order of sales are the data's; event times keep the
    data's order and relative spacing but are spread over ``days`` days (starting on a
    Monday), like a platform with the data's catalogue and ``n / days`` sales a day; lines
    are repeated (distinct ``event_id`` values) when more events are asked for than it has.
    ``days`` sets how many daily buckets close during the run, i.e. how much forecasting
    there is per event (printed by the bench as forecasts per event).

    Returns:
        The events and the start of the day after the last one (epoch ms).
    """
    lines, _ = read_lines(path, columns=COLUMNS, item_pattern=ITEM_PATTERN)
    lines = lines.sort_values("ts", kind="stable").reset_index(drop=True)
    if lines.empty:
        raise BenchError(f"expected sales lines in {path}, got none")
    reps = math.ceil(n / len(lines))
    index = np.arange(n) % len(lines)
    rep_of = np.arange(n) // len(lines)
    ts_ms = lines["ts"].to_numpy(dtype="datetime64[ms]").astype(np.int64)
    used = ts_ms[: min(n, len(ts_ms))]  # fewer events than lines: spread the part used
    t0, span = int(used.min()), int(used.max() - used.min()) + 1
    # Position of each event on the compressed timeline: repetition r follows r-1.
    position = (rep_of + (ts_ms[index] - t0) / span) / reps
    start_ms = START_MONDAY_MS
    event_ms = start_ms + (position * days * DAY_MS).astype(np.int64)
    iso = np.datetime_as_string(event_ms.astype("datetime64[ms]"), unit="ms").tolist()
    items = lines["item_id"].astype(str).to_numpy()[index].tolist()
    quantities = lines["quantity"].to_numpy(dtype="float64")[index].tolist()
    prices = (
        lines["price"].to_numpy(dtype="float64")[index].tolist()
        if "price" in lines.columns
        else [math.nan] * n
    )
    events: list[tuple[bytes, bytes]] = []
    for i in range(n):
        value: dict[str, Any] = {
            "event_id": f"tp{i}",
            "item_id": items[i],
            "ts": iso[i] + "Z",
            "quantity": quantities[i],
        }
        if math.isfinite(prices[i]):
            value["price"] = prices[i]
        events.append((items[i].encode(), orjson.dumps(value)))
    logger.info("%d events from %d lines over %d days", n, len(lines), days)
    return events, start_ms + days * DAY_MS


def _encode(
    prefix: str,
    items: Sequence[str],
    event_ms: npt.NDArray[np.int64],
    quantities: Sequence[float],
    prices: Sequence[float],
) -> list[tuple[bytes, bytes]]:
    """Sale events ``(key, JSON value)``; ``event_id`` is ``prefix`` + the position."""
    iso = np.datetime_as_string(event_ms.astype("datetime64[ms]"), unit="ms").tolist()
    events: list[tuple[bytes, bytes]] = []
    for i, (item, ts, qty, price) in enumerate(zip(items, iso, quantities, prices, strict=True)):
        value: dict[str, Any] = {
            "event_id": f"{prefix}{i}",
            "item_id": item,
            "ts": ts + "Z",
            "quantity": qty,
        }
        if math.isfinite(price):
            value["price"] = price
        events.append((item.encode(), orjson.dumps(value)))
    return events


def build_history(
    path: Path, items: Iterable[str], start_ms: int, days: int = WARM_DAYS
) -> list[tuple[bytes, bytes]]:
    """Warm-up history of the live workload: a full window for every item of ``items``.

    The windows must be full before the measured part, or its forecasts come from the
    fallback (less than a window of history), not from the model. One event per item and
    selling day, with the item's real daily units and mean unit price over the ``days`` days
    of the data from ``WARM_FROM``, placed on the ``days`` days before ``start_ms``; and one
    unit on the first of those days for an item that did not sell then (its first sale, so
    that every item has a full window at the measured part's first close). In event-time
    order, ids ``wh0``, ``wh1``...
    """
    wanted = set(items)
    lines, _ = read_lines(path, columns=COLUMNS, item_pattern=ITEM_PATTERN)
    lo = np.datetime64(WARM_FROM, "ms")
    ts = lines["ts"].to_numpy(dtype="datetime64[ms]")
    lines = lines[
        (ts >= lo) & (ts < lo + np.timedelta64(days, "D")) & lines["item_id"].isin(wanted)
    ]
    lines = lines.assign(
        day=(lines["ts"].to_numpy(dtype="datetime64[ms]") - lo).astype(np.int64) // DAY_MS,
        pq=lines["price"].fillna(0.0) * lines["quantity"],
    )
    daily = lines.groupby(["day", "item_id"], as_index=False)[["quantity", "pq"]].sum()
    first_day = set(daily.loc[daily["day"] == 0, "item_id"])
    rows = [(0, item, 1.0, math.nan) for item in sorted(wanted - first_day)]
    for day, item, qty, pq in daily.itertuples(index=False, name=None):
        rows.append((int(day), str(item), float(qty), pq / qty if qty > 0 else math.nan))
    rows.sort(key=lambda r: (r[0], r[1]))
    day0 = start_ms - days * DAY_MS
    # Noon of each day, one millisecond apart: distinct, in order.
    event_ms = np.array(
        [day0 + d * DAY_MS + DAY_MS // 2 + i for i, (d, *_) in enumerate(rows)], dtype=np.int64
    )
    events = _encode(
        "wh", [r[1] for r in rows], event_ms, [r[2] for r in rows], [r[3] for r in rows]
    )
    logger.info(
        "warm-up history: %d events for %d items over %d days", len(rows), len(wanted), days
    )
    return events


def build_catchup(path: Path) -> tuple[list[tuple[bytes, bytes]], list[tuple[bytes, bytes]]]:
    """The catch-up workload: the data's real lines, real times, in event-time order.

    Returns:
        The warm-up part (``CATCHUP_WARM``: two months, read first so that most items have
        a full window when the measured part starts) and the measured year
        (``CATCHUP_YEAR``), ids ``cu0``, ``cu1``... across both.
    """
    lines, _ = read_lines(path, columns=COLUMNS, item_pattern=ITEM_PATTERN)
    lines = lines.sort_values("ts", kind="stable").reset_index(drop=True)
    ts = lines["ts"].to_numpy(dtype="datetime64[ms]")
    bounds = [np.datetime64(d, "ms") for d in (*CATCHUP_WARM, CATCHUP_YEAR[1])]
    keep = (ts >= bounds[0]) & (ts < bounds[2])
    lines, ts = lines[keep].reset_index(drop=True), ts[keep]
    prices = (
        lines["price"].to_numpy(dtype="float64")
        if "price" in lines.columns
        else np.full(len(lines), np.nan)
    )
    events = _encode(
        "cu",
        lines["item_id"].astype(str).tolist(),
        ts.astype(np.int64),
        lines["quantity"].to_numpy(dtype="float64").tolist(),
        prices.tolist(),
    )
    warm = int((ts < bounds[1]).sum())
    logger.info("catch-up: %d warm-up events, %d in the measured year", warm, len(events) - warm)
    return events[:warm], events[warm:]


async def _produce(bootstrap: str, topic: str, events: list[tuple[bytes, bytes]]) -> list[int]:
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap, acks="all", max_batch_size=256 * 1024, linger_ms=20
    )
    await producer.start()
    try:
        partitions = sorted(await producer.partitions_for(topic))
        partitioner = DefaultPartitioner()
        by_partition: dict[int, list[tuple[bytes, bytes]]] = {p: [] for p in partitions}
        for key, value in events:  # the default (murmur2) partitioner, as replay uses
            by_partition[partitioner(key, partitions, partitions)].append((key, value))
        await send_batches(producer, topic, by_partition)
        return [len(by_partition[p]) for p in partitions]
    finally:
        await producer.stop()


# -- a: raw aiokafka -------------------------------------------------------------------------
async def _raw_consume(bootstrap: str, topic: str, ends: list[int], timeout_s: float) -> Rate:
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        group_id=None,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        max_partition_fetch_bytes=4 * 1024 * 1024,
        fetch_max_bytes=32 * 1024 * 1024,
    )
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for p in range(len(ends))]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        total = sum(ends)
        count = 0
        started = time.perf_counter()
        progress = [(started, 0)]
        while count < total:
            batch = await consumer.getmany(timeout_ms=500, max_records=20_000)
            for messages in batch.values():
                for message in messages:
                    orjson.loads(message.value)
                count += len(messages)
            progress.append((time.perf_counter(), count))
            if time.perf_counter() - started > timeout_s:
                raise BenchError(f"raw consumer read {count} of {total} in {timeout_s:.0f}s")
        # Tansu's ListOffsets(latest) under-reports; the fetch high watermark is the truth.
        highs = [consumer.highwater(tp) for tp in tps]
        if highs != ends:
            raise BenchError(f"expected high watermarks {ends}, got {highs}")
        return steady_rate(progress, total)
    finally:
        await consumer.stop()


# -- b: plain Faust agent --------------------------------------------------------------------
def faust_floor(bootstrap: str, topic: str, total: int, tmp: Path, timeout_s: float) -> Rate:
    """Run ``bench/_throughput_faust.py`` until it counted ``total`` events."""
    group = f"bench-faust-{uuid.uuid4().hex[:8]}"
    out = tmp / f"{group}.json"
    log_path = tmp / f"{group}.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(  # noqa: S603 - argv built here
            [
                sys.executable,
                "-m",
                "bench._throughput_faust",
                bootstrap,
                topic,
                group,
                str(total),
                str(out),
                str(tmp / group),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=str(REPO),
        )
        try:
            deadline = time.monotonic() + timeout_s
            while not out.exists():
                if proc.poll() is not None:
                    raise BenchError(f"faust agent exited {proc.returncode}: {_tail(log_path)}")
                if time.monotonic() > deadline:
                    raise BenchError(f"faust agent did not finish in {timeout_s:.0f}s")
                time.sleep(0.2)
            time.sleep(0.1)  # the file is written in one call; let it land
            progress = [(float(t), int(n)) for t, n in orjson.loads(out.read_bytes())]
        finally:
            _stop(proc)
    return steady_rate(progress, total)


# -- c: the worker ---------------------------------------------------------------------------
@dataclass
class WorkerResult:
    """What the worker run measured."""

    by_metric: Rate
    by_commit: Rate
    metrics: dict[str, float]
    wall_s: float
    exit_code: int
    memory: dict[str, float] = field(default_factory=dict)
    #: Share of the machine's CPU time (all cores) spent busy in the steady state.
    cpu_busy: float | None = None
    #: Cores kept busy in the steady state by the worker processes (summed) and by Redis.
    worker_cores: float | None = None
    redis_cores: float | None = None
    #: The ceiling (a) read just before this read, on the same machine a few seconds earlier.
    ceiling: float | None = None
    #: Growth of ``COUNTERS`` in the steady state (the measured part).
    measured: dict[str, float] = field(default_factory=dict)


_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*(?:\{[^}]*\})?)\s+(\S+)$")


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text samples as ``{'name{labels}': value}``.

    >>> parse_metrics('# HELP x\\nx_total 3.0\\ny{a="b"} 1\\n')
    {'x_total': 3.0, 'y{a="b"}': 1.0}
    """
    out: dict[str, float] = {}
    for line in text.splitlines():
        match = _SAMPLE.match(line)
        if match:
            with contextlib.suppress(ValueError):
                out[match.group(1)] = float(match.group(2))
    return out


async def _watch_worker(
    settings: WorkerSettings,
    bootstrap: str,
    ends: list[int],
    proc: subprocess.Popen[bytes] | Sequence[subprocess.Popen[bytes]],
    timeout_s: float,
    web_ports: Sequence[int] | None = None,
    skipped: int = 0,
) -> Watch:
    """Progress of one worker (or of a group: ``proc`` a list, one web port each) until the
    group's committed offsets reach ``ends``: events counted by the workers' own
    ``events_in`` counters (summed), committed offsets, the last metrics of the first, and
    the machine's CPU time at each sample. ``skipped`` events were never to be read (the
    group started past them)."""
    procs = [proc] if isinstance(proc, subprocess.Popen) else list(proc)
    urls = [f"http://127.0.0.1:{p}/metrics" for p in (web_ports or [settings.web_port])]
    total = sum(ends)
    tps = [TopicPartition(settings.sales_topic, p) for p in range(len(ends))]
    committer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, group_id=settings.consumer_group, enable_auto_commit=False
    )
    await committer.start()
    by_metric: list[tuple[float, int]] = []
    by_commit: list[tuple[float, int]] = []
    metrics: list[dict[str, float]] = [{} for _ in urls]
    cpu: list[tuple[float, int, int]] = []
    worker_cpu: list[tuple[float, float | None]] = []
    redis_cpu: list[tuple[float, float | None]] = []
    counters: list[tuple[float, dict[str, float]]] = []
    redis_client = redis.Redis.from_url(settings.redis_url, socket_timeout=1)
    started = time.perf_counter()
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as http:
            while True:
                now = time.perf_counter()
                for p in procs:
                    if p.poll() is not None:
                        raise BenchError(f"worker exited {p.returncode} before the end")
                if now - started > timeout_s:
                    raise BenchError(
                        f"worker did not commit {total} events in {timeout_s:.0f}s "
                        f"(last: {by_commit[-1] if by_commit else None})"
                    )
                for i, url in enumerate(urls):  # a worker that does not answer keeps its last
                    with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                        async with http.get(url) as response:
                            metrics[i] = parse_metrics(await response.text())
                seen = sum(int(m.get("trendcast_events_in_total", 0)) for m in metrics)
                by_metric.append((now, seen))
                counters.append(
                    (now, {k: sum(m.get(v, 0.0) for m in metrics) for k, v in COUNTERS.items()})
                )
                jiffies = cpu_jiffies()
                if jiffies is not None:
                    cpu.append((now, *jiffies))
                used = [process_cpu_s(p.pid) for p in procs]
                worker_cpu.append((now, None if None in used else sum(cast(list[float], used))))
                redis_cpu.append((now, redis_cpu_s(redis_client)))
                # committed() is an OffsetFetch: it does not join the group nor rebalance it.
                committed = [await committer.committed(tp) or 0 for tp in tps]
                by_commit.append((now, sum(committed)))
                if committed == ends and seen >= total - skipped:
                    return Watch(
                        by_metric,
                        by_commit,
                        metrics[0],
                        now - started,
                        cpu,
                        worker_cpu,
                        redis_cpu,
                        counters,
                    )
                await asyncio.sleep(0.25)
    finally:
        redis_client.close()
        await committer.stop()


def group_run(
    settings: WorkerSettings,
    bootstrap: str,
    ends: list[int],
    tmp: Path,
    timeout_s: float,
    n: int,
    base: int = 0,
    env: dict[str, str] | None = None,
    start: Sequence[int] | None = None,
) -> WorkerResult:
    """``n`` worker processes in one consumer group over the whole topic (state shared in
    Redis, partitions split between them): how the worker scales out on one machine.

    The first ``base`` events of the topic are warm-up history (read, not measured); ``env``
    adds variables to the workers' environment; ``start`` (offsets per partition) is
    committed for the group first, so that the workers start there (measured: the rest)."""
    skipped = 0
    if start is not None:
        run(commit_offsets(bootstrap, settings.consumer_group, settings.sales_topic, start))
        skipped, base = sum(start), 0
    ports = [free_port() for _ in range(n)]
    procs: list[subprocess.Popen[bytes]] = []
    logs = [tmp / f"{settings.consumer_group}-{i}.log" for i in range(n)]
    try:
        for i, (port, log_path) in enumerate(zip(ports, logs, strict=True)):
            child = settings.model_copy(update={"web_port": port, "data_dir": tmp / f"g{i}"})
            with log_path.open("wb") as log:
                procs.append(
                    subprocess.Popen(  # noqa: S603 - argv built here
                        [sys.executable, "-m", "stream"],
                        env=worker_env(child) | (env or {}),
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        cwd=str(REPO),
                    )
                )
        watch = run(_watch_worker(settings, bootstrap, ends, procs, timeout_s, ports, skipped))
    except BaseException:
        for p in procs:
            _stop(p)
        for log_path in logs:
            logger.error("worker log tail (%s):\n%s", log_path.name, _tail(log_path))
        raise
    codes = [_stop(p) for p in procs]
    return watch.result(sum(ends) - base - skipped, next((c for c in codes if c != 0), 0), base)


async def commit_offsets(bootstrap: str, group: str, topic: str, offsets: Sequence[int]) -> None:
    """Commit ``offsets`` (one per partition) for ``group``: where its workers will start."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False
    )
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for p in range(len(offsets))]
        consumer.assign(tps)
        await consumer.commit({tp: off for tp, off in zip(tps, offsets, strict=True)})
    finally:
        await consumer.stop()


@dataclass
class Phases:
    """What the worker did after the main run, with the worker still up."""

    latency_ms: list[float] = field(default_factory=list)
    latency_rate: float = 0.0
    close_s: float = 0.0
    close_items: int = 0
    close_forecasts: int = 0
    close_built_s: float = 0.0
    close_fallbacks: int = 0


async def _committed(committer: AIOKafkaConsumer, tps: Sequence[TopicPartition]) -> list[int]:
    return [await committer.committed(tp) or 0 for tp in tps]


async def _wait_committed(
    committer: AIOKafkaConsumer,
    tps: Sequence[TopicPartition],
    ends: Sequence[int],
    timeout_s: float,
) -> None:
    deadline = time.perf_counter() + timeout_s
    while (committed := await _committed(committer, tps)) < list(ends):
        if time.perf_counter() > deadline:
            raise BenchError(f"worker committed {committed}, expected {list(ends)}")
        await asyncio.sleep(0.05)


def _sale(item: str, ts_ms: int, n: int) -> bytes:
    iso = np.datetime_as_string(np.datetime64(ts_ms, "ms"), unit="ms")
    return orjson.dumps({"event_id": f"ph{n}", "item_id": item, "ts": f"{iso}Z", "quantity": 1})


async def _phases(
    settings: WorkerSettings,
    bootstrap: str,
    ends: list[int],
    day_ms: int,
    items: Sequence[str],
    rate: float,
    seconds: float,
    close_items: int,
    window_days: int = WINDOW_DAYS,
) -> Phases:
    """Latency at ``rate`` events/s, then one bucket close with ``close_items`` new items.

    Latency is produce -> committed offset, and the worker commits a batch only after its
    state is in Redis, so it bounds the produce -> Redis time from above (commit polled every
    10 ms). The close is timed from producing the closing events to receiving the last
    forecast of the ``close_items`` items on the forecasts topic.
    """
    topic = settings.sales_topic
    tps = [TopicPartition(topic, p) for p in range(len(ends))]
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=2)
    committer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, group_id=settings.consumer_group, enable_auto_commit=False
    )
    await producer.start()
    await committer.start()
    out = Phases(latency_rate=rate)
    n = 0
    try:
        # Warm-up: one event per partition in the new day, so the phase starts settled.
        futures = []
        for p in range(len(ends)):
            futures.append(await producer.send(topic, _sale(items[0], day_ms, n), partition=p))
            n += 1
        await asyncio.gather(*futures)
        ends = [e + 1 for e in ends]
        await _wait_committed(committer, tps, ends, 60)

        # Latency at a steady rate.
        sent: list[tuple[float, Any]] = []
        polls: list[tuple[float, list[int]]] = []
        stop = asyncio.Event()

        async def poll() -> None:
            while not stop.is_set():
                polls.append((time.perf_counter(), await _committed(committer, tps)))
                await asyncio.sleep(0.01)

        poller = asyncio.ensure_future(poll())
        started = time.perf_counter()
        tick, k = 0.01, 0
        while (now := time.perf_counter()) - started < seconds:
            due = int((now - started) * rate) - k
            for _ in range(due):
                item = items[k % len(items)]
                value = _sale(item, day_ms + 1000 + k, n)
                sent.append(
                    (time.perf_counter(), await producer.send(topic, value, key=item.encode()))
                )
                k += 1
                n += 1
            await asyncio.sleep(tick)
        metas = [(t, await f) for t, f in sent]
        for meta in (m for _, m in metas):
            ends[meta.partition] = max(ends[meta.partition], meta.offset + 1)
        await _wait_committed(committer, tps, ends, 120)
        polls.append((time.perf_counter(), await _committed(committer, tps)))
        stop.set()
        await poller
        for t_sent, meta in metas:
            p, offset = meta.partition, meta.offset
            t_done = next(t for t, c in polls if t >= t_sent and c[p] > offset)
            out.latency_ms.append((t_done - t_sent) * 1000)

        # One bucket close with exactly close_items active items, each with a full window
        # (so the model, not the fallback, forecasts them). First jump the clocks a window
        # ahead (one event per partition), so that the earlier items fall out of the window;
        # that closes every bucket in between (a burst, not timed). The new items make
        # their first sale in the open bucket after the jump (jump_a - 1 day); a second jump
        # a window later (another untimed burst) leaves that first sale as the oldest
        # bucket of the window of the bucket that then opens, in which they sell again;
        # the closing events close just that bucket, whose windows are full.
        async def jump(to_ms: int) -> None:
            nonlocal n
            futures = []
            for p in range(len(ends)):
                futures.append(await producer.send(topic, _sale(items[0], to_ms, n), partition=p))
                n += 1
            for meta in await asyncio.gather(*futures):
                ends[meta.partition] = max(ends[meta.partition], meta.offset + 1)
            await _wait_committed(committer, tps, ends, 600)

        async def sell(ids: Sequence[str], at_ms: int) -> None:
            nonlocal n
            futures = []
            for i, item in enumerate(ids):
                value = _sale(item, at_ms + i, n)
                futures.append(await producer.send(topic, value, key=item.encode()))
                n += 1
            for meta in await asyncio.gather(*futures):
                ends[meta.partition] = max(ends[meta.partition], meta.offset + 1)
            await _wait_committed(committer, tps, ends, 300)

        close_ids = [f"CL{i:05d}" for i in range(close_items)]
        jump_a = day_ms + (window_days + 4) * DAY_MS
        await jump(jump_a)
        await sell(close_ids, jump_a - DAY_MS + 43_200_000)
        # The closed bucket will be jump_ms - 1 day: the first sale is its window's oldest.
        jump_ms = jump_a + (window_days - 1) * DAY_MS
        await jump(jump_ms)
        await sell(close_ids, jump_ms - DAY_MS + 43_200_000)
        day_ms = jump_ms  # the closing events below are timed from here
        reader = AIOKafkaConsumer(
            bootstrap_servers=bootstrap,
            group_id=None,
            auto_offset_reset="latest",
            fetch_max_wait_ms=20,  # Tansu holds a fetch for the full wait
        )
        await reader.start()
        try:
            # The bench creates the forecasts topic with as many partitions as the sales one.
            fc_tps = [TopicPartition(settings.forecasts_topic, p) for p in range(len(ends))]
            reader.assign(fc_tps)
            await reader.seek_to_end(*fc_tps)
            for tp in fc_tps:
                await reader.position(tp)
            as_of = np.datetime_as_string(np.datetime64(day_ms, "ms"), unit="s") + "Z"
            t0, t0_wall_ms = time.perf_counter(), time.time() * 1000
            futures = []
            for p in range(len(ends)):
                # Watermark (newest event minus the allowed lateness, under a day) -> day_ms.
                value = _sale(items[0], day_ms + DAY_MS, n)
                futures.append(await producer.send(topic, value, partition=p))
                n += 1
            await asyncio.gather(*futures)
            waiting, last, seen, emitted_ms = set(close_ids), t0, 0, 0
            fallbacks = 0
            while waiting:
                if time.perf_counter() - t0 > 120:
                    raise BenchError(f"{len(waiting)} close forecasts missing after 120 s")
                batch = await reader.getmany(timeout_ms=200)
                for records in batch.values():
                    for record in records:
                        value = orjson.loads(record.value)
                        if value["as_of"] == as_of:
                            seen += 1
                            fallbacks += bool(value["fallback"])
                            emitted_ms = max(emitted_ms, value["emitted_at_ms"])
                            waiting.discard(value["item_id"])
                            last = time.perf_counter()
            out.close_s, out.close_items, out.close_forecasts = last - t0, close_items, seen
            out.close_built_s = (emitted_ms - t0_wall_ms) / 1000
            out.close_fallbacks = fallbacks
        finally:
            await reader.stop()
    finally:
        await producer.stop()
        await committer.stop()
    return out


def worker_settings(
    bootstrap: str,
    redis_url: str,
    bundle: Path,
    topics: dict[str, str],
    *,
    group: str,
    prefix: str,
    data_dir: Path,
    partitions: int,
) -> WorkerSettings:
    """Settings of a bench worker on Tansu: topics ``sales``/``dlq``/``fc``, web server on."""
    return WorkerSettings(
        kafka_brokers=f"kafka://{bootstrap}",
        redis_url=redis_url,
        bundle=bundle,
        bundle_poll_s=0,
        sales_topic=topics["sales"],
        dlq_topic=topics["dlq"],
        forecasts_topic=topics["fc"],
        consumer_group=group,
        state_prefix=prefix,
        web_enabled=True,
        web_port=free_port(),
        data_dir=data_dir,
        topic_partitions=partitions,
        fetch_max_wait_ms=50,  # Tansu holds a fetch for the full wait (Kafka answers at once)
    )


def worker_run(
    settings: WorkerSettings,
    bootstrap: str,
    ends: list[int],
    tmp: Path,
    timeout_s: float,
    *,
    day_ms: int,
    items: Sequence[str],
    latency_s: float,
    close_items: int,
    profile: Path | None = None,
    base: int = 0,
) -> tuple[WorkerResult, Phases]:
    """Run ``python -m stream`` over the whole topic, then the latency and close phases."""
    log_path = tmp / f"{settings.consumer_group}.log"
    with log_path.open("wb") as log:
        argv = [sys.executable, "-m", "stream"]
        if profile is not None:  # the whole worker under pyinstrument's sampling profiler
            argv[1:1] = ["-m", "pyinstrument", "-o", str(profile), "-r", "text"]
        proc = subprocess.Popen(  # noqa: S603 - argv built here
            argv,
            env=worker_env(settings),
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=str(REPO),
        )
        try:
            result = run(_watch_worker(settings, bootstrap, ends, proc, timeout_s)).result(
                sum(ends) - base, 0, base
            )
            rate = result.by_metric.events_per_s / 2
            phases = _timed(
                "c: latency and close",
                lambda: run(
                    _phases(
                        settings,
                        bootstrap,
                        list(ends),
                        day_ms,
                        items,
                        rate,
                        latency_s,
                        close_items,
                    )
                ),
            )
        except BaseException:
            _stop(proc)
            logger.error("worker log tail:\n%s", _tail(log_path))
            raise
        result.exit_code = _stop(proc)
    return result, phases


def item_memory(url: str, prefix: str, items: Sequence[str]) -> dict[str, float]:
    """Median ``MEMORY USAGE`` (bytes) of the window hash and dedupe zset of ``items``."""
    client = redis.Redis.from_url(url)
    try:
        windows, dedupes = [], []
        for item in items:
            window_key, dedupe_key = item_keys(prefix, item)
            windows.append(int(client.memory_usage(window_key) or 0))
            dedupes.append(int(client.memory_usage(dedupe_key) or 0))
        n_windows = sum(1 for _ in client.scan_iter(match=f"{prefix}:*:w", count=1000))
        return {
            "window": statistics.median(windows),
            "dedupe": statistics.median(dedupes),
            "items": float(n_windows),
        }
    finally:
        client.close()


def window_memory(url: str, path: Path, items: Sequence[str], window: int) -> dict[str, float]:
    """``MEMORY USAGE`` of full windows: each item's last ``window`` selling days, priced.

    The worker's windows in this bench span only ``--days`` buckets, so the bytes of a full
    window (what capacity planning needs) are measured here: the same store and scripts,
    one update per day with the item's real daily quantity and price sums.
    """
    from stream.state.base import BucketDelta, ItemUpdate
    from stream.state.redis_store import RedisWindowStore
    from trendcast.freq import parse_freq

    lines, _ = read_lines(path, columns=COLUMNS, item_pattern=ITEM_PATTERN)
    lines = lines[lines["item_id"].isin(set(items))].copy()
    lines["day"] = lines["ts"].dt.floor("D")
    lines["pq"] = lines["price"].fillna(0.0) * lines["quantity"].clip(lower=0)
    daily = lines.groupby(["item_id", "day"], as_index=False)[["quantity", "pq"]].sum()
    freq = parse_freq("1D")
    prefix = f"tpmem-{uuid.uuid4().hex[:8]}"
    updates = []
    for item, group in daily.groupby("item_id"):
        days = group.sort_values("day").tail(window)
        starts = days["day"].to_numpy(dtype="datetime64[ms]").astype(np.int64).tolist()
        deltas = [
            BucketDelta(start, f"m{start}", float(q), float(pq), float(max(q, 0.0)))
            for start, q, pq in zip(starts, days["quantity"], days["pq"], strict=True)
        ]
        updates.append(ItemUpdate(str(item), deltas, starts[0], starts[0], ttl_ms=3_600_000))

    async def measure() -> list[int]:
        store = RedisWindowStore.from_url(url, freq, prefix)
        try:
            await store.apply(updates, [])
            return [(await store.memory_usage(u.item_id))["window"] for u in updates]
        finally:
            await store.aclose()

    try:
        sizes = run(measure())
    finally:
        clear_prefix(url, prefix)
    return {"window56": statistics.median(sizes)}


def clear_prefix(url: str, prefix: str) -> None:
    """Delete every key the worker wrote."""
    client = redis.Redis.from_url(url)
    try:
        keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
        for i in range(0, len(keys), 1000):
            client.delete(*keys[i : i + 1000])
    finally:
        client.close()


# -- ONNX ------------------------------------------------------------------------------------
def onnx_rate(
    bundle_dir: Path, sizes: Sequence[int], threads: int | None = None
) -> dict[int, float]:
    """ONNX Runtime windows/s of the bundle at each batch size in ``sizes`` (``threads``
    intra-op threads; default: the worker's)."""
    from bench.offline import onnx_throughput
    from trendcast.bundle import load_bundle
    from trendcast.forecasting.base import WindowBatch
    from trendcast.forecasting.onnx import OnnxForecaster

    bundle = load_bundle(bundle_dir)
    window = bundle.meta.window
    rng = np.random.default_rng(7)
    n = max(sizes)
    batch = WindowBatch(
        item_ids=[f"item{i}" for i in range(n)],
        quantities=rng.gamma(0.5, 8.0, size=(n, window)).astype(np.float32),
        prices=np.full((n, window), 2.5, dtype=np.float32),
        last_start_ms=np.full(n, 1_309_392_000_000, dtype=np.int64),
        history_len=np.full(n, window, dtype=np.int64),
    )
    return onnx_throughput(OnnxForecaster(bundle, threads=threads), batch, sizes=tuple(sizes))


# -- helpers ---------------------------------------------------------------------------------
def _stop(proc: subprocess.Popen[bytes], timeout_s: float = 20.0) -> int:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            return proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            return -9
    return proc.returncode


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _timed(what: str, fn: Callable[[], T]) -> T:
    started = time.perf_counter()
    result = fn()
    logger.info("%s: %.1fs", what, time.perf_counter() - started)
    return result


def _sum(metrics: dict[str, float], name: str) -> float:
    """Sum of every sample of ``name`` (all label sets)."""
    return sum(v for k, v in metrics.items() if k == name or k.startswith(name + "{"))


def _labelled(metrics: dict[str, float], name: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for key, value in metrics.items():
        if key.startswith(name + "{"):
            out[key[len(name) + 1 : -1]] = value
    return out


# -- main ------------------------------------------------------------------------------------
def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Command-line flags."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--events", type=int, default=500_000, help="events in the topic")
    parser.add_argument("--partitions", type=int, default=4, help="partitions of the topic")
    parser.add_argument("--quick", action="store_true", help="50,000 events (smoke run)")
    parser.add_argument(
        "--bundle", type=Path, default=None, help="bundle (default: trained and cached here)"
    )
    parser.add_argument(
        "--fake-bundle", action="store_true", help="the TF-free fake bundle (debugging only)"
    )
    parser.add_argument(
        "--catchup-runs", type=int, default=3, help="reads of the catch-up year (0: skip)"
    )
    parser.add_argument(
        "--no-realtime", dest="realtime", action="store_false", help="skip the real-time part"
    )
    parser.add_argument("--raw-runs", type=int, default=3, help="raw reads (median)")
    parser.add_argument("--data", type=Path, default=DATA, help="sales parquet")
    parser.add_argument("--days", type=int, default=14, help="days of event time in the topic")
    parser.add_argument("--latency-s", type=float, default=15.0, help="latency phase length")
    parser.add_argument(
        "--close-items", type=int, default=None, help="items at the big close (20000)"
    )
    parser.add_argument(
        "--profile", type=Path, default=None, help="write a pyinstrument profile of the worker"
    )
    parser.add_argument(
        "--worker-runs", type=int, default=3, help="reads of c (and c×N); the median counts"
    )
    parser.add_argument(
        "--group-workers",
        type=int,
        default=os.cpu_count() or 1,
        help="then read the topic again with this many workers in one group (1: skip)",
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.events, args.latency_s = 50_000, 5.0
    if args.close_items is None:
        args.close_items = 2000 if args.quick else 20_000
    if args.quick:
        args.worker_runs, args.catchup_runs = 1, min(args.catchup_runs, 1)
    if min(args.partitions, args.raw_runs, args.worker_runs) < 1 or args.events < 1000:
        parser.error("expected --events >= 1000 and --partitions, --raw-runs, --worker-runs >= 1")
    return args


def bench(args: argparse.Namespace, tmp: Path) -> list[str]:
    """Set up, measure a, b and c, and return the markdown report lines."""
    events, day_ms = _timed("build events", lambda: build_events(args.data, args.events, args.days))
    item_counts = Counter(key.decode() for key, _ in events)
    total = len(events)
    timeout_s = max(180.0, total / 1000)  # generous: 1k events/s would be a failure anyway
    suffix = uuid.uuid4().hex[:8]
    topics = {
        "sales": f"tp-sales-{suffix}",
        "catchup": f"tp-catchup-{suffix}",
        "dlq": f"tp-dlq-{suffix}",
        "fc": f"tp-fc-{suffix}",
        "alerts": f"tp-alerts-{suffix}",
    }
    with services(tmp) as (broker, redis_url):
        return _bench_on(
            args, tmp, broker, redis_url, events, item_counts, topics, timeout_s, day_ms
        )


@contextlib.contextmanager
def services(tmp: Path) -> Iterator[tuple[TansuBroker, str]]:
    """A Tansu broker and a Redis URL (the local server, or one started here) for a bench."""
    with TansuBroker(log_dir=tmp / "tansu") as broker:
        redis_url, redis_server = resolve_redis(None)
        try:
            yield broker, redis_url
        finally:
            if isinstance(redis_server, RedisServer):
                redis_server.stop()


@dataclass
class Workload:
    """A topic of warm-up history then a measured part, and what the readers measured."""

    name: str
    topic: str
    warm_ends: list[int]
    ends: list[int]
    raw: list[Rate] = field(default_factory=list)
    reads: list[WorkerResult] = field(default_factory=list)

    @property
    def base(self) -> int:
        """Events of warm-up history (read first, not measured)."""
        return sum(self.warm_ends)

    @property
    def measured(self) -> int:
        """Events of the measured part."""
        return sum(self.ends) - self.base


def _fill(
    bootstrap: str,
    topic: str,
    partitions: int,
    name: str,
    warm: list[tuple[bytes, bytes]],
    events: list[tuple[bytes, bytes]],
) -> Workload:
    """Create ``topic`` and produce the warm-up history, then the measured events."""
    ensure_topics(bootstrap, {topic: partitions})
    warm_ends = _timed(f"produce {name} warm-up", lambda: run(_produce(bootstrap, topic, warm)))
    more = _timed(f"produce {name}", lambda: run(_produce(bootstrap, topic, events)))
    warm.clear()
    events.clear()  # the topic holds them now; free the memory for the readers
    ends = [w + m for w, m in zip(warm_ends, more, strict=True)]
    logger.info("topic %s: %s events per partition (%s warm-up)", topic, ends, warm_ends)
    return Workload(name, topic, warm_ends, ends)


def _bench_on(
    args: argparse.Namespace,
    tmp: Path,
    broker: TansuBroker,
    redis_url: str,
    events: list[tuple[bytes, bytes]],
    item_counts: Counter[str],
    topics: dict[str, str],
    timeout_s: float,
    day_ms: int,
) -> list[str]:
    bootstrap = broker.bootstrap
    parts = args.partitions
    ensure_topics(bootstrap, {topics["dlq"]: 1, topics["fc"]: parts})
    warm = build_history(args.data, item_counts, START_MONDAY_MS)
    live = _fill(bootstrap, topics["sales"], parts, "live", warm, events)
    total, ends, base = live.measured, live.ends, live.base
    catchup: Workload | None = None
    if args.catchup_runs:
        cu_warm, cu_year = _timed("build catch-up events", lambda: build_catchup(args.data))
        catchup = _fill(bootstrap, topics["catchup"], parts, "catch-up", cu_warm, cu_year)

    topic = topics["sales"]

    # The ceiling is read --raw-runs times here and once more just before every worker read:
    # this machine's speed drifts within minutes, so each worker read is also compared with
    # the ceiling read next to it (the paired ratios below).
    def read_ceiling(label: str = "a: raw read", on: Workload = live) -> Rate:
        return _timed(label, lambda: run(_raw_consume(bootstrap, on.topic, on.ends, 300)))

    raw = [read_ceiling() for _ in range(args.raw_runs)]
    a = statistics.median(r.events_per_s for r in raw)
    b_rate = _timed(
        "b: faust agent", lambda: faust_floor(bootstrap, topic, sum(ends), tmp, timeout_s)
    )
    b = b_rate.events_per_s

    bundle, bundle_note = _bundle(args, tmp)
    suffix = topics["sales"].rsplit("-", 1)[-1]
    settings = worker_settings(
        bootstrap,
        redis_url,
        bundle,
        topics,
        group=f"tp-worker-{suffix}",
        prefix=f"tpw-{suffix}",
        data_dir=tmp / "worker",
        partitions=parts,
    )

    def fresh_read(
        label: str, group: str, n: int, on: Workload, start: Sequence[int] | None = None
    ) -> WorkerResult:
        fresh = settings.model_copy(
            update={
                "consumer_group": f"tp-{group}-{suffix}",
                "state_prefix": f"tp{group}-{suffix}",
                "sales_topic": on.topic,
            }
        )
        ceiling = read_ceiling(f"a: raw read (paired, {on.name})", on)
        on.raw.append(ceiling)
        try:
            read = _timed(
                label,
                lambda: group_run(
                    fresh, bootstrap, on.ends, tmp, timeout_s, n, on.base, start=start
                ),
            )
        finally:
            clear_prefix(redis_url, fresh.state_prefix)
        if read.exit_code != 0:
            raise BenchError(f"a worker exited {read.exit_code} after SIGTERM")
        read.ceiling = ceiling.events_per_s
        return read

    # The machine is noisy (run-to-run swings of 30% were seen): the worker's rates are the
    # median of --worker-runs reads, single worker and group taking turns. Each read uses a
    # fresh consumer group and key prefix, from scratch, and all of them come before the
    # last single-worker read, whose latency and close phases add events to the topic.
    # Reads of the catch-up topic take turns with them.
    singles: list[WorkerResult] = []
    groups: list[WorkerResult] = []
    live.raw = raw
    for run_no in range(args.worker_runs):
        plan = [(1, singles)] if run_no < args.worker_runs - 1 else []
        if args.group_workers > 1:
            plan.append((args.group_workers, groups))
        for n, into in plan:
            into.append(
                fresh_read(f"c: {n} worker(s), run {run_no + 1}", f"w{n}r{run_no}", n, live)
            )
        if catchup is not None and run_no < args.catchup_runs:
            catchup.reads.append(
                fresh_read(f"c: catch-up, run {run_no + 1}", f"cu{run_no}", 1, catchup)
            )
    if catchup is not None:
        for run_no in range(args.worker_runs, args.catchup_runs):
            catchup.reads.append(
                fresh_read(f"c: catch-up, run {run_no + 1}", f"cu{run_no}", 1, catchup)
            )
    # The fallback-only figure (what this bench measured before issue 18): the live
    # workload read from the end of its warm-up history, so no item has a full window.
    fallback_only = fresh_read("c: fallback only", "fb", 1, live, start=live.warm_ends)
    top = [item for item, _ in item_counts.most_common(MEMORY_SAMPLE)]
    ceiling = read_ceiling("a: raw read (paired)")
    raw.append(ceiling)
    try:
        result, phases = _timed(
            "c: worker",
            lambda: worker_run(
                settings,
                bootstrap,
                ends,
                tmp,
                timeout_s * 3,
                day_ms=day_ms,
                items=[item for item, _ in item_counts.most_common(500)],
                latency_s=args.latency_s,
                close_items=args.close_items,
                profile=args.profile,
                base=base,
            ),
        )
        result.memory = item_memory(redis_url, settings.state_prefix, top)
        result.memory |= window_memory(redis_url, args.data, top, 56)
    finally:
        clear_prefix(redis_url, settings.state_prefix)
    result.ceiling = ceiling.events_per_s
    singles.append(result)
    live.reads = singles
    a = statistics.median(r.events_per_s for r in raw)
    realtime_lines: list[str] = []
    if args.realtime:
        from bench import _realtime

        realtime_lines = _timed(
            "real time",
            lambda: _realtime.measure(
                args, tmp, bootstrap, redis_url, rate=result.by_metric.events_per_s / 2
            ),
        )
    sizes = (1, 32, settings.inference_batch_size)
    onnx = _timed("onnx", lambda: onnx_rate(bundle, sizes))
    onnx_one = _timed("onnx, one core", lambda: onnx_rate(bundle, (256,), threads=1))[256]
    lines = report(
        args, total, ends, raw, a, b_rate, b, result, phases, onnx, singles, groups, settings
    )
    lines[2] = lines[2].replace(
        "; model: fake bundle (window 56, horizon 28)", f"; model: {bundle_note} {bundle}", 1
    )
    lines += workloads_report(live, catchup, fallback_only, phases, onnx_one)
    return lines + realtime_lines


def _bundle(args: argparse.Namespace, tmp: Path) -> tuple[Path, str]:
    """The bundle the workers serve, and how it was made (printed with the figures)."""
    if args.bundle is not None:
        return args.bundle, "given"
    if args.fake_bundle:
        from trendcast.testkit.bundles import make_fake_bundle

        return make_fake_bundle(tmp / "bundle", window=WINDOW_DAYS, horizon=28), "fake"
    from bench._bundles import daily_bundle

    started = time.perf_counter()
    bundle, cached = daily_bundle(args.data)
    how = "cached" if cached else f"trained in {time.perf_counter() - started:.0f} s"
    return bundle, f"`trendcast train` ({how})"


def workloads_report(
    live: Workload,
    catchup: Workload | None,
    fallback_only: WorkerResult,
    phases: Phases,
    onnx_one: float,
) -> list[str]:
    """The two workloads (and the fallback-only read) and the big close, as markdown."""

    def row(label: str, on: Workload, reads: Sequence[WorkerResult], note: str = "") -> str:
        c = statistics.median(r.by_metric.events_per_s for r in reads)
        a = statistics.median(r.events_per_s for r in on.raw)
        measured = [r.measured for r in reads if r.measured]
        fb = [x for x in map(fallback_share, measured) if x is not None]
        forecasts = [
            (m.get("model", 0) + m.get("fallback", 0)) / m["events"]
            for m in measured
            if m.get("events")
        ]
        onnx_s = [m.get("onnx_s", 0.0) for m in measured]
        batch_s = [m.get("batch_s", 0.0) for m in measured]
        return (
            f"| {label} | {on.measured:,} (+{on.base:,} warm-up) | {c:,.0f} | {a:,.0f} | "
            f"{c / a:.3f} | {paired_ratio(reads)} | "
            f"{statistics.median(fb) if fb else float('nan'):.2%} | "
            f"{statistics.median(forecasts) if forecasts else float('nan'):.3f} | "
            f"{statistics.median(onnx_s) if onnx_s else float('nan'):.1f} of "
            f"{statistics.median(batch_s) if batch_s else float('nan'):.1f} |{note}"
        )

    lines = [
        "",
        "## Workloads (real bundle, full windows; steady state of the measured part)",
        "",
        "| workload | events measured | c events/s | a events/s | c/a (medians) | c/a paired "
        "| fallback share | forecasts per event | ONNX s of batch s (median read) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        row("live: a day's events then its close, 14 days", live, live.reads),
    ]
    if catchup is not None and catchup.reads:
        lines.append(row("catch-up: a year of the data at full speed", catchup, catchup.reads))
    lines.append(
        row(
            "extra, fallback only: live without warm-up (no full window)",
            live,
            [fallback_only],
        )
    )
    per_s = phases.close_items / phases.close_s if phases.close_s else float("nan")
    lines += [
        "",
        "| big close | value |",
        "| --- | ---: |",
        f"| items with full windows closing at once | {phases.close_items:,} "
        f"({phases.close_fallbacks:,} fallback forecasts) |",
        f"| close -> last forecast delivered | {phases.close_s:.2f} s |",
        f"| forecasts delivered per second | {per_s:,.0f} |",
        f"| ONNX Runtime windows/s, same bundle, one core, batch 256 | {onnx_one:,.0f} |",
        f"| ratio (goal >= 0.5) | {per_s / onnx_one:.3f} |",
    ]
    return lines


def report(
    args: argparse.Namespace,
    total: int,
    ends: list[int],
    raw: list[Rate],
    a: float,
    b_rate: Rate,
    b: float,
    result: WorkerResult,
    phases: Phases,
    onnx: dict[int, float],
    singles: Sequence[WorkerResult] = (),
    groups: Sequence[WorkerResult] = (),
    worker: WorkerSettings | None = None,
) -> list[str]:
    """The markdown tables; raises if the worker did not process every event as valid.

    ``result`` is the last single-worker read (its metrics, memory and phases are
    reported); ``c`` is the median of ``singles`` (which include it), ``c×N`` of ``groups``.
    """
    m = result.metrics
    singles = list(singles) or [result]
    c = statistics.median(r.by_metric.events_per_s for r in singles)
    c_commit = statistics.median(r.by_commit.events_per_s for r in singles)
    c_runs = ", ".join(f"{r.by_metric.events_per_s:,.0f}" for r in singles)
    outcomes = _labelled(m, "trendcast_events_total")
    valid = outcomes.get('outcome="valid"', 0.0)
    if result.exit_code != 0:
        raise BenchError(f"worker exited {result.exit_code} after SIGTERM")
    if valid < total:  # the phases after the main run add their own events
        raise BenchError(f"expected {total} valid events, got outcomes {outcomes}")
    batches = m.get("trendcast_batch_size_count", 0.0)
    redis_calls = _labelled(m, "trendcast_redis_seconds_count")
    redis_total = sum(redis_calls.values())
    batch_s = m.get("trendcast_batch_seconds_sum", 0.0)
    redis_s = _sum(m, "trendcast_redis_seconds_sum")
    infer_s = m.get("trendcast_inference_seconds_sum", 0.0)
    infer_n = m.get("trendcast_inference_seconds_count", 0.0)
    forecasts = _sum(m, "trendcast_forecasts_total")
    raw_runs = ", ".join(f"{r.events_per_s:,.0f}" for r in raw)
    model = str(args.bundle) if args.bundle is not None else "fake bundle (window 56, horizon 28)"
    lines = [
        f"## Throughput: {total:,} events, {len(ends)} partitions, {os.cpu_count()} cores",
        "",
        f"Topic per partition: {', '.join(f'{e:,}' for e in ends)}; model: {model}; "
        f"steady state = events between {LOW:.0%} and {HIGH:.0%} of the topic"
        + (
            f"; workers: batches of {worker.batch_size:,} events, "
            f"GC threshold {worker.gc_threshold:,} (TRENDCAST_BATCH_SIZE, _GC_THRESHOLD)."
            if worker is not None
            else "."
        ),
        "",
        "| reader | events/s | wall s | notes |",
        "| --- | ---: | ---: | --- |",
        f"| a. aiokafka + orjson (ceiling) | {a:,.0f} | "
        f"{statistics.median(r.seconds for r in raw):.1f} | median of {len(raw)}: {raw_runs} |",
        f"| b. plain Faust agent, decode only (floor) | {b:,.0f} | {b_rate.seconds:.1f} | "
        "stream.take(500), agent's own counter |",
        f"| c. trendcast worker (events_in) | {c:,.0f} | {result.wall_s:.1f} | "
        f"validate, Redis windows, forecasts; median of {len(singles)}: {c_runs} |",
        f"| c. trendcast worker (committed offsets) | {c_commit:,.0f} | "
        f"{result.wall_s:.1f} | cross-check (commits trail by one or two batches) |",
    ]
    g = statistics.median(r.by_metric.events_per_s for r in groups) if groups else 0.0
    if groups:
        g_commit = statistics.median(r.by_commit.events_per_s for r in groups)
        g_runs = ", ".join(f"{r.by_metric.events_per_s:,.0f}" for r in groups)
        lines.append(
            f"| c×{args.group_workers}. {args.group_workers} workers, one group (events_in, "
            f"summed) | {g:,.0f} | {statistics.median(r.wall_s for r in groups):.1f} | "
            f"median of {len(groups)}: {g_runs}; committed offsets: {g_commit:,.0f} |"
        )
    lines += [
        "",
        "| ratio | value |",
        "| --- | ---: |",
        f"| c/a (medians) | {c / a:.3f} |",
        f"| c/a (paired: each read against the ceiling read just before it; median) | "
        f"{paired_ratio(singles)} |",
        f"| c/b | {c / b:.3f} |",
        f"| b/a | {b / a:.3f} |",
    ]
    if groups:
        lines += [
            f"| c×{args.group_workers}/a (medians) | {g / a:.3f} |",
            f"| c×{args.group_workers}/a (paired, median) | {paired_ratio(groups)} |",
            f"| c×{args.group_workers}/c | {g / c:.3f} |",
        ]
    busy = [f"c {_median_share(singles)}"]
    if groups:
        busy.append(f"c×{args.group_workers} {_median_share(groups)}")
    lines += [
        f"| cores (os.cpu_count) | {os.cpu_count()} |",
        f"| machine CPU busy in the steady state (all cores; worker, Redis, broker) | "
        f"{', '.join(busy)} |",
        f"| of it, cores kept busy by the worker process(es) / by Redis (medians) | "
        f"{_cores(singles, groups, args.group_workers)} |",
        "",
        "## Worker internals (from /metrics at the end)",
        "",
        "| what | value |",
        "| --- | ---: |",
        f"| batches | {batches:,.0f} (mean {total / batches if batches else 0:,.0f} events) |",
        f"| Redis round trips per batch | {redis_total / batches if batches else 0:.2f} "
        f"({', '.join(f'{k} {v:,.0f}' for k, v in sorted(redis_calls.items()))}) |",
        f"| batch time, total s | {batch_s:.1f} ({batch_s / result.wall_s:.0%} of wall) |",
        f"| of it in Redis round trips | {redis_s:.1f} s ({_share(redis_s, batch_s)}) |",
        f"| of it in inference | {infer_s:.1f} s ({_share(infer_s, batch_s)}), "
        f"{infer_n:,.0f} predict calls |",
        f"| of it elsewhere (parse, validate, encode, send) | "
        f"{batch_s - redis_s - infer_s:.1f} s |",
        f"| forecasts emitted | {forecasts:,.0f} ({forecasts / total:.2f} per event, "
        f"{forecasts / batch_s if batch_s else 0:,.0f} per batch-second) |",
        f"| outcomes | {', '.join(f'{k} {v:,.0f}' for k, v in sorted(outcomes.items()))} |",
        f"| items with a window in Redis | {result.memory.get('items', 0):,.0f} |",
        f"| MEMORY USAGE window hash, median of top {MEMORY_SAMPLE} items | "
        f"{result.memory.get('window', 0):,.0f} B |",
        f"| MEMORY USAGE dedupe zset, median of top {MEMORY_SAMPLE} items | "
        f"{result.memory.get('dedupe', 0):,.0f} B (event ids of the writable buckets) |",
        f"| MEMORY USAGE of a full 56-day priced window, median of the same items | "
        f"{result.memory.get('window56', 0):,.0f} B |",
        f"| ONNX Runtime windows/s by batch size | "
        f"{', '.join(f'{k}: {v:,.0f}' for k, v in onnx.items())} |",
        f"| inference batch sizes used | chunks of {INFERENCE_BATCH} windows, "
        f"mean {forecasts / infer_n if infer_n else 0:,.0f} per predict call |",
        "",
        "## Latency and bucket close (worker still running)",
        "",
        "| what | value |",
        "| --- | ---: |",
        f"| produce -> committed (state in Redis), at {phases.latency_rate:,.0f} events/s "
        f"(50% of c), {len(phases.latency_ms):,} events | "
        f"p50 {_pct(phases.latency_ms, 50):,.0f} ms, p99 {_pct(phases.latency_ms, 99):,.0f} ms |",
        f"| bucket close -> last forecast of {phases.close_items:,} new items | "
        f"{phases.close_s:.2f} s ({phases.close_forecasts:,} forecasts as of that bucket; "
        f"the last record was built {phases.close_built_s:.2f} s after the close) |",
    ]
    return lines


def paired_ratio(results: Sequence[WorkerResult]) -> str:
    """Median of each read's rate over the ceiling read just before it, with the ratios.

    >>> r = [WorkerResult(Rate(10.0, 1, 2), Rate(0, 1, 2), {}, 1, 0, ceiling=40.0),
    ...      WorkerResult(Rate(12.0, 1, 2), Rate(0, 1, 2), {}, 1, 0, ceiling=30.0),
    ...      WorkerResult(Rate(9.0, 1, 2), Rate(0, 1, 2), {}, 1, 0)]
    >>> paired_ratio(r)
    '0.325 (0.250, 0.400)'
    """
    ratios = sorted(r.by_metric.events_per_s / r.ceiling for r in results if r.ceiling is not None)
    if not ratios:
        return "n/a"
    return f"{statistics.median(ratios):.3f} ({', '.join(f'{x:.3f}' for x in ratios)})"


def _median_share(results: Sequence[WorkerResult]) -> str:
    """Median CPU busy share of the reads that have one, as a percentage."""
    shares = [r.cpu_busy for r in results if r.cpu_busy is not None]
    return f"{statistics.median(shares):.0%}" if shares else "n/a"


def _cores(singles: Sequence[WorkerResult], groups: Sequence[WorkerResult], n: int) -> str:
    """Median cores used by the workers and by Redis in c (and c×n), e.g. "c 0.93 / 0.41"."""

    def median(values: Sequence[float | None]) -> str:
        known = [v for v in values if v is not None]
        return f"{statistics.median(known):.2f}" if known else "n/a"

    out = [
        f"c {median([r.worker_cores for r in singles])} / "
        f"{median([r.redis_cores for r in singles])}"
    ]
    if groups:
        out.append(
            f"c×{n} {median([r.worker_cores for r in groups])} / "
            f"{median([r.redis_cores for r in groups])}"
        )
    return ", ".join(out)


def _pct(values: Sequence[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def _share(part: float, whole: float) -> str:
    return f"{part / whole:.0%}" if whole > 0 else "n/a"


def main(argv: Sequence[str] | None = None) -> int:
    """Run the bench; print the tables; 1 on any error."""
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S", stream=sys.stderr
    )
    for noisy in ("aiokafka", "trendcast.devtools.embedded"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        with tempfile.TemporaryDirectory(prefix="trendcast-throughput-") as tmp:
            lines = bench(args, Path(tmp))
    except (TrendcastError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
