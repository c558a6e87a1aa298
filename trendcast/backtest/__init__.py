"""Rolling-origin backtests of any :class:`~trendcast.forecasting.base.Forecaster`.

At each origin every model sees only the buckets before it (``windows_from_panel(cutoff=
origin)``) and forecasts the next ``horizon`` buckets, which are then compared with what
actually sold. Origins are spaced ``step`` buckets apart and placed so that the *last* origin's
horizon ends exactly on the panel's last bucket: the most recent data is always tested, and no
forecast reaches past the data.

Each forecaster is called once per origin with the whole batch of items, as in production.
In-sample scales (for RMSSE/MASE) come from each item's full history before the origin, never
from the test period.

The modules, in the order a backtest runs them: :mod:`.origins` (where to test),
:mod:`.inputs` (what each model is given and scored against), :mod:`.forecasts` (running the
models), :mod:`.scoring` (metrics and frames), :mod:`.run` (:func:`backtest`, those steps in
sequence); then :mod:`.leakage`, :mod:`.report` (tables, files, plots) and :mod:`.evaluate`
(``trendcast evaluate``).
"""

from __future__ import annotations

import logging

from trendcast.backtest.evaluate import (
    DEFAULT_WINDOW,
    TRAINING_HISTORY,
    Evaluation,
    baseline_forecasters,
    evaluate,
)
from trendcast.backtest.leakage import bundle_leakage_warning, leakage_warning
from trendcast.backtest.origins import backtest_origins
from trendcast.backtest.report import metrics_markdown, metrics_table, print_metrics, write_report
from trendcast.backtest.run import BacktestResult, backtest

__all__ = [
    "DEFAULT_WINDOW",
    "TRAINING_HISTORY",
    "BacktestResult",
    "Evaluation",
    "backtest",
    "backtest_origins",
    "baseline_forecasters",
    "bundle_leakage_warning",
    "evaluate",
    "leakage_warning",
    "metrics_markdown",
    "metrics_table",
    "print_metrics",
    "write_report",
]

logger = logging.getLogger(__name__)
