"""What the worker knows of its model besides the forecaster: shape, frequency, version."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime

from trendcast.forecasting.profile import IntradayProfile
from trendcast.freq import Freq

__all__ = ["ModelInfo", "iso_utc"]


@dataclass(frozen=True, slots=True)
class ModelInfo:
    """What the worker needs to know about the model besides the forecaster itself.

    Attributes:
        freq: Bucket frequency the model was trained on.
        window: Input buckets per window.
        horizon: Forecast buckets.
        model_version: Written into every forecast record.
        uses_prices: Whether windows must carry prices (the model has a price feature);
            otherwise the store skips price sums and items stay smaller.
        profile: How a bucket's units spread over its duration (the bundle's intraday
            profile; ``None``: evenly), for nowcasts and alerts of the open bucket.
    """

    freq: Freq
    window: int
    horizon: int
    model_version: str
    uses_prices: bool = False
    profile: IntradayProfile | None = field(default=None, compare=False, repr=False)

    def intraday(self) -> IntradayProfile:
        """The intraday profile, uniform when the bundle has none."""
        return self.profile if self.profile is not None else IntradayProfile.uniform(self.freq)


def iso_utc(ms: int, *, date_only: bool = False) -> str:
    """Epoch ms as ISO-8601 UTC.

    >>> iso_utc(86_400_000), iso_utc(86_400_000, date_only=True)
    ('1970-01-02T00:00:00Z', '1970-01-02')
    """
    moment = datetime.fromtimestamp(ms / 1000, tz=UTC)
    return moment.strftime("%Y-%m-%d") if date_only else moment.strftime("%Y-%m-%dT%H:%M:%SZ")
