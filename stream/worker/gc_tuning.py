"""Garbage collector settings for a long-running worker.

Why: CPython's cyclic garbage collector runs its youngest generation every 700 container
allocations and, every so often, walks everything older too. A batch of thousands of events
allocates hundreds of thousands of short-lived containers (records, parsed events, deltas,
Redis arguments and replies) and nearly none of them are in cycles: reference counting frees
them. Measured with the processor alone (real Redis, ``bench/throughput.py`` shows the worker),
collections took about a third of the worker's CPU while finding almost nothing. Two
standard remedies fix it:

* ``gc.freeze()`` after startup moves what startup built (modules, the Faust app, the
  model) to a permanent generation that no collection walks again;
* a higher threshold for the youngest generation (``TRENDCAST_GC_THRESHOLD``, default
  50,000) collects cycles in fewer, larger steps. Cyclic garbage still gets collected,
  only a little later; memory stays bounded.

What freezing costs: a frozen object that later becomes garbage inside a reference cycle is
never collected. The one startup object meant to go away is the model, when a new bundle is
swapped in; it holds no cycle, so reference counting frees it
(``tests/unit/stream/worker/test_gc_tuning.py`` checks this).
"""

from __future__ import annotations

import gc
import logging

__all__ = ["tune_gc"]

logger = logging.getLogger(__name__)


def tune_gc(threshold: int) -> None:
    """Freeze what exists now and collect the youngest generation every ``threshold``
    allocations (0: leave Python's settings alone)."""
    if threshold <= 0:
        return
    gc.collect()
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(threshold, older, oldest)
    logger.info("gc: froze %d startup objects; threshold %d", gc.get_freeze_count(), threshold)
