"""Staging: carry a batch's plans out against the store, then forecast and deliver it.

Why apart from ingest and commits: this is where the order of I/O is decided, and the order
is what the guarantees rest on. A batch is *staged* (steps 1-3 of
:mod:`stream.pipeline.processor`: validated, stored in one round trip, its forecasts planned and
their windows read) and then *emitted* (step 4: forecast, delivered, and only then its clocks
handed to :class:`~stream.pipeline.commits.Commits` to be stored). The worker overlaps the
emitting of one batch with the staging of the next (:meth:`Staging.submit`); a batch whose
emitting fails is kept, with its requests and windows, and emitted again before anything
else, in batch order, so no clock is ever stored before the forecasts it counts were
delivered.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from bisect import bisect_left
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

from stream.inference.batching import ForecastRequest
from stream.inference.delivery import forecast_and_deliver
from stream.inference.model_info import ModelInfo
from stream.inference.observers import ScoredBatch
from stream.monitoring import tracing
from stream.monitoring.telemetry import ALERTS, BATCH_SECONDS, EVENTS, FORECASTS, WATERMARK
from stream.pipeline.commits import Commits
from stream.pipeline.edges import PROCESSOR_LOGGER, BatchStats, Record, Sink
from stream.pipeline.ingest import Ingest, Plan
from stream.pipeline.model_slot import ModelSlot
from stream.pipeline.realtime import OpenBuckets, open_bucket_record
from stream.state.base import (
    ApplyResult,
    ItemWindow,
    PartitionId,
    PartitionState,
    PartitionUpdate,
    WindowStore,
)
from trendcast.forecasting.base import Forecaster

__all__ = ["Staging"]

# The processor's logger, not this module's (see PROCESSOR_LOGGER): the batch summaries and
# re-send warnings keep the name operators filter on.
logger = logging.getLogger(PROCESSOR_LOGGER)

_DAY_MS = 86_400_000
#: Marks the requests of a batch made from partial history, given the partitions' recent
#: sellers and the model (:meth:`stream.pipeline.recovery.Recovery.mark`).
MarkPartial = Callable[
    [list[ForecastRequest], Mapping[PartitionId, Sequence[str]], ModelInfo],
    list[ForecastRequest],
]


@dataclass
class _Staged:
    """A batch whose state is stored and whose forecasts are planned (:meth:`Staging._stage`)."""

    batches: Mapping[PartitionId, Sequence[Record]]
    stats: BatchStats
    #: The clocks as the batch leaves them: stored once its forecasts are delivered.
    states: dict[PartitionId, PartitionState]
    requests: list[ForecastRequest]
    windows: dict[str, ItemWindow]
    #: The model of the whole batch (a swap takes effect from the next batch).
    forecaster: Forecaster
    model: ModelInfo
    shadow: tuple[Forecaster, ModelInfo] | None
    started: float = 0.0
    #: Per live partition, the items whose open bucket sold in this batch (surge checks).
    sold: dict[PartitionId, list[str]] = field(default_factory=dict)
    #: The batch's trace (a no-op while tracing is off), carried here because the batch is
    #: emitted in the background, or again from a later batch's task.
    trace: tracing.BatchTrace = tracing.NO_TRACE


class Staging:
    """Stages batches and emits their forecasts, one in the background, failed ones again first.

    Args:
        store: Window state.
        sink: Output topics.
        ingest: Turns a partition's messages into a plan.
        commits: The partitions' clocks; told what is delivered and what is stored.
        slot: The model each batch is planned and forecast with, and its observers.
        inference_batch_size: Windows per ``predict`` call.
        clock_ms: Wall clock.
        catchup: ``latest``: when a batch closes several buckets of a partition, each item
            is forecast only as of the newest; ``every``: as of each.
        realtime: The open buckets of live partitions (refresh forecasts, alerts); None:
            closes only, no alerts.
        hold: Keeps the plans whose forecasts may be made (``None``: all): a partition whose
            state is being rebuilt from the log has its closes held until the rebuild ends.
    """

    def __init__(
        self,
        store: WindowStore,
        sink: Sink,
        ingest: Ingest,
        commits: Commits,
        slot: ModelSlot,
        *,
        inference_batch_size: int,
        clock_ms: Callable[[], int],
        catchup: Literal["latest", "every"] = "latest",
        realtime: OpenBuckets | None = None,
        hold: Callable[[Sequence[Plan]], list[Plan]] | None = None,
        mark: MarkPartial | None = None,
    ) -> None:
        self.store = store
        # Drops the plans of partitions being rebuilt (stream.pipeline.recovery).
        self._hold = hold
        # Marks requests made from partial history (stream.pipeline.recovery).
        self._mark = mark
        self.catchup = catchup
        self.realtime = realtime
        self.sink = sink
        self._ingest = ingest
        self._commits = commits
        self._slot = slot
        self.inference_batch_size = inference_batch_size
        self.clock_ms = clock_ms
        # The batch forecasting in the background (submit), and batches whose forecasting
        # failed, in batch order: their forecasts are made and sent again before anything.
        self._tail: asyncio.Future[BatchStats] | None = None
        self._tail_staged: _Staged | None = None
        self._failed: list[_Staged] = []
        self._resending = asyncio.Lock()

    async def process(self, batches: Mapping[PartitionId, Sequence[Record]]) -> BatchStats:
        """Stage and emit one batch, returning once it is delivered.

        The contract: :meth:`SalesProcessor.process_partitions`.
        """
        await self.drain()
        staged = await self._staged(batches)
        try:
            stats = await self._emit(staged)
        except BaseException:
            self._failed.append(staged)
            raise
        await self._slot.observed()
        return stats

    async def submit(
        self,
        batches: Mapping[PartitionId, Sequence[Record]],
        *,
        advance_ms: int | None = None,
    ) -> BatchStats:
        """Stage one batch and emit it in the background.

        The contract, and why it is safe: :meth:`SalesProcessor.submit`. With
        ``advance_ms``, the partitions given no records are moved to that wall-clock time
        instead (:meth:`~stream.pipeline.ingest.Ingest.advance`).
        """
        again = next((f for f in self._failed if f.batches is batches), None)
        await self._resend()
        if again is not None:
            return again.stats  # staged before, its forecasts delivered just now
        staged = await self._staged(batches, advance_ms)
        try:
            await self._collect_tail()  # not the observers: they run on in the background
            await self._resend()
        except BaseException:
            self._failed.append(staged)  # after the failed one: delivered in batch order
            raise
        self._tail = asyncio.ensure_future(self._emit(staged))
        self._tail_staged = staged
        return staged.stats

    async def drain(self) -> None:
        """Deliver the forecasts of every batch before (:meth:`SalesProcessor.drain`)."""
        await self._collect_tail()
        await self._resend()
        await self._slot.observed()

    async def check_stalls(self, wall_ms: int) -> int:
        """Send ``stall`` alerts of live partitions whose check is due; how many were sent.

        Outside the batch order on purpose: it reads windows and sends alerts, but moves no
        clock and writes no state, so it may run between any two batches.
        """
        rt = self.realtime
        if rt is None:
            return 0
        model = self._slot.model
        profile = model.intraday()
        candidates = rt.stalls(model, profile, wall_ms)
        if not candidates:
            return 0
        items = sorted({i for group in candidates.values() for i in group})
        windows = await self.store.read(items)
        alerts = rt.confirm_stalls(candidates, windows, model, profile, wall_ms)
        if alerts:
            await self.sink.send_alerts([(a.item_id, a.value) for a in alerts])
            ALERTS.labels("stall").inc(len(alerts))
        return len(alerts)

    def release(self, partition: PartitionId) -> None:
        """Drop a revoked partition's clocks from the batches kept for sending again.

        Their requests stay (sent again, harmless duplicates if the next owner makes them
        too); the next owner plans from its own clocks.
        """
        for staged in self._failed:
            staged.states.pop(partition, None)

    async def _collect_tail(self) -> None:
        """Wait for the batch in the background; keep it, first in line, if it failed."""
        tail, staged = self._tail, self._tail_staged
        if tail is None or staged is None:
            return
        await asyncio.wait([tail])  # a cancelled caller leaves the tail running
        if self._tail is tail:  # else another caller collected it
            self._tail = self._tail_staged = None
            if tail.cancelled() or tail.exception() is not None:
                # Older than any batch kept so far: one is scheduled only when none is kept.
                self._failed.insert(0, staged)

    async def _resend(self) -> None:
        """Make and send again the forecasts of batches whose delivery failed, in order."""
        if not self._failed:
            return
        await self._collect_tail()  # kept while one ran (a cancelled submit): it goes first
        async with self._resending:  # the batch loop and the flush timer may both get here
            while self._failed:
                staged = self._failed[0]
                logger.warning(
                    "sending again the forecasts of a batch of %d events",
                    sum(len(m) for m in staged.batches.values()),
                )
                await self._emit(staged)
                self._failed.pop(0)

    async def _staged(
        self, batches: Mapping[PartitionId, Sequence[Record]], advance_ms: int | None = None
    ) -> _Staged:
        """:meth:`_stage`, with the model fixed for the batch and the clocks put back on failure.

        Why put back rather than reload: the cached clocks hold the claims of batches whose
        forecasts are still on their way (not stored yet), and a batch staged again after a
        failure must be judged exactly as the first time.
        """
        started = time.perf_counter()
        clocks = self._commits.clocks
        before = {pid: (clocks[pid], clocks[pid].state) for pid in batches if pid in clocks}
        self._slot.busy = True
        try:
            staged = await self._stage(batches, advance_ms)
        except BaseException:
            for pid in batches:
                clock = clocks.get(pid)
                if pid not in before:
                    clocks.pop(pid, None)  # loaded by this batch: load it again
                elif clock is before[pid][0]:  # (not forgotten meanwhile, e.g. reassigned)
                    clock.restore(before[pid][1])
            raise
        finally:
            self._slot.planned()
        staged.started = started
        return staged

    async def _stage(
        self, by_partition: Mapping[PartitionId, Sequence[Record]], advance_ms: int | None = None
    ) -> _Staged:
        """Steps 1-3 up to inference: validate, store, plan forecasts and read their windows.

        The cached clocks are advanced here (due buckets claimed, offsets marked), so the
        next batch plans after this one; the states to store are kept apart and stored only
        once :meth:`_emit` delivered the forecasts.
        """
        stats = BatchStats()
        now_ms = self.clock_ms()
        slot = self._slot
        forecaster, model, shadow = slot.forecaster, slot.model, slot.shadow
        trace = tracing.current_batch()

        started = time.perf_counter()
        # 1. Validate and classify; plan the store writes of each partition.
        dead: list[tuple[bytes | None, bytes]] = []
        plans: list[Plan] = []
        with trace.stage("validate"):
            for pid, msgs in by_partition.items():
                if msgs:
                    plan = await self._ingest.ingest(pid, msgs, now_ms, stats, dead)
                elif advance_ms is not None:
                    plan = await self._ingest.advance(pid, advance_ms)
                else:
                    continue
                if plan is not None:
                    plans.append(plan)
                    stats.closed_buckets[pid] = plan.due
        if dead:
            with trace.stage("produce", output="dead_letters", records=len(dead)):
                await self.sink.send_dead_letters(dead)

        # 2. One round trip: sums, dedupe, clocks, recent sellers.
        updates = [plan.partition for plan in plans]
        pending = self._commits.take_unsaved()
        updates += [PartitionUpdate(pid, state) for pid, state in pending.items()]
        stats.timings["ingest"] = time.perf_counter() - started
        started = time.perf_counter()
        try:
            with trace.stage("store", op="apply"):
                result = await self.store.apply([u for plan in plans for u in plan.items], updates)
        except BaseException:
            self._commits.keep_unsaved(pending)  # still delivered; store them later
            raise
        self._commits.stored(pending)
        stats.timings["apply"] = time.perf_counter() - started
        stats.duplicates = result.duplicates
        EVENTS.labels("valid").inc(stats.valid - result.duplicates - result.refused)
        EVENTS.labels("duplicate").inc(result.duplicates)

        # The open buckets of live partitions: what sold, and who is due for a refresh.
        rt = self.realtime
        sold = rt.observe(plans, result.changed, now_ms) if rt is not None else {}
        refresh = rt.refresh_due(sold, now_ms) if rt is not None and sold else []

        # 3. Who to forecast (closed buckets, items whose forecast buckets changed, open
        #    buckets due for a refresh) and their windows, read before any later batch
        #    writes.
        started = time.perf_counter()
        with trace.stage("store", op="read"):
            requests, windows = await self._forecast_requests(plans, result, stats, refresh)
        stats.timings["read"] = time.perf_counter() - started
        states: dict[PartitionId, PartitionState] = {}
        for plan in plans:
            watermark = plan.clock.watermark_ms
            if watermark is not None:
                WATERMARK.labels(plan.pid.topic, str(plan.pid.partition)).set(watermark)
            if plan.due:
                plan.clock.mark_emitted()  # claimed: the next batch plans the buckets after
            if plan.next_offset is not None:
                plan.clock.mark_processed(plan.next_offset)
            states[plan.pid] = plan.clock.state
        return _Staged(
            batches=by_partition,
            stats=stats,
            states=states,
            requests=requests,
            windows=windows,
            forecaster=forecaster,
            model=model,
            shadow=shadow,
            sold=sold,
            trace=trace,
        )

    async def _emit(self, staged: _Staged) -> BatchStats:
        """Step 4: forecast, deliver, and only then let the batch's clocks be stored."""
        stats, requests, windows = staged.stats, staged.requests, staged.windows
        scored: list[ScoredBatch] = []
        # The observers of the batch before are told in the background (see
        # ModelSlot._observe); at most one batch waits to be told, so they can never fall
        # behind by more.
        await self._slot.observed()
        if requests:
            started = time.perf_counter()
            daily = staged.model.freq.step_ms % _DAY_MS == 0
            # Inference, records and produce overlap (forecast_and_deliver): "forecast" times
            # the three together, up to the last record delivered.
            with staged.trace.stage("infer", windows=len(requests)):
                sent = await forecast_and_deliver(
                    staged.forecaster,
                    requests,
                    windows,
                    staged.model,
                    self.inference_batch_size,
                    self._send_forecasts(staged),
                    scored=scored,
                    open_bucket_record=functools.partial(open_bucket_record, daily=daily),
                )
            stats.timings["forecast"] = time.perf_counter() - started
            stats.forecasts = sent
            FORECASTS.labels("closed").inc(sent - stats.reforecasts - stats.refreshes)
            FORECASTS.labels("late").inc(stats.reforecasts)
            FORECASTS.labels("refresh").inc(stats.refreshes)
        rt = self.realtime
        if rt is not None:
            # Surges of this batch's sales, judged by the forecasts known now (this batch's
            # refreshes included), sent once the forecasts they refer to are delivered.
            wall_ms = self.clock_ms()
            rt.remember(scored, wall_ms)
            if staged.sold:
                alerts = rt.surges(staged.sold, staged.model, staged.model.intraday(), wall_ms)
                if alerts:
                    with staged.trace.stage("produce", output="alerts", records=len(alerts)):
                        await self.sink.send_alerts([(a.item_id, a.value) for a in alerts])
                    ALERTS.labels("surge").inc(len(alerts))
                    stats.alerts += len(alerts)
        # Once per batch, when its forecasts are delivered: a batch whose delivery failed is
        # timed when it is sent again, from its first staging (what it really took).
        BATCH_SECONDS.observe(time.perf_counter() - staged.started)
        # Only now, with the forecasts delivered: the states ride along with the next
        # batch's round trip (or flush(), at revoke, at stop and every second). A failure
        # before this line leaves the stored clocks where they were, so the forecasts are
        # made again (at-least-once), never skipped.
        self._commits.delivered(staged.states)
        staged.trace.finish(stats, staged.model.model_version)
        if scored or (requests and staged.shadow is not None):
            self._slot.tell(scored, staged.shadow, requests, windows)
        if stats.invalid or stats.late or stats.forecasts:
            logger.info(
                "batch: %d valid, %d invalid, %d late, %d duplicate, %d forecasts "
                "(%d re-forecasts, %d stale buckets skipped); seconds: %s",
                stats.valid,
                stats.invalid,
                stats.late,
                stats.duplicates,
                stats.forecasts,
                stats.reforecasts,
                stats.skipped_buckets,
                ", ".join(f"{k} {v:.3f}" for k, v in stats.timings.items()),
            )
        return stats

    def _send_forecasts(
        self, staged: _Staged
    ) -> Callable[[list[tuple[str, bytes]]], Awaitable[None]]:
        """Delivers a batch's forecast records, each send traced as a produce stage."""

        async def send(records: list[tuple[str, bytes]]) -> None:
            with staged.trace.stage("produce", output="forecasts", records=len(records)):
                await self.sink.send_forecasts(records)

        return send

    async def _forecast_requests(
        self,
        plans: Sequence[Plan],
        result: ApplyResult,
        stats: BatchStats,
        refresh: Sequence[str] = (),
    ) -> tuple[list[ForecastRequest], dict[str, ItemWindow]]:
        """Who to forecast as of which bucket, and the windows of every candidate.

        Every item with a sale in the window of a newly closed bucket, for that bucket; and
        every item whose already-forecast buckets changed (in-grace late events), as of the
        last closed bucket, unless that forecast is being made anyway. The candidates'
        windows are read in one round trip and reused for inference.
        """
        if self._hold is not None:
            plans = self._hold(plans)  # no forecast from a partly rebuilt window
        model = self._slot.model
        step, window = model.freq.step_ms, model.window
        regrace: dict[PartitionId, list[str]] = {}
        for plan in plans:
            before = plan.emitted_before
            if before is None:
                continue  # nothing was forecast before this batch
            own = {u.item_id for u in plan.items} & result.changed.keys()
            regrace[plan.pid] = sorted(i for i in own if any(b < before for b in result.changed[i]))
        candidates = {item for plan in plans for item in result.active.get(plan.pid, [])}
        candidates.update(item for items in regrace.values() for item in items)
        candidates.update(refresh)
        windows = await self.store.read(sorted(candidates)) if candidates else {}
        sold = {item: sorted(w.buckets) for item, w in windows.items()}
        requests: list[ForecastRequest] = []
        for plan in plans:
            planned: set[tuple[str, int]] = set()
            # Catching up (several buckets closed at once) with ``latest``: only the newest,
            # for every item a close of any of them would have forecast.
            latest = self.catchup == "latest" and len(plan.due) > 1
            for bucket in plan.due[-1:] if latest else plan.due:
                lo = (plan.due[0] if latest else bucket) - (window - 1) * step
                for item in result.active.get(plan.pid, []):
                    buckets = sold[item]
                    i = bisect_left(buckets, lo)
                    if i < len(buckets) and buckets[i] <= bucket:  # a sale in [lo, bucket]
                        requests.append(ForecastRequest(item, bucket))
                        planned.add((item, bucket))
            if latest:
                stats.skipped_buckets += len(plan.due) - 1
            if self.realtime is not None and plan.due:
                self.realtime.watch(plan.pid, result.active.get(plan.pid, []))
            open_from = plan.clock.open_from_ms
            if open_from is None:
                continue
            last_closed = open_from - step
            for item in regrace.get(plan.pid, []):
                if (item, last_closed) not in planned:
                    requests.append(ForecastRequest(item, last_closed, "late"))
                    stats.reforecasts += 1
        if refresh and self.realtime is not None:
            made = {(r.item_id, r.last_start_ms) for r in requests}
            for request in self.realtime.refresh_requests(
                refresh, windows, model, model.intraday()
            ):
                # A close of the same bucket in this batch says it all already.
                if (request.item_id, request.last_start_ms) not in made:
                    requests.append(request)
                    stats.refreshes += 1
        if self._mark is not None:
            requests = self._mark(requests, result.active, model)
        return requests, windows
