"""Hyper-parameter search for the LSTM (Optuna), scored by a rolling-origin backtest.

Why a backtest and not the validation loss: ``train()`` validates on each item's last
``horizon`` buckets, which early stopping, the blends and the calibration already use, so a
search on those scores would fit them twice. Each trial is instead scored like the honest
offline benchmark: forecasts from weekly origins after the trial's training data, compared with
what sold.

Periods (:func:`split_periods`), oldest to newest::

    | training (incl. train()'s own validation split) | tuning origins' horizons | test |
                                                      ^ first tuning origin       ^ test start

* **test**: the last ``test_weeks`` weeks (default: the horizon rounded up to whole weeks).
  No trial sees it, not for training and not for scoring: the panel is cut before it first.
  It stays for one honest look at the tuned settings (``trendcast tune --train-bundle``).
* **tuning origins**: ``n_origins`` origins a week apart, the last one's horizon ending on the
  bucket before the test period. Every trial is scored on the same origins and items.
* **training**: the buckets before the first tuning origin; ``train()`` takes its validation
  split (early stopping, blends, calibration) inside them.

The search space (:class:`SearchSpace`) covers window, units, dropout, learning rate, loss,
quantile weight and the mean's blend with level28. The blend is a categorical over ``None``
("chosen on validation", what ``train`` does by default: the weight in 0, 0.1 .. 1 with the
lowest validation RMSSE) and a few fixed weights: the validation split is one horizon at the
end of training, and a fixed weight scored on later origins may generalise better than the
one it picks. Everything else (horizon, batch size, volume weights …) comes from the base
:class:`~training.trainer.TrainConfig`.

Speed: trials train with a smaller budget than ``train`` (``epochs``, ``max_windows``), and
are scored with the Keras model directly through :class:`KerasForecaster`, which builds its
inputs exactly as :class:`~trendcast.forecasting.onnx.OnnxForecaster` does (same
:func:`~trendcast.forecasting.features.build_inputs`, scales, prices and seasonal-naive
fallback), instead of exporting and verifying an ONNX bundle per trial; export's parity check
(ONNX == Keras within 1e-4) makes the two interchangeable. A small budget favours settings that
learn fast (a higher learning rate): check the winner with ``--train-bundle``.

Reproducibility: Optuna's :class:`~optuna.samplers.TPESampler` is seeded and every trial
trains with the same seed, so differences between trials come from their settings, not from
their initialisation. The first ``n_startup_trials`` (10) parameter sets are drawn at random and
do not depend on the scores, so the same seed gives the same trials; later TPE suggestions
depend on the scores, hence on TensorFlow reproducing them (it does on CPU for one thread
count, without guarantee across machines). A study resumed from ``storage`` seeds its sampler
with ``seed`` plus the trials already run, so it does not draw the first run's trials again.

Modules, in the order a search runs::

    periods   TuningSplit, split_periods: where trials train, are scored, and the test period
    space     SearchSpace (what a trial may set), config_from_json (``train --config``)
    scoring   KerasForecaster and the backtest scores a trial is judged by
    result    TrialRecord, TuneResult (``best.json``, the trials table)
    study     tune(): the Optuna study, its trials, resuming a stored one
    final     train_best, score_test_period: the one look at the test period
"""

from __future__ import annotations

import logging

from training.tuning.final import score_test_period, train_best
from training.tuning.periods import DEFAULT_ORIGINS, TuningSplit, split_periods
from training.tuning.result import TrialRecord, TuneResult
from training.tuning.scoring import METRICS, KerasForecaster, Metric
from training.tuning.space import SearchSpace, config_from_json
from training.tuning.study import tune

__all__ = [
    "DEFAULT_ORIGINS",
    "METRICS",
    "KerasForecaster",
    "Metric",
    "SearchSpace",
    "TrialRecord",
    "TuneResult",
    "TuningSplit",
    "config_from_json",
    "score_test_period",
    "split_periods",
    "train_best",
    "tune",
]

logger = logging.getLogger(__name__)
