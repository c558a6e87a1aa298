"""The periods of a search: training, the weekly tuning origins, and the held-out test period.

See the package docstring (:mod:`training.tuning`) for the picture and why the test period
is cut off before any trial.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import pandas as pd

from trendcast.backtest import backtest_origins
from trendcast.backtest.origins import week_buckets
from trendcast.data import Panel
from trendcast.exceptions import ConfigError

__all__ = [
    "DEFAULT_ORIGINS",
    "TuningSplit",
    "split_periods",
]

logger = logging.getLogger(__name__)

#: Weekly tuning origins by default: three horizons' worth of scores, one week apart.
DEFAULT_ORIGINS = 3
_DAY_MS = 86_400_000


@dataclass(frozen=True)
class TuningSplit:
    """Where trials train, where they are scored, and the test period none of them sees.

    Attributes:
        data_start: First bucket of the data.
        train_until: The first tuning origin: trials train on buckets before it.
        origins: The tuning origins (first forecast buckets), oldest first, a week apart.
        tuning_end: Last bucket scored by a trial (the bucket before ``test_start``).
        test_start: First bucket of the test period.
        test_end: Last bucket of the data (and of the test period).
        test_buckets: Buckets in the test period.
        horizon: Buckets forecast from each origin.
    """

    data_start: pd.Timestamp
    train_until: pd.Timestamp
    origins: list[pd.Timestamp]
    tuning_end: pd.Timestamp
    test_start: pd.Timestamp
    test_end: pd.Timestamp
    test_buckets: int
    horizon: int

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready periods (ISO timestamps; ends inclusive, ``train_until`` exclusive)."""
        return {
            "data_start": self.data_start.isoformat(),
            "train_until": self.train_until.isoformat(),
            "tuning_origins": [o.isoformat() for o in self.origins],
            "tuning_end": self.tuning_end.isoformat(),
            "test_start": self.test_start.isoformat(),
            "test_end": self.test_end.isoformat(),
            "test_buckets": self.test_buckets,
            "horizon": self.horizon,
        }


def split_periods(
    panel: Panel,
    *,
    horizon: int,
    n_origins: int = DEFAULT_ORIGINS,
    test_weeks: int | None = None,
    min_train_buckets: int | None = None,
) -> TuningSplit:
    """Place the test period, the tuning origins and the training cut-off (module docstring).

    Args:
        panel: All the data.
        horizon: Buckets forecast from each origin.
        n_origins: Weekly tuning origins.
        test_weeks: Weeks held out at the end (default: the horizon, rounded up to weeks).
        min_train_buckets: Buckets the training period needs at least (``train()`` needs
            ``window + 2 * horizon`` for one item); default ``2 * horizon + 1``.

    Raises:
        ConfigError: Bad counts, a test period shorter than the horizon, or too little data
            before the first tuning origin.
    """
    if horizon < 1:
        raise ConfigError(f"expected --horizon >= 1, got {horizon}")
    if n_origins < 1:
        raise ConfigError(f"expected --origins >= 1, got {n_origins}")
    freq, td = panel.freq, panel.freq.timedelta
    week_ms = 7 * _DAY_MS
    if test_weeks is None:
        test_weeks = max(1, -(-horizon * freq.step_ms // week_ms))
    if test_weeks < 1:
        raise ConfigError(f"expected --test-weeks >= 1, got {test_weeks}")
    test_buckets = max(1, test_weeks * week_ms // freq.step_ms)
    if test_buckets < horizon:
        raise ConfigError(
            f"expected a test period of at least the horizon ({horizon} buckets), got "
            f"--test-weeks {test_weeks} = {test_buckets} bucket(s) of {freq.name}"
        )
    test_start = panel.end - (test_buckets - 1) * td
    tuning_end = test_start - td
    origins = backtest_origins(
        tuning_end, freq, horizon=horizon, step=week_buckets(freq), n_origins=n_origins
    )
    train_until = origins[0]
    have = int((train_until - panel.start) // td)
    need = 2 * horizon + 1 if min_train_buckets is None else min_train_buckets
    if have < need:
        raise ConfigError(
            f"expected at least {need} buckets of training data before the first tuning origin "
            f"{freq.label(train_until)} ({n_origins} weekly origin(s) of {horizon} buckets, then "
            f"{test_weeks} test week(s) up to {freq.label(panel.end)}), got {max(have, 0)} "
            f"from {freq.label(panel.start)}; use fewer --origins, a shorter --test-weeks or "
            "--horizon, or more data"
        )
    return TuningSplit(
        data_start=panel.start,
        train_until=train_until,
        origins=list(origins),
        tuning_end=tuning_end,
        test_start=test_start,
        test_end=panel.end,
        test_buckets=test_buckets,
        horizon=horizon,
    )
