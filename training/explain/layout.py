"""Which of a bundle's feature columns are sales, price and each calendar kind; references.

The two references of one forecast (zero sales; an average calendar day at the usual price)
are explained in the :mod:`training.explain` package docstring.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from trendcast.exceptions import BundleError
from trendcast.forecasting.features import QTY_FEATURES

__all__ = ["InputLayout"]

logger = logging.getLogger(__name__)

F32 = npt.NDArray[np.float32]
F64 = npt.NDArray[np.float64]

_KIND_LABELS = {
    "dow": "day of week",
    "dom": "day of month",
    "month": "month",
    "moh": "minute of hour",
    "hod": "hour of day",
}


@dataclass(frozen=True)
class InputLayout:
    """Which feature columns are sales, price, and each calendar (or other) kind."""

    features: list[str]
    sales: int
    price: int | None
    kinds: dict[str, list[int]]

    @classmethod
    def of(cls, features: Sequence[str]) -> InputLayout:
        sales = [j for j, f in enumerate(features) if f in QTY_FEATURES]
        if len(sales) != 1:
            raise BundleError(
                f"expected exactly one of {QTY_FEATURES} in the bundle's features, got "
                f"{list(features)}"
            )
        price = features.index("price") if "price" in features else None
        kinds: dict[str, list[int]] = {}
        for j, name in enumerate(features):
            if j == sales[0] or j == price:
                continue
            kind = re.sub(r"_(sin|cos)$", "", name)
            kinds.setdefault(_KIND_LABELS.get(kind, kind), []).append(j)
        return cls(list(features), sales[0], price, kinds)

    def context_reference(self, x: F32) -> F32:
        """``x`` on an average calendar day at the usual price (package docstring)."""
        ref = x.copy()
        for columns in self.kinds.values():
            ref[..., columns] = 0.0  # circle centres; other features: absent
        if self.price is not None:
            ref[..., self.price] = 1.0
        return ref

    def by_input(self, attr_x: F64) -> F64:
        """``[n, inputs]``: attributions per reported input (sales and price per bucket,
        calendar kinds over the window) from ``[n, window, features]`` ones."""
        columns = [attr_x[:, :, self.sales]]
        if self.price is not None:
            columns.append(attr_x[:, :, self.price])
        columns.extend(attr_x[:, :, idx].sum(axis=(1, 2))[:, None] for idx in self.kinds.values())
        return np.concatenate(columns, axis=1)

    def sales_reference(self, x: F32) -> F32:
        """``x`` with zero sales, its own calendar and prices."""
        ref = x.copy()
        ref[..., self.sales] = 0.0
        return ref
