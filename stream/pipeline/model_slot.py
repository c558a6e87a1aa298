"""The model the processor serves, the shadow scored beside it, and who is told of forecasts.

Why apart from the batch logic: the model can change while the worker runs (hot reload, a
shadow candidate set or dropped by a timer), and the rules for that are their own: a model
is taken only if the stored windows can feed it (their layout is fixed by the first model),
and a swap asked for while a batch is being planned waits for the planning to end, so one
batch never mixes two models. The observers (online accuracy, trends) and the shadow model
are told about a batch only once its forecasts are delivered, in the background, one batch
at a time; that is kept here too, since it is the same "who looks at the forecasts" concern.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping, Sequence

from stream.inference.batching import ForecastRequest
from stream.inference.delivery import forecast
from stream.inference.model_info import ModelInfo
from stream.inference.observers import ForecastObserver, ScoredBatch, notify
from stream.monitoring.telemetry import SHADOW_FAILURES
from stream.pipeline.edges import PROCESSOR_LOGGER
from stream.state.base import ItemWindow
from trendcast.exceptions import BundleError
from trendcast.forecasting.base import Forecaster

__all__ = ["ModelSlot"]

# The processor's logger, not this module's (see PROCESSOR_LOGGER).
logger = logging.getLogger(PROCESSOR_LOGGER)


class ModelSlot:
    """The live model (swappable between batches), the shadow model and the observers.

    Args:
        forecaster: Turns windows into forecasts.
        model: Window, horizon, freq and version of the model; its window and prices fix
            the layout of the stored windows for the life of the slot.
        observers: Shown every forecast micro-batch, once the batch's forecasts are
            delivered.
        inference_batch_size: Windows per ``predict`` call of the shadow model.
    """

    def __init__(
        self,
        forecaster: Forecaster,
        model: ModelInfo,
        *,
        observers: Sequence[ForecastObserver],
        inference_batch_size: int,
    ) -> None:
        self.forecaster = forecaster
        self.model = model
        self.inference_batch_size = inference_batch_size
        # What the stored windows hold, fixed for the life of the processor: a swapped-in
        # model with a smaller window must not trim history a rollback would need again.
        self.state_window = model.window
        self.state_uses_prices = model.uses_prices
        #: A batch is being planned (see :meth:`swap`, :meth:`planned`).
        self.busy = False
        self._pending: tuple[Forecaster, ModelInfo] | None = None
        self.observers = list(observers)
        self.shadow: tuple[Forecaster, ModelInfo] | None = None
        # Observers being told about the last delivered batch (_observe).
        self._observing: asyncio.Future[None] | None = None

    def swap(self, forecaster: Forecaster, model: ModelInfo) -> None:
        """Serve ``model`` from the next batch on (:meth:`SalesProcessor.swap_model`).

        Raises:
            BundleError: The window state cannot feed ``model``.
        """
        self.check_feedable(model)
        if self.busy:
            self._pending = (forecaster, model)
        else:
            self._pending = None
            self.forecaster, self.model = forecaster, model

    def planned(self) -> None:
        """The batch being planned is done with the model: a swap asked for meanwhile is served."""
        self.busy = False
        if self._pending is not None:  # swapped while this batch ran: serve it from now
            (self.forecaster, self.model), self._pending = self._pending, None

    def check_feedable(self, model: ModelInfo) -> None:
        """Refuse a model the stored windows cannot feed.

        Raises:
            BundleError: Another freq, a window longer than the kept one, or prices the
                state does not keep.
        """
        if model.freq != self.model.freq:
            raise BundleError(
                f"model {model.model_version}: expected freq {self.model.freq.name} "
                f"(the stored windows'), got {model.freq.name}"
            )
        if model.window > self.state_window:
            raise BundleError(
                f"model {model.model_version}: expected a window of at most "
                f"{self.state_window} buckets (what the stored windows keep), got {model.window}"
            )
        if model.uses_prices and not self.state_uses_prices:
            raise BundleError(
                f"model {model.model_version}: expected a model without a price feature "
                "(the stored windows keep no prices), got one with prices"
            )

    def set_shadow(self, forecaster: Forecaster | None, model: ModelInfo | None = None) -> None:
        """Score ``forecaster`` beside the live model (:meth:`SalesProcessor.set_shadow`).

        Raises:
            BundleError: The window state cannot feed ``model``.
        """
        if forecaster is None or model is None:
            self.shadow = None
            return
        self.check_feedable(model)
        self.shadow = (forecaster, model)

    def tell(
        self,
        scored: Sequence[ScoredBatch],
        shadow: tuple[Forecaster, ModelInfo] | None,
        requests: Sequence[ForecastRequest],
        windows: Mapping[str, ItemWindow],
    ) -> None:
        """Start telling the observers about a delivered batch, in the background (_observe)."""
        self._observing = asyncio.ensure_future(self._observe(scored, shadow, requests, windows))

    async def _observe(
        self,
        scored: Sequence[ScoredBatch],
        shadow: tuple[Forecaster, ModelInfo] | None,
        requests: Sequence[ForecastRequest],
        windows: Mapping[str, ItemWindow],
    ) -> None:
        """Tell the observers about a delivered batch, then score the shadow model on it.

        Why in the background: online accuracy and trends cost a tenth of the worker's
        time (``bench/ab_worker.py`` with them switched off), and none of it needs to hold
        up delivering forecasts or storing clocks; run after delivery, it fills the time
        the next batch awaits Redis. Batches are told in order (one is told before the next
        batch forecasts, :meth:`observed`), exactly what they would have been told inline.
        """
        for one in scored:
            notify(self.observers, one)
        await self._score_shadow(shadow, requests, windows)

    async def observed(self) -> None:
        """Wait until the observers have been told about every delivered batch."""
        observing = self._observing
        if observing is not None:
            await asyncio.wait([observing])
            if self._observing is observing:
                self._observing = None
                if not observing.cancelled() and observing.exception() is not None:
                    logger.warning("telling the observers failed: %s", observing.exception())

    async def _score_shadow(
        self,
        shadow: tuple[Forecaster, ModelInfo] | None,
        requests: Sequence[ForecastRequest],
        windows: Mapping[str, ItemWindow],
    ) -> None:
        if shadow is None:
            return
        forecaster, model = shadow
        try:
            await forecast(
                forecaster,
                requests,
                windows,
                model,
                self.inference_batch_size,
                observers=self.observers,
                role="shadow",
                emit=False,
            )
        except Exception as exc:  # a broken candidate must never hold up live forecasts
            SHADOW_FAILURES.inc()
            logger.warning("shadow model %s failed: %s", model.model_version, exc)
