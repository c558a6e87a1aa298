"""Whether a model's training data reaches the backtest origins (optimistic scores)."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import pandas as pd

from trendcast.bundle import Bundle

__all__ = ["bundle_leakage_warning", "leakage_warning"]

logger = logging.getLogger(__name__)


def leakage_warning(data_end: str | pd.Timestamp, origins: Sequence[pd.Timestamp]) -> str | None:
    """A message if training data reaches the first backtest origin, else ``None``.

    A model trained on buckets at or after an origin has seen the answers it is scored on, so
    its backtest scores are optimistic. ``data_end`` is the last training timestamp (inclusive,
    ISO string as in ``bundle.meta.training.data_end``; a timezone is converted to UTC).

    >>> o = [pd.Timestamp("2011-07-07"), pd.Timestamp("2011-08-04")]
    >>> leakage_warning("2011-06-30", o) is None
    True
    >>> msg = leakage_warning("2011-07-31T00:00:00Z", o)
    >>> msg.split(": ")[1].split(" — ")[0]
    '1 of 2 origins are inside the training range'
    """
    if not origins:
        return None
    end = pd.Timestamp(data_end)
    if end.tzinfo is not None:
        end = end.tz_convert("UTC").tz_localize(None)
    first = min(pd.Timestamp(o) for o in origins)
    if end < first:
        return None
    leaked = sum(1 for o in origins if pd.Timestamp(o) <= end)
    message = (
        f"model trained on data up to {end}, at or after the first backtest origin {first}: "
        f"{leaked} of {len(origins)} origins are inside the training range "
        f"— scores are optimistic; retrain with data before {first}"
    )
    logger.warning(message)
    return message


def bundle_leakage_warning(bundle: Bundle, origins: Sequence[pd.Timestamp]) -> str | None:
    """:func:`leakage_warning` for a loaded bundle (``bundle.meta.training.data_end``)."""
    return leakage_warning(bundle.meta.training.data_end, origins)
