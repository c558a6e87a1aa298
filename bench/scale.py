"""Scale bench: one daily close of 10⁴, 10⁵, 10⁶ items with full windows, 1 and 2 workers.

Run::

    python bench/scale.py [--sizes 10000,100000,1000000] [--workers 1,2] [--partitions 8]
                          [--bundle DIR] [--data PARQUET]

What a platform team plans for is a catalogue, not an event rate: how long the forecasts of
a daily close of N items take, and what N costs in Redis and in worker memory. For each size
and worker count, on a fresh Tansu broker and a Redis server of its own (so ``INFO memory``
sees only this bench, and a million windows do not land in a colleague's Redis):

1. Redis gets N items with full windows: clones of the shared data's items (every item with
   at least a window of history and a sale in the window ending 2011-08-31; clone ``k`` of
   ``S`` sources is ``C<k>-<source k mod S>``, deterministic). The sources' windows (56
   daily buckets of real units and prices, their real first sale) are written through the
   worker's own store (:class:`~stream.state.redis_store.RedisWindowStore`), then each
   clone's window hash is a ``RESTORE`` of its source's ``DUMP`` under the clone's key:
   byte for byte what the worker would have stored. Each partition's clock says the bucket
   of 2011-08-31 is open (``save_partition``) and its sellers zset lists its clones (clone
   ``k`` on partition ``k mod P``).
2. ``--workers`` workers start in one consumer group (``python -m stream``, the bundle of
   ``bench/_bundles.py`` unless ``--bundle``); one event per partition in the open bucket
   shows they own their partitions.
3. The close: one event per partition in the next day (the watermark passes midnight). Timed
   from producing it to receiving, on the forecasts topic, the last of the N forecasts as of
   that bucket (counted by ``as_of`` in the raw bytes; every one must be a model forecast,
   ``"fallback":false``).

Printed: the close time and forecasts/s, Redis ``used_memory`` of the windows (total and per
item), the workers' peak RSS (``/proc/<pid>/status`` ``VmRSS``, sampled every 0.2 s), and a
growth table (each size over the one before, which should be about the size ratio).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `python bench/scale.py` puts bench/, not the repo, first
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import orjson  # noqa: E402
import redis  # noqa: E402
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition  # noqa: E402

from bench import throughput as tp  # noqa: E402
from stream.settings.worker import WorkerSettings  # noqa: E402
from stream.state.base import (  # noqa: E402
    BucketDelta,
    ItemUpdate,
    PartitionId,
    PartitionState,
)
from stream.state.redis_store import RedisWindowStore, item_keys, partition_keys  # noqa: E402
from trendcast.data import read_lines  # noqa: E402
from trendcast.devtools.embedded import (  # noqa: E402
    RedisServer,
    TansuBroker,
    ensure_topics,
    free_port,
)
from trendcast.devtools.up import worker_env  # noqa: E402
from trendcast.exceptions import TrendcastError  # noqa: E402
from trendcast.freq import parse_freq  # noqa: E402

__all__ = ["CloseResult", "main", "source_windows"]

logger = logging.getLogger(__name__)

DAY_MS = 86_400_000
#: The closing bucket: the last day of the shared data.
CLOSE_DAY = "2011-08-31"
WINDOW = 56
#: Items written per Redis pipeline while filling.
FILL_CHUNK = 5_000


class ScaleError(TrendcastError):
    """A measurement could not be taken (timeout, missing forecasts, failed worker)."""


@dataclass
class CloseResult:
    """One close of ``items`` items with ``workers`` workers."""

    items: int
    workers: int
    close_s: float
    forecasts: int
    fallbacks: int
    redis_bytes: int
    rss_idle_mb: list[float]
    rss_peak_mb: list[float]
    fill_s: float
    #: Each worker's own timings of the close batch (its log line).
    timings: list[str]

    @property
    def per_s(self) -> float:
        """Forecasts delivered per second of the close."""
        return self.items / self.close_s if self.close_s else float("nan")


# -- the sources -----------------------------------------------------------------------------
def source_windows(path: Path, close_ms: int) -> list[ItemUpdate]:
    """Two updates per item of the shared data with a full window ending at ``close_ms``.

    Every item whose first sale is at least ``WINDOW - 1`` days before the last day of the
    data and that sold in the last ``WINDOW`` days: its daily units and price sums of those
    days (one delta per selling day) plus one delta on its real first-sale day (so the
    store's first-sale field is real), all moved so that the last day is ``close_ms``.
    """
    lines, _ = read_lines(path, columns=tp.COLUMNS, item_pattern=tp.ITEM_PATTERN)
    day = lines["ts"].to_numpy(dtype="datetime64[ms]").astype("datetime64[D]")
    last_day = np.datetime64(CLOSE_DAY, "D")
    lines = lines.assign(
        day=(last_day - day).astype(np.int64),  # days before the last day
        pq=lines["price"].fillna(0.0) * lines["quantity"],
        pn=np.where(lines["price"].notna(), lines["quantity"], 0.0),
    )
    first = lines.groupby("item_id")["day"].max()
    recent = lines[lines["day"] < WINDOW]
    daily = recent.groupby(["item_id", "day"], as_index=False)[["quantity", "pq", "pn"]].sum()
    keep_from = close_ms - (WINDOW - 1) * DAY_MS
    ttl_ms = 30 * DAY_MS  # the clones are RESTOREd without one
    updates = []
    for item, group in daily.groupby("item_id", sort=True):
        back = int(first[item])
        if back < WINDOW - 1:
            continue  # less than a window of history: the fallback would forecast it
        deltas = [
            BucketDelta(close_ms - int(d) * DAY_MS, f"s{d}", float(q), float(pq), float(pn))
            for d, q, pq, pn in sorted(
                group[["day", "quantity", "pq", "pn"]].itertuples(index=False, name=None),
                key=lambda r: -r[0],
            )
        ]
        first_ms = close_ms - back * DAY_MS
        # The first sale on its own (it sets the store's first-sale field), then the
        # window's days with the worker's trim bound (which drops that old bucket again).
        updates.append(
            ItemUpdate(
                str(item),
                [BucketDelta(first_ms, "first", 1.0, 0.0, 0.0)],
                first_ms,
                first_ms,
                ttl_ms,
            )
        )
        updates.append(ItemUpdate(str(item), deltas, keep_from, keep_from, ttl_ms))
    return updates


async def _write_sources(url: str, prefix: str, updates: Sequence[ItemUpdate]) -> None:
    store = RedisWindowStore.from_url(url, parse_freq("1D"), prefix)
    try:
        for step in (0, 1):  # first sales, then windows (see source_windows)
            await store.apply(updates[step::2], [])
    finally:
        await store.aclose()


def fill(
    url: str,
    prefix: str,
    updates: Sequence[ItemUpdate],
    n: int,
    topic: str,
    partitions: int,
    close_ms: int,
) -> list[str]:
    """Write ``n`` clones of the ``updates`` items' windows, the sellers and the clocks.

    Returns:
        The clone ids.
    """
    template = f"{prefix}-src"
    run(_write_sources(url, template, updates))
    updates = updates[1::2]  # one per item: the window
    client = redis.Redis.from_url(url)
    try:
        dumps: list[bytes] = []
        for u in updates:
            dump = client.dump(item_keys(template, u.item_id)[0])
            if not isinstance(dump, bytes):
                raise ScaleError(f"expected a window of {u.item_id} to DUMP, got {dump!r}")
            dumps.append(dump)
        last_sale = [max(d.bucket_ms for d in u.deltas) for u in updates]
        for u in updates:
            client.delete(*item_keys(template, u.item_id))
        ids: list[str] = []
        sellers: dict[int, dict[str, int]] = {p: {} for p in range(partitions)}
        for start in range(0, n, FILL_CHUNK):
            pipe = client.pipeline(transaction=False)
            for k in range(start, min(n, start + FILL_CHUNK)):
                s = k % len(updates)
                clone = f"C{k:07d}-{updates[s].item_id}"
                pipe.restore(item_keys(prefix, clone)[0], 0, dumps[s], replace=True)
                ids.append(clone)
                sellers[k % partitions][clone] = last_sale[s]
            pipe.execute()
        for p, members in sellers.items():
            key = partition_keys(prefix, PartitionId(topic, p))[1]
            chunk: dict[str, int] = {}
            for clone, score in members.items():
                chunk[clone] = score
                if len(chunk) >= FILL_CHUNK:
                    client.zadd(key, chunk)
                    chunk = {}
            if chunk:
                client.zadd(key, chunk)
    finally:
        client.close()

    async def clocks() -> None:
        store = RedisWindowStore.from_url(url, parse_freq("1D"), prefix)
        try:
            for p in range(partitions):
                state = PartitionState(max_event_ms=close_ms + DAY_MS // 2, emitted_to_ms=close_ms)
                await store.save_partition(PartitionId(topic, p), state)
        finally:
            await store.aclose()

    run(clocks())
    return ids


def run(coro: Any) -> Any:
    """Run ``coro`` on a fresh event loop."""
    return asyncio.run(coro)


# -- the close -------------------------------------------------------------------------------
def rss_mb(pid: int) -> float | None:
    """Resident memory of a process in MB (``VmRSS``), None if gone."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def _event(item: str, ts_ms: int, n: int) -> bytes:
    iso = np.datetime_as_string(np.datetime64(ts_ms, "ms"), unit="ms")
    return orjson.dumps({"event_id": f"sc{n}", "item_id": item, "ts": f"{iso}Z", "quantity": 1})


async def _close(
    settings: WorkerSettings,
    bootstrap: str,
    partitions: int,
    close_ms: int,
    n_items: int,
    pids: Sequence[int],
    timeout_s: float,
) -> tuple[float, int, int, list[float], list[float]]:
    """Show the workers own their partitions, then close the bucket and time its forecasts."""
    topic = settings.sales_topic
    tps = [TopicPartition(topic, p) for p in range(partitions)]
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=2)
    committer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, group_id=settings.consumer_group, enable_auto_commit=False
    )
    reader = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        group_id=None,
        auto_offset_reset="latest",
        fetch_max_wait_ms=20,
        max_partition_fetch_bytes=8 * 1024 * 1024,
        fetch_max_bytes=64 * 1024 * 1024,
    )
    await producer.start()
    await committer.start()
    await reader.start()
    try:
        fc_tps = [TopicPartition(settings.forecasts_topic, p) for p in range(partitions)]
        reader.assign(fc_tps)
        await reader.seek_to_end(*fc_tps)
        for fc_tp in fc_tps:
            await reader.position(fc_tp)
        deadline = time.perf_counter() + 120
        n = 0
        for attempt in range(3):  # a rebalance may eat the first round; send another
            futures = []
            for p in range(partitions):
                value = _event("WARM", close_ms + DAY_MS // 2 + attempt * 1000 + p, n)
                futures.append(await producer.send(topic, value, partition=p))
                n += 1
            metas = await asyncio.gather(*futures)
            ends = [m.offset + 1 for m in sorted(metas, key=lambda m: m.partition)]
            while time.perf_counter() < deadline:
                committed = [await committer.committed(t) or 0 for t in tps]
                if all(c >= e for c, e in zip(committed, ends, strict=True)):
                    break
                await asyncio.sleep(0.2)
            else:
                raise ScaleError(f"workers did not take their partitions: committed {committed}")
            await asyncio.sleep(1.0)
        idle = [rss_mb(pid) or 0.0 for pid in pids]
        peak = list(idle)
        as_of = (
            b'"as_of":"'
            + np.datetime_as_string(np.datetime64(close_ms + DAY_MS, "ms"), unit="s").encode()
            + b'Z"'
        )
        closing_ms = close_ms + DAY_MS + int(settings.allowed_lateness_s * 1000) + 1000
        t0 = time.perf_counter()
        futures = []
        for p in range(partitions):
            futures.append(
                # The watermark (newest event - allowed lateness) passes the bucket's end.
                await producer.send(topic, _event("WARM", closing_ms, n), partition=p)
            )
            n += 1
        await asyncio.gather(*futures)
        seen, fallbacks, last, next_rss = 0, 0, t0, t0
        while seen < n_items:
            now = time.perf_counter()
            if now - t0 > timeout_s:
                raise ScaleError(
                    f"{n_items - seen} of {n_items} forecasts missing after {timeout_s:.0f} s"
                )
            if now >= next_rss:
                peak = [max(a, rss_mb(pid) or 0.0) for a, pid in zip(peak, pids, strict=True)]
                next_rss = now + 0.2
            batch = await reader.getmany(timeout_ms=100, max_records=50_000)
            for records in batch.values():
                for record in records:
                    if record.key != b"WARM" and as_of in record.value:
                        seen += 1
                        fallbacks += b'"fallback":true' in record.value
                if records:
                    last = time.perf_counter()
        return last - t0, seen, fallbacks, idle, peak
    finally:
        await reader.stop()
        await committer.stop()
        await producer.stop()


def close_once(
    args: argparse.Namespace,
    tmp: Path,
    bundle: Path,
    updates: Sequence[ItemUpdate],
    n_items: int,
    n_workers: int,
) -> CloseResult:
    """A fresh broker and Redis; fill, start the workers, close, measure."""
    close_ms = int(np.datetime64(CLOSE_DAY, "ms").astype(np.int64))
    suffix = uuid.uuid4().hex[:8]
    topics = {
        "sales": f"sc-sales-{suffix}",
        "dlq": f"sc-dlq-{suffix}",
        "fc": f"sc-fc-{suffix}",
        "alerts": f"sc-alerts-{suffix}",
    }
    parts = args.partitions
    with TansuBroker(log_dir=tmp / f"tansu-{suffix}") as broker, RedisServer() as server:
        ensure_topics(
            broker.bootstrap,
            {topics["sales"]: parts, topics["dlq"]: 1, topics["fc"]: parts, topics["alerts"]: 1},
        )
        client = redis.Redis.from_url(server.url)
        before = int(client.info("memory")["used_memory"])
        started = time.perf_counter()
        prefix = f"sc{suffix}"
        fill(server.url, prefix, updates, n_items, topics["sales"], parts, close_ms)
        fill_s = time.perf_counter() - started
        after = int(client.info("memory")["used_memory"])
        client.close()
        logger.info("%d items in Redis in %.1f s: %d bytes", n_items, fill_s, after - before)
        settings = tp.worker_settings(
            broker.bootstrap,
            server.url,
            bundle,
            topics,
            group=f"sc-{suffix}",
            prefix=prefix,
            data_dir=tmp / f"w-{suffix}",
            partitions=parts,
        ).model_copy(update={"alerts_topic": topics["alerts"]})
        procs: list[subprocess.Popen[bytes]] = []
        logs = [tmp / f"sc-{suffix}-{i}.log" for i in range(n_workers)]
        try:
            for i, log_path in enumerate(logs):
                child = settings.model_copy(
                    update={"web_port": free_port(), "data_dir": tmp / f"w-{suffix}-{i}"}
                )
                with log_path.open("wb") as log:
                    procs.append(
                        subprocess.Popen(  # noqa: S603 - argv built here
                            [sys.executable, "-m", "stream"],
                            env=worker_env(child),
                            stdout=log,
                            stderr=subprocess.STDOUT,
                            cwd=str(REPO),
                        )
                    )
            close_s, seen, fallbacks, idle, peak = run(
                _close(
                    settings,
                    broker.bootstrap,
                    parts,
                    close_ms,
                    n_items,
                    [p.pid for p in procs],
                    args.timeout_s,
                )
            )
        except BaseException:
            for log_path in logs:
                logger.error("worker log tail (%s):\n%s", log_path.name, tp._tail(log_path))
            raise
        finally:
            codes = [tp._stop(p) for p in procs]
        if any(codes):
            raise ScaleError(f"a worker exited {codes}")
        timings = [_close_timings(log_path) for log_path in logs]
    return CloseResult(
        n_items, n_workers, close_s, seen, fallbacks, after - before, idle, peak, fill_s, timings
    )


def _close_timings(log_path: Path) -> str:
    """The worker's own timings of its largest batch (the close): read, forecast, send..."""
    best, text = -1, ""
    for line in log_path.read_text(errors="replace").splitlines():
        if "batch:" in line and "forecasts" in line and "seconds:" in line:
            forecasts = int(line.split(" forecasts")[0].rsplit(" ", 1)[-1])
            if forecasts > best:
                best, text = forecasts, line.split("seconds:", 1)[1].strip()
    return text


# -- report ----------------------------------------------------------------------------------
def report(results: Sequence[CloseResult], sources: int, bundle_note: str) -> list[str]:
    """The markdown tables."""
    lines = [
        f"## Scale: one daily close, items with full windows ({sources:,} real items cloned)",
        "",
        f"Model: {bundle_note}.",
        "",
        "| items | workers | close -> last forecast | forecasts/s | fallback | Redis used_memory "
        "(per item) | worker RSS idle -> peak (MB) | fill |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        rss = ", ".join(
            f"{a:,.0f} -> {b:,.0f}" for a, b in zip(r.rss_idle_mb, r.rss_peak_mb, strict=True)
        )
        lines.append(
            f"| {r.items:,} | {r.workers} | {r.close_s:.1f} s | {r.per_s:,.0f} | "
            f"{r.fallbacks:,} | {r.redis_bytes / 1e6:,.1f} MB ({r.redis_bytes / r.items:,.0f} B) | "
            f"{rss} | {r.fill_s:.0f} s |"
        )
    lines += ["", "| items | workers | each worker's timings of the close batch (its log) |"]
    lines.append("| ---: | ---: | --- |")
    for r in results:
        lines.append(f"| {r.items:,} | {r.workers} | {'; '.join(r.timings)} |")
    lines += [
        "",
        "| growth (this size over the one before) | items | close time | Redis | peak RSS |",
    ]
    lines.append("| --- | ---: | ---: | ---: | ---: |")
    for workers in sorted({r.workers for r in results}):
        rows = [r for r in results if r.workers == workers]
        for prev, cur in zip(rows, rows[1:], strict=False):
            lines.append(
                f"| {workers} worker(s), {prev.items:,} -> {cur.items:,} | "
                f"×{cur.items / prev.items:.0f} | ×{cur.close_s / prev.close_s:.1f} | "
                f"×{cur.redis_bytes / prev.redis_bytes:.1f} | "
                f"×{sum(cur.rss_peak_mb) / sum(prev.rss_peak_mb):.1f} |"
            )
    return lines


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Command-line flags."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument(
        "--sizes", default="10000,100000,1000000", help="items per close, comma-separated"
    )
    parser.add_argument("--workers", default="1,2", help="workers in the group, comma-separated")
    parser.add_argument("--partitions", type=int, default=8, help="partitions of the topics")
    parser.add_argument("--bundle", type=Path, default=None, help="bundle (default: trained)")
    parser.add_argument("--data", type=Path, default=tp.DATA, help="sales parquet")
    parser.add_argument("--timeout-s", type=float, default=900.0, help="per close")
    args = parser.parse_args(argv)
    args.sizes = [int(x) for x in args.sizes.split(",")]
    args.workers = [int(x) for x in args.workers.split(",")]
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run the closes; print the tables; 1 on any error."""
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S", stream=sys.stderr
    )
    for noisy in ("aiokafka", "trendcast.devtools.embedded"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        if args.bundle is not None:
            bundle, note = args.bundle, str(args.bundle)
        else:
            from bench._bundles import daily_bundle

            bundle, cached = daily_bundle(args.data)
            note = f"`trendcast train` on the shared data ({'cached' if cached else 'trained now'})"
        close_ms = int(np.datetime64(CLOSE_DAY, "ms").astype(np.int64))
        updates = source_windows(args.data, close_ms)
        logger.info("%d source items with full windows", len(updates) // 2)
        results = []
        with tempfile.TemporaryDirectory(prefix="trendcast-scale-") as tmp:
            for size in args.sizes:
                for workers in args.workers:
                    result = close_once(args, Path(tmp), bundle, updates, size, workers)
                    logger.info(
                        "%d items, %d workers: %.1f s (%.0f/s), %d fallback",
                        size,
                        workers,
                        result.close_s,
                        result.per_s,
                        result.fallbacks,
                    )
                    results.append(result)
    except (TrendcastError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    print("\n".join(report(results, len(updates) // 2, note)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
