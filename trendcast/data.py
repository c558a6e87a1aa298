"""The data contract: reading sales files and turning them into dense bucketed series.

Canonical columns, everywhere in trendcast (files, frames, forecasts)::

    item_id   str        the series key (a product, a SKU…)
    ts        datetime   event time (input) or bucket start (bucketed panel), UTC, tz-naive
    quantity  float      units sold (negative = returns/cancellations in raw input)
    price     float      optional unit price

Input may be raw sales lines or pre-aggregated series; both are summed into buckets of a
:class:`~trendcast.freq.Freq`. Other layouts (e.g. UCI Online Retail: StockCode, InvoiceDate,
Quantity, UnitPrice) are mapped with :class:`ColumnMap`.

Every problem is reported as one :class:`~trendcast.exceptions.DataError` whose message says
what was expected and what was found, because these messages reach users of the CLI verbatim.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd

from trendcast.exceptions import DataError
from trendcast.freq import Freq

__all__ = [
    "ColumnMap",
    "Panel",
    "ReturnsPolicy",
    "bucketize",
    "clean_lines",
    "load_sales",
    "read_lines",
    "read_table",
    "sample_data_path",
]

logger = logging.getLogger(__name__)

ReturnsPolicy = Literal["drop", "net"]

CANONICAL = ("item_id", "ts", "quantity", "price")
SAMPLE_FILE = "online_retail_daily_sample.csv.gz"


@dataclass(frozen=True)
class ColumnMap:
    """Names of the input columns that hold the canonical fields.

    ``price`` may be ``None`` (no price column); the default maps canonical names, and a price
    column named ``price`` is used only if present.
    """

    item: str = "item_id"
    time: str = "ts"
    quantity: str = "quantity"
    price: str | None = "price"


@dataclass(frozen=True)
class Panel:
    """Dense bucketed series: one row per item and bucket, from the item's first sale to ``end``.

    Attributes:
        frame: Columns ``item_id, ts, quantity`` and ``price`` (if ``has_price``), sorted by
            item then time, default RangeIndex.
        freq: The bucket frequency.
        has_price: Whether a price column was present.
        lines: The canonical lines (``item_id, ts, quantity``) the buckets were summed from,
            sorted by time, or ``None`` for a panel built from bucketed data. Training learns
            from their timestamps how a bucket's units spread over its duration (the
            intraday profile), and ``trendcast evaluate --intraday`` replays them; the
            buckets alone cannot tell noon from midnight.
    """

    frame: pd.DataFrame
    freq: Freq
    has_price: bool
    lines: pd.DataFrame | None = field(default=None, repr=False, compare=False)

    @property
    def start(self) -> pd.Timestamp:
        """First bucket start over all items."""
        return pd.Timestamp(self.frame["ts"].min())

    @property
    def end(self) -> pd.Timestamp:
        """Last bucket start (the same for every item)."""
        return pd.Timestamp(self.frame["ts"].max())

    @property
    def n_items(self) -> int:
        """Number of distinct items."""
        return int(self.frame["item_id"].nunique())

    @property
    def n_buckets(self) -> int:
        """Number of buckets from the first to the last bucket of the data."""
        return int((self.end - self.start) / self.freq.timedelta) + 1

    def require_history(self, horizon: int, *, what: str = "the history") -> None:
        """Refuse a horizon that does not fit in the data with at least one bucket of history.

        Raises:
            DataError: ``horizon`` is not shorter than the number of buckets.
        """
        if horizon >= self.n_buckets:
            raise DataError(
                f"horizon of {horizon} buckets is longer than {what} "
                f"({self.n_buckets} buckets of {self.freq.name}, {self.freq.label(self.start)}.."
                f"{self.freq.label(self.end)}); use a shorter --horizon or more data"
            )

    def until(self, cutoff: pd.Timestamp) -> Panel:
        """The panel restricted to buckets starting before ``cutoff`` (a backtest origin)."""
        frame = self.frame[self.frame["ts"] < cutoff].reset_index(drop=True)
        lines = None
        if self.lines is not None:
            lines = self.lines[self.lines["ts"] < cutoff].reset_index(drop=True)
        return Panel(frame=frame, freq=self.freq, has_price=self.has_price, lines=lines)

    def series(self) -> dict[str, pd.DataFrame]:
        """Per-item frames, in item order."""
        groups = self.frame.groupby("item_id", sort=True)
        return {str(k): g.reset_index(drop=True) for k, g in groups}


def sample_data_path() -> Path:
    """Path of the small daily sample that ships with trendcast.

    Derived from UCI Online Retail (D. Chen 2015, CC BY 4.0): daily sums of a few dozen items,
    so that ``make up`` and the tests run without the full data set.
    """
    return Path(str(resources.files("trendcast") / "sample_data" / SAMPLE_FILE))


def read_table(path: Path | str) -> pd.DataFrame:
    """Read a CSV (optionally compressed) or Parquet file.

    Raises:
        DataError: The file is missing, of an unknown kind, or unreadable.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"data file not found: {path}")
    if path.is_dir():
        raise DataError(f"expected a CSV or Parquet file, got a directory: {path}")
    suffixes = [s.lower() for s in path.suffixes]
    try:
        if ".parquet" in suffixes or ".pq" in suffixes:
            return pd.read_parquet(path)
        if ".csv" in suffixes or ".tsv" in suffixes or ".txt" in suffixes:
            sep = "\t" if ".tsv" in suffixes else ","
            return pd.read_csv(path, sep=sep, low_memory=False)
    except (OSError, ValueError, pd.errors.ParserError) as exc:
        raise DataError(f"cannot read {path}: {exc}") from exc
    raise DataError(f"expected a .csv, .csv.gz, .tsv or .parquet file, got {path.name!r}")


def _rename(raw: pd.DataFrame, columns: ColumnMap, path: str) -> tuple[pd.DataFrame, bool]:
    wanted = {columns.item: "item_id", columns.time: "ts", columns.quantity: "quantity"}
    missing = [name for name in wanted if name not in raw.columns]
    if missing:
        found = ", ".join(map(str, raw.columns))
        raise DataError(
            f"{path}: missing column(s) {', '.join(missing)}; columns found: {found} "
            "(map them with --item-col/--time-col/--qty-col/--price-col)"
        )
    has_price = columns.price is not None and columns.price in raw.columns
    if columns.price is not None and not has_price and columns.price != "price":
        found = ", ".join(map(str, raw.columns))
        raise DataError(f"{path}: missing price column {columns.price}; columns found: {found}")
    if has_price and columns.price is not None:
        wanted[columns.price] = "price"
    frame = raw[list(wanted)].rename(columns=wanted)
    return frame, has_price


def _parse_times(values: pd.Series, path: str) -> pd.Series:
    """Parse timestamps to tz-naive UTC; name the first bad row (1-based data row) if any."""
    if pd.api.types.is_datetime64_any_dtype(values):
        parsed = values
    else:
        parsed = pd.to_datetime(values, errors="coerce", utc=True, format="mixed")
        bad = parsed.isna() & values.notna()
        if values.isna().any() or bad.any():
            pos = int(np.flatnonzero((bad | values.isna()).to_numpy())[0])
            raise DataError(
                f"{path}: unparsable timestamp in row {pos + 1}: {values.iloc[pos]!r} "
                "(expected ISO-8601 like 2011-01-31 or 2011-01-31T10:15:00Z)"
            )
    if isinstance(parsed.dtype, pd.DatetimeTZDtype):
        parsed = parsed.dt.tz_convert("UTC").dt.tz_localize(None)
    if parsed.isna().any():
        pos = int(np.flatnonzero(parsed.isna().to_numpy())[0])
        raise DataError(f"{path}: missing timestamp in row {pos + 1}")
    return parsed.astype("datetime64[ns]")


def _numeric(values: pd.Series, name: str, path: str) -> pd.Series:
    numbers = pd.to_numeric(values, errors="coerce").astype("float64")
    bad = ~np.isfinite(numbers.to_numpy())
    if bad.any():
        pos = int(np.flatnonzero(bad)[0])
        raise DataError(
            f"{path}: {name} must be a finite number, got {values.iloc[pos]!r} in row {pos + 1}"
        )
    return numbers


def clean_lines(
    raw: pd.DataFrame,
    *,
    columns: ColumnMap = ColumnMap(),
    item_pattern: str | None = None,
    returns: ReturnsPolicy = "drop",
    source: str = "input",
) -> tuple[pd.DataFrame, bool]:
    """Validate and normalise raw sales lines to canonical columns.

    Args:
        raw: The file's rows.
        columns: Which input columns hold the canonical fields.
        item_pattern: Keep only items whose id matches this regex (``re.search``; anchor it).
        returns: ``drop`` removes lines with negative quantity (returns, cancellations);
            ``net`` keeps them so they offset sales in the same bucket.
        source: Name used in error messages (usually the file path).

    Returns:
        The canonical lines (``item_id, ts, quantity[, price]``) and whether price is present.

    Raises:
        DataError: Missing columns, bad timestamps, non-finite numbers, or nothing left.
    """
    frame, has_price = _rename(raw, columns, source)
    if frame.empty:
        raise DataError(f"{source}: no rows")
    frame = frame.reset_index(drop=True)
    frame["item_id"] = frame["item_id"].astype(str).str.strip()
    frame["ts"] = _parse_times(frame["ts"], source)
    frame["quantity"] = _numeric(frame["quantity"], "quantity", source)
    if has_price:
        frame["price"] = pd.to_numeric(frame["price"], errors="coerce").astype("float64")
        frame.loc[~np.isfinite(frame["price"]) | (frame["price"] < 0), "price"] = np.nan
    if item_pattern:
        try:
            regex = re.compile(item_pattern)
        except re.error as exc:
            raise DataError(f"invalid --item-pattern {item_pattern!r}: {exc}") from exc
        frame = frame[frame["item_id"].map(lambda s: regex.search(s) is not None)]
        if frame.empty:
            raise DataError(f"{source}: no items left after filtering with {item_pattern!r}")
    if returns == "drop":
        frame = frame[frame["quantity"] >= 0]
    elif returns != "net":
        raise DataError(f"expected --returns drop or net, got {returns!r}")
    if frame.empty:
        raise DataError(f"{source}: no sales lines left after dropping returns")
    return frame.reset_index(drop=True), has_price


def bucketize(lines: pd.DataFrame, freq: Freq, *, has_price: bool, min_active: int = 0) -> Panel:
    """Sum canonical lines into dense buckets.

    Every bucket from an item's first sale to the data's last bucket exists (no sale = 0),
    because models and metrics must see closed days as zero demand, not as missing. Netted
    returns never push a bucket below zero. Price per bucket is the quantity-weighted mean
    price of its positive lines, carried forward over buckets without sales.

    Args:
        lines: Output of :func:`clean_lines`.
        freq: Bucket size.
        has_price: Whether ``lines`` has a usable ``price`` column.
        min_active: Keep only items with at least this many buckets with positive sales.

    Raises:
        DataError: No item is left.

    >>> from trendcast.freq import parse_freq
    >>> lines = pd.DataFrame({"item_id": ["a", "a", "b"], "quantity": [1.0, 2.0, 5.0],
    ...     "ts": pd.to_datetime(["2011-01-01 10:00", "2011-01-03 00:00", "2011-01-02 00:00"])})
    >>> p = bucketize(lines, parse_freq("1D"), has_price=False)
    >>> p.frame.assign(ts=p.frame.ts.dt.day).values.tolist()
    [['a', 1, 1.0], ['a', 2, 0.0], ['a', 3, 2.0], ['b', 2, 5.0], ['b', 3, 0.0]]
    """
    work = lines.assign(ts=freq.floor(lines["ts"]))
    agg: dict[str, tuple[str, str]] = {"quantity": ("quantity", "sum")}
    if has_price:
        positive = work["quantity"] > 0
        work = work.assign(
            _pq=np.where(positive & work["price"].notna(), work["price"] * work["quantity"], 0.0),
            _q=np.where(positive & work["price"].notna(), work["quantity"], 0.0),
        )
        agg |= {"_pq": ("_pq", "sum"), "_q": ("_q", "sum")}
    sums = work.groupby(["item_id", "ts"], sort=True).agg(**agg).reset_index()
    sums["quantity"] = sums["quantity"].clip(lower=0.0)
    if min_active > 0:
        active = sums[sums["quantity"] > 0].groupby("item_id").size()
        keep = active[active >= min_active].index
        sums = sums[sums["item_id"].isin(keep)]
        if sums.empty:
            raise DataError(f"no items left with at least {min_active} selling buckets")
    end = sums["ts"].max()
    first = sums.groupby("item_id")["ts"].min()
    step = freq.timedelta
    counts = ((end - first) / step).astype("int64") + 1
    item_ids = np.repeat(first.index.to_numpy(), counts.to_numpy())
    offsets = np.concatenate([np.arange(n) for n in counts.to_numpy()])
    starts = np.repeat(first.to_numpy(), counts.to_numpy())
    grid = pd.DataFrame({"item_id": item_ids, "ts": starts + offsets * step.to_timedelta64()})
    frame = grid.merge(sums, on=["item_id", "ts"], how="left")
    frame["quantity"] = frame["quantity"].fillna(0.0)
    columns = ["item_id", "ts", "quantity"]
    if has_price:
        price = frame["_pq"] / frame["_q"].where(frame["_q"] > 0)
        frame["price"] = price.groupby(frame["item_id"]).ffill().groupby(frame["item_id"]).bfill()
        columns.append("price")
    frame = frame[columns].sort_values(["item_id", "ts"], kind="stable").reset_index(drop=True)
    frame["item_id"] = frame["item_id"].astype(str)
    kept = lines[lines["item_id"].isin(first.index)] if min_active > 0 else lines
    raw = kept[["item_id", "ts", "quantity"]].astype({"item_id": str})
    raw = raw.sort_values("ts", kind="stable").reset_index(drop=True)
    return Panel(frame=frame, freq=freq, has_price=has_price, lines=raw)


def read_lines(
    path: Path | str,
    *,
    columns: ColumnMap = ColumnMap(),
    item_pattern: str | None = None,
    returns: ReturnsPolicy = "drop",
) -> tuple[pd.DataFrame, bool]:
    """Read a file and return its cleaned canonical lines (see :func:`clean_lines`)."""
    raw = read_table(path)
    return clean_lines(
        raw, columns=columns, item_pattern=item_pattern, returns=returns, source=str(path)
    )


def load_sales(
    path: Path | str,
    freq: Freq,
    *,
    columns: ColumnMap = ColumnMap(),
    item_pattern: str | None = None,
    returns: ReturnsPolicy = "drop",
    min_active: int = 0,
) -> Panel:
    """Read a sales file into a dense bucketed :class:`Panel`.

    Raises:
        DataError: Any problem with the file or its content.
    """
    lines, has_price = read_lines(path, columns=columns, item_pattern=item_pattern, returns=returns)
    panel = bucketize(lines, freq, has_price=has_price, min_active=min_active)
    logger.info(
        "loaded %s: %d items, %d buckets of %s (%s..%s)",
        path,
        panel.n_items,
        panel.n_buckets,
        freq.name,
        panel.start,
        panel.end,
    )
    return panel
