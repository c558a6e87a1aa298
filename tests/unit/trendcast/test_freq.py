"""Bucket frequencies: minute buckets beside hours, days and weeks."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from trendcast.exceptions import ConfigError
from trendcast.freq import parse_freq, season_length


@pytest.mark.parametrize(
    ("text", "name", "step_ms"),
    [
        ("1min", "1min", 60_000),
        ("5min", "5min", 300_000),
        ("15MIN", "15min", 900_000),
        ("min", "1min", 60_000),
        ("7 minutes", "7min", 420_000),
        ("60min", "1h", 3_600_000),
        ("1h", "1h", 3_600_000),
        ("1D", "1D", 86_400_000),
    ],
)
def test_minute_names_are_canonical(text: str, name: str, step_ms: int) -> None:
    freq = parse_freq(text)
    assert (freq.name, freq.step_ms, freq.origin_ms) == (name, step_ms, 0)
    assert parse_freq(freq.name) == freq


@pytest.mark.parametrize("text", ["1M", "m", "0min", "5 mins later", "1.5min"])
def test_bad_minute_frequencies(text: str) -> None:
    with pytest.raises(ConfigError, match="expected"):
        parse_freq(text)


def test_minute_buckets_align_on_the_epoch() -> None:
    five = parse_freq("5min")
    ts = pd.Series(pd.to_datetime(["2011-01-05 13:04:59", "2011-01-05 13:05:00"]))
    assert five.floor(ts).dt.strftime("%H:%M").tolist() == ["13:00", "13:05"]
    assert five.floor_ms_array(np.array([299_999, 300_000, -1])).tolist() == [0, 300_000, -300_000]
    assert five.range(pd.Timestamp("2011-01-05 13:00"), pd.Timestamp("2011-01-05 14:00")).size == 13


def test_season_length_and_labels() -> None:
    assert season_length(parse_freq("1min")) == 60
    assert season_length(parse_freq("1D")) == 7
    t = pd.Timestamp("2011-01-05 13:05")
    assert parse_freq("1min").label(t) == "2011-01-05T13:05:00Z"
    assert parse_freq("1W").label(t) == "2011-01-05"
