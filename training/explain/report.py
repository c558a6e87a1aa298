"""Showing explanations: a rich table, a PNG per item, and ``explain.json``.

What the numbers mean is in the :mod:`training.explain` package docstring.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import numpy as np
import orjson
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from rich.table import Table

from training.explain.explainer import Explainer
from training.explain.results import ItemExplanation, fmt_units
from trendcast.exceptions import ConfigError

__all__ = ["explanation_table", "plot_explanation", "write_explanations"]

logger = logging.getLogger(__name__)

# How the table names each path: where it starts.
_PART_LABELS = {
    "sales": "from zero sales",
    "context": "from an average day, usual price",
    "change": "from the older forecast",
}


def explanation_table(item: ItemExplanation) -> Table:
    """A short rich table: what moved the item's forecast most, then the groups."""
    title = f"{item.item_id}: " + (item.note or item.summary.split(";")[0])
    table = Table(title=title, title_justify="left")
    table.add_column("input")
    table.add_column("date")
    table.add_column("value", justify="right")
    table.add_column("moved it by", justify="right")
    for i in item.top:
        date = i.date if i.old_date is None else f"{i.date} vs {i.old_date}"
        value = "" if i.value is None else f"{i.value:,.2f}"
        if i.old_value is not None:
            value = f"{value} vs {i.old_value:,.2f}"
        color = "green" if i.attribution > 0 else "red"
        table.add_row(i.name, date or "", value, f"[{color}]{fmt_units(i.attribution)}[/{color}]")
    for name, part in item.parts.items():
        table.add_section()
        groups = ", ".join(f"{g} {fmt_units(v)}" for g, v in part.groups.items())
        table.add_row(
            f"[dim]{_PART_LABELS.get(name, name)}[/dim]",
            "",
            f"[dim]{part.start:,.2f} -> {part.end:,.2f}[/dim]",
            f"[dim]{groups}[/dim]",
        )
    return table


def _safe_name(item_id: str) -> str:
    """A file name for an item id (ids may hold ``/`` or spaces)."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", item_id) or "_"


def plot_explanation(item: ItemExplanation, path: Path | str) -> Path:
    """PNG of one explanation: the window's sales, attribution per bucket, and per group.

    Buckets are drawn by lag position, oldest left, so a comparison's two windows line up.

    Raises:
        ConfigError: The item was not attributed (a fallback item).
    """
    if not item.explained:
        raise ConfigError(f"expected an attributed item, got {item.item_id} ({item.note})")
    parts = list(item.parts.values())
    sales = [i for p in parts for i in p.inputs if i.group == "sales"]
    prices = [i for p in parts for i in p.inputs if i.group == "price"]
    sales.sort(key=lambda i: -(i.lag or 0))
    prices.sort(key=lambda i: -(i.lag or 0))
    pos = np.arange(len(sales))
    fig = Figure(figsize=(10, 8))
    ax_sales, ax_attr, ax_groups = fig.subplots(3, 1, gridspec_kw={"height_ratios": [2, 2, 1.6]})
    qty = [i.value or 0.0 for i in sales]
    if item.mode == "change":
        old = [i.old_value or 0.0 for i in sales]
        ax_sales.bar(pos - 0.2, old, width=0.4, color="0.65", label=f"window as of {item.vs}")
        ax_sales.bar(pos + 0.2, qty, width=0.4, color="tab:blue", label=f"as of {item.at}")
        ax_sales.legend(fontsize=7, loc="upper left")
    else:
        ax_sales.bar(pos, qty, color="tab:blue")
    ax_sales.set_ylabel("units sold", fontsize=8)
    every = max(1, math.ceil(len(sales) / 7))  # about 7 date labels: readable at any window
    ticks = pos[::-1][::every]
    labels = []
    for p in ticks:
        i = sales[int(p)]
        labels.append(f"t-{i.lag}\n{i.date}" + ("" if i.old_date is None else f"\n{i.old_date}"))
    for ax in (ax_sales, ax_attr):
        ax.set_xticks(ticks, labels, fontsize=7)
        ax.tick_params(axis="y", labelsize=7)
        ax.grid(alpha=0.3, axis="y")
    attr = np.array([i.attribution for i in sales])
    width = 0.4 if prices else 0.8
    ax_attr.bar(
        pos - (0.2 if prices else 0.0),
        attr,
        width=width,
        color=np.where(attr >= 0, "tab:green", "tab:red"),
    )
    if prices:
        ax_attr.bar(
            pos + 0.2,
            [i.attribution for i in prices],
            width=width,
            color="tab:purple",
        )
    handles = [
        Patch(color="tab:green", label="sales: added"),
        Patch(color="tab:red", label="sales: removed"),
    ]
    if prices:
        handles.append(Patch(color="tab:purple", label="price"))
    ax_attr.legend(handles=handles, fontsize=7, loc="upper left")
    ax_attr.axhline(0, color="0.3", lw=0.8)
    ax_attr.set_ylabel("moved forecast by (units)", fontsize=8)
    groups: dict[str, float] = {}
    for p in parts:
        for g, v in p.groups.items():
            groups[g] = groups.get(g, 0.0) + v
    names = list(groups)
    values = np.array([groups[g] for g in names])
    ax_groups.barh(names, values, color=np.where(values >= 0, "tab:green", "tab:red"))
    ax_groups.axvline(0, color="0.3", lw=0.8)
    ax_groups.tick_params(labelsize=7)
    ax_groups.set_xlabel(
        "moved forecast by (units), per group"
        + (
            ""
            if item.mode == "change"
            else " (sales: over zero sales; calendar, price: over an average day at usual price)"
        ),
        fontsize=8,
    )
    ax_groups.grid(alpha=0.3, axis="x")
    if item.mode == "change":
        head = (
            f"{item.item_id}: forecast {item.previous:,.2f} (as of {item.vs}) -> "
            f"{item.forecast:,.2f} (as of {item.at}), change {fmt_units(item.change or 0.0)}"
        )
    else:
        sales_ref, context_ref = item.parts["sales"].start, item.parts["context"].start
        head = (
            f"{item.item_id}: forecast {item.forecast:,.2f} as of {item.at}; with zero sales "
            f"{sales_ref:,.2f}, on an average day at the usual price {context_ref:,.2f}"
        )
    fig.suptitle(head, fontsize=9)
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)  # Agg explicitly: no GUI backend is ever chosen (trendcast.plots)
    fig.savefig(out, dpi=110)
    return out


def write_explanations(
    explainer: Explainer, items: Sequence[ItemExplanation], out_dir: Path | str
) -> tuple[Path, list[Path]]:
    """Write ``explain.json`` (every item) and a PNG per attributed item into ``out_dir``.

    Returns:
        The JSON file and the PNG files.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    meta = explainer.bundle.meta
    payload = {
        "bundle": str(explainer.bundle.path),
        "model_version": meta.model_version,
        "output": explainer.output,
        "horizon_steps": explainer.horizon_steps,
        "min_integration_steps": explainer.n_steps,
        "method": "integrated gradients (midpoint rule) on the bundle's Keras model",
        "items": [asdict(i) for i in items],
    }
    json_path = out / "explain.json"
    json_path.write_bytes(orjson.dumps(payload, option=orjson.OPT_INDENT_2))
    pngs = [plot_explanation(i, out / f"{_safe_name(i.item_id)}.png") for i in items if i.explained]
    logger.info("wrote %s and %d PNGs", json_path, len(pngs))
    return json_path, pngs
