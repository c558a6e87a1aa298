"""Forecast records in C (``stream/inference/_recordfmt.c``); see ``forecast_records``."""

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

def format_rows(
    values: npt.NDArray[np.float64],
    prefix: bytes,
    ids: list[bytes],
    seps: Sequence[tuple[bytes, ...]],
    tails: list[bytes],
) -> list[bytes | None]: ...
