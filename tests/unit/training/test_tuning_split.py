"""``trendcast tune``'s periods, search space and ``train --config`` reading (no training)."""

from __future__ import annotations

from pathlib import Path

import orjson
import pandas as pd
import pytest

from trendcast.data import Panel
from trendcast.exceptions import ConfigError
from trendcast.freq import parse_freq

pytest.importorskip("tensorflow")
pytest.importorskip("optuna")

from training.trainer import TrainConfig  # noqa: E402
from training.tuning import SearchSpace, config_from_json, split_periods  # noqa: E402


def _panel(start: str, end: str, freq: str = "1D") -> Panel:
    f = parse_freq(freq)
    ts = pd.date_range(start, end, freq=f.timedelta)
    frame = pd.DataFrame({"item_id": "a", "ts": ts, "quantity": 1.0})
    return Panel(frame=frame, freq=f, has_price=False)


def test_default_test_period_is_the_horizon_and_origins_end_before_it() -> None:
    panel = _panel("2011-01-01", "2011-08-31")
    split = split_periods(panel, horizon=28)
    day = pd.Timedelta(days=1)
    assert split.test_buckets == 28
    assert split.test_start == pd.Timestamp("2011-08-04")
    assert split.test_end == panel.end
    assert split.tuning_end == split.test_start - day
    assert [o.strftime("%m-%d") for o in split.origins] == ["06-23", "06-30", "07-07"]
    # The last origin's horizon ends exactly on the bucket before the test period.
    assert split.origins[-1] + 27 * day == split.tuning_end
    assert split.train_until == split.origins[0]
    assert split.as_dict()["tuning_origins"][0] == "2011-06-23T00:00:00"


def test_explicit_test_weeks_and_origins() -> None:
    split = split_periods(_panel("2011-01-01", "2011-08-31"), horizon=7, test_weeks=8, n_origins=2)
    assert split.test_buckets == 56
    assert split.test_start == pd.Timestamp("2011-07-07")
    assert [o.strftime("%m-%d") for o in split.origins] == ["06-23", "06-30"]


def test_hourly_buckets_hold_out_whole_weeks() -> None:
    split = split_periods(_panel("2011-06-01", "2011-08-31 23:00", "1h"), horizon=24)
    assert split.test_buckets == 168
    assert split.origins[1] - split.origins[0] == pd.Timedelta(days=7)
    assert split.origins[-1] + pd.Timedelta(hours=23) == split.tuning_end


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"horizon": 28, "test_weeks": 2}, "test period of at least the horizon"),
        ({"horizon": 28, "n_origins": 0}, "--origins >= 1"),
        ({"horizon": 0}, "--horizon >= 1"),
        ({"horizon": 28, "test_weeks": 0}, "--test-weeks >= 1"),
        ({"horizon": 28, "n_origins": 20}, "before the first tuning origin"),
        ({"horizon": 28, "min_train_buckets": 400}, "expected at least 400 buckets"),
    ],
)
def test_bad_settings_or_too_little_data(kwargs: dict[str, int], fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment):
        split_periods(_panel("2011-01-01", "2011-08-31"), **kwargs)  # type: ignore[arg-type]


def test_space_drops_windows_that_do_not_fit_and_holds_the_defaults() -> None:
    space = SearchSpace()
    assert space.fitting(60).windows == (28, 56)
    with pytest.raises(ConfigError, match="room for a window of 28"):
        space.fitting(27)
    defaults = TrainConfig()
    params = {
        k: getattr(defaults, k)
        for k in ("window", "units", "dropout", "learning_rate", "loss", "quantile_weight")
    }
    assert space.contains({**params, "mean_blend": defaults.mean_blend})
    assert not space.contains({**params, "mean_blend": 0.3})


def test_config_from_best_json_with_flags_on_top(tmp_path: Path) -> None:
    best = tmp_path / "best.json"
    config = {**TrainConfig().as_dict(), "window": 28, "dropout": 0.1, "mean_blend": 0.5}
    best.write_bytes(orjson.dumps({"metric": "rmsse", "config": config}))
    read = config_from_json(best, units=16)
    assert (read.window, read.dropout, read.mean_blend, read.units) == (28, 0.1, 0.5, 16)
    plain = tmp_path / "plain.json"
    plain.write_bytes(orjson.dumps({"loss": "tweedie", "learning_rate": 0.001}))
    read = config_from_json(plain)
    assert (read.loss, read.learning_rate, read.window) == ("tweedie", 0.001, 56)


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        (b'{"windw": 28}', r"unknown \[.windw.\]"),
        (b'{"window": "long"}', "window"),
        (b'{"loss": "huber"}', "loss"),
        (b'{"dropout": 1.5}', "dropout"),
        (b"[1, 2]", "expected a JSON object"),
        (b"not json", "expected a JSON object"),
    ],
)
def test_bad_config_files(tmp_path: Path, text: bytes, fragment: str) -> None:
    path = tmp_path / "c.json"
    path.write_bytes(text)
    with pytest.raises(ConfigError, match=fragment):
        config_from_json(path)


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="file not found"):
        config_from_json(tmp_path / "nope.json")
