"""Bucket frequencies and event-time bucket math, shared by offline and stream code.

A bucket is a half-open interval ``[start, start + step)``. Buckets are aligned on a fixed
origin so that the offline aggregation and the stream worker (which only sees epoch
milliseconds) agree on every boundary: minutes, hours and days align on the Unix epoch (UTC
midnight), weeks on Monday 1970-01-05 so that a weekly bucket is a calendar week starting Monday.

Minute buckets (``1min``, ``5min``, ``15min``, any ``Nmin``) exist for flash sales and for
tests of the live behaviour, which then take seconds instead of days. ``60min`` is the same
bucket as ``1h`` and is named so: one bucket size has one canonical name (stored in bundles).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import pandas as pd

from trendcast.exceptions import ConfigError

__all__ = ["Freq", "parse_freq", "season_length"]

_MINUTE_MS = 60_000
_HOUR_MS = 3_600_000
_DAY_MS = 24 * _HOUR_MS
_WEEK_MS = 7 * _DAY_MS
# Monday 1970-01-05 00:00 UTC: weekly buckets start on Mondays.
_MONDAY_ORIGIN_MS = 4 * _DAY_MS

_UNITS = {"min": _MINUTE_MS, "h": _HOUR_MS, "d": _DAY_MS, "w": _WEEK_MS}
# A bare "m" is refused: it reads as a month as often as a minute.
_PATTERN = re.compile(
    r"^\s*(\d*)\s*(min|mins|minute|minutes|h|hour|hours|d|day|days|w|week|weeks)\s*$",
    re.IGNORECASE,
)
_EXPECTED = "expected a frequency like 1min, 5min, 15min, 1h, 6h, 1D, 7D or 1W"


@dataclass(frozen=True)
class Freq:
    """A fixed-length bucket size with its alignment origin.

    Attributes:
        step_ms: Bucket length in milliseconds.
        origin_ms: Epoch milliseconds of one bucket boundary.
        name: Canonical spelling (``1min``, ``1h``, ``1D``, ``1W``…), stored in bundles.
    """

    step_ms: int
    origin_ms: int
    name: str

    def floor_ms(self, ts_ms: int) -> int:
        """Start (epoch ms) of the bucket holding ``ts_ms``.

        >>> parse_freq("1D").floor_ms(86_400_000 + 5)
        86400000
        >>> parse_freq("1W").floor_ms(0)  # Thursday 1970-01-01 belongs to the week of Mon 12-29
        -259200000
        """
        return self.origin_ms + ((ts_ms - self.origin_ms) // self.step_ms) * self.step_ms

    def floor_ms_array(self, ts_ms: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
        """Vectorised :meth:`floor_ms`.

        >>> parse_freq("1h").floor_ms_array(np.array([3_599_999, 3_600_000])).tolist()
        [0, 3600000]
        """
        return self.origin_ms + ((ts_ms - self.origin_ms) // self.step_ms) * self.step_ms

    def floor(self, ts: pd.Series) -> pd.Series:
        """Bucket start of each timestamp of a tz-naive (UTC) datetime Series.

        >>> s = pd.Series(pd.to_datetime(["2011-01-05 13:00", "2011-01-09 23:59"]))
        >>> parse_freq("1W").floor(s).dt.strftime("%Y-%m-%d").tolist()
        ['2011-01-03', '2011-01-03']
        """
        ms: npt.NDArray[np.int64] = np.asarray(ts.astype("datetime64[ms]").astype("int64"))
        floored = self.floor_ms_array(ms)
        return pd.Series(pd.to_datetime(floored, unit="ms"), index=ts.index, name=ts.name)

    def range(self, start: pd.Timestamp, end: pd.Timestamp) -> pd.DatetimeIndex:
        """All bucket starts from ``start`` to ``end`` inclusive (both bucket starts).

        >>> parse_freq("1D").range(pd.Timestamp("2011-01-01"), pd.Timestamp("2011-01-03")).size
        3
        """
        return pd.date_range(start, end, freq=pd.Timedelta(milliseconds=self.step_ms))

    @property
    def timedelta(self) -> pd.Timedelta:
        """Bucket length as a pandas Timedelta."""
        return pd.Timedelta(milliseconds=self.step_ms)

    @property
    def is_sub_hourly(self) -> bool:
        """Whether a bucket is shorter than an hour (minute buckets).

        >>> parse_freq("5min").is_sub_hourly, parse_freq("1h").is_sub_hourly
        (True, False)
        """
        return self.step_ms < _HOUR_MS

    @property
    def is_daily(self) -> bool:
        """Whether buckets are whole days (dates then print without a time of day).

        >>> parse_freq("1D").is_daily, parse_freq("1W").is_daily, parse_freq("6h").is_daily
        (True, True, False)
        """
        return self.step_ms % _DAY_MS == 0

    def label(self, ts: pd.Timestamp) -> str:
        """A bucket start as people read it: the date for whole days, else date and time.

        >>> t = pd.Timestamp("2011-01-05 13:05")
        >>> parse_freq("1D").label(t), parse_freq("5min").label(t)
        ('2011-01-05', '2011-01-05T13:05:00Z')
        """
        return f"{ts:%Y-%m-%d}" if self.is_daily else f"{ts:%Y-%m-%dT%H:%M:%SZ}"


def parse_freq(text: str) -> Freq:
    """Parse a bucket frequency such as ``1min``, ``15min``, ``1h``, ``6h``, ``1D``, ``7D``, ``1W``.

    Only fixed-length buckets are allowed: calendar months have no fixed length and would make
    the stream's bucket math depend on a calendar. Minute counts that make whole hours are
    named in hours (``60min`` is ``1h``), so equal buckets compare equal by name.

    >>> parse_freq("1d").name, parse_freq("W").name, parse_freq("6H").step_ms
    ('1D', '1W', 21600000)
    >>> parse_freq("5min").name, parse_freq("15 minutes").step_ms, parse_freq("120min").name
    ('5min', 900000, '2h')
    >>> parse_freq("1M")
    Traceback (most recent call last):
    ...
    trendcast.exceptions.ConfigError: expected a frequency like 1min, 5min, 15min, 1h, 6h, 1D, 7D or 1W, got '1M'

    Raises:
        ConfigError: The text is not a supported frequency.
    """  # noqa: E501
    match = _PATTERN.match(text)
    if match is None:
        raise ConfigError(f"{_EXPECTED}, got {text!r}")
    count = int(match.group(1) or "1")
    if count <= 0:
        raise ConfigError(f"expected a positive frequency, got {text!r}")
    word = match.group(2).lower()
    unit = "min" if word.startswith("min") else word[0]
    if unit == "min" and count % 60 == 0:
        unit, count = "h", count // 60
    step = count * _UNITS[unit]
    origin = _MONDAY_ORIGIN_MS if unit == "w" else 0
    suffix = {"min": "min", "h": "h"}.get(unit, unit.upper())
    return Freq(step_ms=step, origin_ms=origin, name=f"{count}{suffix}")


def season_length(freq: Freq) -> int:
    """Seasonal-naive period in buckets: the cycle a bucket of ``freq`` most plainly repeats.

    Minute buckets repeat the hour: a day of them (1,440 one-minute buckets) is far longer
    than any window the model reads, so a day-long season would only ever see its fallback
    mean. Hourly to sub-daily buckets repeat the day, daily ones the week, longer ones the year.

    >>> [season_length(parse_freq(f)) for f in ("1min", "5min", "15min", "1h", "6h", "1D", "1W")]
    [60, 12, 4, 24, 4, 7, 52]
    """
    if freq.step_ms < _HOUR_MS:
        return max(1, _HOUR_MS // freq.step_ms)
    if freq.step_ms < _DAY_MS:
        return max(1, _DAY_MS // freq.step_ms)
    if freq.step_ms < _WEEK_MS:
        return max(1, _WEEK_MS // freq.step_ms)
    return max(1, 52 * _WEEK_MS // freq.step_ms)
