"""Rolling-origin backtest on tiny synthetic panels (no I/O beyond tmp_path, no TensorFlow)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from rich.console import Console

from trendcast.backtest import (
    backtest,
    backtest_origins,
    evaluate,
    leakage_warning,
    metrics_markdown,
    print_metrics,
    write_report,
)
from trendcast.data import Panel
from trendcast.exceptions import ConfigError, DataError
from trendcast.forecasting.base import ForecastBatch, WindowBatch
from trendcast.forecasting.baselines import (
    NaiveForecaster,
    SeasonalNaiveForecaster,
    WindowMeanForecaster,
    ZeroForecaster,
)
from trendcast.freq import parse_freq

DAY = parse_freq("1D")
START = pd.Timestamp("2011-01-03")  # a Monday


def weekly_panel(n_days: int = 84, late_item_start: int = 60) -> Panel:
    """Three items with an exactly weekly pattern; ``c`` starts late (short history)."""
    rows = []
    patterns = {"a": [5, 1, 0, 2, 8, 3, 0], "b": [0, 0, 1, 0, 0, 4, 0], "c": [2, 2, 2, 9, 2, 2, 2]}
    for item, week in patterns.items():
        first = late_item_start if item == "c" else 0
        for day in range(first, n_days):
            rows.append((item, START + pd.Timedelta(days=day), float(week[day % 7])))
    frame = pd.DataFrame(rows, columns=["item_id", "ts", "quantity"])
    return Panel(frame=frame, freq=DAY, has_price=False)


def test_origins_end_on_last_bucket_and_step_weekly():
    end = START + pd.Timedelta(days=83)
    origins = backtest_origins(end, DAY, horizon=14, weeks=4)
    assert [o - origins[0] for o in origins] == [pd.Timedelta(days=d) for d in (0, 7, 14)]
    assert origins[-1] + pd.Timedelta(days=13) == end
    assert origins[0] >= end - pd.Timedelta(days=27)  # all targets within the last 4 weeks
    assert len(backtest_origins(end, DAY, horizon=14, n_origins=5, step=1)) == 5


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({}, "exactly one"),
        ({"weeks": 1, "n_origins": 1}, "exactly one"),
        ({"weeks": 1}, "at least the horizon"),
        ({"n_origins": 0}, "at least 1 origin"),
        ({"n_origins": 1, "step": 0}, "step"),
    ],
)
def test_origins_bad_settings(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        backtest_origins(pd.Timestamp("2011-03-01"), DAY, horizon=14, **kwargs)


def test_seasonal_naive_is_perfect_on_weekly_data():
    panel = weekly_panel(late_item_start=40)  # c has > 1 week of history at every origin
    h = 14
    result = backtest(
        panel,
        [SeasonalNaiveForecaster(h, 7), NaiveForecaster(h), ZeroForecaster(h)],
        horizon=h,
        window=28,
        n_origins=3,
        step=7,
    )
    snaive = result.metrics.loc["seasonal_naive7"]
    assert snaive["rmsse"] == 0.0 and snaive["mase"] == 0.0 and snaive["wape"] == 0.0
    assert snaive["coverage"] == 1.0
    assert result.metrics.loc["naive", "rmsse"] > 0
    assert result.metrics.loc["zero", "wape"] == 1.0
    assert list(result.metrics.index) == ["seasonal_naive7", "naive", "zero"]
    assert result.n_items == 3 and len(result.origins) == 3
    assert result.origins[-1] + pd.Timedelta(days=h - 1) == panel.end
    # Every (model, origin, item, step) appears once, and actuals match the panel.
    assert len(result.forecasts) == 3 * 3 * 3 * h
    merged = result.forecasts.merge(panel.frame, on=["item_id", "ts"])
    np.testing.assert_array_equal(merged["actual"], merged["quantity"])
    by_step = result.by_step[result.by_step["model"] == "seasonal_naive7"]
    assert by_step["step"].tolist() == list(range(1, h + 1))
    assert (by_step["rmsse"] == 0).all()


def test_items_need_history_before_origin():
    panel = weekly_panel(late_item_start=75)  # c starts between the two origins (74, 77)
    result = backtest(panel, [ZeroForecaster(7)], horizon=7, window=14, n_origins=2, step=3)
    per_origin = result.forecasts.groupby("origin")["item_id"].nunique().tolist()
    assert per_origin == [2, 3]
    # c's two buckets before origin 77 are equal (2, 2): zero naive scale -> unscaled, counted.
    assert result.metrics.loc["zero", "n_unscaled"] == 1


def test_progress_hook_and_plot_context_of_the_last_origin():
    panel = weekly_panel(late_item_start=70)  # c has 7 buckets before the last origin (77)
    calls: list[tuple[int, int, pd.Timestamp]] = []
    result = backtest(
        panel,
        [ZeroForecaster(7)],
        horizon=7,
        window=14,
        n_origins=3,
        step=2,
        on_origin=lambda *args: calls.append(args),
    )
    assert calls == [(i, 3, origin) for i, origin in enumerate(result.origins)]
    # History: the 14 buckets before the last origin, none before an item's first bucket.
    last = result.origins[-1]
    history = result.history
    assert list(history.columns) == ["item_id", "ts", "quantity"]
    assert history.groupby("item_id")["ts"].count().to_dict() == {"a": 14, "b": 14, "c": 7}
    assert history["ts"].max() == last - pd.Timedelta(days=1)
    assert history["ts"].min() == last - pd.Timedelta(days=14)
    merged = history.merge(panel.frame, on=["item_id", "ts"])
    np.testing.assert_array_equal(merged["quantity_x"], merged["quantity_y"])
    assert len(merged) == len(history)


class RecordingForecaster:
    """Fake model with its own window length; records what it was given."""

    name = "fake"
    horizon = 7
    window = 10

    def __init__(self) -> None:
        self.calls: list[WindowBatch] = []

    def predict(self, batch: WindowBatch) -> ForecastBatch:
        self.calls.append(batch)
        z = np.ones((len(batch), self.horizon), dtype=np.float32)
        return ForecastBatch(z, z, z, z, np.ones(len(batch), dtype=bool))


def test_one_batched_call_per_origin_with_own_window_and_no_future():
    panel = weekly_panel()
    fake = RecordingForecaster()
    origins = [START + pd.Timedelta(days=50), START + pd.Timedelta(days=70)]
    result = backtest(panel, [fake, NaiveForecaster(7)], horizon=7, window=28, origins=origins)
    assert len(fake.calls) == 2
    assert all(b.window == 10 for b in fake.calls)
    for batch, origin in zip(fake.calls, origins, strict=True):
        last_ms = int(origin.value // 1_000_000) - 86_400_000
        assert (batch.last_start_ms == last_ms).all()  # the window ends just before the origin
    assert result.metrics.loc["fake", "fallback_share"] == 1.0
    assert result.settings["windows"] == {"fake": 10, "naive": 28}


class BadForecaster(RecordingForecaster):
    name = "bad"

    def predict(self, batch: WindowBatch) -> ForecastBatch:
        z = np.ones((len(batch), 3), dtype=np.float32)
        return ForecastBatch(z, z, z, z, np.zeros(len(batch), dtype=bool))


def test_bad_forecaster_and_bad_settings_are_reported():
    panel = weekly_panel()
    with pytest.raises(DataError, match="expected mean of shape"):
        backtest(panel, [BadForecaster()], horizon=7, window=14, n_origins=1)
    with pytest.raises(ConfigError, match="unique"):
        backtest(panel, [ZeroForecaster(7), ZeroForecaster(7)], horizon=7, window=14, n_origins=1)
    with pytest.raises(ConfigError, match="forecasts 7 buckets"):
        backtest(panel, [ZeroForecaster(7)], horizon=14, window=14, n_origins=1)
    with pytest.raises(ConfigError, match="up to the data's end"):
        backtest(panel, [ZeroForecaster(7)], horizon=7, window=14, origins=[panel.end])
    with pytest.raises(ConfigError, match="at least one forecaster"):
        backtest(panel, [], horizon=7, window=14, n_origins=1)


def test_report_files_and_table(tmp_path):
    h = 14
    result = backtest(
        weekly_panel(),
        [SeasonalNaiveForecaster(h, 7), WindowMeanForecaster(h, 28), ZeroForecaster(h)],
        horizon=h,
        window=28,
        weeks=4,
    )
    written = write_report(result, tmp_path / "report", extra={"note": "x"})
    for key in ("metrics", "forecasts", "forecasts_png", "error_png"):
        assert written[key].is_file() and written[key].stat().st_size > 0
    for key in ("forecasts_png", "error_png"):
        assert written[key].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    payload = json.loads(written["metrics"].read_text())
    assert set(payload["models"]) == {"seasonal_naive7", "mean28", "zero"}
    assert payload["n_items"] == 3 and payload["note"] == "x"
    assert payload["settings"]["horizon"] == h
    assert len(payload["origins"]) == 3
    assert len(payload["by_step"]["zero"]["rmsse"]) == h

    console = Console(record=True, width=120)
    print_metrics(result, console=console)
    text = console.export_text()
    assert "seasonal_naive7" in text and "3 items, 3 origins" in text
    md = metrics_markdown(result.metrics)
    assert "| seasonal_naive7 | **0.000** |" in md


def test_leakage_warning():
    origins = [pd.Timestamp("2011-07-07"), pd.Timestamp("2011-07-14"), pd.Timestamp("2011-08-04")]
    assert leakage_warning("2011-06-30", origins) is None
    assert leakage_warning("2011-07-06T23:59:59", origins) is None
    message = leakage_warning("2011-07-20", origins)
    assert message is not None and "2 of 3 origins" in message
    # Timezone-aware ends are compared in UTC.
    assert leakage_warning("2011-07-07T01:00:00+02:00", origins) is None
    assert leakage_warning("2011-07-07T00:00:00Z", origins) is not None
    assert leakage_warning("2011-12-31", []) is None


class FakeOnnxForecaster:
    """Stands in for trendcast.forecasting.onnx.OnnxForecaster (no onnxruntime needed)."""

    name = "lstm"

    def __init__(self, bundle):
        self.horizon = bundle.meta.horizon
        self.windows_seen: list[int] = []

    def predict(self, batch: WindowBatch) -> ForecastBatch:
        self.windows_seen.append(batch.window)
        z = np.full((len(batch), self.horizon), 2.0, dtype=np.float32)
        return ForecastBatch(z, z * 0.5, z, z * 2, np.zeros(len(batch), dtype=bool))


class FakeBundle:
    def __init__(self, path, data_end: str, freq: str = "1D"):
        from trendcast.bundle import TrainingMeta

        self.path = path
        self.meta = SimpleNamespace(
            freq=freq,
            horizon=7,
            window=21,
            model_version="test-1",
            training=TrainingMeta(
                data_start="2011-01-03",
                data_end=data_end,
                n_items=3,
                n_windows=10,
                epochs=1,
                loss="pinball",
                seed=0,
            ),
        )


def test_evaluate_with_bundle_writes_report_curves_and_leakage(tmp_path, monkeypatch):
    import sys
    import types

    fake_module = types.ModuleType("trendcast.forecasting.onnx")
    fake_module.OnnxForecaster = FakeOnnxForecaster  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "trendcast.forecasting.onnx", fake_module)
    bundle_dir = tmp_path / "bundle"
    (bundle_dir / "training").mkdir(parents=True)
    (bundle_dir / "training" / "history.json").write_text(
        json.dumps({"loss": [1.0, 0.8, 0.7], "val_loss": [1.1, 0.9, 0.85]})
    )
    panel = weekly_panel()
    bundle = FakeBundle(bundle_dir, data_end="2011-03-20")  # inside the test weeks -> leak
    evaluation = evaluate(panel, tmp_path / "out", bundle=bundle, weeks=2)  # type: ignore[arg-type]
    result = evaluation.result
    assert list(result.metrics.index)[0] == "lstm"
    assert result.settings["horizon"] == 7 and result.settings["windows"]["lstm"] == 21
    assert evaluation.warnings and "origins are inside the training range" in evaluation.warnings[0]
    assert evaluation.files["training_png"].read_bytes()[:4] == b"\x89PNG"
    payload = json.loads(evaluation.files["metrics"].read_text())
    assert payload["bundle"]["model_version"] == "test-1" and payload["warnings"]
    with pytest.raises(ConfigError, match="trained on 1h buckets"):
        evaluate(panel, tmp_path / "o2", bundle=FakeBundle(bundle_dir, "2011-01-10", "1h"))  # type: ignore[arg-type]


def test_evaluate_without_bundle_runs_baselines(tmp_path):
    evaluation = evaluate(weekly_panel(), tmp_path, weeks=4, horizon=14)
    assert list(evaluation.result.metrics.index) == ["zero", "naive", "seasonal_naive7", "mean28"]
    assert evaluation.warnings == [] and "training_png" not in evaluation.files
