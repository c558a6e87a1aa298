"""Real-time figures of the throughput bench (issue 17 §4), on live events (ts = now).

Three measurements, each with its own worker, topics and key prefix on the bench's broker
and Redis:

* **surge alert latency** (daily bundle of the bench): items with full windows (a first sale
  60 days back, sales 10 and 2 days back, produced first: the partitions then close
  yesterday, so each item has a forecast of today, the open bucket), then live background
  sales (ts = now) at ``rate`` (the bench passes 50% of the worker's steady rate) with, every
  ``BURST_EVERY_S``, one sale of an item far above its forecast. Latency = from producing
  that sale to receiving its ``surge`` alert on the alerts topic (p50, p99), and
  ``detected_at_ms`` minus the produce time (the worker's share);
* **refresh cost** (daily bundle): one pre-filled topic of live events (the same warm-up
  history, then ``REFRESH_EVENTS`` sales with ts in the last minute) read at full speed by
  a worker with ``TRENDCAST_REFRESH_S=60`` and by one with ``0``, in turns (ABBA); events/s
  of each (median) and refresh forecasts per event;
* **close on time**, run beside the other two (it waits for minute boundaries; 20 items,
  a light load) (a ``1min`` bundle trained by ``trendcast train --freq 1min``,
  ``bench/_bundles.py``): a few items sell live into minute M (their first sales an hour
  back, so windows are full); sales stop half-way through minute M + 1, so that minute
  closes by the wall clock alone. For both minutes: the time from the minute's end to the
  last close forecast of it (``emitted_at_ms``; and received), with
  ``TRENDCAST_ALLOWED_LATENESS_S`` = ``MINUTE_LATENESS_S``.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import statistics
import threading
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from bench import throughput as tp
from stream.settings.worker import WorkerSettings
from trendcast.data import read_lines
from trendcast.devtools.embedded import ensure_topics
from trendcast.devtools.up import worker_env

__all__ = ["measure"]

logger = logging.getLogger(__name__)

DAY_MS = 86_400_000
MINUTE_MS = 60_000
#: Items of the surge and refresh parts (the data's best sellers), and burst items.
ITEMS = 500
BURSTS = 60
BURST_EVERY_S = 0.25
BURST_QTY = 5_000.0
BURST_DAILY = 20.0
#: Live events of the refresh-cost topic, and reads of each setting.
REFRESH_EVENTS = 200_000
REFRESH_RUNS = 2
#: TRENDCAST_REFRESH_S of the refresh-cost reads: the default, none, and a stress setting (a
#: read at full speed lasts seconds, and an item is refreshed at most once per REFRESH_S).
REFRESH_SETTINGS = (60.0, 0.0, 1.0)
MINUTE_LATENESS_S = 5.0
PARTITIONS = 4


def _now_ms() -> int:
    return int(time.time() * 1000)


def _sale(item: str, ts_ms: int, event_id: str, qty: float = 1.0) -> bytes:
    iso = np.datetime_as_string(np.datetime64(ts_ms, "ms"), unit="ms")
    return orjson.dumps({"event_id": event_id, "item_id": item, "ts": f"{iso}Z", "quantity": qty})


def _history(items: Sequence[str], now_ms: int, step_ms: int, backs: Sequence[int]) -> list[Any]:
    """Warm-up sales of ``items``: one unit ``back`` buckets before now for each ``backs``."""
    events = []
    for back in backs:  # oldest first: event-time order
        at = now_ms - back * step_ms
        for i, item in enumerate(items):
            events.append((item.encode(), _sale(item, at + i, f"h{back}-{item}")))
    return events


def _topics(name: str) -> dict[str, str]:
    suffix = uuid.uuid4().hex[:8]
    return {
        "sales": f"rt-{name}-{suffix}",
        "dlq": f"rt-{name}-dlq-{suffix}",
        "fc": f"rt-{name}-fc-{suffix}",
        "alerts": f"rt-{name}-alerts-{suffix}",
    }


def _settings(
    bootstrap: str, redis_url: str, bundle: Path, topics: dict[str, str], tmp: Path, **kw: Any
) -> WorkerSettings:
    ensure_topics(
        bootstrap,
        {
            topics["sales"]: PARTITIONS,
            topics["dlq"]: 1,
            topics["fc"]: PARTITIONS,
            topics["alerts"]: PARTITIONS,
        },
    )
    base = tp.worker_settings(
        bootstrap,
        redis_url,
        bundle,
        topics,
        group=f"g-{topics['sales']}",
        prefix=f"p-{topics['sales']}",
        data_dir=tmp / topics["sales"],
        partitions=PARTITIONS,
    )
    return base.model_copy(update={"alerts_topic": topics["alerts"], **kw})


async def _reader(bootstrap: str, topic: str) -> AIOKafkaConsumer:
    reader = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        group_id=None,
        auto_offset_reset="earliest",
        fetch_max_wait_ms=10,  # Tansu holds a fetch for the full wait
    )
    await reader.start()
    reader.assign([TopicPartition(topic, p) for p in range(PARTITIONS)])
    return reader


async def _produce_wait(producer: AIOKafkaProducer, topic: str, events: Sequence[Any]) -> None:
    futures = [await producer.send(topic, value, key=key) for key, value in events]
    await asyncio.gather(*futures)


# -- surge latency -----------------------------------------------------------------------------
async def _surges(
    settings: WorkerSettings, bootstrap: str, items: Sequence[str], rate: float, seconds: float
) -> tuple[list[float], list[float], int]:
    """Background sales at ``rate`` with bursts; (receive latencies, detect latencies, lost)."""
    topic = settings.sales_topic
    burst_items = [f"BURST{i:03d}" for i in range(BURSTS)]
    everyone = [*items, *burst_items]
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=2)
    await producer.start()
    alerts = await _reader(bootstrap, settings.alerts_topic)
    try:
        now = _now_ms()
        history = _history(items, now, DAY_MS, (60, 10, 2))
        # Burst items sell BURST_DAILY units every day: their forecast of today expects
        # enough by now for an alert to be judged (see stream.pipeline.realtime).
        for back in range(60, 0, -1):
            at = now - back * DAY_MS
            history += [
                (i.encode(), _sale(i, at + n, f"h{back}-{i}", BURST_DAILY))
                for n, i in enumerate(burst_items)
            ]
        history.sort(key=lambda kv: orjson.loads(kv[1])["ts"])
        await _produce_wait(producer, topic, history)
        # Today's first sale of every item: closes yesterday (forecasts of today).
        await _produce_wait(producer, topic, _history(everyone, _now_ms(), DAY_MS, (0,)))
        await asyncio.sleep(3.0)  # the close of yesterday's bucket is forecast
        sent: dict[str, float] = {}
        received: dict[str, float] = {}
        detected: dict[str, int] = {}
        stop = asyncio.Event()

        async def read_alerts() -> None:
            while not stop.is_set() or len(received) < len(sent):
                batch = await alerts.getmany(timeout_ms=50)
                t = time.time()
                for records in batch.values():
                    for record in records:
                        value = orjson.loads(record.value)
                        if value["kind"] == "surge" and value["item_id"] in sent:
                            received.setdefault(value["item_id"], t)
                            detected.setdefault(value["item_id"], int(value["detected_at_ms"]))
                if stop.is_set() and time.time() - last_sent > 10:
                    return

        last_sent = time.time()
        watcher = asyncio.ensure_future(read_alerts())
        started = time.perf_counter()
        k, bursts = 0, 0
        next_burst = started + 2.0
        while (now_p := time.perf_counter()) - started < seconds:
            due = int((now_p - started) * rate) - k
            now_ms = _now_ms()
            for _ in range(due):
                item = items[k % len(items)]
                await producer.send(topic, _sale(item, now_ms, f"bg{k}"), key=item.encode())
                k += 1
            if now_p >= next_burst and bursts < BURSTS:
                item = burst_items[bursts]
                value = _sale(item, _now_ms(), f"burst{bursts}", BURST_QTY)
                sent[item] = time.time()
                last_sent = sent[item]
                await producer.send(topic, value, key=item.encode())
                bursts += 1
                next_burst += BURST_EVERY_S
            await asyncio.sleep(0.005)
        await producer.flush()
        stop.set()
        await watcher
        logger.info("surge part: %d background sales, %d bursts", k, bursts)
        recv = [(received[i] - sent[i]) * 1000 for i in sent if i in received]
        det = [detected[i] - sent[i] * 1000 for i in sent if i in detected]
        return recv, det, len(sent) - len(recv)
    finally:
        await alerts.stop()
        await producer.stop()


# -- refresh cost ------------------------------------------------------------------------------
async def _fill_live(bootstrap: str, topic: str, items: Sequence[str]) -> tuple[list[int], int]:
    """Warm-up history, then ``REFRESH_EVENTS`` live sales over the last minute."""
    now = _now_ms()
    warm = _history(items, now, DAY_MS, (60, 10, 2))
    ends = await tp._produce(bootstrap, topic, warm)
    events = []
    for k in range(REFRESH_EVENTS):
        item = items[k % len(items)]
        at = now - MINUTE_MS + k * MINUTE_MS // REFRESH_EVENTS
        events.append((item.encode(), _sale(item, at, f"lv{k}")))
    more = await tp._produce(bootstrap, topic, events)
    return [w + m for w, m in zip(ends, more, strict=True)], len(warm)


# -- minute closes -----------------------------------------------------------------------------
async def _minutes(settings: WorkerSettings, bootstrap: str) -> list[tuple[str, float, float]]:
    """(which, emitted - end, received - end) in seconds, for minute M and M + 1."""
    topic = settings.sales_topic
    items = [f"M{i:02d}" for i in range(20)]
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=2)
    await producer.start()
    forecasts = await _reader(bootstrap, settings.forecasts_topic)
    try:
        now = _now_ms()
        await _produce_wait(producer, topic, _history(items, now, MINUTE_MS, (70, 30, 2)))
        m0 = now - now % MINUTE_MS + MINUTE_MS
        if m0 - now < 10_000:
            m0 += MINUTE_MS
        m1, m2 = m0 + MINUTE_MS, m0 + 2 * MINUTE_MS
        ends = {m1: "minute M (sales flowing)", m2: "minute M + 1 (closed by the wall clock)"}
        iso = {np.datetime_as_string(np.datetime64(end, "ms"), unit="s") + "Z": end for end in ends}
        emitted: dict[int, int] = {}
        received: dict[int, float] = {}  # when the last close record of the minute came

        async def read() -> None:
            deadline = m2 + int(MINUTE_LATENESS_S * 1000) + 30_000
            while _now_ms() < deadline:
                batch = await forecasts.getmany(timeout_ms=50)
                t = time.time() * 1000
                for records in batch.values():
                    for record in records:
                        value = orjson.loads(record.value)
                        end = iso.get(value["as_of"])
                        if end is not None and value["kind"] == "close":
                            emitted[end] = max(emitted.get(end, 0), value["emitted_at_ms"])
                            received[end] = t
                if m2 in received and t - received[m2] > 2_000:
                    return  # the close of M + 1 is in, and nothing more of it came

        collect = asyncio.ensure_future(read())
        k = 0
        while (now := _now_ms()) < m1 + MINUTE_MS // 2:  # sales until half-way into M + 1
            if now >= m0:
                await _produce_wait(
                    producer, topic, [(i.encode(), _sale(i, now, f"mn{k}-{i}")) for i in items]
                )
                k += 1
            await asyncio.sleep(0.5)
        await collect  # reads until the close of M + 1 is in (or the deadline)
        return [
            (label, (emitted[end] - end) / 1000, (received[end] - end) / 1000)
            for end, label in ends.items()
            if end in received
        ]
    finally:
        await forecasts.stop()
        await producer.stop()


# -- all -------------------------------------------------------------------------------------
def measure(
    args: argparse.Namespace, tmp: Path, bootstrap: str, redis_url: str, rate: float
) -> list[str]:
    """The real-time table of the bench (markdown lines)."""
    from bench._bundles import daily_bundle, minute_bundle

    daily, _ = daily_bundle(args.data) if args.bundle is None else (args.bundle, True)
    minute, _ = minute_bundle(args.data)
    lines, _ = read_lines(args.data, columns=tp.COLUMNS, item_pattern=tp.ITEM_PATTERN)
    catalogue = lines["item_id"].value_counts().index.astype(str).tolist()
    items = catalogue[:ITEMS]
    seconds = 10.0 if args.quick else 20.0

    # 3 (in the background: a light load of 20 items). Minute closes, the last one by the
    # wall clock; it waits for minute boundaries, so it runs beside parts 1 and 2.
    topics = _topics("minute")
    minute_settings = _settings(
        bootstrap, redis_url, minute, topics, tmp, allowed_lateness_s=MINUTE_LATENESS_S
    )
    minutes_box: list[Any] = []

    def minutes_part() -> None:
        try:
            minutes_box.append(
                _with_worker(
                    minute_settings, tmp, lambda: tp.run(_minutes(minute_settings, bootstrap))
                )
            )
        except BaseException as exc:  # reported after the other parts
            minutes_box.append(exc)

    minute_thread = threading.Thread(target=minutes_part, name="bench-minutes", daemon=True)
    minute_thread.start()

    # 1. Surges at `rate`.
    topics = _topics("surge")
    settings = _settings(bootstrap, redis_url, daily, topics, tmp)
    recv, det, lost = _with_worker(
        settings, tmp, lambda: tp.run(_surges(settings, bootstrap, items, rate, seconds))
    )
    tp.clear_prefix(redis_url, settings.state_prefix)

    # 2. Refresh cost: the same live topic read with refreshes every 60 s and without.
    topics = _topics("refresh")
    settings = _settings(bootstrap, redis_url, daily, topics, tmp)
    ends, base = tp.run(_fill_live(bootstrap, topics["sales"], catalogue))
    rates: dict[float, list[float]] = {s: [] for s in REFRESH_SETTINGS}
    refreshes: dict[float, list[float]] = {s: [] for s in REFRESH_SETTINGS}
    order = [
        s
        for r in range(REFRESH_RUNS)
        for s in (REFRESH_SETTINGS if r % 2 == 0 else REFRESH_SETTINGS[::-1])
    ]
    for i, refresh_s in enumerate(order):
        fresh = settings.model_copy(
            update={
                "refresh_s": refresh_s,
                "consumer_group": f"{settings.consumer_group}-{i}",
                "state_prefix": f"{settings.state_prefix}-{i}",
            }
        )
        try:
            read = tp.group_run(fresh, bootstrap, ends, tmp, 300, 1, base)
        finally:
            tp.clear_prefix(redis_url, fresh.state_prefix)
        rates[refresh_s].append(read.by_metric.events_per_s)
        forecasts = tp._labelled(read.metrics, "trendcast_forecasts_total")
        refreshes[refresh_s].append(forecasts.get('kind="refresh"', 0.0) / (sum(ends) - base))

    minute_thread.join(timeout=400)
    tp.clear_prefix(redis_url, minute_settings.state_prefix)
    if not minutes_box:
        raise tp.BenchError("the minute-close part did not finish in 400 s")
    if isinstance(minutes_box[0], BaseException):
        raise tp.BenchError(f"the minute-close part failed: {minutes_box[0]!r}")
    minutes: list[tuple[str, float, float]] = minutes_box[0]

    with_r, without = statistics.median(rates[60.0]), statistics.median(rates[0.0])
    stress = statistics.median(rates[1.0])
    out = [
        "",
        "## Real time (live events, ts = now)",
        "",
        "| what | value |",
        "| --- | ---: |",
        f"| sale produced -> its surge alert received, at {rate:,.0f} events/s (50% of c), "
        f"{len(recv)} bursts ({lost} without an alert) | p50 {tp._pct(recv, 50):,.0f} ms, "
        f"p99 {tp._pct(recv, 99):,.0f} ms |",
        f"| of it, sale produced -> `detected_at_ms` | p50 {tp._pct(det, 50):,.0f} ms, "
        f"p99 {tp._pct(det, 99):,.0f} ms |",
        f"| worker events/s on live events, TRENDCAST_REFRESH_S=60 vs 0 (medians of "
        f"{REFRESH_RUNS}: {', '.join(f'{x:,.0f}' for x in rates[60.0])} vs "
        f"{', '.join(f'{x:,.0f}' for x in rates[0.0])}) | {with_r:,.0f} vs {without:,.0f} "
        f"(×{with_r / without:.3f}) |",
        f"| stress: TRENDCAST_REFRESH_S=1 vs 0 ({', '.join(f'{x:,.0f}' for x in rates[1.0])}) | "
        f"{stress:,.0f} vs {without:,.0f} (×{stress / without:.3f}) |",
        f"| refresh forecasts per event (REFRESH_S 60 / 1 / 0; {len(catalogue):,} items, "
        f"{REFRESH_EVENTS:,} live events) | {statistics.median(refreshes[60.0]):.4f} / "
        f"{statistics.median(refreshes[1.0]):.4f} / {statistics.median(refreshes[0.0]):.4f} |",
    ]
    for label, emitted_s, received_s in minutes:
        out.append(
            f"| 1min bundle, {label}: bucket end -> last close forecast (allowed lateness "
            f"{MINUTE_LATENESS_S:.0f} s) | built {emitted_s:.2f} s, received {received_s:.2f} s |"
        )
    return out


def _with_worker(settings: WorkerSettings, tmp: Path, body: Any) -> Any:
    """Run ``body()`` with one worker of ``settings`` up (ready and in its group)."""
    import subprocess
    import sys

    import aiohttp

    log_path = tmp / f"{settings.consumer_group}.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(  # noqa: S603 - argv built here
            [sys.executable, "-m", "stream"],
            env=worker_env(settings),
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=str(tp.REPO),
        )
    try:

        async def ready() -> None:
            url = f"http://127.0.0.1:{settings.web_port}/ready"
            deadline = time.monotonic() + 90
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as http:
                while time.monotonic() < deadline:
                    if proc.poll() is not None:
                        raise tp.BenchError(f"worker exited {proc.returncode}")
                    try:
                        async with http.get(url) as response:
                            if response.status == 200:
                                return
                    except (aiohttp.ClientError, TimeoutError):
                        pass
                    await asyncio.sleep(0.3)
            raise tp.BenchError("worker not ready in 90 s")

        tp.run(ready())
        time.sleep(3.0)  # the group join
        return body()
    except BaseException:
        logger.error("worker log tail:\n%s", tp._tail(log_path))
        raise
    finally:
        tp._stop(proc)
