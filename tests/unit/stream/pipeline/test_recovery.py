"""State lost in the store is rebuilt from the log (issue 19, part 1), on the in-memory store.

A small consumer replays a two-partition log in batches; the store "loses" state mid-run
(everything, like ``FLUSHALL``, or one partition's). The windows after the rebuild must equal
those of a run without loss, no forecast may come from a partly rebuilt window (the closes
are held, then sent), no dead letter is sent twice, the other partition keeps running.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from datetime import datetime
from typing import Any

import orjson
import pytest

from stream.monitoring.telemetry import METRICS_REGISTRY
from stream.pipeline.processor import RawMessage, SalesProcessor
from stream.pipeline.recovery import Rewind
from stream.state.base import PartitionId, PartitionState, StateLostError
from stream.state.memory import MemoryWindowStore
from trendcast import contract
from trendcast.client import parse_forecast
from trendcast.testkit.doubles import DAY, FREQ, MODEL, Feed, ListSink, processor, sale

P0, P1 = PartitionId("sales", 0), PartitionId("sales", 1)
BATCH = 4


def _log(days: int = 20) -> dict[int, list[RawMessage]]:
    """Per partition, a day of sales every half day; partition 0 sells a*, partition 1 b*."""
    feed = Feed()
    log: dict[int, list[RawMessage]] = {}
    for p, prefix in ((0, "a"), (1, "b")):
        values = [sale(f"{prefix}{n % 3}", n / 2, qty=1 + n % 4) for n in range(2 * days)]
        values.insert(7, b"not json")  # dead-lettered once, before any loss
        log[p] = feed(*values, partition=p)
    return log


def _rebuilds() -> float:
    return METRICS_REGISTRY.get_sample_value("trendcast_rebuilds_total") or 0.0


def _rebuilding() -> float:
    return METRICS_REGISTRY.get_sample_value("trendcast_rebuilding_partitions") or 0.0


async def _consume(
    proc: SalesProcessor,
    log: dict[int, list[RawMessage]],
    *,
    lose_at: int | None = None,
    lose: Callable[[], None] = lambda: None,
    start: dict[int, int] | None = None,
    sink: ListSink | None = None,
    trace: list[tuple[int, int]] | None = None,
    seek: Callable[[list[RawMessage], Rewind], int] | None = None,
) -> None:
    """Batches of every partition in turn, as the worker's consumer hands them over; the
    partitions the processor asks to read again are sought back to ``start`` (the log's),
    or where ``seek`` finds (the broker's answer to a rewind by time)."""
    start = start or {}
    pos = {p: start.get(p, 0) for p in log}
    n = 0
    while any(pos[p] < len(log[p]) for p in log):
        batch = {}
        for p, msgs in log.items():
            if pos[p] < len(msgs):
                batch[PartitionId("sales", p)] = msgs[pos[p] : pos[p] + BATCH]
                pos[p] += BATCH
        await proc.submit(batch)
        await proc.drain()
        n += 1
        if trace is not None and sink is not None:
            trace.append((n, len(sink.forecasts)))
        if n == lose_at:
            lose()
        for pid, where in proc.recovery.take_rewinds().items():
            log_start = start.get(pid.partition, 0)
            found = None if seek is None else seek(log[pid.partition], where)
            pos[pid.partition] = log_start if found is None else max(found, log_start)
            proc.recovery.rewound(pid, pos[pid.partition], log_start)
    await proc.drain()
    await proc.flush()


def _windows(store: MemoryWindowStore) -> dict[str, dict[int, float]]:
    items = [f"{x}{n}" for x in "ab" for n in range(3)]
    read = asyncio.run(store.read(items))
    return {i: {b: s.quantity for b, s in w.buckets.items()} for i, w in read.items()}


def _needed(windows: dict[str, dict[int, float]]) -> dict[str, dict[int, float]]:
    """The buckets forecasts still read: the model's window before the newest bucket, and
    the open ones. (Older buckets may outlive their use for a while: a rebuilt partition
    trims them sooner, having no stored clock to keep dedupe keys for.)"""
    newest = max(b for buckets in windows.values() for b in buckets)
    oldest = newest - (MODEL.window + 1) * FREQ.step_ms  # (lateness: one day)
    return {i: {b: q for b, q in w.items() if b >= oldest} for i, w in windows.items()}


def _records(sink: ListSink) -> dict[tuple[str, str], dict[str, Any]]:
    out = {}
    for key, record in sink.forecasts:
        out[(key, record["as_of"])] = {k: v for k, v in record.items() if k != "emitted_at_ms"}
    return out


def _control(log: dict[int, list[RawMessage]]) -> tuple[MemoryWindowStore, ListSink]:
    store, sink = MemoryWindowStore(FREQ), ListSink()
    asyncio.run(_consume(processor(store=store, sink=sink), log))
    return store, sink


def _lose_partition(store: MemoryWindowStore, pid: PartitionId, prefix: str) -> None:
    """Lose one partition's state (its clock, sellers and items), like an eviction."""
    store._clocks.pop(pid, None)
    store._sellers.pop(pid, None)
    for item in [i for i in store._items if i.startswith(prefix)]:
        del store._items[item]


def test_a_flushed_store_is_rebuilt_from_the_log_and_equals_a_run_without_loss() -> None:
    log = _log()
    control_store, control_sink = _control(log)
    store, sink = MemoryWindowStore(FREQ), ListSink()
    before = _rebuilds()
    asyncio.run(_consume(processor(store=store, sink=sink), log, lose_at=5, lose=store.flush))

    assert _rebuilds() == before + 2  # both partitions
    assert _rebuilding() == 0
    assert _windows(store) == _windows(control_store)
    # The same forecasts, with the same values: none from a partly rebuilt window.
    assert _records(sink) == _records(control_sink)
    # Dead letters: the invalid message of each partition once, never again in the replay.
    assert sorted(d["source"]["partition"] for d in sink.dead) == [0, 1]
    # The clocks are stored again, as far as the run went.
    for p in (P0, P1):
        state = asyncio.run(store.load_partition(p))
        assert state.next_offset == len(log[p.partition])


def test_closes_are_held_while_rebuilding_then_sent() -> None:
    log = _log()
    store, sink = MemoryWindowStore(FREQ), ListSink()
    proc = processor(store=store, sink=sink)
    held: list[int] = []

    def lose() -> None:
        _lose_partition(store, P0, "a")

    async def run() -> None:
        # Lose partition 0 after batch 8; record partition 0's forecasts batch by batch.
        pos, n = {0: 0, 1: 0}, 0
        while any(pos[p] < len(log[p]) for p in log):
            batch = {}
            for p, msgs in log.items():
                if pos[p] < len(msgs):
                    batch[PartitionId("sales", p)] = msgs[pos[p] : pos[p] + BATCH]
                    pos[p] += BATCH
            sent = len(sink.forecasts)
            await proc.submit(batch)
            await proc.drain()
            n += 1
            if proc.recovery.rebuilding:
                assert P1 not in proc.recovery.rebuilding
                new = sink.forecasts[sent:]
                # Partition 1 runs on; partition 0 sends nothing while it rebuilds.
                assert not [k for k, _ in new if k.startswith("a")]
                held.append(len([k for k, _ in new if k.startswith("b")]))
            if n == 8:
                lose()
            for pid in proc.recovery.take_rewinds():
                pos[pid.partition] = 0
                proc.recovery.rewound(pid, 0)
        await proc.drain()
        await proc.flush()

    asyncio.run(run())
    control_store, control_sink = _control(log)
    assert held and sum(held) > 0  # partition 1 forecast while partition 0 rebuilt
    assert _needed(_windows(store)) == _needed(_windows(control_store))
    # Every close of partition 0 was forecast in the end (the held ones too).
    assert set(_records(sink)) == set(_records(control_sink))


def test_a_new_worker_finds_the_state_behind_the_committed_offset_and_rebuilds() -> None:
    log = _log()
    store = MemoryWindowStore(FREQ)
    asyncio.run(_consume(processor(store=store), log))
    expected = _windows(store)
    committed = {p: len(msgs) for p, msgs in log.items()}
    store.flush()  # Redis restarted without persistence while no worker ran

    proc = processor(store=store, sink=ListSink())

    async def run() -> None:
        for pid in (P0, P1):
            assert await proc.recovery.check_assigned(pid, committed[pid.partition])
        assert set(proc.recovery.take_rewinds()) == {P0, P1}
        for pid in (P0, P1):
            proc.recovery.rewound(pid, 0)
        await _consume(proc, log)

    asyncio.run(run())
    assert not proc.recovery.rebuilding
    assert _needed(_windows(store)) == _needed(expected)


def test_a_first_start_and_an_intact_store_are_not_losses() -> None:
    store = MemoryWindowStore(FREQ)
    proc = processor(store=store)
    before = _rebuilds()

    async def run() -> None:
        assert not await proc.recovery.check_assigned(P0, None)  # nothing committed yet
        asyncio_log = _log(days=6)
        await _consume(proc, asyncio_log)
        again = processor(store=store)
        assert not await again.recovery.check_assigned(P0, len(asyncio_log[0]))

    asyncio.run(run())
    assert _rebuilds() == before


def test_a_stored_clock_older_than_the_committed_offset_is_a_loss() -> None:
    store = MemoryWindowStore(FREQ)
    asyncio.run(store.save_partition(P0, PartitionState(5, 4, 10)))
    proc = processor(store=store)
    assert asyncio.run(proc.recovery.check_assigned(P0, 12))
    assert proc.recovery.rebuilding[P0].reason == "older"
    assert proc.recovery.status()["sales[0]"]["to_offset"] == 12


def test_a_log_that_no_longer_reaches_back_is_rebuilt_with_what_it_holds(
    caplog: pytest.LogCaptureFixture,
) -> None:
    log = _log(days=30)
    store, sink = MemoryWindowStore(FREQ), ListSink()
    proc = processor(store=store, sink=sink)
    ends: list[dict[str, Any]] = []
    proc.recovery.on_change = lambda pid, detail: ends.append({"pid": pid, "detail": detail})
    # Retention deleted the first 40 messages of each partition (20 days): at the loss,
    # three batches in, the windows (7 days, lateness, grace) reach back before the log.
    start = {0: 40, 1: 40}
    asyncio.run(_consume(proc, log, lose_at=3, lose=store.flush, start=start))
    assert not proc.recovery.rebuilding
    assert any(e["detail"] is None for e in ends)  # ended
    ended = [r for r in caplog.records if "rebuilt from the log" in r.getMessage()]
    assert len(ended) == 2
    assert all(getattr(r, "partial_history", None) is True for r in ended)
    assert "retention" in ended[0].getMessage()
    # What the log still holds is counted once: the recent buckets equal a full run's.
    control_store, _ = _control(log)
    got, full = _windows(store), _windows(control_store)
    for item, buckets in full.items():
        recent = {b: q for b, q in buckets.items() if b >= max(buckets) - 3 * FREQ.step_ms}
        assert {b: got[item].get(b) for b in recent} == recent


class _FlushBeforeRead(MemoryWindowStore):
    """Loses everything once, between a round trip and the window read after it."""

    def __init__(self) -> None:
        super().__init__(FREQ)
        self.armed = False

    async def read(self, item_ids: Any) -> Any:
        if self.armed:
            self.armed = False
            self.flush()
        return await super().read(item_ids)


def test_a_loss_between_the_round_trip_and_the_window_read_skips_no_forecast() -> None:
    """The sellers listed by the round trip have no window: the batch fails with
    StateLostError and is staged again with the partition rebuilding, its close held."""
    log = _log()
    _, control_sink = _control(log)
    store, sink = _FlushBeforeRead(), ListSink()
    proc = processor(store=store, sink=sink)
    errors: list[str] = []

    async def run() -> None:
        pos, n = {0: 0, 1: 0}, 0
        while any(pos[p] < len(log[p]) for p in log):
            batch = {}
            for p, msgs in log.items():
                if pos[p] < len(msgs):
                    batch[PartitionId("sales", p)] = msgs[pos[p] : pos[p] + BATCH]
                    pos[p] += BATCH
            n += 1
            store.armed = n == 6
            while True:  # the worker's retry loop
                try:
                    await proc.submit(batch)
                    await proc.drain()
                    break
                except StateLostError as exc:
                    errors.append(str(exc))
            for pid in proc.recovery.take_rewinds():
                pos[pid.partition] = 0
                proc.recovery.rewound(pid, 0)
        await proc.drain()
        await proc.flush()

    asyncio.run(run())
    assert errors and "rebuilding" in errors[0]
    assert set(_records(sink)) == set(_records(control_sink))


# --- where the replay starts -----------------------------------------------------------------


def _by_time(msgs: list[RawMessage], where: Rewind) -> int | None:
    """ListOffsets by time, the record timestamps being the event times (a producer that
    stamps records when it sends the sale): the first offset stamped ``from_ms`` or later."""
    if where.from_ms is None:
        return None
    for msg in msgs:
        assert msg.value is not None
        if msg.value.startswith(b"{") and orjson.loads(msg.value)["ts"] >= where.from_ms:
            return msg.offset
    return None


def _starts(proc: SalesProcessor) -> list[dict[str, Any]]:
    """The ``/health`` details of the rebuilds, each time they change."""
    seen: list[dict[str, Any]] = []
    proc.recovery.on_change = lambda pid, detail: seen.append({"pid": pid, **(detail or {})})
    return seen


def test_a_lost_partition_is_read_again_from_its_oldest_kept_bucket_not_the_log_start() -> None:
    log = _log(days=30)
    control_store, control_sink = _control(log)
    store, sink = MemoryWindowStore(FREQ), ListSink()
    proc = processor(store=store, sink=sink)
    seen = _starts(proc)
    asyncio.run(_consume(proc, log, lose_at=12, lose=store.flush, sink=sink, seek=_by_time))
    starts = {d["pid"]: d["from_offset"] for d in seen if d.get("from_offset") is not None}
    # 48 messages read at the loss (day 23.5): the kept buckets and the margin reach back
    # to about day 7, so the replay skips the first dozen or more messages of each partition.
    assert set(starts) == {P0, P1}
    assert all(12 <= start <= 30 for start in starts.values()), starts
    assert not proc.recovery.rebuilding and not proc.recovery.partial
    assert _needed(_windows(store)) == _needed(_windows(control_store))
    assert _records(sink) == _records(control_sink)
    assert not any("partial_history" in r for _, r in sink.forecasts)


def test_a_broker_answering_a_start_too_late_makes_the_rebuild_read_the_whole_log(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A broker whose timestamps run ahead of the event times answers an offset past the
    events the windows need: the rebuild sees it in the first events it replays and reads
    again from the start of the log, and the windows are still those of a run without loss."""
    log = _log(days=30)
    control_store, control_sink = _control(log)
    store, sink = MemoryWindowStore(FREQ), ListSink()
    proc = processor(store=store, sink=sink)

    def too_late(msgs: list[RawMessage], where: Rewind) -> int | None:
        return None if where.from_ms is None else where.reached_offset - 6

    with caplog.at_level(logging.WARNING):
        asyncio.run(_consume(proc, log, lose_at=12, lose=store.flush, seek=too_late))
    again = [r for r in caplog.records if "reading again from the start" in r.getMessage()]
    assert len(again) == 2  # both partitions
    assert not proc.recovery.rebuilding and not proc.recovery.partial
    assert _needed(_windows(store)) == _needed(_windows(control_store))
    assert _records(sink) == _records(control_sink)


def test_a_lost_partition_without_a_known_time_is_read_from_the_log_start() -> None:
    store = MemoryWindowStore(FREQ)
    proc = processor(store=store)
    # A clock missing at assignment and no record timestamp: the start of the log.
    assert asyncio.run(proc.recovery.check_assigned(P1, 12))
    # A clock older than the committed offset: its newest event time, less the kept span.
    asyncio.run(store.save_partition(P0, PartitionState(max_event_ms=40 * DAY, next_offset=3)))
    assert asyncio.run(proc.recovery.check_assigned(P0, 12, newest_ms=99 * DAY))
    rewinds = proc.recovery.take_rewinds()
    assert rewinds[P1] == Rewind(None, 12)
    assert rewinds[P0] == Rewind(40 * DAY - proc.recovery.seek_back_ms, 12)
    # Kept buckets (window 7, lateness 1, grace 1, the open one) and twice the skew
    # (lateness, grace and a bucket: 3 days).
    assert proc.recovery.seek_back_ms == (10 + 2 * 3) * DAY


# --- forecasts from partial history ----------------------------------------------------------


def test_forecasts_from_partial_history_are_marked_until_the_window_slides_past() -> None:
    log = _log(days=30)
    store, sink = MemoryWindowStore(FREQ), ListSink()
    proc = processor(store=store, sink=sink)
    # Retention deleted the first 40 messages of each partition (about 20 days); the
    # store loses everything three batches later: the rebuild finds the log too short.
    start = {0: 40, 1: 40}
    before: list[int] = []

    def lose() -> None:
        before.append(len(sink.forecasts))
        store.flush()

    asyncio.run(_consume(proc, log, lose_at=3, lose=lose, start=start, seek=_by_time))
    after = sink.forecasts[before[0] :]  # made by the rebuilt partitions
    first = min(orjson.loads(m.value)["ts"] for m in log[0][40:44] if m.value != b"not json")
    first_bucket = FREQ.floor_ms(first)
    reach = (MODEL.window - 1) * FREQ.step_ms
    marked = [r for _, r in after if r.get("partial_history")]
    whole = [r for _, r in after if "partial_history" not in r]
    assert marked and whole
    for record in sink.forecasts:
        value = orjson.dumps(record[1])
        contract.validate("forecasts", value)
        assert parse_forecast(value).partial_history is ("partial_history" in record[1])
    for record in marked:
        assert record["partial_history"] is True
        last_start = _as_of_ms(record["as_of"]) - FREQ.step_ms
        assert last_start - reach <= first_bucket  # the window reaches before the log
    for record in whole:  # made after the window slid past the log's first event
        last_start = _as_of_ms(record["as_of"]) - FREQ.step_ms
        assert last_start - reach > first_bucket
    # The last marked bucket is followed by unmarked ones: the marking stopped by itself.
    assert max(map(_as_of, marked)) < max(map(_as_of, whole))
    # Forgotten once every kept bucket (the window plus lateness and grace) is newer.
    assert proc.recovery.partial == {P0: first_bucket, P1: first_bucket}
    later = {
        P0: [RawMessage("sales", 0, len(log[0]), b"k", sale("a0", 36))],
        P1: [RawMessage("sales", 1, len(log[1]), b"k", sale("b0", 36))],
    }

    async def more() -> None:
        await proc.submit(later)
        await proc.drain()

    asyncio.run(more())
    assert not proc.recovery.partial
    assert not any("partial_history" in r for _, r in sink.forecasts[-len(later) :])


def test_a_run_without_loss_marks_nothing() -> None:
    _, sink = _control(_log(days=30))
    assert sink.forecasts and not any("partial_history" in r for _, r in sink.forecasts)


def _as_of(record: dict[str, Any]) -> str:
    return str(record["as_of"])


def _as_of_ms(as_of: str) -> int:
    return int(datetime.fromisoformat(as_of.replace("Z", "+00:00")).timestamp() * 1000)
