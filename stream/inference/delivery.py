"""Forecasting a batch's requests: micro-batches predicted one ahead, records sent as made.

Why apart from :mod:`stream.inference.batching` (requests, stacked windows, record bytes):
this is the loop that runs them, and where inference, record building and produce overlap at
a close of many items (:func:`forecast_and_deliver`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping, Sequence
from contextlib import aclosing

from stream.inference.batching import (
    ForecastRequest,
    OpenBucketRecord,
    RowExtra,
    build_batch,
    check_forecast,
    forecast_records,
)
from stream.inference.model_info import ModelInfo
from stream.inference.observers import ForecastObserver, Role, ScoredBatch, notify
from stream.state.base import ItemWindow
from trendcast.exceptions import ForecastError
from trendcast.forecasting.base import ForecastBatch, Forecaster, WindowBatch

__all__ = ["DELIVER_EVERY", "Deliver", "forecast", "forecast_and_deliver"]

logger = logging.getLogger(__name__)

#: Sends a list of forecast records and returns once they are delivered (the sink's
#: ``send_forecasts``).
Deliver = Callable[[list[tuple[str, bytes]]], Awaitable[None]]
#: Records handed to :data:`Deliver` at a time while a big batch is still being forecast.
DELIVER_EVERY = 16_384


async def _predicted(
    forecaster: Forecaster,
    requests: Sequence[ForecastRequest],
    windows: Mapping[str, ItemWindow],
    model: ModelInfo,
    batch_size: int,
) -> AsyncGenerator[tuple[Sequence[ForecastRequest], WindowBatch, ForecastBatch], None]:
    """Each micro-batch with its forecast, in order, the next one predicted meanwhile.

    ``predict`` runs in a thread (ONNX Runtime releases the GIL), so a large batch does not
    stall the event loop (the Kafka consumer's heartbeats and fetches keep going) and the
    next micro-batch computes while the caller turns this one into records and sends them:
    at a close of 10^5-10^6 items the record and produce work on the event loop then overlaps
    inference on the other core instead of following it.

    Raises:
        ForecastError: The forecaster failed or returned wrongly shaped arrays.
    """

    def launch(
        start: int,
    ) -> tuple[Sequence[ForecastRequest], WindowBatch, asyncio.Future[ForecastBatch]]:
        chunk = requests[start : start + batch_size]
        batch = build_batch(chunk, windows, model)
        return chunk, batch, asyncio.ensure_future(asyncio.to_thread(forecaster.predict, batch))

    starts = iter(range(0, len(requests), batch_size))
    first = next(starts, None)
    ahead = launch(first) if first is not None else None
    try:
        while ahead is not None:
            chunk, batch, future = ahead
            ahead = None
            try:
                result = await future
            except ForecastError:
                raise
            except Exception as exc:  # a model bug must surface as ours, with the cause kept
                raise ForecastError(
                    f"{forecaster.name} failed on {len(chunk)} windows: {exc}"
                ) from exc
            check_forecast(result, len(chunk), model.horizon)
            start = next(starts, None)
            if start is not None:
                ahead = launch(start)
            yield chunk, batch, result
    finally:
        if ahead is not None:  # the caller stopped early: nobody will read this one
            ahead[2].cancel()


async def forecast(
    forecaster: Forecaster,
    requests: Sequence[ForecastRequest],
    windows: Mapping[str, ItemWindow],
    model: ModelInfo,
    batch_size: int,
    *,
    observers: Sequence[ForecastObserver] = (),
    role: Role = "live",
    emit: bool = True,
    scored: list[ScoredBatch] | None = None,
    open_bucket_record: OpenBucketRecord | None = None,
) -> list[tuple[str, bytes]]:
    """Forecast every request, ``batch_size`` windows per ``predict`` call.

    Every result is shown to ``observers`` (online accuracy, trends) on the event loop; an
    observer that fails is logged and never fails the forecast.

    Args:
        forecaster: The model.
        requests: Who to forecast as of which bucket.
        windows: The stored windows of the requested items.
        model: Window, horizon, freq and version of ``forecaster``.
        batch_size: Windows per ``predict`` call.
        observers: Shown every scored micro-batch.
        role: ``live`` (emitted) or ``shadow`` (scored only).
        emit: Build forecast records (False for a shadow model: nothing is returned).
        scored: Where to append every scored micro-batch, for observers told later
            (:func:`notify`), off the path that delivers the forecasts.
        open_bucket_record: Makes the ``open_bucket`` object of ``refresh`` requests.

    Raises:
        ForecastError: The forecaster failed or returned wrongly shaped arrays.
    """
    records: list[tuple[str, bytes]] = []
    async with aclosing(_predicted(forecaster, requests, windows, model, batch_size)) as chunks:
        async for chunk, batch, result in chunks:
            if observers or scored is not None:
                one = ScoredBatch(model, role, batch, result)
                if scored is not None:
                    scored.append(one)
                notify(observers, one)
            if emit:
                extras = _extras(chunk, result, open_bucket_record)
                records += forecast_records(batch, result, model, int(time.time() * 1000), extras)
    return records


async def forecast_and_deliver(
    forecaster: Forecaster,
    requests: Sequence[ForecastRequest],
    windows: Mapping[str, ItemWindow],
    model: ModelInfo,
    batch_size: int,
    deliver: Deliver,
    *,
    scored: list[ScoredBatch] | None = None,
    open_bucket_record: OpenBucketRecord | None = None,
    deliver_every: int = DELIVER_EVERY,
) -> int:
    """Forecast every request and deliver the records, sending while forecasting goes on.

    A close of many items used to forecast all of them, then send all of them: for a
    million items about 55 s of inference followed by 24 s of produce on the event loop
    (``bench/scale.py``). Here records go to ``deliver`` every ``deliver_every`` records, in
    order, from one sender task, while the next micro-batches are predicted; the call returns
    once every record is delivered, so what the caller does next (storing the clocks) still
    follows delivery. A batch smaller than ``deliver_every`` is sent once, at the end, as
    before. Order is kept (one sender, chunks in forecast order), so an item's forecasts of
    several buckets (``TRENDCAST_CATCHUP=every``) reach its partition oldest first.

    Returns:
        Records delivered.

    Raises:
        ForecastError: The forecaster failed or returned wrongly shaped arrays.
        Exception: Whatever ``deliver`` raised (the records before it may have been sent:
            the batch is sent again whole, at least once).
    """
    queue: asyncio.Queue[list[tuple[str, bytes]] | None] = asyncio.Queue()

    async def sender() -> None:
        while (records := await queue.get()) is not None:
            await deliver(records)

    task: asyncio.Task[None] | None = None
    pending: list[tuple[str, bytes]] = []
    sent = 0
    try:
        async with aclosing(_predicted(forecaster, requests, windows, model, batch_size)) as chunks:
            async for chunk, batch, result in chunks:
                if scored is not None:
                    scored.append(ScoredBatch(model, "live", batch, result))
                extras = _extras(chunk, result, open_bucket_record)
                pending += forecast_records(batch, result, model, int(time.time() * 1000), extras)
                if len(pending) >= deliver_every:
                    if task is None:
                        task = asyncio.create_task(sender())
                    elif task.done():
                        task.result()  # the sender failed: raise its error now
                    queue.put_nowait(pending)
                    sent += len(pending)
                    pending = []
        sent += len(pending)
        if task is None:
            if pending:
                await deliver(pending)
            return sent
        if pending:
            queue.put_nowait(pending)
        queue.put_nowait(None)
        await task
        return sent
    finally:
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(BaseException):
                await task


def _extras(
    chunk: Sequence[ForecastRequest],
    result: ForecastBatch,
    open_bucket_record: OpenBucketRecord | None,
) -> list[RowExtra] | None:
    """Each row's kind, open bucket and mark; None when every row is a plain, unmarked close
    (the usual)."""
    if all(r.kind == "close" and not r.partial_history for r in chunk):
        return None
    out: list[RowExtra] = []
    for row, request in enumerate(chunk):
        bucket = request.open_bucket
        if bucket is None or open_bucket_record is None:
            out.append((request.kind, None, request.partial_history))
            continue
        step = (result.mean[row, 0], result.p10[row, 0], result.p50[row, 0], result.p90[row, 0])
        record = open_bucket_record(bucket, *map(float, step))
        out.append((request.kind, record, request.partial_history))
    return out
