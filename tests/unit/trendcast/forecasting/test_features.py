"""The model inputs: shapes, calendar, scaling, the time split and train/inference equality."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import pytest

from trendcast.data import Panel, bucketize
from trendcast.exceptions import ConfigError, DataError
from trendcast.forecasting.base import WindowBatch
from trendcast.forecasting.features import (
    CALENDAR_FEATURES,
    build_inputs,
    calendar_features,
    feature_names,
    item_prices,
    item_scales,
    make_training_windows,
    training_starts,
)
from trendcast.forecasting.windows import windows_from_panel
from trendcast.freq import parse_freq

DAY = parse_freq("1D")


def _panel(
    lengths: dict[str, int], *, end: str = "2011-03-31", price: bool = True, seed: int = 0
) -> Panel:
    rng = np.random.default_rng(seed)
    frames = []
    for item, n in lengths.items():
        ts = pd.date_range(end=end, periods=n, freq="D")
        frame = pd.DataFrame(
            {"item_id": item, "ts": ts, "quantity": rng.poisson(3.0, n).astype(float)}
        )
        if price:
            frame["price"] = rng.uniform(1.0, 2.0, n)
        frames.append(frame)
    lines = pd.concat(frames, ignore_index=True)
    lines = lines[lines["quantity"] > 0]
    return bucketize(lines, DAY, has_price=price)


def _batch(
    q: np.ndarray,
    last: str = "2011-01-09",
    prices: np.ndarray | None = None,
    ids: list[str] | None = None,
    history: list[int] | None = None,
) -> WindowBatch:
    n, w = q.shape
    return WindowBatch(
        item_ids=ids or [f"i{k}" for k in range(n)],
        quantities=q.astype(np.float32),
        prices=None if prices is None else prices.astype(np.float32),
        last_start_ms=np.full(n, pd.Timestamp(last).value // 1_000_000, dtype=np.int64),
        history_len=np.array(history or [w] * n, dtype=np.int64),
    )


def test_feature_names_order() -> None:
    assert feature_names(True) == ["qty", *CALENDAR_FEATURES, "price"]
    assert feature_names(False, log1p=True)[0] == "qty_log1p"
    assert "price" not in feature_names(False)


def test_calendar_of_known_dates() -> None:
    ms = pd.to_datetime(["2011-01-03", "2011-01-09", "2011-07-01", "2011-12-31"])
    cal = calendar_features(ms.asi8 // 1_000_000)
    dow = np.round(np.arctan2(cal[:, 0], cal[:, 1]) / (2 * np.pi) * 7) % 7
    dom = np.round(np.arctan2(cal[:, 2], cal[:, 3]) / (2 * np.pi) * 31) % 31
    month = np.round(np.arctan2(cal[:, 4], cal[:, 5]) / (2 * np.pi) * 12) % 12
    assert dow.tolist() == [0, 6, 4, 5]  # Mon, Sun, Fri, Sat
    assert dom.tolist() == [2, 8, 0, 30]  # zero-based day of month
    assert month.tolist() == [0, 0, 6, 11]
    assert np.allclose(cal[..., 0::2] ** 2 + cal[..., 1::2] ** 2, 1.0, atol=1e-6)


def test_build_inputs_shapes_and_calendar_per_bucket() -> None:
    q = np.arange(14, dtype=np.float32).reshape(2, 7)
    x, scale = build_inputs(_batch(q), feature_names(False), {"i0": 2.0, "i1": 4.0}, {}, DAY)
    assert x.shape == (2, 7, 7) and x.dtype == np.float32 and scale.dtype == np.float32
    # Window of 7 days ending Sunday 2011-01-09: the first bucket is Monday 2011-01-03.
    assert x[0, 0, 1] == pytest.approx(0.0, abs=1e-6) and x[0, 0, 2] == pytest.approx(1.0)
    assert np.array_equal(x[0, :, 1:], x[1, :, 1:])


def test_known_items_use_stored_scale_unknown_use_window_mean() -> None:
    q = np.array([[0, 0, 2, 4], [1, 1, 1, 1]], dtype=np.float32)
    batch = _batch(q, ids=["known", "new"], history=[2, 4])
    x, scale = build_inputs(batch, ["qty"], {"known": 2.0}, {}, DAY, epsilon=0.0)
    assert scale.tolist() == [2.0, 1.0]
    assert x[..., 0].tolist() == [[0, 0, 1, 2], [1, 1, 1, 1]]


def test_log1p_feature() -> None:
    q = np.array([[0, 1, 3]], dtype=np.float32)
    x, _ = build_inputs(_batch(q, ids=["a"]), ["qty_log1p"], {"a": 1.0}, {}, DAY)
    assert np.allclose(x[0, :, 0], np.log1p([0, 1, 3]))


def test_price_relative_to_item_mean_and_nan_is_one() -> None:
    q = np.ones((2, 3), dtype=np.float32)
    prices = np.array([[2.0, np.nan, 4.0], [3.0, 6.0, np.nan]])
    batch = _batch(q, prices=prices, ids=["a", "new"])
    x, _ = build_inputs(batch, ["qty", "price"], {"a": 1.0}, {"a": 2.0}, DAY)
    assert x[0, :, 1].tolist() == [1.0, 1.0, 2.0]
    assert x[1, :, 1].tolist() == [pytest.approx(2 / 3), pytest.approx(4 / 3), 1.0]
    no_prices = _batch(q, ids=["a", "b"])
    x, _ = build_inputs(no_prices, ["qty", "price"], {}, {}, DAY)
    assert np.all(x[..., 1] == 1.0)


def test_unknown_feature_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="unknown"):
        build_inputs(_batch(np.ones((1, 3))), ["qty", "weather"], {}, {}, DAY)


def test_item_scales_and_prices_respect_until() -> None:
    panel = _panel({"a": 10})
    cutoff = panel.end - pd.Timedelta(days=2)
    scales = item_scales(panel, until=cutoff, epsilon=0.0)
    before = panel.frame[panel.frame["ts"] < cutoff]
    assert scales["a"] == pytest.approx(before["quantity"].mean())
    assert item_prices(panel, until=cutoff)["a"] == pytest.approx(before["price"].mean())


def test_training_starts_grid() -> None:
    starts = training_starts(100, 10, 5, stride=3)
    assert starts[-1] == 100 - 5 - 10 - 5
    assert np.all(np.diff(starts) == 3) and starts[0] >= 0
    assert training_starts(19, 10, 5).size == 0


def _windows(panel: Panel, **kw):
    features = feature_names(panel.has_price)
    cutoff = panel.end - (kw.get("horizon", 5) - 1) * DAY.timedelta
    scales = item_scales(panel, until=cutoff)
    prices = item_prices(panel, until=cutoff)
    args: dict[str, Any] = {
        "window": 10,
        "horizon": 5,
        "features": features,
        "scales": scales,
        "prices": prices,
    } | kw
    return make_training_windows(panel, **args), scales, prices, cutoff


def test_training_windows_shapes_and_short_items() -> None:
    panel = _panel({"long": 60, "mid": 17, "short": 12})
    w, _, _, _ = _windows(panel)
    # long: 60 - 5 - 10 - 5 + 1 = 41 windows; mid: 17 < 20, validation only; short: nothing.
    assert w.x_train.shape == (41, 10, 8) and w.y_train.shape == (41, 5)
    assert w.n_items == 1 and w.n_available == 41
    assert w.val_batch.item_ids == ["long", "mid"]
    assert w.x_val.shape == (2, 10, 8) and w.y_val.shape == (2, 5)
    assert w.val_scale_sq.shape == (2,)


def test_no_validation_target_leaks_into_training() -> None:
    panel = _panel({"a": 80, "b": 50}, price=False)
    horizon = 5
    frame = panel.frame.copy()
    last = frame.groupby("item_id")["ts"].transform("max")
    in_val = frame["ts"] > last - pd.Timedelta(days=horizon)
    sentinel = 1e6
    frame.loc[in_val, "quantity"] = sentinel
    marked = Panel(frame=frame, freq=DAY, has_price=False)
    w, scales, _, _ = _windows(marked, horizon=horizon, stride=1)
    assert (w.y_train * w.scale_train[:, None]).max() < sentinel / 10
    assert (w.x_train[..., 0] * w.scale_train[:, None]).max() < sentinel / 10
    assert w.scale_train.max() < sentinel / 10
    assert max(scales.values()) < sentinel / 10  # scales come from before the cutoff too
    assert np.allclose(w.y_val * w.scale_val[:, None], sentinel)


def test_max_windows_samples_reproducibly() -> None:
    panel = _panel({"a": 200, "b": 150})
    w1, *_ = _windows(panel, max_windows=50, seed=3)
    w2, *_ = _windows(panel, max_windows=50, seed=3)
    assert w1.x_train.shape[0] == 50 and w1.n_available > 50
    assert np.array_equal(w1.x_train, w2.x_train)


def test_no_item_long_enough_is_a_data_error() -> None:
    with pytest.raises(DataError, match="training window"):
        _windows(_panel({"a": 15}))


def test_validation_inputs_equal_inference_inputs() -> None:
    """What the model is scored on is exactly what inference builds from the same history."""
    panel = _panel({"a": 90, "b": 40, "c": 33})
    w, scales, prices, cutoff = _windows(panel)
    served = windows_from_panel(panel, 10, cutoff=cutoff)
    x, scale = build_inputs(served, feature_names(True), scales, prices, DAY)
    order = [served.item_ids.index(i) for i in w.val_batch.item_ids]
    assert np.array_equal(x[order], w.x_val)
    assert np.array_equal(scale[order], w.scale_val)


def test_causal_training_window_equals_inference_window_at_its_origin() -> None:
    panel = _panel({"a": 70}, price=True)
    w, scales, prices, _ = _windows(panel, stride=7, causal_scales=True)
    starts = training_starts(70, 10, 5, stride=7)
    k = 2
    origin = panel.start + int(starts[k] + 10) * DAY.timedelta
    served = windows_from_panel(panel, 10, cutoff=origin)
    # The scale a bundle trained just before this origin would have stored.
    then = item_scales(panel, until=origin)
    x, scale = build_inputs(served, feature_names(True), then, prices, DAY)
    assert scale[0] == pytest.approx(w.scale_train[k], rel=1e-6)
    assert np.allclose(x[0], w.x_train[k], rtol=1e-5, atol=1e-6)


def test_stored_scales_by_default() -> None:
    panel = _panel({"a": 70, "b": 60})
    w, scales, _, _ = _windows(panel, stride=5)
    ids = np.repeat(["a", "b"], [len(training_starts(n, 10, 5, 5)) for n in (70, 60)])
    assert np.allclose(w.scale_train, [scales[i] for i in ids])


def test_max_age_keeps_only_recent_windows() -> None:
    panel = _panel({"a": 100})
    w, *_ = _windows(panel, max_age=20)
    assert w.x_train.shape[0] == 20
    everything, *_ = _windows(panel)
    assert np.array_equal(w.x_train, everything.x_train[-20:])


def test_minute_models_get_minute_and_hour_calendar_inputs() -> None:
    minute = parse_freq("5min")
    names = feature_names(False, freq=minute)
    assert names == ["qty", "moh_sin", "moh_cos", "hod_sin", "hod_cos", "dow_sin", "dow_cos"]
    # Daily and hourly models keep the feature set their bundles were trained with.
    assert feature_names(False, freq=DAY) == feature_names(False)
    assert feature_names(True, freq=parse_freq("1h")) == feature_names(True)
    last = np.array([int(pd.Timestamp("2011-01-03 18:55").value // 1_000_000)])
    batch = WindowBatch(["a"], np.ones((1, 3), np.float32), None, last, np.array([3]))
    x, _ = build_inputs(batch, names, {}, {}, minute)
    moh = np.degrees(np.arctan2(x[0, :, 1], x[0, :, 2])) % 360 / 6  # minute of the hour
    hod = np.degrees(np.arctan2(x[0, :, 3], x[0, :, 4])) % 360 / 15  # hour of the day
    np.testing.assert_allclose(moh, [45, 50, 55], atol=1e-3)
    np.testing.assert_allclose(hod, [18.75, 18 + 50 / 60, 18 + 55 / 60], atol=1e-3)
    np.testing.assert_allclose(x[0, :, 6], 1.0)  # Monday: dow angle 0
