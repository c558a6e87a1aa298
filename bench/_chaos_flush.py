"""The chaos bench's ``flush`` disruption: Redis loses every key mid-stream (issue 19, part 1).

Kept apart from ``bench/chaos.py`` (owned elsewhere) until it is wired in there; see
:func:`flush_state`. The bench's Redis is its own ``redis-server`` and scenarios run one after
the other, so a real ``FLUSHALL`` hits nothing but the scenario's workers.

What it checks, with the bench's usual checks afterwards: the workers keep running (no exit,
``/health`` 200 again), every partition commits again (time to recover), and in the end every
item's window equals the offline aggregation although Redis lost everything halfway: the
workers rebuilt their partitions from the ``sales`` log.
"""

from __future__ import annotations

import logging
import time
import urllib.request
from typing import Any

import redis

__all__ = ["flush_state"]

logger = logging.getLogger(__name__)


def flush_state(scenario: Any) -> None:
    """``FLUSHALL`` the scenario's Redis once its workers serve; note what was lost.

    ``scenario`` is ``bench.chaos._Scenario`` (typed loosely: this module must not import
    the bench's script). To wire it in ``bench/chaos.py``::

        SCENARIOS = ("crash", "scale", "outage", "hostile", "flush")
        # _Scenario._actions:
        if self.name == "flush":
            return [(self.rng.uniform(0.3, 0.6), lambda: flush_state(self))]
        # and in "combined", e.g. (0.55, lambda: flush_state(self))

    The README table row then reads like the others (events, mismatching items, lost,
    double-counted, forecasts missing, time to recover).
    """
    pool, monitor, result = scenario.pool, scenario._monitor, scenario.result
    workers = pool.alive
    deadline = time.monotonic() + 60
    while not all(pool.ready(n) and pool.health(n) == 200 for n in workers):
        if time.monotonic() > deadline:
            result.problems.append("workers not serving /health before the flush")
            break
        time.sleep(0.25)
    # Partitions that had committed something had state to lose (the others start fresh).
    partitions = sum(1 for offset in monitor.latest().values() if offset)
    client = redis.Redis.from_url(scenario.redis.url)
    try:
        keys = int(client.dbsize())
        client.flushall()
    finally:
        client.close()
    flushed_at = time.monotonic()
    scenario.disruptions.append(flushed_at)
    progress = monitor.progress()
    # The workers find out with their next round trip (an idle partition within a few
    # seconds) and must stay healthy: a rebuild is not a failure. Wait until every
    # partition was rebuilt, so that the end of the stream cannot come first.
    deadline = flushed_at + 120
    unhealthy: set[str] = set()
    rebuilt_after: float | None = None
    while time.monotonic() < deadline:
        statuses = {n: pool.health(n) for n in workers}
        unhealthy.update(n for n, code in statuses.items() if code not in (200, None))
        rebuilds, rebuilding = _rebuild_metrics(pool, workers)
        if rebuilds >= partitions and rebuilding == 0:
            rebuilt_after = time.monotonic() - flushed_at
            break
        time.sleep(0.25)
    else:
        result.problems.append(f"not every partition rebuilt 120s after the flush ({rebuilds})")
    result.notes.append(
        f"FLUSHALL of {keys} keys at {progress:.0%}; every partition rebuilt "
        f"{rebuilt_after if rebuilt_after is not None else float('nan'):.1f}s later; "
        f"/health non-200 on {len(unhealthy)}/{len(workers)} workers meanwhile"
    )
    logger.info("flush: %d keys deleted at %.0f%%", keys, 100 * progress)


def _rebuild_metrics(pool: Any, workers: list[str]) -> tuple[float, float]:
    """Sums over ``workers`` of ``trendcast_rebuilds_total`` and of
    ``trendcast_rebuilding_partitions`` (from ``/metrics``; a worker not answering adds 0)."""
    rebuilds = rebuilding = 0.0
    for name in workers:
        url = f"http://127.0.0.1:{pool.web_port(name)}/metrics"
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:  # noqa: S310 - local URL
                text = resp.read().decode()
        except (OSError, ValueError):
            continue
        for line in text.splitlines():
            if line.startswith("trendcast_rebuilds_total "):
                rebuilds += float(line.split()[1])
            elif line.startswith("trendcast_rebuilding_partitions "):
                rebuilding += float(line.split()[1])
    return rebuilds, rebuilding
