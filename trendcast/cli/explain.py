"""The ``explain`` command: which inputs moved an item's forecast (integrated gradients).

TensorFlow (``training.explain``) is imported inside the command only: gradients need the
bundle's Keras model, and ``trendcast --help`` must stay instant.
"""

from __future__ import annotations

import logging
from datetime import datetime
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from trendcast.cli.options import (
    BundleOpt,
    SalesData,
    offline_settings,
    parse_date,
    sales_data_options,
)
from trendcast.exceptions import DataError

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["OutputChoice", "explain"]

logger = logging.getLogger(__name__)


class OutputChoice(StrEnum):
    """The forecast explained."""

    mean = "mean"
    p50 = "p50"


def _timestamp(value: datetime | None) -> pd.Timestamp | None:
    """A naive UTC timestamp (the panel's time base), or ``None``."""
    import pandas as pd

    if value is None:
        return None
    ts = pd.Timestamp(value)
    return ts.tz_convert("UTC").tz_localize(None) if ts.tzinfo is not None else ts


@sales_data_options
def explain(
    ctx: typer.Context,
    items: Annotated[
        list[str],
        typer.Argument(metavar="ITEM...", help="Item ids to explain.", show_default=False),
    ],
    bundle: BundleOpt = None,
    *,
    sales: SalesData,
    at: Annotated[
        str | None,
        typer.Option(
            "--at",
            help="Explain the forecast made as of this date (its first bucket; the window is "
            "the buckets before). Default: the end of the data.",
        ),
    ] = None,
    vs: Annotated[
        str | None,
        typer.Option(
            "--vs",
            help="Explain the change from the forecast as of this earlier date to the one "
            "as of --at instead (why did it go up?).",
        ),
    ] = None,
    output: Annotated[
        OutputChoice, typer.Option("--output", help="The forecast explained.")
    ] = OutputChoice.mean,
    step: Annotated[
        int | None,
        typer.Option("--step", min=1, help="Explain one horizon step (1 = next bucket)."),
    ] = None,
    steps: Annotated[
        int, typer.Option("--steps", min=1, help="Integration steps of integrated gradients.")
    ] = 64,
    top: Annotated[int, typer.Option("--top", min=1, help="Inputs listed per item.")] = 5,
    out: Annotated[
        Path, typer.Option("--out", help="Directory for explain.json and a PNG per item.")
    ] = Path("artifacts/explain"),
) -> None:
    """Which inputs moved items' forecasts (each bucket's sales, calendar, price): JSON + PNGs.

    Items on the seasonal-naive fallback (less than a window of history) are not explained:
    exit 1. See docs/model.md, "Explanations".

    Example: trendcast explain --bundle artifacts/bundle --data sales.csv 85123A --vs 2011-08-01
    """
    from rich.console import Console

    from trendcast.bundle import load_bundle

    settings = offline_settings(ctx)
    at_ts = _timestamp(parse_date(at, "--at"))
    vs_ts = _timestamp(parse_date(vs, "--vs"))
    loaded = load_bundle(bundle or settings.bundle)
    panel = sales.panel(loaded.meta.freq)

    # TensorFlow is imported only here: gradients need the Keras model.
    from training.explain import Explainer, explanation_table, write_explanations

    explainer = Explainer(
        loaded,
        output="p50" if output is OutputChoice.p50 else "mean",
        step=step,
        n_steps=steps,
        top=top,
    )
    if vs_ts is None:
        results = explainer.explain(panel, items, at=at_ts)
    else:
        results = explainer.compare(panel, items, vs=vs_ts, at=at_ts)
    json_path, pngs = write_explanations(explainer, results, out)
    console = Console()
    for item in results:
        if item.explained:
            console.print(explanation_table(item))
            console.print(item.summary, highlight=False, soft_wrap=True)
        else:
            console.print(f"[yellow]{item.note}[/yellow]", highlight=False, soft_wrap=True)
        console.print()
    typer.echo(f"wrote {json_path} and {len(pngs)} PNG{'s' if len(pngs) != 1 else ''} in {out}")
    skipped = [i.item_id for i in results if not i.explained]
    if skipped:
        raise DataError(
            f"expected items served by the model, got {len(skipped)} of {len(results)} on the "
            f"seasonal-naive fallback or without history (not explained): {', '.join(skipped)}"
        )
