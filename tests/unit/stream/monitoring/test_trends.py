"""Trends: next week vs last week per item, ranking, ties, zero last week, bounds."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import orjson
import pytest

from stream.inference.model_info import ModelInfo
from stream.inference.observers import ForecastObserver, Role, ScoredBatch
from stream.monitoring.trends import TrendTracker
from trendcast.forecasting.base import ForecastBatch, WindowBatch
from trendcast.freq import parse_freq

DAY = 86_400_000


def model(freq: str = "1D", window: int = 8, horizon: int = 10, version: str = "v1") -> ModelInfo:
    return ModelInfo(freq=parse_freq(freq), window=window, horizon=horizon, model_version=version)


def scored(
    info: ModelInfo,
    rows: Sequence[tuple[str, float, float]],
    *,
    last_start_ms: int = 20 * DAY,
    role: Role = "live",
) -> ScoredBatch:
    """Rows of (item, sold per bucket in the window, forecast mean per bucket)."""
    n = len(rows)
    quantities = np.array([[r[1]] * info.window for r in rows], dtype=np.float32)
    mean = np.array([[r[2]] * info.horizon for r in rows], dtype=np.float32)
    batch = WindowBatch(
        item_ids=[r[0] for r in rows],
        quantities=quantities,
        prices=None,
        last_start_ms=np.full(n, last_start_ms, dtype=np.int64),
        history_len=np.full(n, info.window, dtype=np.int64),
    )
    result = ForecastBatch(mean=mean, p10=mean, p50=mean, p90=mean, fallback=np.zeros(n, bool))
    return ScoredBatch(model=info, role=role, batch=batch, result=result)


def snap(tracker: TrendTracker, k: int = 3) -> dict[str, Any]:
    raw = tracker.snapshot(k, now_ms=123)
    assert raw is not None
    value: dict[str, Any] = orjson.loads(raw)
    return value


def ids(entries: list[dict[str, Any]]) -> list[str]:
    return [e["item_id"] for e in entries]


def test_is_a_forecast_observer_and_empty_gives_none() -> None:
    tracker = TrendTracker()
    assert isinstance(tracker, ForecastObserver)
    assert tracker.snapshot(5, now_ms=0) is None


def test_daily_week_sums_and_record_fields() -> None:
    tracker = TrendTracker()
    tracker.on_forecasts(scored(model(version="m7"), [("A", 1.0, 2.0)]))
    value = snap(tracker)
    assert (value["freq"], value["buckets"], value["items_considered"]) == ("1D", 7, 1)
    assert value["emitted_at_ms"] == 123 and value["falling"] == []
    (entry,) = value["rising"]
    assert entry == {
        "item_id": "A",
        "last_week": 7.0,
        "next_week": 14.0,
        "change": 7.0,
        "change_pct": 100.0,
        "as_of": "1970-01-22T00:00:00Z",
        "model_version": "m7",
    }


def test_ranking_by_absolute_change_with_ties_and_zero_last_week() -> None:
    tracker = TrendTracker()
    rows = [
        ("big", 100.0, 110.0),  # +70 a week, +10%
        ("small", 1.0, 3.0),  # +14 a week, +200%
        ("new", 0.0, 1.0),  # +7, sold nothing last week
        ("tie-b", 2.0, 1.0),  # -7
        ("tie-a", 3.0, 2.0),  # -7
        ("drop", 10.0, 0.0),  # -70
        ("flat", 5.0, 5.0),  # neither list
    ]
    tracker.on_forecasts(scored(model(), rows))
    value = snap(tracker, k=2)
    assert ids(value["rising"]) == ["big", "small"]
    assert ids(value["falling"]) == ["drop", "tie-a"]  # equal change: item id order
    assert value["items_considered"] == 7
    everything = snap(tracker, k=10)
    assert ids(everything["rising"]) == ["big", "small", "new"]
    assert ids(everything["falling"]) == ["drop", "tie-a", "tie-b"]
    new = everything["rising"][2]
    assert new["change_pct"] is None and new["change"] == 7.0
    assert snap(tracker, k=0)["rising"] == []
    with pytest.raises(ValueError, match="k >= 0"):
        tracker.snapshot(-1, now_ms=0)


def test_shadow_is_ignored_and_newest_forecast_wins() -> None:
    tracker = TrendTracker()
    tracker.on_forecasts(scored(model(), [("A", 1.0, 2.0)], last_start_ms=20 * DAY))
    tracker.on_forecasts(scored(model(), [("A", 1.0, 9.0)], role="shadow"))
    tracker.on_forecasts(scored(model(), [("A", 1.0, 0.0)], last_start_ms=19 * DAY))  # stale
    assert snap(tracker)["rising"][0]["next_week"] == 14.0
    tracker.on_forecasts(scored(model(version="v2"), [("A", 1.0, 0.0)], last_start_ms=21 * DAY))
    value = snap(tracker)
    assert value["rising"] == []
    assert value["falling"][0]["model_version"] == "v2"


@pytest.mark.parametrize(
    ("freq", "window", "horizon", "buckets"),
    [("1h", 200, 24, 24), ("1W", 8, 4, 1), ("1D", 5, 28, 5), ("1D", 56, 3, 3)],
)
def test_week_is_capped_at_horizon_and_window(
    freq: str, window: int, horizon: int, buckets: int
) -> None:
    tracker = TrendTracker()
    tracker.on_forecasts(scored(model(freq, window, horizon), [("A", 1.0, 2.0)]))
    value = snap(tracker)
    assert value["buckets"] == buckets
    assert value["rising"][0]["next_week"] == 2.0 * buckets
    assert value["rising"][0]["last_week"] == 1.0 * buckets


def test_items_not_forecast_for_a_window_are_dropped_and_capped() -> None:
    info = model(window=8)
    tracker = TrendTracker(max_items=2)
    tracker.on_forecasts(scored(info, [("A", 1.0, 2.0), ("B", 1.0, 2.0), ("C", 1.0, 2.0)]))
    assert tracker.items == 2  # C is over the cap
    tracker.on_forecasts(scored(info, [("B", 1.0, 2.0)], last_start_ms=28 * DAY))
    assert tracker.items == 2  # A's window ended 8 buckets ago: still kept
    tracker.on_forecasts(scored(info, [("C", 1.0, 3.0)], last_start_ms=29 * DAY))
    assert tracker.items == 2  # A dropped, C took its place
    assert sorted(ids(snap(tracker)["rising"])) == ["B", "C"]
