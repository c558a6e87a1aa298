"""Intraday profiles: learned from line timestamps, shrunk per item, stored in the bundle."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import orjson
import pandas as pd
import pytest

from trendcast.bundle import PROFILES_FILE, load_bundle, sha256_file, write_bundle_meta
from trendcast.data import bucketize, load_sales, sample_data_path
from trendcast.exceptions import BundleError
from trendcast.forecasting.profile import IntradayProfile, learn_profile, profile_layout
from trendcast.freq import parse_freq
from trendcast.testkit.bundles import make_fake_bundle

DAY = parse_freq("1D")
HOUR_MS = 3_600_000


def _lines(days: int = 140, seed: int = 0) -> pd.DataFrame:
    """Item ``a`` sells mornings (09:00-12:00), ``b`` afternoons, ``c`` rarely, every day."""
    rng = np.random.default_rng(seed)
    rows = []
    start = pd.Timestamp("2011-01-03")  # a Monday
    for d in range(days):
        day = start + pd.Timedelta(days=d)
        for item, (lo, hi) in {"a": (9, 12), "b": (13, 17)}.items():
            for _ in range(3):
                rows.append((item, day + pd.Timedelta(hours=rng.uniform(lo, hi)), 2.0))
        if d % 10 == 0:
            rows.append(("c", day + pd.Timedelta(hours=20.5), 1.0))
    return pd.DataFrame(rows, columns=["item_id", "ts", "quantity"])


def test_layout_by_frequency() -> None:
    assert profile_layout(DAY)[0] == "hour_by_weekday"
    assert profile_layout(parse_freq("1W"))[0] == "day_of_week"
    for text in ("1h", "6h", "7D", "1min", "15min"):
        assert profile_layout(parse_freq(text))[0] == "uniform"


def test_learned_daily_profile_and_item_shrinkage() -> None:
    profile = learn_profile(_lines(), DAY, min_buckets=100, prior_buckets=20.0)
    assert profile.kind == "hour_by_weekday" and profile.shares.shape == (7, 24)
    np.testing.assert_allclose(profile.shares.sum(axis=1), 1.0)
    assert set(profile.item_index) == {"a", "b"}  # c: 14 selling days < 100
    monday = 0
    global_row = profile.shares[monday]
    assert global_row[:9].sum() == 0 and global_row[9:17].sum() > 0.9
    a = profile.item_shares[profile.item_index["a"], monday]
    # 20 Mondays of its own against 20 pseudo-days of the global profile: about half each.
    assert a[9:12].sum() == pytest.approx((20 * 1.0 + 20 * global_row[9:12].sum()) / 40)
    monday_ms = int(pd.Timestamp("2011-01-03").value // 1_000_000)
    noon = monday_ms + 12 * HOUR_MS
    share = profile.cumulative_share(["a", "b", "c", "new"], np.full(4, monday_ms), noon)
    assert share[0] > 0.7 and share[1] < 0.3  # mornings vs afternoons
    assert share[2] == share[3] == pytest.approx(global_row[:12].sum())


def test_cumulative_share_is_monotone_from_zero_to_one() -> None:
    profile = learn_profile(_lines(days=30), DAY, min_buckets=1)
    start = int(pd.Timestamp("2011-01-05").value // 1_000_000)
    times = start + np.arange(0, 24 * HOUR_MS + 1, 15 * 60_000)
    shares = profile.cumulative_share(["a"] * len(times), np.full(len(times), start), times)
    assert shares[0] == 0.0 and shares[-1] == 1.0
    assert np.all(np.diff(shares) >= -1e-12)


def test_uniform_without_time_of_day_or_lines() -> None:
    sample = load_sales(sample_data_path(), DAY)  # daily sums at midnight
    assert sample.lines is not None
    profile = learn_profile(sample.lines, DAY)
    assert profile.kind == "uniform" and "no time" in str(profile.params["source"])
    assert learn_profile(None, DAY).kind == "uniform"
    minute = learn_profile(_lines(days=2), parse_freq("5min"))
    half = minute.cumulative_share(["a"], np.array([0]), np.array([150_000]))
    assert half.tolist() == [0.5]


def test_panel_keeps_lines_through_until() -> None:
    lines = _lines(days=10)
    panel = bucketize(lines, DAY, has_price=False)
    assert panel.lines is not None and len(panel.lines) == len(lines)
    cut = panel.until(pd.Timestamp("2011-01-08"))
    assert cut.lines is not None and cut.lines["ts"].max() < pd.Timestamp("2011-01-08")


def _bundle_with_profile(path: Path) -> Path:
    make_fake_bundle(path)
    profile = learn_profile(_lines(), DAY, min_buckets=100)
    (path / PROFILES_FILE).write_bytes(orjson.dumps({"items": profile.items_json()}))
    meta = load_bundle(path, check_model=False).meta
    files = dict(meta.files) | {PROFILES_FILE: sha256_file(path / PROFILES_FILE)}
    new = meta.model_copy(update={"intraday": profile.to_meta(PROFILES_FILE), "files": files})
    write_bundle_meta(path, new)
    return path


def test_profile_round_trips_through_the_bundle(tmp_path: Path) -> None:
    bundle = load_bundle(_bundle_with_profile(tmp_path / "b"))
    assert bundle.meta.intraday is not None and bundle.meta.intraday.n_items == 2
    loaded = IntradayProfile.from_bundle(bundle)
    learned = learn_profile(_lines(), DAY, min_buckets=100)
    start = int(pd.Timestamp("2011-01-04").value // 1_000_000)
    args = (["a", "b", "z"], np.full(3, start), start + 11 * HOUR_MS)
    np.testing.assert_allclose(
        loaded.cumulative_share(*args), learned.cumulative_share(*args), atol=1e-4
    )


def test_older_bundles_get_the_uniform_profile(tmp_path: Path) -> None:
    bundle = load_bundle(make_fake_bundle(tmp_path / "b"))
    assert bundle.meta.intraday is None and bundle.item_profiles == {}
    profile = IntradayProfile.from_bundle(bundle)
    assert profile.kind == "uniform"
    assert profile.cumulative_share(
        ["a"], np.array([0]), np.array([DAY.step_ms // 4])
    ).tolist() == [0.25]


def test_tampered_or_unlisted_profiles_are_refused(tmp_path: Path) -> None:
    path = _bundle_with_profile(tmp_path / "b")
    data = orjson.loads((path / PROFILES_FILE).read_bytes())
    data["items"]["a"][0][9] += 0.5
    (path / PROFILES_FILE).write_bytes(orjson.dumps(data))
    with pytest.raises(BundleError, match="checksum mismatch"):
        load_bundle(path, check_model=False)
    meta = orjson.loads((path / "bundle.json").read_bytes())
    meta["files"][PROFILES_FILE] = sha256_file(path / PROFILES_FILE)
    (path / "bundle.json").write_bytes(orjson.dumps(meta))
    with pytest.raises(BundleError, match="each row summing to 1"):
        load_bundle(path, check_model=False)
    del meta["files"][PROFILES_FILE]
    (path / "bundle.json").write_bytes(orjson.dumps(meta))
    with pytest.raises(BundleError, match="no checksum for profiles.json"):
        load_bundle(path, check_model=False)


def test_profile_slots_must_cover_the_bucket(tmp_path: Path) -> None:
    path = _bundle_with_profile(tmp_path / "b")
    meta = orjson.loads((path / "bundle.json").read_bytes())
    meta["intraday"]["slot_ms"] = 1_800_000
    (path / "bundle.json").write_bytes(orjson.dumps(meta))
    with pytest.raises(BundleError, match="intraday slots covering one 1D bucket"):
        load_bundle(path, check_model=False)
