"""The worker's health in one small object: which components are failing, since when, why.

A worker whose Redis is down keeps running: it retries the same batch with backoff and
commits no offset past it (see :mod:`stream.worker.app`), so nothing is lost and it resumes by
itself. From outside, though, such a worker must not look healthy: an orchestrator or an
operator should see that forecasts have stopped and why. Everything that knows about a
failure reports it here, and everything that shows health (the ``/health`` page, the
``trendcast_healthy`` gauge, log lines) reads it from here, so a later ``/ready`` endpoint
or a different web server needs no change in the code that detects failures.

Components are free-form names; the worker uses :data:`PROCESSING` (the batch loop: Redis,
broker or model errors while processing) and :data:`STATE_STORE` (a periodic Redis ping, so
an idle worker also notices an outage, and notices the end of one before the next batch).

>>> h = Health(clock=lambda: 10.0)
>>> h.failing("processing", "Redis unavailable"); h.healthy
False
>>> h.recovered("processing"); h.healthy
True
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from prometheus_client import Gauge

__all__ = ["PROCESSING", "STATE_STORE", "Failure", "Health"]

logger = logging.getLogger(__name__)

#: Component name of the batch loop (Redis, broker or model errors while processing a batch).
PROCESSING = "processing"
#: Component name of the periodic state-store probe.
STATE_STORE = "state_store"

HEALTHY = Gauge("trendcast_healthy", "1 while no component of the worker is failing, else 0")
COMPONENT_HEALTHY = Gauge(
    "trendcast_component_healthy", "1 while the component is not failing, else 0", ["component"]
)


@dataclass(frozen=True, slots=True)
class Failure:
    """One failing component.

    Attributes:
        reason: The latest error, one line.
        since: Clock reading when the component started failing (kept across repeats).
        attempts: Failures reported since then (retries of the same batch count each).
    """

    reason: str
    since: float
    attempts: int


class Health:
    """Failing components of one worker; healthy when there are none.

    Reporting is idempotent and cheap (a dict update), so the batch loop may report every
    retry. Transitions — and only transitions — are logged, so an outage of a minute writes
    two lines, not one per retry.

    Args:
        clock: Monotonic seconds (injectable for tests).
    """

    def __init__(self, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._failures: dict[str, Failure] = {}
        self._notices: dict[str, tuple[float, dict[str, Any]]] = {}
        HEALTHY.set(1)

    @property
    def healthy(self) -> bool:
        """True while no component is failing."""
        return not self._failures

    @property
    def failures(self) -> dict[str, Failure]:
        """A copy of the failing components."""
        return dict(self._failures)

    def failing(self, component: str, reason: str) -> None:
        """Record that ``component`` failed (again) with ``reason``."""
        reason = " ".join(reason.split())[:500]  # one line, bounded: it ends up in JSON
        previous = self._failures.get(component)
        if previous is None:
            logger.warning("unhealthy: %s failing (%s)", component, reason)
            self._failures[component] = Failure(reason, self._clock(), 1)
        else:
            self._failures[component] = Failure(reason, previous.since, previous.attempts + 1)
        COMPONENT_HEALTHY.labels(component).set(0)
        HEALTHY.set(0)

    def recovered(self, component: str) -> None:
        """Record that ``component`` works (a no-op when it was not failing)."""
        previous = self._failures.pop(component, None)
        COMPONENT_HEALTHY.labels(component).set(1)
        if previous is None:
            return
        logger.warning(
            "%s recovered after %.1fs and %d failed attempts%s",
            component,
            self._clock() - previous.since,
            previous.attempts,
            "; healthy again" if not self._failures else "",
        )
        if not self._failures:
            HEALTHY.set(1)

    def notice(self, component: str, detail: dict[str, Any] | None) -> None:
        """Show ``component`` in :meth:`snapshot` with ``detail`` (None: no longer).

        For work that is not a failure but that an operator should see while it lasts, e.g.
        a partition whose lost state is rebuilt from the log: the worker is healthy and
        keeps serving its other partitions, so it neither fails ``/health`` (an
        orchestrator would restart it mid-rebuild) nor stays flagged once it is done.

        >>> h = Health(clock=iter([1.0, 2.0, 4.0]).__next__)
        >>> h.notice("rebuilding sales[0]", {"to_offset": 9})
        >>> h.snapshot()["notices"]
        {'rebuilding sales[0]': {'to_offset': 9, 'for_s': 1.0}}
        >>> h.notice("rebuilding sales[0]", None); h.snapshot()
        {'healthy': True, 'failing': {}}
        """
        if detail is None:
            self._notices.pop(component, None)
            return
        known = self._notices.get(component)
        self._notices[component] = (self._clock() if known is None else known[0], dict(detail))

    def snapshot(self) -> dict[str, Any]:
        """JSON-ready state, e.g. for ``/health``.

        >>> h = Health(clock=iter([1.0, 3.5]).__next__)
        >>> h.failing("state_store", "connection refused")
        >>> h.snapshot()
        {'healthy': False, 'failing': {'state_store': {'reason': 'connection refused', \
'for_s': 2.5, 'attempts': 1}}}
        """
        now = self._clock() if self._failures or self._notices else 0.0
        out: dict[str, Any] = {
            "healthy": self.healthy,
            "failing": {
                name: {
                    "reason": f.reason,
                    "for_s": round(now - f.since, 3),
                    "attempts": f.attempts,
                }
                for name, f in sorted(self._failures.items())
            },
        }
        if self._notices:
            out["notices"] = {
                name: {**detail, "for_s": round(now - since, 3)}
                for name, (since, detail) in sorted(self._notices.items())
            }
        return out
