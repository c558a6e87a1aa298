"""A/B of the worker: two checkouts read the same topic in turns, in one run.

Why: this machine's rates swing by a third from run to run, and by more between days, so a
change worth 5% cannot be seen by comparing two runs of ``bench/throughput.py``. Here both
workers read the same pre-filled topic (as in the throughput bench: real items and
quantities, event times spread over 14 days) on the same broker and Redis, alternating
A, B, B, A, A, B... so that drift hits both alike, and the medians are compared::

    git worktree add /tmp/base main
    python bench/ab_worker.py /tmp/base . --events 200000 --runs 6

Each checkout runs its own ``python -m stream`` (from its directory, with this
interpreter), each read with a fresh consumer group and key prefix. Printed per read:
events/s in the steady state (the worker's own counter) and the cores its process kept busy;
then the medians and B/A.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import uuid
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import throughput as tp  # noqa: E402
from trendcast.devtools.embedded import ensure_topics  # noqa: E402
from trendcast.exceptions import TrendcastError  # noqa: E402


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Command-line flags."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("a", type=Path, help="checkout A (the baseline)")
    parser.add_argument("b", type=Path, help="checkout B")
    parser.add_argument("--events", type=int, default=200_000, help="events in the topic")
    parser.add_argument("--runs", type=int, default=6, help="reads of each checkout")
    parser.add_argument("--data", type=Path, default=tp.DATA, help="sales parquet")
    args = parser.parse_args(argv)
    for repo in (args.a, args.b):
        if not (repo / "stream" / "__main__.py").is_file():
            parser.error(f"expected a trendcast checkout, got {repo}")
    if args.runs < 1 or args.events < 1000:
        parser.error("expected --runs >= 1 and --events >= 1000")
    return args


def order(runs: int) -> list[str]:
    """Who reads when: A B, B A, A B... (ABBA), so a drift favours neither.

    >>> order(3)
    ['a', 'b', 'b', 'a', 'a', 'b']
    """
    return [x for r in range(runs) for x in (("a", "b") if r % 2 == 0 else ("b", "a"))]


def ab(args: argparse.Namespace, tmp: Path) -> dict[str, list[tp.WorkerResult]]:
    """Fill a topic, then let A and B read it in turns."""
    from trendcast.testkit.bundles import make_fake_bundle

    events, _ = tp.build_events(args.data, args.events, 14)
    repos = {"a": args.a.resolve(), "b": args.b.resolve()}
    results: dict[str, list[tp.WorkerResult]] = {"a": [], "b": []}
    with tp.services(tmp) as (broker, redis_url):
        suffix = uuid.uuid4().hex[:8]
        topics = {"sales": f"ab-{suffix}", "dlq": f"ab-dlq-{suffix}", "fc": f"ab-fc-{suffix}"}
        ensure_topics(broker.bootstrap, {topics["sales"]: 4, topics["dlq"]: 1, topics["fc"]: 4})
        ends = tp.run(tp._produce(broker.bootstrap, topics["sales"], events))
        events.clear()
        bundle = make_fake_bundle(tmp / "bundle", window=tp.WINDOW_DAYS, horizon=28)
        for i, who in enumerate(order(args.runs)):
            tp.REPO = repos[who]  # group_run starts `python -m stream` there
            settings = tp.worker_settings(
                broker.bootstrap,
                redis_url,
                bundle,
                topics,
                group=f"ab-{who}{i}-{suffix}",
                prefix=f"ab-{who}{i}-{suffix}",
                data_dir=tmp / f"w{i}",
                partitions=4,
            )
            try:
                result = tp.group_run(settings, broker.bootstrap, ends, tmp, 600, 1)
            finally:
                tp.clear_prefix(redis_url, settings.state_prefix)
            results[who].append(result)
            cores = "n/a" if result.worker_cores is None else f"{result.worker_cores:.2f}"
            print(
                f"{who.upper()} {result.by_metric.events_per_s:>10,.0f} events/s, "
                f"worker {cores} cores",
                flush=True,
            )
    return results


def main(argv: Sequence[str] | None = None) -> int:
    """Run the A/B; print the medians; 1 on any error."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s")
    try:
        with tempfile.TemporaryDirectory(prefix="trendcast-ab-") as tmp:
            results = ab(args, Path(tmp))
    except TrendcastError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    medians = {}
    for who, reads in results.items():
        rates = [r.by_metric.events_per_s for r in reads]
        cores = [r.worker_cores for r in reads if r.worker_cores is not None]
        medians[who] = statistics.median(rates)
        print(
            f"{who.upper()} ({getattr(args, who)}): median {medians[who]:,.0f} events/s "
            f"({', '.join(f'{x:,.0f}' for x in rates)}); worker cores "
            f"{statistics.median(cores) if cores else float('nan'):.2f}"
        )
    print(f"B/A {medians['b'] / medians['a']:.3f} (medians of {args.runs} reads each)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
