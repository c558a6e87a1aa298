"""``trendcast evaluate``: the bundle's model beside the baselines, backtested and reported."""

from __future__ import annotations

import importlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from trendcast.backtest.leakage import bundle_leakage_warning
from trendcast.backtest.report import write_report
from trendcast.backtest.run import BacktestResult, backtest
from trendcast.bundle import Bundle
from trendcast.data import Panel
from trendcast.exceptions import ConfigError
from trendcast.forecasting.base import Forecaster
from trendcast.forecasting.baselines import (
    NaiveForecaster,
    SeasonalNaiveForecaster,
    WindowMeanForecaster,
    ZeroForecaster,
)
from trendcast.freq import Freq, season_length
from trendcast.plots import plot_training_curves

__all__ = ["DEFAULT_WINDOW", "Evaluation", "TRAINING_HISTORY", "baseline_forecasters", "evaluate"]

logger = logging.getLogger(__name__)

DEFAULT_WINDOW = 56
TRAINING_HISTORY = Path("training") / "history.json"


def baseline_forecasters(horizon: int, freq: Freq) -> list[Forecaster]:
    """The baselines every backtest reports: zero, naive, seasonal-naive, 28-bucket mean."""
    return [
        ZeroForecaster(horizon),
        NaiveForecaster(horizon),
        SeasonalNaiveForecaster(horizon, season_length(freq)),
        WindowMeanForecaster(horizon, 28),
    ]


@dataclass(frozen=True)
class Evaluation:
    """What :func:`evaluate` produced: the backtest, the files written, and warnings to show."""

    result: BacktestResult
    files: dict[str, Path]
    warnings: list[str]


def evaluate(
    panel: Panel,
    out_dir: Path | str,
    *,
    bundle: Bundle | None = None,
    weeks: int = 8,
    horizon: int = 28,
    window: int = DEFAULT_WINDOW,
    step: int | None = None,
    on_origin: Callable[[int, int, pd.Timestamp], None] | None = None,
) -> Evaluation:
    """Backtest the bundle's model (if any) beside the baselines and write the report.

    This is ``trendcast evaluate``: with a bundle, the horizon and the model's window come
    from its metadata, a leakage warning is raised when its training data reaches the first
    origin, and its training curves (``training/history.json`` inside the bundle, if present)
    are plotted too.

    Raises:
        ConfigError: The bundle's frequency differs from the data's, or bad settings.
        DataError: No usable item.
    """
    forecasters: list[Forecaster] = []
    windows: dict[str, int] = {}
    if bundle is not None:
        if bundle.meta.freq != panel.freq.name:
            raise ConfigError(
                f"bundle was trained on {bundle.meta.freq} buckets, data is bucketed by "
                f"{panel.freq.name} (pass --freq {bundle.meta.freq})"
            )
        horizon = bundle.meta.horizon
        # Imported here: the ONNX forecaster pulls in onnxruntime, needless for baselines.
        onnx_module = importlib.import_module("trendcast.forecasting.onnx")
        model: Forecaster = onnx_module.OnnxForecaster(bundle)
        forecasters.append(model)
        windows[model.name] = bundle.meta.window
    forecasters += baseline_forecasters(horizon, panel.freq)
    window = max(window, season_length(panel.freq) + 1)
    result = backtest(
        panel,
        forecasters,
        horizon=horizon,
        window=window,
        weeks=weeks,
        step=step,
        windows=windows,
        on_origin=on_origin,
    )
    warnings: list[str] = []
    extra: dict[str, Any] = {}
    if bundle is not None:
        note = bundle_leakage_warning(bundle, result.origins)
        if note is not None:
            warnings.append(note)
        extra["bundle"] = {
            "path": str(bundle.path),
            "model_version": bundle.meta.model_version,
            "training": bundle.meta.training.model_dump(mode="json"),
        }
    extra["warnings"] = warnings
    files = write_report(result, out_dir, extra=extra)
    if bundle is not None and (bundle.path / TRAINING_HISTORY).is_file():
        history_path = bundle.path / TRAINING_HISTORY
        try:
            history = json.loads(history_path.read_text())
        except (OSError, ValueError) as exc:
            warnings.append(f"cannot read {history_path}: {exc}")
        else:
            files["training_png"] = plot_training_curves(
                history, Path(out_dir) / "training_curves.png"
            )
    return Evaluation(result=result, files=files, warnings=warnings)
