"""The offline intraday replay: nowcasts against the start-of-bucket forecast, and alerts."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from trendcast.bundle import load_bundle
from trendcast.data import bucketize, load_sales, sample_data_path
from trendcast.exceptions import ConfigError, DataError
from trendcast.forecasting.base import ForecastBatch, WindowBatch
from trendcast.forecasting.profile import learn_profile
from trendcast.freq import parse_freq
from trendcast.intraday import evaluate_intraday
from trendcast.testkit.bundles import make_fake_bundle

DAY = parse_freq("1D")


class MeanForecaster:
    """Window mean with a +-60% band: a forecast that cannot know today's level."""

    name = "mean"
    horizon = 1

    def predict(self, batch: WindowBatch) -> ForecastBatch:
        level = batch.quantities.mean(axis=1, keepdims=True)
        return ForecastBatch(
            mean=level,
            p10=0.4 * level,
            p50=level,
            p90=1.6 * level,
            fallback=np.zeros(len(batch), dtype=bool),
        )


def _lines(days: int = 60, seed: int = 1) -> pd.DataFrame:
    """Items selling 09:00-18:00 at a level that changes from day to day (x0.3 to x3)."""
    rng = np.random.default_rng(seed)
    rows = []
    for d in range(days):
        day = pd.Timestamp("2011-03-07") + pd.Timedelta(days=d)
        for k in range(6):
            level = 20 * (k + 1) * rng.choice([0.3, 1.0, 3.0])
            hours = rng.uniform(9, 18, size=rng.poisson(level))
            rows += [(f"i{k}", day + pd.Timedelta(hours=h), 1.0) for h in hours]
    return pd.DataFrame(rows, columns=["item_id", "ts", "quantity"])


def test_nowcast_beats_the_start_of_bucket_forecast(tmp_path: Path) -> None:
    panel = bucketize(_lines(), DAY, has_price=False)
    bundle = load_bundle(make_fake_bundle(tmp_path / "b"))
    profile = learn_profile(panel.until(panel.end - 13 * DAY.timedelta).lines, DAY)
    result = evaluate_intraday(
        panel,
        bundle,
        tmp_path / "report",
        buckets=14,
        profile=profile,
        forecaster=MeanForecaster(),
        thresholds=(0.01, 0.001),
    )
    acc = result.accuracy
    assert list(acc.index) == [
        "start of bucket",
        "nowcast at 25%",
        "nowcast at 50%",
        "nowcast at 75%",
    ]
    wape = acc["wape"].to_numpy()
    assert wape[2] < 0.7 * wape[0] and wape[3] < wape[2]
    assert acc["rmsse"].iloc[3] < acc["rmsse"].iloc[0]
    assert (result.n_items, result.n_buckets) == (6, 14)
    alerts = result.alerts
    assert set(alerts.index.get_level_values("kind")) == {"surge", "stall"}
    surges = alerts.loc["surge"]
    assert surges.loc[0.01, "alerts"] >= surges.loc[0.001, "alerts"] > 0
    assert surges.loc[0.01, "precision"] > 0.5  # a x3 day is what surges catch
    assert result.recommended_probability in (0.01, 0.001)
    md = (tmp_path / "report" / "intraday.md").read_text()
    assert "| nowcast at 50% |" in md and "Recommended TRENDCAST_ALERT_PROBABILITY" in md
    assert set(result.files) == {"markdown", "accuracy_csv", "alerts_csv"}


def test_a_stalled_item_raises_a_stall(tmp_path: Path) -> None:
    lines = _lines(days=40)
    last = lines["ts"].max().normalize()
    lines = lines[~((lines["item_id"] == "i5") & (lines["ts"] >= last))]  # i5 stops selling
    panel = bucketize(lines, DAY, has_price=False)
    bundle = load_bundle(make_fake_bundle(tmp_path / "b"))
    result = evaluate_intraday(
        panel,
        bundle,
        buckets=1,
        profile=learn_profile(lines, DAY),
        forecaster=MeanForecaster(),
        thresholds=(0.001,),
    )
    stall = result.alerts.loc[("stall", 0.001)]
    assert stall["alerts"] == 1 and stall["precision"] == 1.0 and stall["median_at"] < 0.5


def test_refuses_panels_without_lines_or_other_frequencies(tmp_path: Path) -> None:
    bundle = load_bundle(make_fake_bundle(tmp_path / "b"))
    panel = load_sales(sample_data_path(), DAY)
    with pytest.raises(DataError, match="needs the sales lines"):
        evaluate_intraday(
            type(panel)(panel.frame, panel.freq, panel.has_price),
            bundle,
            forecaster=MeanForecaster(),
        )
    hourly = bucketize(_lines(days=3), parse_freq("1h"), has_price=False)
    with pytest.raises(ConfigError, match="pass --freq 1D"):
        evaluate_intraday(hourly, bundle, forecaster=MeanForecaster())
    with pytest.raises(ConfigError, match="strictly between 0 and 1"):
        evaluate_intraday(panel, bundle, fractions=(0.5, 1.0), forecaster=MeanForecaster())
