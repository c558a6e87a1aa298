"""PNG plots of backtests and training: forecasts vs actuals, error by horizon, loss curves.

Figures are built with :class:`matplotlib.figure.Figure` and rendered by the Agg canvas, never
through ``pyplot``: pyplot keeps global state and picks a GUI backend from the environment,
which breaks on headless CI and leaks figures in long-running processes.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

__all__ = ["plot_error_by_step", "plot_forecasts", "plot_training_curves"]

logger = logging.getLogger(__name__)

_DPI = 110


def _save(fig: Figure, path: Path | str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)  # attach the Agg canvas explicitly: no GUI backend is ever chosen
    fig.savefig(path, dpi=_DPI)
    logger.info("wrote %s", path)
    return path


def plot_forecasts(
    forecasts: pd.DataFrame,
    history: pd.DataFrame,
    path: Path | str,
    *,
    model: str,
    items: Sequence[str] | None = None,
    n_items: int = 4,
    others: Sequence[str] = (),
) -> Path:
    """Forecast vs actual at the last origin, for a few items, with ``model``'s p10–p90 band.

    Args:
        forecasts: Long backtest frame (``model, origin, item_id, ts, actual, mean, p10, p50,
            p90``).
        history: ``item_id, ts, quantity`` buckets before the last origin (context).
        path: PNG file to write.
        model: Model whose band and median are drawn.
        items: Items to draw; default the ``n_items`` with the most actual sales at the last
            origin (the series a reader can judge by eye).
        n_items: How many items when ``items`` is not given.
        others: Other models whose medians are drawn as thin lines for comparison.

    Returns:
        The path written.
    """
    last = forecasts["origin"].max()
    at_last = forecasts[(forecasts["origin"] == last) & (forecasts["model"] == model)]
    if items is None:
        totals = at_last.groupby("item_id")["actual"].sum().sort_values(ascending=False)
        items = [str(i) for i in totals.index[:n_items]]
    n = max(len(items), 1)
    fig = Figure(figsize=(10, 2.6 * n))
    axes = fig.subplots(n, 1, squeeze=False)[:, 0]
    for ax, item in zip(axes, items, strict=False):
        past = history[history["item_id"] == item]
        ax.plot(past["ts"], past["quantity"], color="0.4", lw=1, label="history")
        fc = at_last[at_last["item_id"] == item]
        ax.plot(fc["ts"], fc["actual"], color="black", lw=1.5, label="actual")
        ax.fill_between(
            fc["ts"], fc["p10"], fc["p90"], color="tab:blue", alpha=0.25, label=f"{model} p10–p90"
        )
        ax.plot(fc["ts"], fc["p50"], color="tab:blue", lw=1.5, label=f"{model} p50")
        for other in others:
            oc = forecasts[
                (forecasts["origin"] == last)
                & (forecasts["model"] == other)
                & (forecasts["item_id"] == item)
            ]
            ax.plot(oc["ts"], oc["p50"], lw=0.9, ls="--", label=f"{other} p50")
        ax.axvline(last, color="0.6", ls=":", lw=1)
        ax.set_title(f"item {item}", fontsize=9)
        ax.tick_params(labelsize=8)
    axes[0].legend(fontsize=7, ncol=3, loc="upper left")
    fig.suptitle(f"Forecasts from origin {pd.Timestamp(last).date()}", fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def plot_error_by_step(by_step: pd.DataFrame, path: Path | str, *, metric: str = "rmsse") -> Path:
    """One line per model: ``metric`` (a column of ``by_step``) against the horizon step.

    Args:
        by_step: Long frame with columns ``model, step`` and ``metric``.
        path: PNG file to write.
        metric: Column to draw.
    """
    fig = Figure(figsize=(8, 4.5))
    ax = fig.subplots()
    for model, group in by_step.groupby("model", sort=False):
        ax.plot(group["step"], group[metric], marker="o", ms=3, lw=1.2, label=str(model))
    ax.set_xlabel("horizon step (buckets ahead)")
    ax.set_ylabel(metric.upper())
    ax.set_title(f"{metric.upper()} by horizon step")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


def plot_training_curves(history: Mapping[str, Sequence[float]], path: Path | str) -> Path:
    """Training curves (``loss``, ``val_loss`` and any other per-epoch series) against epoch.

    Args:
        history: Keras-style history, e.g. the content of ``training/history.json``.
        path: PNG file to write.
    """
    fig = Figure(figsize=(7, 4))
    ax = fig.subplots()
    for name, values in history.items():
        series = np.asarray(values, dtype=np.float64)
        if series.ndim != 1 or series.size == 0:
            continue
        ax.plot(np.arange(1, series.size + 1), series, marker="o", ms=3, label=name)
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    ax.set_title("Training curves")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, path)
