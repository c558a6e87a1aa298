"""Where a backtest tests: the origins, and their checks against the data.

Origins are spaced ``step`` buckets apart (default a week), the last one's horizon ending on
the data's last bucket, so the most recent data is always tested.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import pandas as pd

from trendcast.data import Panel
from trendcast.exceptions import ConfigError
from trendcast.freq import Freq

__all__ = ["backtest_origins", "choose_origins", "week_buckets"]

logger = logging.getLogger(__name__)


def week_buckets(freq: Freq) -> int:
    """Buckets per week (at least 1): the default spacing of origins.

    >>> from trendcast.freq import parse_freq
    >>> [week_buckets(parse_freq(f)) for f in ("1D", "1h", "1W")]
    [7, 168, 1]
    """
    return max(1, (7 * 86_400_000) // freq.step_ms)


def backtest_origins(
    end: pd.Timestamp,
    freq: Freq,
    *,
    horizon: int,
    step: int | None = None,
    n_origins: int | None = None,
    weeks: int | None = None,
) -> list[pd.Timestamp]:
    """Origins (first forecast bucket), oldest first, the last one's horizon ending at ``end``.

    Give either ``n_origins`` or ``weeks``: ``weeks`` is the length of the test period at the
    end of the data, and as many origins as fit in it (every ``step`` buckets, default a week)
    are used, so every forecast target lies within those weeks.

    Raises:
        ConfigError: Neither or both of ``n_origins``/``weeks``, or a period shorter than the
            horizon.

    >>> from trendcast.freq import parse_freq
    >>> end = pd.Timestamp("2011-08-31")
    >>> daily = parse_freq("1D")
    >>> [o.strftime("%m-%d") for o in backtest_origins(end, daily, horizon=28, weeks=8)]
    ['07-07', '07-14', '07-21', '07-28', '08-04']
    >>> [o.strftime("%m-%d") for o in backtest_origins(end, daily, horizon=7, n_origins=2, step=3)]
    ['08-22', '08-25']
    """
    if horizon < 1:
        raise ConfigError(f"expected a horizon of at least 1 bucket, got {horizon}")
    step = week_buckets(freq) if step is None else step
    if step < 1:
        raise ConfigError(f"expected an origin step of at least 1 bucket, got {step}")
    if (n_origins is None) == (weeks is None):
        raise ConfigError("expected exactly one of n_origins or weeks")
    if weeks is not None:
        if weeks < 1:
            raise ConfigError(f"expected at least 1 week, got {weeks}")
        period = (weeks * 7 * 86_400_000) // freq.step_ms
        if period < horizon:
            raise ConfigError(
                f"expected a test period of at least the horizon ({horizon} buckets), "
                f"got {weeks} week(s) = {period} bucket(s) of {freq.name}"
            )
        n_origins = (period - horizon) // step + 1
    if n_origins is None or n_origins < 1:
        raise ConfigError(f"expected at least 1 origin, got {n_origins}")
    last = end - (horizon - 1) * freq.timedelta
    return [last - k * step * freq.timedelta for k in reversed(range(n_origins))]


def choose_origins(
    panel: Panel,
    *,
    horizon: int,
    n_origins: int | None,
    weeks: int | None,
    step: int | None,
    origins: Sequence[pd.Timestamp] | None,
) -> list[pd.Timestamp]:
    """The origins to test, oldest first: explicit ones, or those :func:`backtest_origins` places.

    Explicit origins are checked against the data, because an origin without history before it,
    whose horizon runs past the data, or that falls between bucket starts would be scored on
    targets that do not exist (or on shifted ones).

    Raises:
        ConfigError: No origin, or an origin outside the data or off the bucket grid.
    """
    freq = panel.freq
    if origins is None:
        origin_list = backtest_origins(
            panel.end, freq, horizon=horizon, step=step, n_origins=n_origins, weeks=weeks
        )
    else:
        origin_list = sorted(pd.Timestamp(o) for o in origins)
    if not origin_list:
        raise ConfigError("expected at least one origin")
    td = freq.timedelta
    for origin in origin_list:
        if origin <= panel.start or origin + (horizon - 1) * td > panel.end:
            raise ConfigError(
                f"origin {origin} needs history before it and {horizon} buckets up to the data's "
                f"end {panel.end}; data spans {panel.start}..{panel.end}"
            )
        if (origin - panel.start) % td != pd.Timedelta(0):
            raise ConfigError(f"origin {origin} is not a {freq.name} bucket start")
    return origin_list
