"""What an explanation holds: per input, per integrated-gradients path, per item.

These are plain frozen dataclasses: :func:`training.explain.write_explanations` writes them to
JSON with :func:`dataclasses.asdict`, so their fields are the JSON's keys.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Literal

__all__ = ["Attribution", "InputAttribution", "ItemExplanation", "fmt_units"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class InputAttribution:
    """How much one input moved the forecast, in forecast units.

    Attributes:
        name: ``sales t-1`` … (one per bucket, ``t-1`` the window's last), ``price t-k``, a
            calendar kind (``day of week``, summed over the window's buckets and the sine and
            cosine), or ``item scale``.
        group: ``sales``, ``price``, the calendar kind, or ``item scale``.
        attribution: Units of forecast this input added (negative: removed).
        lag: Buckets before the forecast origin (``1`` = the last bucket); ``None`` for
            inputs over the whole window.
        date: The bucket's start (the newer window's in a comparison).
        value: The input as people know it: units sold, unit price (``None`` if unknown),
            the scale; ``None`` for calendar kinds.
        old_date: In a comparison, the older window's bucket at the same lag.
        old_value: In a comparison, the older window's value.
    """

    name: str
    group: str
    attribution: float
    lag: int | None = None
    date: str | None = None
    value: float | None = None
    old_date: str | None = None
    old_value: float | None = None

    def label(self) -> str:
        """``name (date)``, or ``name (date vs old_date)`` in a comparison."""
        if self.date is None:
            return self.name
        if self.old_date is None:
            return f"{self.name} ({self.date})"
        return f"{self.name} ({self.date} vs {self.old_date})"


@dataclass(frozen=True)
class Attribution:
    """One integrated-gradients path: from ``reference`` (value ``start``) to the forecast.

    Attributes:
        reference: What the path starts from, in words.
        start: The target at the reference (units).
        end: The target at the explained input (units).
        inputs: Attribution of every input the path moves.
        groups: Sum of ``inputs`` per group.
        total: Sum of all attributions.
        completeness_error: ``|total - (end - start)|`` (units): the integral's error.
        completeness_share: ``completeness_error`` over the sum of ``|attribution|``.
        integration_steps: Intervals the integral took (more than asked when refined).
    """

    reference: str
    start: float
    end: float
    inputs: list[InputAttribution]
    groups: dict[str, float]
    total: float
    completeness_error: float
    completeness_share: float
    integration_steps: int

    @property
    def delta(self) -> float:
        """``end - start``: what the attributions explain."""
        return self.end - self.start


@dataclass(frozen=True)
class ItemExplanation:
    """The explanation of one item's forecast (or of the change between two of them).

    Attributes:
        item_id: The item.
        mode: ``forecast`` (one forecast, paths ``sales`` and ``context``) or ``change``
            (path ``change`` from the forecast as of ``vs`` to the one as of ``at``).
        at: Origin of the forecast: its first bucket (the window ends just before it).
        forecast: The explained target in units (Keras), ``None`` when not attributed.
        served: The served forecast of the output per explained step (ONNX Runtime, or the
            seasonal-naive fallback), empty when the item has no history at all.
        fallback: The item gets the seasonal-naive fallback, not the model: not attributed.
        note: Why the item was not attributed, when it was not.
        vs: Origin of the older forecast (``change`` mode).
        previous: The older forecast (``change`` mode).
        change: ``forecast - previous`` (``change`` mode).
        parts: The integrated-gradients paths by name.
        top: The inputs that moved the forecast most, largest ``|attribution|`` first.
        summary: One sentence saying it.
    """

    item_id: str
    mode: Literal["forecast", "change"]
    at: str
    forecast: float | None
    served: list[float]
    fallback: bool = False
    note: str | None = None
    vs: str | None = None
    previous: float | None = None
    change: float | None = None
    parts: dict[str, Attribution] = field(default_factory=dict)
    top: list[InputAttribution] = field(default_factory=list)
    summary: str = ""

    @property
    def explained(self) -> bool:
        """Whether the item has attributions (it is served by the model)."""
        return bool(self.parts)


def fmt_units(value: float) -> str:
    """A signed number of units, as summaries and tables show a contribution (``+1,234.50``)."""
    return f"{value:+,.2f}"
