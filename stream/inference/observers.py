"""What the worker tells observers after each forecast batch: :class:`ScoredBatch`.

Observers (online accuracy in :mod:`stream.monitoring.online_accuracy`, trends in
:mod:`stream.monitoring.trends`) see
every ``predict`` call's inputs and outputs together, so they need no state reads of their
own: a later window of an item carries the actuals of buckets forecast earlier. The worker
calls :meth:`ForecastObserver.on_forecasts` on its event loop, once per micro-batch of
thousands of rows, in batch order, just after the batch's forecasts are delivered (off the
delivery path, while the next batch awaits Redis; ``stream.pipeline.model_slot``), so an
observer must be cheap (numpy over the batch, no I/O, no awaiting) and must not raise for
ordinary data; it publishes what it learned when the worker asks
(``drain_records``/``snapshot``), not per batch.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Protocol, runtime_checkable

from stream.inference.model_info import ModelInfo
from trendcast.forecasting.base import ForecastBatch, WindowBatch

__all__ = ["ForecastObserver", "Role", "ScoredBatch", "notify"]

logger = logging.getLogger(__name__)

#: ``live`` forecasts are published; ``shadow`` ones come from a candidate model scored on
#: the same windows but not published.
Role = Literal["live", "shadow"]


@dataclass(frozen=True, slots=True)
class ScoredBatch:
    """One ``Forecaster.predict`` call: the model, its role, the windows and the forecasts.

    Attributes:
        model: The model that forecast (freq, window, horizon, version).
        role: ``live`` or ``shadow``.
        batch: The input windows (raw bucket sums, oldest first; the last column is the
            bucket starting ``batch.last_start_ms[row]``).
        result: The forecasts; step ``h`` (1-based) is for the bucket starting
            ``last_start_ms + h * model.freq.step_ms``.
    """

    model: ModelInfo
    role: Role
    batch: WindowBatch
    result: ForecastBatch


@runtime_checkable
class ForecastObserver(Protocol):
    """Anything told about every forecast batch (on the worker's event loop, in order)."""

    def on_forecasts(self, scored: ScoredBatch) -> None:
        """Take note of one batch; must be cheap and must not keep references to its arrays."""
        ...


def notify(observers: Sequence[ForecastObserver], scored: ScoredBatch) -> None:
    """Show ``scored`` to every observer; one that fails is logged, never raised."""
    for observer in observers:
        try:
            observer.on_forecasts(scored)
        except Exception:  # scoring is a side show: it must not stop forecasts
            logger.exception("forecast observer %r failed", observer)
