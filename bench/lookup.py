"""Lookup bench: ``GET /forecasts/{item_id}`` and ``GET /forecasts?items=...`` on a real worker.

Run::

    python bench/lookup.py [--items 2000,20000] [--concurrency 32] [--requests 20000]
                           [--seconds 30] [--batch 50,500]

For each size in ``--items``: a fresh topic on a local Tansu broker gets four days of sales
of that many items; one worker (``python -m stream``, the TF-free fake bundle of window 56
and horizon 28, so records are full-size (their mean size is printed); the lookup token set, as in
production) consumes them, closes the first three days and keeps every item's latest
forecast in Redis. Once every item answers, a client on loopback (aiohttp, at most
``--concurrency`` requests in flight, keep-alive) sends:

* single lookups of random items, one at a time (a tenth of ``--requests``), then with
  ``--concurrency`` in flight (``--requests``, or ``--seconds`` at most);
* batch lookups of ``--batch`` random items each (a tenth as many requests);
* single lookups of items with no forecast (the 404 path).

Every response is checked (status, and for a sample the body against ``trendcast.contract``).
Printed: a markdown table of lookups/s (items/s for batches), requests/s and latency
p50/p99/max per row. The worker is idle meanwhile (its stream is done), and the client and
the worker share this machine's two cores: the figures are of the whole loop, not of the
server alone.

The exit code is 1 on any error (a service that does not start, a worker that never keeps
the forecasts, a response that is not the expected one).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `python bench/lookup.py` puts bench/, not the repo, first
    sys.path.insert(0, str(REPO))

import aiohttp  # noqa: E402
import orjson  # noqa: E402
import redis  # noqa: E402

from stream.settings.worker import WorkerSettings  # noqa: E402
from trendcast import contract  # noqa: E402
from trendcast.devtools.embedded import (  # noqa: E402
    RedisServer,
    TansuBroker,
    ensure_topics,
    free_port,
    resolve_redis,
)
from trendcast.devtools.up import worker_env  # noqa: E402
from trendcast.exceptions import TrendcastError  # noqa: E402
from trendcast.testkit.bundles import make_fake_bundle  # noqa: E402
from trendcast.testkit.kafka import produce  # noqa: E402

__all__ = ["Row", "main"]

logger = logging.getLogger(__name__)

DAY_MS = 86_400_000
#: 2023-11-13, a Monday: event times of the bench start here.
START_MS = 1_699_833_600_000
TOKEN = "bench-lookup-token"  # noqa: S105  (a bench token)
#: Bodies checked against the forecasts schema per row (validation costs more than a lookup).
VALIDATED = 50


class BenchError(TrendcastError):
    """A measurement could not be taken (timeout, wrong answer, failed process)."""


@dataclass(frozen=True)
class Row:
    """One measured kind of request."""

    items: int
    what: str
    per_request: int
    requests: int
    seconds: float
    latencies_s: list[float]
    body_bytes: float = 0.0

    @property
    def lookups_per_s(self) -> float:
        return self.requests * self.per_request / self.seconds

    def pct_ms(self, q: float) -> float:
        ordered = sorted(self.latencies_s)
        return 1000 * ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--items", default="2000,20000", help="item counts, comma-separated")
    p.add_argument("--concurrency", type=int, default=32, help="requests in flight at most")
    p.add_argument("--requests", type=int, default=20_000, help="single lookups per size")
    p.add_argument("--seconds", type=float, default=30.0, help="longest phase, seconds")
    p.add_argument("--batch", default="50,500", help="items per batch lookup, comma-separated")
    return p.parse_args(argv)


def sales(items: Sequence[str]) -> list[tuple[str, bytes]]:
    """Four days of sales of every item: the fourth closes the first three."""
    return [
        (item, orjson.dumps({"item_id": item, "ts": START_MS + d * DAY_MS + n % 3_600_000,
                             "quantity": 1 + (n + d) % 5, "event_id": f"{item}-{d}"}))
        for d in range(4)
        for n, item in enumerate(items)
    ]  # fmt: skip


async def _get(
    session: aiohttp.ClientSession, url: str, expect: int, latencies: list[float]
) -> bytes:
    started = time.perf_counter()
    async with session.get(url) as resp:
        body = await resp.read()
    latencies.append(time.perf_counter() - started)
    if resp.status != expect:
        raise BenchError(f"expected {expect} from {url}, got {resp.status}: {body[:200]!r}")
    return body


async def _phase(
    session: aiohttp.ClientSession,
    urls: Sequence[str],
    expect: int,
    concurrency: int,
    seconds: float,
) -> tuple[int, float, list[float], list[bytes]]:
    """GET ``urls`` with at most ``concurrency`` in flight, for ``seconds`` at most."""
    latencies: list[float] = []
    bodies: list[bytes] = []
    queue = iter(urls)
    started = time.perf_counter()
    deadline = started + seconds

    async def client() -> None:
        for url in queue:
            if time.perf_counter() > deadline:
                return
            body = await _get(session, url, expect, latencies)
            if len(bodies) < VALIDATED:
                bodies.append(body)

    await asyncio.gather(*(client() for _ in range(concurrency)))
    return len(latencies), time.perf_counter() - started, latencies, bodies


async def _measure(
    base: str, items: Sequence[str], args: argparse.Namespace, batches: Sequence[int]
) -> list[Row]:
    rng = random.Random(7)
    headers = {"Authorization": f"Bearer {TOKEN}"}
    connector = aiohttp.TCPConnector(limit=args.concurrency)
    rows: list[Row] = []
    async with aiohttp.ClientSession(base, headers=headers, connector=connector) as session:
        # Wait until every item answers (the worker keeps a batch's records once delivered).
        deadline = time.monotonic() + 300
        while True:
            missing = 0
            try:
                for start in range(0, len(items), 500):
                    chunk = ",".join(quote(i, safe="") for i in items[start : start + 500])
                    body = await _get(session, f"/forecasts?items={chunk}", 200, [])
                    missing += sum(v is None for v in orjson.loads(body).values())
            except aiohttp.ClientConnectorError:
                missing = len(items)  # the web server is not up yet
            if not missing:
                break
            if time.monotonic() > deadline:
                raise BenchError(f"{missing} of {len(items)} items still have no forecast")
            await asyncio.sleep(1.0)
        await _phase(session, [f"/forecasts/{quote(items[0], safe='')}"] * 500, 200, 8, 5)  # warm

        n = args.requests
        # One request at a time: the latency of a lookup on an otherwise idle loop.
        urls = [f"/forecasts/{quote(rng.choice(items), safe='')}" for _ in range(n // 10)]
        done, took, lat, _ = await _phase(session, urls, 200, 1, args.seconds)
        rows.append(Row(len(items), "single item, found, 1 in flight", 1, done, took, lat))

        urls = [f"/forecasts/{quote(rng.choice(items), safe='')}" for _ in range(n)]
        done, took, lat, bodies = await _phase(session, urls, 200, args.concurrency, args.seconds)
        for body in bodies:
            contract.validate("forecasts", body)
        mean_bytes = statistics.fmean(len(b) for b in bodies)
        rows.append(Row(len(items), "single item, found", 1, done, took, lat, mean_bytes))

        for size in batches:
            urls = [
                "/forecasts?items=" + ",".join(quote(i, safe="") for i in rng.sample(items, size))
                for _ in range(max(50, n // 10 if size <= 50 else n // 100))
            ]
            done, took, lat, bodies = await _phase(
                session, urls, 200, args.concurrency, args.seconds
            )
            for body in bodies[:5]:
                for record in orjson.loads(body).values():
                    contract.validate("forecasts", orjson.dumps(record))
            rows.append(Row(len(items), f"batch of {size}", size, done, took, lat))

        urls = [f"/forecasts/unknown-{k}" for k in range(n // 4)]
        done, took, lat, _ = await _phase(session, urls, 404, args.concurrency, args.seconds)
        rows.append(Row(len(items), "single item, unknown (404)", 1, done, took, lat))
    return rows


def _stop(proc: subprocess.Popen[bytes], timeout_s: float = 20.0) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def run_size(
    n_items: int, args: argparse.Namespace, tmp: Path, bootstrap: str, redis_url: str
) -> list[Row]:
    """One worker over ``n_items`` items' sales, then the lookups."""
    suffix = uuid.uuid4().hex[:8]
    topics = {"sales": f"lk-s-{suffix}", "dlq": f"lk-d-{suffix}", "fc": f"lk-f-{suffix}"}
    ensure_topics(bootstrap, dict.fromkeys(topics.values(), 4))
    settings = WorkerSettings(
        kafka_brokers=f"kafka://{bootstrap}",
        redis_url=redis_url,
        bundle=make_fake_bundle(tmp / f"bundle-{suffix}", window=56, horizon=28),
        bundle_poll_s=0,
        sales_topic=topics["sales"],
        dlq_topic=topics["dlq"],
        forecasts_topic=topics["fc"],
        consumer_group=f"lookup-{suffix}",
        state_prefix=f"lookup-{suffix}",
        web_port=free_port(),
        web_bind="127.0.0.1",
        data_dir=tmp / f"faust-{suffix}",
        topic_partitions=4,
        fetch_max_wait_ms=50,  # Tansu holds a fetch for the full wait
        publish_interval_s=0,
    )
    items = [f"{10000 + k}{chr(65 + k % 26)}" for k in range(n_items)]
    produce(bootstrap, settings.sales_topic, sales(items))
    log_path = tmp / f"worker-{suffix}.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(  # noqa: S603 - argv built here
            [sys.executable, "-m", "stream"],
            env=worker_env(settings, {"web_token": TOKEN}),  # the token itself, not masked
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=str(REPO),
        )
        try:
            base = f"http://127.0.0.1:{settings.web_port}"
            return asyncio.run(_measure(base, items, args, _ints(args.batch)))
        except BenchError:
            tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-20:])
            logger.error("worker log tail:\n%s", tail)
            raise
        except aiohttp.ClientError as exc:
            raise BenchError(f"the worker's web server failed: {exc}") from exc
        finally:
            _stop(proc)
            client = redis.Redis.from_url(redis_url)
            keys = list(client.scan_iter(match=f"*{settings.state_prefix}*", count=1000))
            for start in range(0, len(keys), 1000):
                client.delete(*keys[start : start + 1000])
            client.close()


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


@contextlib.contextmanager
def services(tmp: Path) -> Iterator[tuple[str, str]]:
    """A Tansu broker and a Redis URL (the local server, or one started here)."""
    with TansuBroker(log_dir=tmp / "tansu") as broker:
        redis_url, redis_server = resolve_redis(None)
        try:
            yield broker.bootstrap, redis_url
        finally:
            if isinstance(redis_server, RedisServer):
                redis_server.stop()


def report(rows: Sequence[Row], args: argparse.Namespace) -> list[str]:
    sizes = [r.body_bytes for r in rows if r.body_bytes]
    mean_size = statistics.fmean(sizes) if sizes else 0.0
    lines = [
        f"Lookups on loopback, {args.concurrency} requests in flight unless said, token on, "
        f"records of horizon 28 ({mean_size:,.0f} bytes on average):",
        "",
        "| items kept | request | requests | lookups/s | requests/s | p50 ms | p99 ms | max ms |",
        "|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r.items:,} | {r.what} | {r.requests:,} | {r.lookups_per_s:,.0f} | "
            f"{r.requests / r.seconds:,.0f} | {statistics.median(r.latencies_s) * 1000:.1f} | "
            f"{r.pct_ms(0.99):.1f} | {max(r.latencies_s) * 1000:.1f} |"
        )
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    """Run the bench; print the table; 1 on any error."""
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S", stream=sys.stderr
    )
    for noisy in ("aiokafka", "trendcast.devtools.embedded"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    rows: list[Row] = []
    try:
        with tempfile.TemporaryDirectory(prefix="trendcast-lookup-") as tmp_dir:
            tmp = Path(tmp_dir)
            with services(tmp) as (bootstrap, redis_url):
                for n_items in _ints(args.items):
                    logger.info("size %d: producing, forecasting, looking up", n_items)
                    rows += run_size(n_items, args, tmp, bootstrap, redis_url)
    except (TrendcastError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    print("\n".join(report(rows, args)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
