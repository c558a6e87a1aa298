"""Machinery of the chaos bench: services, worker processes, a progress monitor, the checks.

Kept apart from :mod:`bench.chaos` (which only says *what* each scenario does) so the slow
integration test can drive the same code with smaller numbers. Nothing here is product code:
it may work around Tansu's quirks (see :mod:`trendcast.devtools.embedded`) — ends of partitions
come from
the producer's own acknowledgements, committed offsets from a group consumer's
``committed()`` that never joins the group.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import Counter, defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import orjson
import pandas as pd
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from stream.settings.worker import WorkerSettings
from stream.worker.runner import inspect_items
from trendcast.data import bucketize
from trendcast.devtools.embedded import free_port, to_bootstrap
from trendcast.devtools.up import worker_env
from trendcast.freq import Freq
from trendcast.sync_bridge import run_sync
from trendcast.testkit.kafka import consume_all

__all__ = [
    "Checks",
    "Monitor",
    "Produced",
    "WorkerPool",
    "check_dead_letters",
    "check_forecasts",
    "check_windows",
    "consume_all",
    "produce_tracked",
    "worker_env",
]

logger = logging.getLogger(__name__)

_REPO = Path(__file__).resolve().parents[1]


# -- producing -------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Produced:
    """Where one produced record landed."""

    partition: int
    offset: int


async def _produce(
    bootstrap: str, topic: str, records: Sequence[tuple[bytes | None, bytes | None]]
) -> list[Produced]:
    producer = AIOKafkaProducer(
        bootstrap_servers=to_bootstrap(bootstrap),
        acks="all",
        linger_ms=20,
        max_batch_size=256 * 1024,
        max_request_size=1024 * 1024,
        enable_idempotence=False,  # Tansu rejects InitProducerId
    )
    await producer.start()
    try:
        out: list[Produced] = []
        for begin in range(0, len(records), 2000):
            futures = [
                await producer.send(topic, key=key, value=value)
                for key, value in records[begin : begin + 2000]
            ]
            out.extend(Produced(m.partition, m.offset) for m in await asyncio.gather(*futures))
        return out
    finally:
        await producer.stop()


def produce_tracked(
    bootstrap: str, topic: str, records: Sequence[tuple[bytes | None, bytes | None]]
) -> list[Produced]:
    """Produce in order with ``acks=all``; the partition and offset of every record."""
    return run_sync(_produce(bootstrap, topic, records))


# -- workers ---------------------------------------------------------------------------------
@dataclass
class _Worker:
    name: str
    settings: WorkerSettings
    proc: subprocess.Popen[bytes]
    log: IO[bytes]
    started: float
    signalled: str | None = None  # "SIGKILL" / "SIGTERM" once we sent it


class WorkerPool:
    """``python -m stream`` workers of one consumer group, started, killed and stopped here.

    Every process is ours; we never signal anything we did not start. A worker that exits
    without having been signalled is recorded in :attr:`unexpected_exits`.
    """

    def __init__(self, base: WorkerSettings, log_dir: Path) -> None:
        self.base = base
        self.log_dir = log_dir
        self._workers: dict[str, _Worker] = {}
        self._serial = 0
        self.unexpected_exits: list[str] = []
        self.graceful_exit_codes: list[int] = []
        self.kills = 0
        self.terms = 0
        self.starts = 0

    def start(self) -> str:
        """Start a new worker; returns its name."""
        self._serial += 1
        name = f"w{self._serial}"
        settings = self.base.model_copy(
            update={"web_port": free_port(), "data_dir": self.log_dir / f"faust-{name}"}
        )
        log = (self.log_dir / f"{name}.log").open("ab")
        proc = subprocess.Popen(
            [sys.executable, "-m", "stream"],
            env=worker_env(settings),
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=str(_REPO),
        )
        self._workers[name] = _Worker(name, settings, proc, log, time.monotonic())
        self.starts += 1
        logger.info("started worker %s (pid %d)", name, proc.pid)
        return name

    @property
    def alive(self) -> list[str]:
        """Names of running workers we have not signalled."""
        return [
            w.name for w in self._workers.values() if w.proc.poll() is None and w.signalled is None
        ]

    def web_port(self, name: str) -> int:
        """The worker's Faust web port."""
        return self._workers[name].settings.web_port

    def kill(self, name: str) -> None:
        """SIGKILL: no shutdown hook runs, exactly like a crash or an OOM kill."""
        w = self._workers[name]
        w.signalled = "SIGKILL"
        w.proc.kill()
        w.proc.wait(timeout=10)
        self.kills += 1
        logger.info("killed worker %s", name)

    def terminate(self, name: str, timeout_s: float = 30.0) -> int:
        """SIGTERM and wait: the worker must finish its batch, commit and leave the group."""
        w = self._workers[name]
        w.signalled = "SIGTERM"
        w.proc.send_signal(signal.SIGTERM)
        try:
            code = w.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            w.proc.kill()
            code = w.proc.wait()
            logger.error("worker %s ignored SIGTERM for %.0fs", name, timeout_s)
            code = -9
        self.terms += 1
        self.graceful_exit_codes.append(code)
        return code

    def check_unexpected_exits(self) -> None:
        """Record workers that died on their own (they are not restarted: that is the bug)."""
        for w in self._workers.values():
            if w.signalled is None and w.proc.poll() is not None:
                w.signalled = f"exited {w.proc.returncode}"
                self.unexpected_exits.append(f"{w.name} exited with {w.proc.returncode}")
                logger.error("worker %s exited by itself (code %s)", w.name, w.proc.returncode)

    def stop_all(self) -> None:
        """SIGTERM every running worker (graceful exits are checked like any other)."""
        self.check_unexpected_exits()
        for name in self.alive:
            self.terminate(name)
        for w in self._workers.values():
            if w.proc.poll() is None:  # pragma: no cover - only after a failed terminate
                w.proc.kill()
                w.proc.wait()
            w.log.close()

    def ready(self, name: str) -> bool:
        """Whether Faust finished starting (its timers, the health probe among them, run).

        Read from the worker's log ("[^Worker]: Ready"): a bench-only signal, so the
        product does not grow an endpoint for it; its ``/health`` is served earlier, while
        the worker is still joining the group.
        """
        with contextlib.suppress(OSError):
            return "[^Worker]: Ready" in (self.log_dir / f"{name}.log").read_text(errors="replace")
        return False

    def health(self, name: str) -> int | None:
        """HTTP status of the worker's ``/health`` (None: not answering)."""
        url = f"http://127.0.0.1:{self.web_port(name)}/health"
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:  # noqa: S310 - local URL
                return int(resp.status)
        except urllib.error.HTTPError as exc:
            return int(exc.code)
        except (OSError, ValueError):
            return None

    def log_tail(self, lines: int = 30) -> str:
        """The end of every worker's log, for failure reports."""
        out = []
        for w in self._workers.values():
            with contextlib.suppress(OSError):
                text = (self.log_dir / f"{w.name}.log").read_text(errors="replace")
                out.append(f"--- {w.name} ---\n" + "\n".join(text.splitlines()[-lines:]))
        return "\n".join(out)


# -- progress --------------------------------------------------------------------------------
class Monitor:
    """Samples the group's committed offsets in a thread (one long-lived consumer).

    The consumer has the group's id but never subscribes, so it never joins the group and
    never triggers a rebalance; ``committed()`` asks the coordinator (OffsetFetch) each time.
    """

    def __init__(self, bootstrap: str, group: str, topic: str, ends: dict[int, int]) -> None:
        self.bootstrap = bootstrap
        self.group = group
        self.topic = topic
        self.ends = dict(ends)
        self.samples: list[tuple[float, dict[int, int]]] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="chaos-monitor", daemon=True)

    def __enter__(self) -> Monitor:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=15)

    def _run(self) -> None:
        asyncio.run(self._loop())

    async def _loop(self) -> None:
        consumer = AIOKafkaConsumer(
            bootstrap_servers=to_bootstrap(self.bootstrap),
            group_id=self.group,
            enable_auto_commit=False,
        )
        await consumer.start()
        try:
            tps = {p: TopicPartition(self.topic, p) for p in self.ends}
            while not self._stop.is_set():
                offsets: dict[int, int] = {}
                try:
                    for p, tp in tps.items():
                        offsets[p] = int(await consumer.committed(tp) or 0)
                except Exception as exc:  # a coordinator hiccup during a rebalance: sample later
                    logger.debug("committed() failed: %s", exc)
                else:
                    with self._lock:
                        self.samples.append((time.monotonic(), offsets))
                await asyncio.sleep(0.4)
        finally:
            await consumer.stop()

    def latest(self) -> dict[int, int]:
        """The latest committed offsets (zeros before the first sample)."""
        with self._lock:
            return dict(self.samples[-1][1]) if self.samples else dict.fromkeys(self.ends, 0)

    def progress(self) -> float:
        """Committed share of all produced records, 0..1."""
        total = sum(self.ends.values())
        return sum(min(o, self.ends[p]) for p, o in self.latest().items()) / max(total, 1)

    def done(self) -> bool:
        """Every partition committed to its end."""
        latest = self.latest()
        return all(latest.get(p, 0) >= end for p, end in self.ends.items())

    def recovery_s(self, since: float) -> float | None:
        """Time after ``since`` until every partition that had work left moved again.

        A partition "had work left" when its committed offset at ``since`` was below its end;
        it has recovered once a later sample shows it committed further. None while some
        such partition has not moved yet.
        """
        with self._lock:
            samples = list(self.samples)
        before = [s for t, s in samples if t <= since]
        base = before[-1] if before else dict.fromkeys(self.ends, 0)
        pending = {p for p, end in self.ends.items() if base.get(p, 0) < end}
        worst = 0.0
        for p in pending:
            moved = next(
                (t for t, s in samples if t > since and s.get(p, 0) > base.get(p, 0)), None
            )
            if moved is None:
                return None
            worst = max(worst, moved - since)
        return worst


# -- checks ----------------------------------------------------------------------------------
@dataclass
class Checks:
    """What the verification found for one scenario (all zero = correct)."""

    items: int = 0
    buckets_compared: int = 0
    mismatching_items: int = 0
    lost_units: float = 0.0
    double_units: float = 0.0
    bad_records: int = 0
    dead_lettered: int = 0
    dlq_missing: int = 0
    dlq_wrong_reason: int = 0
    dlq_unexpected: int = 0
    forecasts_expected: int = 0
    forecasts_missing: int = 0
    forecasts_repeated: int = 0
    forecasts_unexpected: int = 0
    examples: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when nothing was lost, double-counted, mis-lettered or left unforecast."""
        return not (
            self.mismatching_items
            or self.lost_units
            or self.double_units
            or self.dlq_missing
            or self.dlq_wrong_reason
            or self.dlq_unexpected
            or self.forecasts_missing
            or self.forecasts_unexpected
        )


def _iso(ms: int) -> str:
    return pd.Timestamp(ms, unit="ms").strftime("%Y-%m-%dT%H:%M:%SZ")


def check_windows(
    settings: WorkerSettings, lines: pd.DataFrame, freq: Freq, checks: Checks
) -> None:
    """Every item's stored window (``inspect_items``) against the offline aggregation.

    The store keeps only the recent buckets of an item (window + lateness + grace), so the
    comparison covers the buckets ``inspect_items`` shows — from the oldest kept one to the
    item's latest sale, zeros included — and requires that the latest shown bucket is the
    item's latest bucket with a sale offline (a lost tail would otherwise go unnoticed).
    """
    panel = bucketize(lines, freq, has_price=True).frame
    offline: dict[tuple[str, str], float] = {
        (i, t.strftime("%Y-%m-%dT%H:%M:%SZ")): float(q)
        for i, t, q in zip(panel["item_id"], panel["ts"], panel["quantity"], strict=True)
    }
    ts_ms = lines["ts"].to_numpy(dtype="datetime64[ms]").astype("int64")
    last_bucket: dict[str, int] = {}
    for item, ms in zip(lines["item_id"].astype(str), ts_ms, strict=True):
        b = freq.floor_ms(int(ms))
        if b > last_bucket.get(item, b - 1):
            last_bucket[item] = b
    items = sorted(last_bucket)
    checks.items = len(items)
    for shown in inspect_items(settings, items, freq=freq.name):
        item = shown["item_id"]
        bad = False
        buckets = shown["buckets"]
        if not buckets or buckets[-1]["start"] != _iso(last_bucket[item]):
            bad = True
            if len(checks.examples) < 5:
                last = buckets[-1]["start"] if buckets else None
                checks.examples.append(
                    f"{item}: last stored bucket {last}, offline {_iso(last_bucket[item])}"
                )
        for b in buckets:
            want = offline.get((item, b["start"]), 0.0)
            got = float(b["quantity"])
            checks.buckets_compared += 1
            if got != want:
                bad = True
                if got < want:
                    checks.lost_units += want - got
                else:
                    checks.double_units += got - want
                if len(checks.examples) < 5:
                    checks.examples.append(f"{item} {b['start']}: stored {got}, offline {want}")
        checks.mismatching_items += bad


def check_dead_letters(
    bootstrap: str,
    settings: WorkerSettings,
    expected: dict[Produced, str],
    checks: Checks,
) -> None:
    """Every bad record is in the DLQ with its reason; nothing else is there.

    Dead letters are at-least-once (a record re-delivered after a crash is dead-lettered
    again), so records are matched by their source partition and offset, not counted.
    """
    checks.bad_records = len(expected)
    found: dict[Produced, set[str]] = defaultdict(set)
    for rec in consume_all(bootstrap, settings.dlq_topic):
        value = orjson.loads(rec.value)
        src = value["source"]
        if src["topic"] != settings.sales_topic:
            continue
        found[Produced(src["partition"], src["offset"])].add(value["reason"])
    checks.dead_lettered = sum(1 for k in expected if k in found)
    checks.dlq_missing = sum(1 for k in expected if k not in found)
    checks.dlq_wrong_reason = sum(
        1 for k, reason in expected.items() if k in found and found[k] != {reason}
    )
    unexpected = [k for k in found if k not in expected]
    checks.dlq_unexpected = len(unexpected)
    for k in unexpected[:3]:
        checks.examples.append(f"valid event {k} was dead-lettered: {sorted(found[k])}")


def expected_forecasts(
    events: Sequence[tuple[int, str, int]], freq: Freq, window: int, lateness_ms: int
) -> set[tuple[str, str]]:
    """(item, as_of) for every closed bucket, from ``(partition, item, ts_ms)`` in offset order.

    Mirrors the worker's contract: a partition's watermark is its max event time minus
    ``lateness_ms``; each bucket it passes is forecast for every item of the partition
    with a sale in the ``window`` buckets ending there.
    """
    by_partition: dict[int, list[tuple[str, int]]] = defaultdict(list)
    for partition, item, ts in events:
        by_partition[partition].append((item, ts))
    step = freq.step_ms
    out: set[tuple[str, str]] = set()
    for evs in by_partition.values():
        first_open = freq.floor_ms(evs[0][1] - lateness_ms)
        end_open = freq.floor_ms(max(ts for _, ts in evs) - lateness_ms)
        sold: dict[str, list[int]] = defaultdict(list)
        for item, ts in evs:
            sold[item].append(freq.floor_ms(ts))
        spans = {item: sorted(set(b)) for item, b in sold.items()}
        for bucket in range(first_open, end_open, step):
            lo = bucket - (window - 1) * step
            as_of = _iso(bucket + step)
            for item, buckets in spans.items():
                if any(lo <= b <= bucket for b in buckets):
                    out.add((item, as_of))
    return out


def check_forecasts(
    bootstrap: str,
    settings: WorkerSettings,
    valid: Sequence[tuple[int, str, int]],
    freq: Freq,
    window: int,
    checks: Checks,
) -> None:
    """At least one forecast per (item, closed bucket); repeats are allowed (and counted)."""
    expected = expected_forecasts(valid, freq, window, int(settings.allowed_lateness_s * 1000))
    got: Counter[tuple[str, str]] = Counter()
    for rec in consume_all(bootstrap, settings.forecasts_topic):
        as_of = orjson.loads(rec.value)["as_of"]
        got[(rec.key.decode(), as_of)] += 1
    checks.forecasts_expected = len(expected)
    missing = expected - got.keys()
    checks.forecasts_missing = len(missing)
    checks.forecasts_repeated = sum(n - 1 for n in got.values())
    checks.forecasts_unexpected = len(got.keys() - expected)
    for pair in sorted(missing)[:3]:
        checks.examples.append(f"no forecast for {pair}")


def iter_valid(lines: pd.DataFrame, placed: Sequence[Produced]) -> Iterator[tuple[int, str, int]]:
    """``(partition, item, ts_ms)`` of produced valid lines, in offset order per partition."""
    ts_ms = lines["ts"].to_numpy(dtype="datetime64[ms]").astype("int64")
    rows = sorted(
        zip(placed, lines["item_id"].astype(str), ts_ms, strict=True),
        key=lambda r: (r[0].partition, r[0].offset),
    )
    for where, item, ms in rows:
        yield where.partition, item, int(ms)
