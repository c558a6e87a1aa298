"""Showing a backtest: a rich table, a markdown table, and ``metrics.json`` with PNG plots."""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd
from rich.console import Console
from rich.table import Table

from trendcast.backtest.run import BacktestResult
from trendcast.plots import plot_error_by_step, plot_forecasts

__all__ = ["metrics_markdown", "metrics_table", "print_metrics", "write_report"]

logger = logging.getLogger(__name__)

# Columns rank lowest-is-best, except coverage (closest to its nominal 0.8) and fallback share
# (not ranked).
_NOMINAL_COVERAGE = 0.8
_TABLE_COLUMNS = ("rmsse", "wape", "mase", "pinball", "coverage", "fallback_share")
_SHORT_HEADERS = {"fallback_share": "fallback"}


def _best(metrics: pd.DataFrame) -> dict[str, str | None]:
    """The model to highlight per column (``None``: nothing to rank, or a single model)."""
    best: dict[str, str | None] = {}
    for col in _TABLE_COLUMNS:
        values = metrics[col].astype(float)
        if col == "fallback_share" or values.isna().all() or len(values) < 2:
            best[col] = None
        elif col == "coverage":
            best[col] = str((values - _NOMINAL_COVERAGE).abs().idxmin())
        else:
            best[col] = str(values.idxmin())
    return best


def _fmt(value: Any) -> str:
    """Three decimals, or a dash for a missing (NaN) metric, which is clearer than ``nan``."""
    return "—" if value is None or not math.isfinite(float(value)) else f"{float(value):.3f}"


def metrics_table(metrics: pd.DataFrame, *, title: str = "Backtest") -> Table:
    """A rich table, models as rows, the best value of each column in bold green.

    Best means lowest, except coverage (closest to 0.8); fallback share is not ranked.
    """
    best = _best(metrics)
    table = Table(title=title)
    table.add_column("model", no_wrap=True)
    for col in _TABLE_COLUMNS:
        table.add_column(_SHORT_HEADERS.get(col, col), justify="right")
    for name, row in metrics.iterrows():
        cells = [str(name)]
        for col in _TABLE_COLUMNS:
            text = _fmt(row[col])
            cells.append(f"[bold green]{text}[/]" if best[col] == name else text)
        table.add_row(*cells)
    return table


def print_metrics(result: BacktestResult, console: Console | None = None) -> None:
    """Print the metrics table with the origins and item count as caption."""
    table = metrics_table(result.metrics)
    first, last = result.origins[0].date(), result.origins[-1].date()
    table.caption = (
        f"{result.n_items} items, {len(result.origins)} origins {first}..{last}, "
        f"horizon {result.settings['horizon']}; coverage target 0.8"
    )
    (console or Console()).print(table)


def metrics_markdown(metrics: pd.DataFrame, columns: Sequence[str] = _TABLE_COLUMNS) -> str:
    """A GitHub markdown table (best value of each column in bold), ready for a README.

    >>> m = pd.DataFrame({"rmsse": [1.0, 0.5], "wape": [1.0, 0.7], "mase": [1.0, 0.9],
    ...     "pinball": [0.5, 0.4], "coverage": [0.0, 0.7], "fallback_share": [0.0, 0.0]},
    ...     index=pd.Index(["zero", "naive"], name="model"))
    >>> print(metrics_markdown(m, ["rmsse", "coverage"]))
    | model | rmsse | coverage |
    |---|---:|---:|
    | zero | 1.000 | 0.000 |
    | naive | **0.500** | **0.700** |
    """
    best = _best(metrics)
    lines = ["| model | " + " | ".join(columns) + " |", "|---|" + "---:|" * len(columns)]
    for name, row in metrics.iterrows():
        cells = []
        for col in columns:
            text = _fmt(row[col])
            cells.append(f"**{text}**" if best.get(col) == name else text)
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_report(
    result: BacktestResult,
    out_dir: Path | str,
    *,
    plot_model: str | None = None,
    n_plot_items: int = 4,
    write_forecasts: bool = True,
    extra: dict[str, Any] | None = None,
) -> dict[str, Path]:
    """Write ``metrics.json``, ``forecasts.parquet`` and PNG plots into ``out_dir``.

    Args:
        result: A backtest result.
        out_dir: Directory (created if needed).
        plot_model: Model whose band is drawn in ``forecasts.png`` (default: ``lstm`` if
            present, else the best by RMSSE).
        n_plot_items: Items in ``forecasts.png``.
        write_forecasts: Also write the long forecast frame (can be large).
        extra: More JSON-able entries for ``metrics.json`` (e.g. bundle version, leakage note).

    Returns:
        Written files by kind: ``metrics``, ``forecasts``, ``forecasts_png``, ``error_png``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    payload = result.to_json() | (extra or {})
    written["metrics"] = out / "metrics.json"
    written["metrics"].write_text(json.dumps(payload, indent=2, default=str) + "\n")
    if write_forecasts:
        written["forecasts"] = out / "forecasts.parquet"
        result.forecasts.to_parquet(written["forecasts"], index=False)
    names = list(result.metrics.index)
    if plot_model is None:
        plot_model = "lstm" if "lstm" in names else str(result.metrics["rmsse"].idxmin())
    others = [n for n in ("seasonal_naive7",) if n in names and n != plot_model]
    written["forecasts_png"] = plot_forecasts(
        result.forecasts,
        result.history,
        out / "forecasts.png",
        model=plot_model,
        n_items=n_plot_items,
        others=others,
    )
    written["error_png"] = plot_error_by_step(result.by_step, out / "error_by_step.png")
    logger.info("wrote backtest report to %s", out)
    return written
