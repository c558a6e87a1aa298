"""A tiny *trained* bundle (real Keras LSTM -> tf2onnx) for tests of training and export.

Kept as a plain function so it can move into a shared session fixture in conftest.py.
Trains in a few seconds: 6 items of the shipped sample, window 28, horizon 7, 2 epochs.
"""

from __future__ import annotations

from pathlib import Path

from trendcast.data import Panel, load_sales, sample_data_path
from trendcast.freq import parse_freq

TINY_WINDOW = 28
TINY_HORIZON = 7
TINY_ITEMS = 6


def tiny_panel(n_items: int = TINY_ITEMS) -> Panel:
    """The first ``n_items`` items of the shipped daily sample."""
    panel = load_sales(sample_data_path(), parse_freq("1D"))
    keep = sorted(panel.frame["item_id"].unique())[:n_items]
    frame = panel.frame[panel.frame["item_id"].isin(keep)].reset_index(drop=True)
    return Panel(frame=frame, freq=panel.freq, has_price=panel.has_price)


def train_tiny_bundle(tmp_dir: Path) -> Path:
    """Train a tiny LSTM on :func:`tiny_panel` and export it to ``tmp_dir/bundle``."""
    from rich.console import Console

    from export import export_bundle
    from training import TrainConfig, train

    config = TrainConfig(
        window=TINY_WINDOW,
        horizon=TINY_HORIZON,
        epochs=2,
        units=8,
        batch_size=128,
        max_windows=1_000,
        seed=7,
    )
    result = train(tiny_panel(), config, console=Console(quiet=True))
    return export_bundle(result, Path(tmp_dir) / "bundle")
