"""Online accuracy: hand-computed metrics, exactly-once scoring, replacement, bounds, roles."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import orjson
import pytest

from stream.inference.model_info import ModelInfo
from stream.inference.observers import ForecastObserver, Role, ScoredBatch
from stream.monitoring.online_accuracy import AccuracyTracker, window_scales
from stream.monitoring.telemetry import METRICS_REGISTRY
from trendcast.forecasting.base import ForecastBatch, WindowBatch
from trendcast.freq import parse_freq
from trendcast.metrics import coverage, naive_scales, rmsse_by_step, wape

DAY = 86_400_000
FREQ = parse_freq("1D")

# (item, origin day, window quantities, history_len, mean, p10, p50, p90)
Row = tuple[Any, ...]


def model(version: str = "v1", window: int = 4, horizon: int = 2) -> ModelInfo:
    return ModelInfo(freq=FREQ, window=window, horizon=horizon, model_version=version)


def scored(rows: Sequence[Row], info: ModelInfo, role: Role = "live") -> ScoredBatch:
    def f32(i: int) -> np.ndarray:
        return np.array([r[i] for r in rows], dtype=np.float32)

    batch = WindowBatch(
        item_ids=[r[0] for r in rows],
        quantities=f32(2),
        prices=None,
        last_start_ms=np.array([r[1] * DAY for r in rows], dtype=np.int64),
        history_len=np.array([r[3] for r in rows], dtype=np.int64),
    )
    result = ForecastBatch(
        mean=f32(4), p10=f32(5), p50=f32(6), p90=f32(7), fallback=np.zeros(len(rows), bool)
    )
    return ScoredBatch(model=info, role=role, batch=batch, result=result)


def feed(
    tracker: AccuracyTracker, rows: Sequence[Row], info: ModelInfo, role: Role = "live"
) -> None:
    tracker.on_forecasts(scored(rows, info, role))


FLAT = ([0.0, 0.0], [0.0, 0.0], [0.0, 0.0], [0.0, 0.0])


def test_is_a_forecast_observer() -> None:
    assert isinstance(AccuracyTracker(), ForecastObserver)


def test_window_scales_ignore_padding() -> None:
    got = window_scales([[0, 0, 1, 3], [0, 5, 5, 5]], [2, 3])
    assert got.tolist() == [4.0, 0.0]


def test_hand_computed_metrics_per_step_and_overall() -> None:
    info = model("hand-1")
    tracker = AccuracyTracker()
    # Origin day 3, window [0,1,3,2] with 3 real buckets: scale ((3-1)^2 + (2-3)^2) / 2 = 2.5.
    feed(tracker, [("A", 3, [0, 1, 3, 2], 3, [2, 2], [1, 1], [2, 3], [3, 3])], info)
    assert tracker.accuracy("live", "hand-1") is None  # nothing has come true yet
    # Day 4 sells 4: step 1 of origin 3 -> |4-2|/sqrt(2.5), |4-2| / 4, 4 outside [1, 3].
    feed(tracker, [("A", 4, [1, 3, 2, 4], 4, *FLAT)], info)
    acc = tracker.accuracy("live", "hand-1")
    assert acc is not None
    assert acc.n == 1
    assert acc.rmsse == pytest.approx(2 / math.sqrt(2.5))
    assert acc.wape == pytest.approx(0.5)
    assert acc.coverage == 0.0
    # Day 5 sells 1: step 2 of origin 3 (p50 3: |1-3| = 2, inside [1, 3]) and step 1 of
    # origin 4 (all zero forecast; scale of [1,3,2,4] = (4+1+4)/3 = 3).
    feed(tracker, [("A", 5, [3, 2, 4, 1], 4, *FLAT)], info)
    acc = tracker.accuracy("live", "hand-1")
    assert acc is not None
    assert acc.n == 3
    step1, step2 = acc.by_step
    assert step1.n == 2 and step2.n == 1
    assert step1.rmsse == pytest.approx((2 / math.sqrt(2.5) + 1 / math.sqrt(3)) / 2)
    assert step1.wape == pytest.approx((2 + 1) / (4 + 1))
    assert step1.coverage == 0.0  # 1 is above origin 4's [0, 0]
    assert step2.rmsse == pytest.approx(1 / math.sqrt(2.5))
    assert step2.wape == pytest.approx(2.0)
    assert step2.coverage == 1.0
    assert acc.rmsse == pytest.approx((2 / math.sqrt(2.5) + 1 / math.sqrt(2.5) + 1 / 3**0.5) / 3)
    assert acc.wape == pytest.approx((2 + 2 + 1) / (4 + 1 + 1))
    assert acc.coverage == pytest.approx(1 / 3)
    assert (acc.target_from_ms, acc.target_to_ms) == (4 * DAY, 5 * DAY)


def test_matches_offline_metrics_on_a_random_stream() -> None:
    """Every step of every origin scored online equals trendcast.metrics on the same rows."""
    rng = np.random.default_rng(7)
    n_items, window, horizon, days = 30, 6, 3, 20
    series = rng.poisson(3.0, size=(n_items, days)).astype(np.float64)
    series[:5, :] = 2.0  # constant items: unscaled, still in WAPE and coverage
    fc = rng.gamma(2.0, 1.5, size=(days, n_items, horizon, 3))
    fc.sort(axis=-1)
    info = model("random-1", window=window, horizon=horizon)
    tracker = AccuracyTracker(rolling_buckets=1000)
    ids = [f"i{k}" for k in range(n_items)]
    first = 2  # early windows are left-padded
    for day in range(first, days):
        lo = max(0, day - window + 1)
        q = np.zeros((n_items, window))
        q[:, window - (day + 1 - lo) :] = series[:, lo : day + 1]
        hist = np.full(n_items, day + 1 - lo)
        rows = [
            (
                ids[i],
                day,
                q[i],
                int(hist[i]),
                fc[day, i, :, 1],
                fc[day, i, :, 0],
                fc[day, i, :, 1],
                fc[day, i, :, 2],
            )
            for i in range(n_items)
        ]
        feed(tracker, rows, info)
    acc = tracker.accuracy("live", "random-1")
    assert acc is not None
    all_y, all_mean, all_lo, all_hi = [], [], [], []
    for h in range(1, horizon + 1):
        origins = range(first, days - h)
        y = np.array([series[:, o + h] for o in origins]).ravel()
        mean = np.array([fc[o, :, h - 1, 1] for o in origins]).ravel()
        lo_q = np.array([fc[o, :, h - 1, 0] for o in origins]).ravel()
        hi_q = np.array([fc[o, :, h - 1, 2] for o in origins]).ravel()
        hist_rows = []
        for o in origins:
            padded = np.full((n_items, window), np.nan)
            start = max(0, o - window + 1)
            padded[:, window - (o + 1 - start) :] = series[:, start : o + 1]
            hist_rows.append(padded)
        scale_sq, _ = naive_scales(np.concatenate(hist_rows))
        step = acc.by_step[h - 1]
        assert step.n == y.size
        assert step.rmsse == pytest.approx(rmsse_by_step(y[:, None], mean[:, None], scale_sq)[0])
        assert step.wape == pytest.approx(wape(y, mean))
        assert step.coverage == pytest.approx(coverage(y, lo_q, hi_q))
        all_y.append(y)
        all_mean.append(mean)
        all_lo.append(lo_q)
        all_hi.append(hi_q)
    y, mean = np.concatenate(all_y), np.concatenate(all_mean)
    assert acc.wape == pytest.approx(wape(y, mean))
    assert acc.coverage == pytest.approx(
        coverage(y, np.concatenate(all_lo), np.concatenate(all_hi))
    )
    assert acc.n_unscaled == 5 * sum(days - h - first for h in range(1, horizon + 1))


def test_each_step_is_scored_exactly_once() -> None:
    info = model("once-1")
    tracker = AccuracyTracker()
    feed(tracker, [("A", 3, [0, 1, 3, 2], 4, [2, 2], [1, 1], [2, 2], [3, 3])], info)
    later = [("A", 5, [3, 2, 4, 1], 4, *FLAT)]
    feed(tracker, later, info)
    before = tracker.accuracy("live", "once-1")
    feed(tracker, later, info)  # a retried batch
    feed(tracker, later, model("once-1"), role="shadow")  # the shadow batch of the same bucket
    feed(tracker, [("A", 4, [1, 3, 2, 4], 4, *FLAT)], info)  # an older window, out of order
    assert tracker.accuracy("live", "once-1") == before
    assert before is not None and before.n == 2  # both steps of origin 3, once each


def test_duplicate_rows_in_one_batch_score_once() -> None:
    info = model("dup-1")
    tracker = AccuracyTracker()
    feed(tracker, [("A", 3, [0, 1, 3, 2], 4, [2, 2], [1, 1], [2, 2], [3, 3])], info)
    feed(tracker, [("A", 4, [1, 3, 2, 4], 4, *FLAT), ("A", 4, [1, 3, 2, 4], 4, *FLAT)], info)
    acc = tracker.accuracy("live", "dup-1")
    assert acc is not None and acc.n == 1


def test_reforecast_of_the_same_origin_replaces_the_pending_one() -> None:
    info = model("re-1")
    tracker = AccuracyTracker()
    feed(tracker, [("A", 3, [0, 1, 3, 2], 4, [9, 9], [9, 9], [9, 9], [9, 9])], info)
    # A late event changed day 3: the worker re-forecasts the same origin.
    feed(tracker, [("A", 3, [0, 1, 3, 5], 4, [4, 4], [0, 0], [4, 4], [8, 8])], info)
    feed(tracker, [("A", 4, [1, 3, 5, 4], 4, *FLAT)], info)
    acc = tracker.accuracy("live", "re-1")
    assert acc is not None
    assert (acc.n, acc.wape, acc.coverage) == (1, 0.0, 1.0)
    # Re-forecasting origin 3 again after step 1 came true keeps step 1 scored once.
    feed(tracker, [("A", 3, [0, 1, 3, 5], 4, [4, 4], [0, 0], [4, 4], [8, 8])], info)
    feed(tracker, [("A", 5, [3, 5, 4, 4], 4, *FLAT)], info)
    acc = tracker.accuracy("live", "re-1")
    assert acc is not None
    assert acc.by_step[0].n == 2 and acc.by_step[1].n == 1


def test_live_and_shadow_are_kept_apart_but_share_actuals() -> None:
    live, shadow = model("cand-live"), model("cand-shadow")
    tracker = AccuracyTracker()
    origin = [0, 1, 3, 2]
    feed(tracker, [("A", 3, origin, 4, [4, 4], [3, 3], [4, 4], [5, 5])], live)
    feed(tracker, [("A", 3, origin, 4, [0, 0], [0, 0], [0, 0], [1, 1])], shadow, "shadow")
    # Only the live batch of day 4 arrives: it scores the shadow's pending forecast too.
    feed(tracker, [("A", 4, [1, 3, 2, 4], 4, *FLAT)], live)
    acc_live = tracker.accuracy("live", "cand-live")
    acc_shadow = tracker.accuracy("shadow", "cand-shadow")
    assert acc_live is not None and acc_shadow is not None
    assert (acc_live.wape, acc_live.coverage) == (0.0, 1.0)
    assert (acc_shadow.wape, acc_shadow.coverage) == (1.0, 0.0)
    assert tracker.accuracy("shadow", "cand-live") is None
    records = {orjson.loads(v)["role"]: orjson.loads(v) for _, v in tracker.drain_records(1)}
    assert set(records) == {"live", "shadow"}


def test_max_items_caps_tracking() -> None:
    info = model("cap-1")
    tracker = AccuracyTracker(max_items=2)
    feed(tracker, [(k, 3, [0, 1, 3, 2], 4, *FLAT) for k in "ABC"], info)
    assert tracker.tracked_items == 2
    assert tracker.untracked == 1
    # A and B go quiet for a whole window: their blocks go to the next new item.
    feed(tracker, [("D", 8, [0, 1, 3, 2], 4, *FLAT)], info)
    assert tracker.tracked_items == 1
    assert tracker.untracked == 1


def test_items_not_forecast_for_a_window_are_dropped() -> None:
    info = model("exp-1", window=4)
    tracker = AccuracyTracker()
    feed(tracker, [("A", 3, [0, 1, 3, 2], 4, *FLAT), ("B", 3, [0, 1, 3, 2], 4, *FLAT)], info)
    feed(tracker, [("B", 7, [1, 1, 1, 1], 4, *FLAT)], info)
    assert tracker.tracked_items == 2  # A was forecast 4 buckets ago: still inside the window
    feed(tracker, [("B", 8, [1, 1, 1, 1], 4, *FLAT)], info)
    assert tracker.tracked_items == 1


def test_ring_memory_is_per_item_not_per_origin() -> None:
    info = model("ring-1", window=4, horizon=2)
    tracker = AccuracyTracker()
    for day in range(3, 60):
        feed(tracker, [("A", day, [1, 2, 1, 2], 4, [1, 1], [0, 0], [1, 1], [2, 2])], info)
    assert tracker.tracked_items == 1
    acc = tracker.accuracy("live", "ring-1")
    assert acc is not None
    assert acc.by_step[0].n == 28 and acc.by_step[1].n == 28  # the last 28 target buckets


def test_rolling_window_forgets_old_targets_and_drains_only_changes() -> None:
    info = model("roll-1")
    tracker = AccuracyTracker(rolling_buckets=2)
    feed(tracker, [("A", 3, [0, 1, 3, 2], 4, [9, 9], [9, 9], [9, 9], [9, 9])], info)
    feed(tracker, [("A", 4, [1, 3, 2, 4], 4, [4, 4], [4, 4], [4, 4], [4, 4])], info)
    first = tracker.drain_records(1_000)
    assert len(first) == 1 and tracker.drain_records(2_000) == []
    key, raw = first[0]
    value = orjson.loads(raw)
    assert key == "roll-1"
    assert value["target_from"] == value["target_to"] == "1970-01-05"
    assert value["n"] == 1 and value["emitted_at_ms"] == 1_000 and value["freq"] == "1D"
    assert [s["step"] for s in value["steps"]] == [1, 2] and value["steps"][1]["rmsse"] is None
    assert value["sums"]["n"] == 1.0
    feed(tracker, [("A", 5, [3, 2, 4, 4], 4, *FLAT)], info)  # day 5 sells 4
    feed(tracker, [("A", 6, [2, 4, 4, 0], 4, *FLAT)], info)  # day 6 sells 0
    acc = tracker.accuracy("live", "roll-1")
    assert acc is not None
    assert (acc.target_from_ms, acc.target_to_ms) == (5 * DAY, 6 * DAY)  # day 4 rolled out
    # Day 5: origin 3 step 2 (9 vs 4), origin 4 step 1 (4 vs 4); day 6: origin 4 step 2
    # (4 vs 0), origin 5 step 1 (0 vs 0).
    assert acc.n == 4
    assert acc.wape == pytest.approx((5 + 0 + 4 + 0) / (4 + 4))
    assert len(tracker.drain_records(3_000)) == 1


def test_gauges_follow_the_metrics() -> None:
    info = model("gauge-1")
    tracker = AccuracyTracker()
    feed(tracker, [("A", 3, [0, 1, 3, 2], 3, [2, 2], [1, 1], [2, 2], [3, 3])], info)
    feed(tracker, [("A", 4, [1, 3, 2, 4], 4, *FLAT)], info)
    labels = {"model_version": "gauge-1", "role": "live"}
    assert METRICS_REGISTRY.get_sample_value("trendcast_online_wape", labels) == 0.5
    assert METRICS_REGISTRY.get_sample_value("trendcast_online_coverage", labels) == 0.0
    rmsse = METRICS_REGISTRY.get_sample_value("trendcast_online_rmsse", labels)
    assert rmsse == pytest.approx(2 / math.sqrt(2.5))


def test_gauges_equal_the_full_metrics_exactly() -> None:
    """The gauges' light path (overall sums only) gives exactly what ``accuracy()`` reports."""
    rng = np.random.default_rng(3)
    info = model("gauge-2", window=5, horizon=3)
    tracker = AccuracyTracker(rolling_buckets=4)
    labels = {"model_version": "gauge-2", "role": "live"}
    for day in range(5, 15):
        rows = [
            (f"i{k}", day, rng.poisson(2.0, 5).astype(float), 5, *rng.gamma(2.0, 1.0, (4, 3)))
            for k in range(12)
        ]
        feed(tracker, rows, info)
        acc = tracker.accuracy("live", "gauge-2")
        if acc is None:
            continue
        for name, value in (("rmsse", acc.rmsse), ("wape", acc.wape), ("coverage", acc.coverage)):
            gauge = METRICS_REGISTRY.get_sample_value(f"trendcast_online_{name}", labels)
            assert gauge is not None
            assert gauge == value or (math.isnan(gauge) and math.isnan(value))


def test_growing_past_the_first_blocks_keeps_pending_forecasts(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Reserving the budget at once and growing by half score the same; items keep their
    pending forecasts across a growth, and new items arrive while others are pending."""
    from stream.monitoring import online_accuracy as accuracy

    info = model("grow-1", window=4, horizon=3)
    n_items, days = 150, 12  # more items than the first allocation (64 blocks)

    def run(reserve_bytes: int) -> tuple[AccuracyTracker, int]:
        monkeypatch.setattr(accuracy, "_RESERVE_BYTES", reserve_bytes)
        tracker = AccuracyTracker(rolling_buckets=1000, max_items=1000)
        rng = np.random.default_rng(3)  # the same rows in the same order in both runs
        for day in range(3, days):
            # Items arrive a few dozen at a time, so the arrays grow while forecasts wait.
            live = min(n_items, 20 * (day - 2))
            rows = [
                (
                    f"i{k}",
                    day,
                    [float((k * day + j) % 5) for j in range(4)],
                    4,
                    [1.0 + k % 3] * 3,
                    [0.0] * 3,
                    [1.0 + k % 2] * 3,
                    [3.0] * 3,
                )
                for k in rng.permutation(live).tolist()
            ]
            feed(tracker, rows, info)
        stream = tracker._streams[("live", "grow-1")]
        return tracker, len(stream.items)

    reserved, reserved_blocks = run(1 << 30)
    grown, grown_blocks = run(0)
    assert reserved_blocks == 1000  # the whole budget at the first growth
    assert 150 <= grown_blocks < 1000  # grown by half as needed
    a, b = reserved.accuracy("live", "grow-1"), grown.accuracy("live", "grow-1")
    assert a is not None and b is not None
    assert a.n > 0
    assert a == b
