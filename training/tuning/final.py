"""After the search: train the best settings before the test period, and score them on it."""

from __future__ import annotations

import logging

from rich.console import Console

from training.trainer import TrainResult, train
from training.tuning.periods import TuningSplit
from training.tuning.result import TuneResult
from training.tuning.scoring import _baselines
from trendcast.backtest import BacktestResult, backtest, backtest_origins
from trendcast.backtest.origins import week_buckets
from trendcast.data import Panel
from trendcast.forecasting.base import Forecaster

__all__ = [
    "score_test_period",
    "train_best",
]

logger = logging.getLogger(__name__)


def train_best(panel: Panel, result: TuneResult, *, console: Console | None = None) -> TrainResult:
    """Train :attr:`TuneResult.best_config` on the data before the test period.

    Before, not through: the bundle can then be scored honestly on the test period (see
    :func:`score_test_period`), the one look at data no trial saw. A production bundle
    should use all the data: ``trendcast train --data … --config best.json``.
    """
    return train(panel.until(result.split.test_start), result.best_config, console=console)


def score_test_period(
    panel: Panel, split: TuningSplit, forecaster: Forecaster, *, window: int
) -> BacktestResult:
    """Backtest ``forecaster`` (and two baselines) on weekly origins inside the test period.

    Args:
        panel: All the data (through the test period).
        split: The periods of the search.
        forecaster: The model trained before the test period (``OnnxForecaster`` of the
            exported bundle, or :class:`KerasForecaster`).
        window: Input length for the baselines (the model's own window).
    """
    step = week_buckets(panel.freq)
    n = (split.test_buckets - split.horizon) // step + 1
    origins = backtest_origins(
        split.test_end, panel.freq, horizon=split.horizon, step=step, n_origins=n
    )
    return backtest(
        panel,
        [forecaster, *_baselines(split.horizon, panel)],
        horizon=split.horizon,
        window=window,
        origins=origins,
    )
