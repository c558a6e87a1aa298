"""What the command groups share: option types, the sales-data flags, settings from the context.

The sales-data flags (``--data``, ``--item-col`` … ``--returns``) are defined here once and
added to a command by :func:`sales_data_options`, which hands the command one
:class:`SalesData`; the commands never list them.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from pydantic import ValidationError

from trendcast.config import OfflineSettings
from trendcast.exceptions import ConfigError

if TYPE_CHECKING:
    import pandas as pd

    from stream.settings.worker import WorkerSettings
    from trendcast.data import ColumnMap, Panel

__all__ = [
    "BundleOpt",
    "FreqOpt",
    "MinActive",
    "ReturnsChoice",
    "SalesData",
    "offline_settings",
    "parse_date",
    "sales_data_options",
    "worker_settings",
]

BundleOpt = Annotated[Path | None, typer.Option("--bundle", help="Model bundle directory.")]
FreqOpt = Annotated[str, typer.Option("--freq", help="Bucket size: 1h, 6h, 1D, 7D, 1W…")]
MinActive = Annotated[
    int, typer.Option("--min-active", min=0, help="Keep items with at least N selling buckets.")
]


class ReturnsChoice(StrEnum):
    """What to do with negative quantities (returns, cancellations)."""

    drop = "drop"
    net = "net"


@dataclass(frozen=True)
class SalesData:
    """The sales file a command reads and how to read it (the shared data flags, parsed)."""

    path: Path
    item_col: str = "item_id"
    time_col: str = "ts"
    qty_col: str = "quantity"
    price_col: str = "price"
    item_pattern: str | None = None
    returns: ReturnsChoice = ReturnsChoice.drop

    @property
    def columns(self) -> ColumnMap:
        """The column names as :func:`trendcast.data.read_lines` takes them."""
        from trendcast.data import ColumnMap

        return ColumnMap(
            item=self.item_col, time=self.time_col, quantity=self.qty_col, price=self.price_col
        )

    def lines(self) -> pd.DataFrame:
        """The cleaned canonical sales lines of the file (what ``replay`` publishes)."""
        from trendcast.data import read_lines

        lines, _ = read_lines(
            self.path,
            columns=self.columns,
            item_pattern=self.item_pattern,
            returns=self.returns.value,
        )
        return lines

    def panel(self, freq: str, *, min_active: int = 0) -> Panel:
        """The cleaned panel of the file in buckets of ``freq``."""
        from trendcast.data import load_sales
        from trendcast.freq import parse_freq

        return load_sales(
            self.path,
            parse_freq(freq),
            columns=self.columns,
            item_pattern=self.item_pattern,
            returns=self.returns.value,
            min_active=min_active,
        )


def _option(
    name: str, annotation: Any, default: Any = inspect.Parameter.empty
) -> inspect.Parameter:
    return inspect.Parameter(
        name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation
    )


# The flags behind SalesData, each defined only here. --data leads a command's options; the
# others stand where the command puts its ``sales`` parameter (after its own --out/--bundle).
_DATA_FILE = _option(
    "data",
    Annotated[
        Path, typer.Option("--data", help="CSV/Parquet of sales lines or pre-aggregated series.")
    ],
)
_READ_FLAGS = (
    _option(
        "item_col",
        Annotated[str, typer.Option("--item-col", help="Column holding the item id.")],
        "item_id",
    ),
    _option(
        "time_col",
        Annotated[str, typer.Option("--time-col", help="Column holding the timestamp.")],
        "ts",
    ),
    _option(
        "qty_col",
        Annotated[str, typer.Option("--qty-col", help="Column holding the quantity.")],
        "quantity",
    ),
    _option(
        "price_col",
        Annotated[
            str,
            typer.Option("--price-col", help="Column holding the unit price (used if present)."),
        ],
        "price",
    ),
    _option(
        "item_pattern",
        Annotated[
            str | None,
            typer.Option(
                "--item-pattern", help=r"Keep items whose id matches this regex, e.g. '^\d{5}'."
            ),
        ],
        None,
    ),
    _option(
        "returns",
        Annotated[
            ReturnsChoice,
            typer.Option(
                "--returns",
                help="drop: ignore negative quantities; net: subtract them within a bucket.",
            ),
        ],
        ReturnsChoice.drop,
    ),
)
_FLAG_NAMES = frozenset(p.name for p in (_DATA_FILE, *_READ_FLAGS))


def sales_data_options(command: Callable[..., None]) -> Callable[..., None]:
    """Give ``command`` the sales-data flags, gathered into its ``sales: SalesData`` parameter.

    Typer builds a command's options from its signature alone and has no option groups, so
    without this every command reading sales data would repeat the same seven parameters.
    The wrapper's signature is the command's with ``sales`` replaced: ``--data`` first (after
    a leading ``typer.Context``), the column flags where ``sales`` stood, so ``--help`` lists
    them in the order the commands always had.

    Raises:
        TypeError: ``command`` has no ``sales`` parameter or already takes a data flag.
    """
    own = list(inspect.signature(command, eval_str=True).parameters.values())
    names = [p.name for p in own]
    if "sales" not in names or _FLAG_NAMES & set(names):
        raise TypeError(f"{command.__name__}: expected a 'sales' parameter and no data flags")
    at = names.index("sales")
    lead = 1 if own and own[0].annotation is typer.Context else 0
    params = [
        *own[:lead],
        _DATA_FILE,
        *own[lead:at],
        *_READ_FLAGS,
        *own[at + 1 :],
    ]

    @functools.wraps(command)
    def wrapper(**kwargs: Any) -> None:
        flags = {name: kwargs.pop(name) for name in _FLAG_NAMES}
        command(**kwargs, sales=SalesData(path=flags.pop("data"), **flags))

    # Keyword-only throughout: typer passes every value by name, and a required option may
    # then follow one with a default (--out after nothing, --data before --bundle=None).
    wrapper.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
        [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in params], return_annotation=None
    )
    wrapper.__annotations__ = {p.name: p.annotation for p in params} | {"return": None}
    return wrapper


def offline_settings(ctx: typer.Context) -> OfflineSettings:
    """The :class:`OfflineSettings` ``main()`` built, from the root context."""
    obj = ctx.find_root().obj
    if not isinstance(obj, OfflineSettings):  # pragma: no cover - set by the callback
        raise ConfigError("settings not initialised")
    return obj


def worker_settings() -> WorkerSettings:
    """The worker's settings from ``TRENDCAST_*``; a bad value is one line naming the variable."""
    from stream.settings.worker import WorkerSettings

    try:
        return WorkerSettings()
    except ValidationError as exc:
        first = exc.errors()[0]
        raise ConfigError(f"TRENDCAST_{str(first['loc'][0]).upper()}: {first['msg']}") from exc


def parse_date(value: str | None, flag: str) -> datetime | None:
    """``value`` of ``flag`` as a datetime (``None`` stays ``None``).

    Raises:
        ConfigError: ``value`` is not an ISO date.
    """
    if value is None:
        return None
    try:
        return datetime.fromisoformat(value)
    except ValueError as exc:
        raise ConfigError(f"{flag}: expected a date like 2011-06-30, got {value!r}") from exc
