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
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Literal, get_args

import keras
import numpy as np
import numpy.typing as npt
import optuna
import orjson
import pandas as pd
from pydantic import TypeAdapter, ValidationError
from rich.console import Console
from rich.table import Table

from training.model import LossName
from training.trainer import TrainConfig, TrainResult, predict_scaled, train
from trendcast.backtest import BacktestResult, backtest, backtest_origins
from trendcast.backtest.origins import week_buckets
from trendcast.data import Panel
from trendcast.exceptions import ConfigError, ModelError
from trendcast.forecasting.base import ForecastBatch, Forecaster, WindowBatch
from trendcast.forecasting.baselines import SeasonalNaiveForecaster, WindowMeanForecaster
from trendcast.forecasting.features import build_inputs
from trendcast.forecasting.onnx import unscale_outputs
from trendcast.freq import season_length

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

Metric = Literal["rmsse", "wape", "pinball"]
METRICS: tuple[str, ...] = get_args(Metric)
#: Weekly tuning origins by default: three horizons' worth of scores, one week apart.
DEFAULT_ORIGINS = 3
_SCORES = ("rmsse", "wape", "mase", "pinball", "coverage", "fallback_share")
_DAY_MS = 86_400_000
F32 = npt.NDArray[np.float32]


# --------------------------------------------------------------------------------------------
# Periods
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TuningSplit:
    """Where trials train, where they are scored, and the test period none of them sees.

    Attributes:
        data_start: First bucket of the data.
        train_until: The first tuning origin: trials train on buckets before it.
        origins: The tuning origins (first forecast buckets), oldest first, a week apart.
        tuning_end: Last bucket scored by a trial (the bucket before ``test_start``).
        test_start: First bucket of the test period.
        test_end: Last bucket of the data (and of the test period).
        test_buckets: Buckets in the test period.
        horizon: Buckets forecast from each origin.
    """

    data_start: pd.Timestamp
    train_until: pd.Timestamp
    origins: list[pd.Timestamp]
    tuning_end: pd.Timestamp
    test_start: pd.Timestamp
    test_end: pd.Timestamp
    test_buckets: int
    horizon: int

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready periods (ISO timestamps; ends inclusive, ``train_until`` exclusive)."""
        return {
            "data_start": self.data_start.isoformat(),
            "train_until": self.train_until.isoformat(),
            "tuning_origins": [o.isoformat() for o in self.origins],
            "tuning_end": self.tuning_end.isoformat(),
            "test_start": self.test_start.isoformat(),
            "test_end": self.test_end.isoformat(),
            "test_buckets": self.test_buckets,
            "horizon": self.horizon,
        }


def split_periods(
    panel: Panel,
    *,
    horizon: int,
    n_origins: int = DEFAULT_ORIGINS,
    test_weeks: int | None = None,
    min_train_buckets: int | None = None,
) -> TuningSplit:
    """Place the test period, the tuning origins and the training cut-off (module docstring).

    Args:
        panel: All the data.
        horizon: Buckets forecast from each origin.
        n_origins: Weekly tuning origins.
        test_weeks: Weeks held out at the end (default: the horizon, rounded up to weeks).
        min_train_buckets: Buckets the training period needs at least (``train()`` needs
            ``window + 2 * horizon`` for one item); default ``2 * horizon + 1``.

    Raises:
        ConfigError: Bad counts, a test period shorter than the horizon, or too little data
            before the first tuning origin.
    """
    if horizon < 1:
        raise ConfigError(f"expected --horizon >= 1, got {horizon}")
    if n_origins < 1:
        raise ConfigError(f"expected --origins >= 1, got {n_origins}")
    freq, td = panel.freq, panel.freq.timedelta
    week_ms = 7 * _DAY_MS
    if test_weeks is None:
        test_weeks = max(1, -(-horizon * freq.step_ms // week_ms))
    if test_weeks < 1:
        raise ConfigError(f"expected --test-weeks >= 1, got {test_weeks}")
    test_buckets = max(1, test_weeks * week_ms // freq.step_ms)
    if test_buckets < horizon:
        raise ConfigError(
            f"expected a test period of at least the horizon ({horizon} buckets), got "
            f"--test-weeks {test_weeks} = {test_buckets} bucket(s) of {freq.name}"
        )
    test_start = panel.end - (test_buckets - 1) * td
    tuning_end = test_start - td
    origins = backtest_origins(
        tuning_end, freq, horizon=horizon, step=week_buckets(freq), n_origins=n_origins
    )
    train_until = origins[0]
    have = int((train_until - panel.start) // td)
    need = 2 * horizon + 1 if min_train_buckets is None else min_train_buckets
    if have < need:
        raise ConfigError(
            f"expected at least {need} buckets of training data before the first tuning origin "
            f"{freq.label(train_until)} ({n_origins} weekly origin(s) of {horizon} buckets, then "
            f"{test_weeks} test week(s) up to {freq.label(panel.end)}), got {max(have, 0)} "
            f"from {freq.label(panel.start)}; use fewer --origins, a shorter --test-weeks or "
            "--horizon, or more data"
        )
    return TuningSplit(
        data_start=panel.start,
        train_until=train_until,
        origins=list(origins),
        tuning_end=tuning_end,
        test_start=test_start,
        test_end=panel.end,
        test_buckets=test_buckets,
        horizon=horizon,
    )


# --------------------------------------------------------------------------------------------
# Search space
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SearchSpace:
    """What a trial may set; the rest of its :class:`TrainConfig` is the base config's.

    Attributes:
        windows: Input lengths (buckets); those that do not fit the training period are
            dropped (:meth:`fitting`).
        units: LSTM widths.
        dropout: ``(low, high)`` of a uniform float.
        learning_rate: ``(low, high)`` of a log-uniform float.
        losses: Losses of the mean output.
        quantile_weight: ``(low, high)`` of a log-uniform float (weight of the pinball loss).
        mean_blends: Weights of the network against level28 in the mean; ``None`` = chosen on
            ``train()``'s validation split (the default of ``train``).
    """

    windows: tuple[int, ...] = (28, 56, 84)
    units: tuple[int, ...] = (32, 64, 128)
    dropout: tuple[float, float] = (0.0, 0.4)
    learning_rate: tuple[float, float] = (5e-4, 1e-2)
    losses: tuple[LossName, ...] = ("poisson", "tweedie", "mse")
    quantile_weight: tuple[float, float] = (1.0, 30.0)
    mean_blends: tuple[float | None, ...] = (None, 0.25, 0.5, 0.75, 1.0)

    def suggest(self, trial: optuna.Trial) -> dict[str, Any]:
        """One trial's settings (the :class:`TrainConfig` field names)."""
        return {
            "window": trial.suggest_categorical("window", list(self.windows)),
            "units": trial.suggest_categorical("units", list(self.units)),
            "dropout": trial.suggest_float("dropout", *self.dropout),
            "learning_rate": trial.suggest_float("learning_rate", *self.learning_rate, log=True),
            "loss": trial.suggest_categorical("loss", list(self.losses)),
            "quantile_weight": trial.suggest_float(
                "quantile_weight", *self.quantile_weight, log=True
            ),
            "mean_blend": trial.suggest_categorical("mean_blend", list(self.mean_blends)),
        }

    def fitting(self, max_window: int) -> SearchSpace:
        """The space without windows longer than ``max_window``.

        Raises:
            ConfigError: Not even the shortest window fits.
        """
        windows = tuple(w for w in self.windows if w <= max_window)
        if not windows:
            raise ConfigError(
                f"expected room for a window of {min(self.windows)} buckets before the first "
                f"tuning origin, got room for {max_window}; use fewer --origins, a shorter "
                "--test-weeks or --horizon, or more data"
            )
        if len(windows) < len(self.windows):
            logger.warning("windows %s dropped: too long for the training period", self.windows)
        return replace(self, windows=windows)

    def contains(self, params: Mapping[str, Any]) -> bool:
        """Whether ``params`` (e.g. the defaults of ``train``) is a point of this space."""
        return (
            params["window"] in self.windows
            and params["units"] in self.units
            and self.dropout[0] <= params["dropout"] <= self.dropout[1]
            and self.learning_rate[0] <= params["learning_rate"] <= self.learning_rate[1]
            and params["loss"] in self.losses
            and self.quantile_weight[0] <= params["quantile_weight"] <= self.quantile_weight[1]
            and params["mean_blend"] in self.mean_blends
        )

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready description (ranges as ``[low, high]``)."""
        return {f.name: list(getattr(self, f.name)) for f in fields(self)}


def _params_of(config: TrainConfig) -> dict[str, Any]:
    """The searched settings of ``config`` (as :meth:`SearchSpace.suggest` names them)."""
    return {
        "window": config.window,
        "units": config.units,
        "dropout": config.dropout,
        "learning_rate": config.learning_rate,
        "loss": config.loss,
        "quantile_weight": config.quantile_weight,
        "mean_blend": config.mean_blend,
    }


# --------------------------------------------------------------------------------------------
# Scoring a trained Keras model
# --------------------------------------------------------------------------------------------


class KerasForecaster:
    """A trained Keras model as a :class:`~trendcast.forecasting.base.Forecaster` (``lstm``).

    Mirrors :class:`~trendcast.forecasting.onnx.OnnxForecaster` without the ONNX export: the
    same :func:`~trendcast.forecasting.features.build_inputs` with the training run's scales,
    prices and epsilon, the same unscaling, and the same seasonal-naive fallback for items
    with less than ``window`` buckets of history (or a non-finite forecast). The Keras model
    already holds the frozen blend and calibration layers the ONNX graph is converted from.
    """

    def __init__(self, result: TrainResult) -> None:
        self._result = result
        self._fallback = SeasonalNaiveForecaster(result.config.horizon, season_length(result.freq))

    @property
    def name(self) -> str:
        """``lstm``."""
        return "lstm"

    @property
    def horizon(self) -> int:
        """Buckets forecast."""
        return self._result.config.horizon

    @property
    def window(self) -> int:
        """Buckets of history the model reads."""
        return self._result.config.window

    def predict(self, batch: WindowBatch) -> ForecastBatch:
        """Forecast every window of ``batch`` (model or fallback, flagged)."""
        n, h = len(batch), self.horizon
        mean = np.zeros((n, h), np.float32)
        p10, p50, p90 = mean.copy(), mean.copy(), mean.copy()
        fallback = batch.history_len < self.window
        rows = np.flatnonzero(~fallback)
        if rows.size:
            result = self._result
            x, scale = build_inputs(
                batch.take(rows),
                result.features,
                result.scales,
                result.prices,
                result.freq,
                result.config.epsilon,
            )
            out = unscale_outputs(*predict_scaled(result.model, x), scale)
            finite = np.isfinite(out.mean).all(axis=1) & np.isfinite(out.p90).all(axis=1)
            fallback[rows[~finite]] = True
            ok = rows[finite]
            mean[ok], p10[ok] = out.mean[finite], out.p10[finite]
            p50[ok], p90[ok] = out.p50[finite], out.p90[finite]
        fb_rows = np.flatnonzero(fallback)
        if fb_rows.size:
            fb = self._fallback.predict(batch.take(fb_rows))
            mean[fb_rows], p10[fb_rows], p50[fb_rows], p90[fb_rows] = (
                fb.mean,
                fb.p10,
                fb.p50,
                fb.p90,
            )
        return ForecastBatch(mean=mean, p10=p10, p50=p50, p90=p90, fallback=fallback)


def _scores(result: BacktestResult, name: str) -> dict[str, float]:
    row = result.metrics.loc[name].to_dict()
    return {k: float(row[k]) for k in _SCORES}


def _baselines(horizon: int, panel: Panel) -> list[Forecaster]:
    return [
        SeasonalNaiveForecaster(horizon, season_length(panel.freq)),
        WindowMeanForecaster(horizon, 28),
    ]


# --------------------------------------------------------------------------------------------
# The search
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrialRecord:
    """One trial: its settings, scores on the tuning origins and cost.

    Attributes:
        number: Optuna's trial number (0-based, in order of start).
        state: ``COMPLETE``, ``FAIL`` (diverged…) or ``PRUNED``/``RUNNING`` (interrupted).
        params: The searched settings.
        value: The objective (``None`` if the trial did not complete).
        scores: rmsse, wape, mase, pinball, coverage, fallback_share on the tuning origins.
        seconds: Training plus scoring wall time.
        defaults: This trial is ``train``'s default settings (enqueued first for comparison).
        extra: Facts of the run: epochs run, the mean blend chosen, windows trained on.
    """

    number: int
    state: str
    params: dict[str, Any]
    value: float | None
    scores: dict[str, float]
    seconds: float | None
    defaults: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready (non-finite numbers as ``null``)."""
        return {
            "number": self.number,
            "state": self.state,
            "defaults": self.defaults,
            "params": self.params,
            "value": _finite(self.value),
            "scores": {k: _finite(v) for k, v in self.scores.items()},
            "seconds": None if self.seconds is None else round(self.seconds, 2),
            **self.extra,
        }


def _finite(value: float | None) -> float | None:
    return None if value is None or not math.isfinite(value) else round(float(value), 6)


@dataclass(frozen=True)
class TuneResult:
    """What :func:`tune` found (written as ``best.json`` by :meth:`to_json`).

    Attributes:
        metric: The objective (minimised) on the tuning origins.
        best_params: The best trial's searched settings.
        best_config: The full :class:`TrainConfig` they imply for a final run: the base
            config's budget (epochs, max windows), not the trials' smaller one.
        best_score: The best trial's ``metric``.
        best_trial: Its number.
        default_score: ``train``'s defaults scored the same way (``None`` if not run).
        seed: Sampler and training seed.
        split: The periods.
        trials: Every trial of the study, oldest first.
        budget: epochs, max_windows, trials, timeout of the search.
        space: The search space as searched.
        baselines: Baseline scores on the same tuning origins.
        study: Study name and storage (``None``: in memory).
        seconds: Wall time of this search.
    """

    metric: str
    best_params: dict[str, Any]
    best_config: TrainConfig
    best_score: float
    best_trial: int
    default_score: float | None
    seed: int
    split: TuningSplit
    trials: list[TrialRecord]
    budget: dict[str, Any]
    space: SearchSpace
    baselines: dict[str, dict[str, float]]
    study: dict[str, Any]
    seconds: float

    def to_json(self) -> dict[str, Any]:
        """The ``best.json`` document (``trendcast train --config`` reads its ``config``)."""
        return {
            "metric": self.metric,
            "best_score": _finite(self.best_score),
            "best_trial": self.best_trial,
            "default_score": _finite(self.default_score),
            "best_params": self.best_params,
            "config": self.best_config.as_dict(),
            "seed": self.seed,
            "periods": self.split.as_dict(),
            "budget": self.budget,
            "search_space": self.space.as_dict(),
            "baselines": {
                name: {k: _finite(v) for k, v in s.items()} for name, s in self.baselines.items()
            },
            "study": self.study,
            "seconds": round(self.seconds, 1),
            "trials": [t.as_dict() for t in self.trials],
        }

    def write(self, path: Path | str, extra: Mapping[str, Any] | None = None) -> Path:
        """Write :meth:`to_json` (plus ``extra`` keys, e.g. ``test``) to ``path``."""
        out = Path(path)
        out.parent.mkdir(parents=True, exist_ok=True)
        document = {**self.to_json(), **(extra or {})}
        out.write_bytes(orjson.dumps(document, option=orjson.OPT_INDENT_2) + b"\n")
        return out

    def table(self) -> Table:
        """Every trial with its settings and scores; the best one in bold green.

        Compact headers so it fits 100 columns: ``qw`` quantile weight, ``blend`` the mean's
        weight against level28 (``val``: chosen on validation), ``d`` marks the defaults.
        """
        table = Table(
            title=f"trials ({self.metric} on {len(self.split.origins)} tuning origins; "
            "d = train's defaults)"
        )
        columns = ("#", "window", "units", "dropout", "lr", "loss", "qw", "blend")
        for name in (*columns, "rmsse", "wape", "pinball", "s"):
            table.add_column(
                name,
                justify="left" if name in ("loss", "blend") else "right",
                no_wrap=True,
                min_width=len(name),
            )
        for t in self.trials:
            p = t.params
            blend = p.get("mean_blend")
            cells = [
                f"{t.number}{'d' if t.defaults else ''}",
                str(p.get("window", "")),
                str(p.get("units", "")),
                f"{p['dropout']:.2f}" if "dropout" in p else "",
                f"{p['learning_rate']:.1e}" if "learning_rate" in p else "",
                str(p.get("loss", "")),
                f"{p['quantile_weight']:.1f}" if "quantile_weight" in p else "",
                "val" if blend is None else f"{blend:.2f}",
            ]
            if t.state == "COMPLETE":
                cells += [f"{t.scores[k]:.4f}" for k in ("rmsse", "wape", "pinball")]
            else:
                cells += [t.state.lower(), "", ""]
            cells.append("" if t.seconds is None else f"{t.seconds:.0f}")
            table.add_row(*cells, style="bold green" if t.number == self.best_trial else None)
        return table


def _trial_config(
    base: TrainConfig, params: Mapping[str, Any], *, epochs: int, max_windows: int | None
) -> TrainConfig:
    return replace(base, **params, epochs=epochs, max_windows=max_windows)


def _record(trial: optuna.trial.FrozenTrial) -> TrialRecord:
    attrs = trial.user_attrs
    return TrialRecord(
        number=trial.number,
        state=trial.state.name,
        params=dict(trial.params),
        value=trial.value if trial.state == optuna.trial.TrialState.COMPLETE else None,
        scores=dict(attrs.get("scores", {})),
        seconds=attrs.get("seconds"),
        defaults=bool(attrs.get("defaults", False)),
        extra={k: attrs[k] for k in ("epochs_run", "mean_blend_used", "n_windows") if k in attrs},
    )


def _open_study(
    *, storage: str | None, study_name: str, seed: int, setup: dict[str, Any]
) -> optuna.Study:
    """A new (or, with ``storage``, resumed) minimising study with a seeded TPE sampler.

    Raises:
        ConfigError: The storage URL is unusable, or the stored study was tuned with another
            setup (periods, metric, budget, space): its scores would not compare.
    """
    sampler = optuna.samplers.TPESampler(seed=seed)
    try:
        study = optuna.create_study(
            study_name=study_name,
            storage=storage,
            sampler=sampler,
            direction="minimize",
            load_if_exists=True,
        )
    except (ValueError, ImportError) as exc:
        raise ConfigError(
            f"--storage: expected an Optuna RDB URL like sqlite:///tune.db, got {storage!r} ({exc})"
        ) from exc
    except Exception as exc:  # SQLAlchemy's errors: a bad path, a locked or foreign database
        raise ConfigError(f"--storage {storage}: cannot open the study ({exc})") from exc
    stored = study.user_attrs.get("setup")
    if stored is None:
        study.set_user_attr("setup", setup)
    elif stored == setup:
        # The same seed again would redraw the first run's random trials: shift it by the
        # trials already there (still reproducible).
        study.sampler = optuna.samplers.TPESampler(seed=seed + len(study.trials))
    else:
        changed = sorted(k for k in setup if stored.get(k) != setup[k])
        raise ConfigError(
            f"study {study_name!r} in {storage} was tuned with other settings ({', '.join(changed)}"
            "): expected the same data, periods, metric, budget and space to resume it, or use "
            "another --study-name"
        )
    return study


def tune(
    panel: Panel,
    *,
    horizon: int = 28,
    trials: int = 20,
    timeout: float | None = None,
    n_origins: int = DEFAULT_ORIGINS,
    test_weeks: int | None = None,
    metric: str = "rmsse",
    epochs: int = 8,
    max_windows: int | None = 20_000,
    seed: int = 42,
    space: SearchSpace | None = None,
    base: TrainConfig | None = None,
    defaults_first: bool = True,
    storage: str | None = None,
    study_name: str = "trendcast-tune",
    console: Console | None = None,
) -> TuneResult:
    """Search the LSTM's settings with Optuna, each trial scored by the tuning backtest.

    Args:
        panel: All the data; the test period at its end is cut off before any trial.
        horizon: Buckets forecast (fixed, not searched).
        trials: Trials to run (new ones, when resuming a stored study).
        timeout: Stop starting trials after this many seconds (Optuna's timeout: a running
            trial finishes).
        n_origins: Weekly tuning origins.
        test_weeks: Weeks held out at the end (see :func:`split_periods`).
        metric: Objective on the tuning origins: ``rmsse`` (of the mean), ``wape`` (of p50) or
            ``pinball`` (mean of p10/p50/p90).
        epochs: Maximum epochs per trial (early stopping may end sooner).
        max_windows: Training windows per trial (uniform sample).
        seed: Seeds the sampler and every trial's training.
        space: The search space (default :class:`SearchSpace`).
        base: Settings not searched (default :class:`TrainConfig`); also the budget of
            :attr:`TuneResult.best_config`.
        defaults_first: Run ``train``'s default settings as trial 0 (when they are in the
            space and the study is new), so the best is compared with them.
        storage: Optuna RDB URL (``sqlite:///tune.db``) to keep the study and resume it.
        study_name: The study's name in ``storage``.
        console: Where per-trial lines go (default: a rich Console on stderr).

    Raises:
        ConfigError: Bad settings or too little data (see :func:`split_periods`).
        ModelError: No trial completed.
    """
    started = time.perf_counter()
    console = console or Console(stderr=True)
    if trials < 1:
        raise ConfigError(f"expected --trials >= 1, got {trials}")
    if timeout is not None and timeout <= 0:
        raise ConfigError(f"expected --timeout > 0 seconds, got {timeout}")
    if metric not in METRICS:
        raise ConfigError(f"expected --metric in {list(METRICS)}, got {metric!r}")
    if epochs < 1:
        raise ConfigError(f"expected --epochs >= 1, got {epochs}")
    space = space or SearchSpace()
    base = replace(base or TrainConfig(), horizon=horizon, seed=seed)
    base.validate()
    split = split_periods(
        panel,
        horizon=horizon,
        n_origins=n_origins,
        test_weeks=test_weeks,
        min_train_buckets=min(space.windows) + 2 * horizon,
    )
    # The test period goes first: nothing below can see it.
    tuning_panel = panel.until(split.test_start)
    train_panel = tuning_panel.until(split.train_until)
    space = space.fitting(train_panel.n_buckets - 2 * horizon)
    for w in space.windows:
        replace(base, window=w).validate()

    reference = backtest(
        tuning_panel,
        _baselines(horizon, panel),
        horizon=horizon,
        window=max(space.windows),
        origins=split.origins,
    )
    baselines = {str(name): _scores(reference, str(name)) for name in reference.metrics.index}
    freq = panel.freq
    console.print(
        f"tuning: {train_panel.n_items:,} items; trials train on "
        f"{freq.label(split.data_start)}..{freq.label(split.train_until - freq.timedelta)}, "
        f"scored on {len(split.origins)} origins {freq.label(split.origins[0])}.."
        f"{freq.label(split.origins[-1])} (to {freq.label(split.tuning_end)}); test period "
        f"{freq.label(split.test_start)}..{freq.label(split.test_end)} held out"
    )
    console.print(
        "baselines on the tuning origins: "
        + ", ".join(f"{n} {metric} {s[metric]:.4f}" for n, s in baselines.items())
    )

    budget = {
        "epochs": epochs,
        "max_windows": max_windows,
        "trials": trials,
        "timeout": timeout,
        "n_origins": n_origins,
        "test_weeks": split.test_buckets * freq.step_ms / (7 * _DAY_MS),
    }
    setup = {
        "metric": metric,
        "periods": split.as_dict(),
        "n_items": tuning_panel.n_items,
        "freq": freq.name,
        "epochs": epochs,
        "max_windows": max_windows,
        "seed": seed,
        "space": space.as_dict(),
        "base": {k: v for k, v in base.as_dict().items() if k not in _params_of(base)},
    }
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = _open_study(storage=storage, study_name=study_name, seed=seed, setup=setup)
    defaults = _params_of(TrainConfig(horizon=horizon))
    if defaults_first and not study.trials:
        if space.contains(defaults):
            study.enqueue_trial(defaults, user_attrs={"defaults": True})
        else:
            console.print("train's default settings are outside the search space: not run")

    def objective(trial: optuna.Trial) -> float:
        params = space.suggest(trial)
        config = _trial_config(base, params, epochs=epochs, max_windows=max_windows)
        t0 = time.perf_counter()
        keras.backend.clear_session()
        result = train(train_panel, config, console=Console(quiet=True))
        scored = backtest(
            tuning_panel,
            [KerasForecaster(result)],
            horizon=horizon,
            window=config.window,
            origins=split.origins,
        )
        scores = _scores(scored, "lstm")
        trial.set_user_attr("scores", scores)
        trial.set_user_attr("seconds", time.perf_counter() - t0)
        trial.set_user_attr("epochs_run", result.epochs_run)
        trial.set_user_attr("n_windows", result.n_windows)
        trial.set_user_attr("mean_blend_used", result.extra.get("mean_blend"))
        if not math.isfinite(scores[metric]):
            raise ModelError(f"trial {trial.number}: {metric} is not finite")
        return scores[metric]

    def report(study: optuna.Study, frozen: optuna.trial.FrozenTrial) -> None:
        record = _record(frozen)
        if record.value is None:
            console.print(f"trial {record.number}: {record.state.lower()} {record.params}")
            return
        best = study.best_trial.number == record.number
        console.print(
            f"trial {record.number}{' (defaults)' if record.defaults else ''}: {metric} "
            f"{record.value:.4f}  wape {record.scores['wape']:.4f}  "
            f"({record.seconds or 0:.0f}s){'  [green]*best[/green]' if best else ''}"
        )

    # Every trial builds a new model whose predict function TensorFlow traces again: its
    # "triggered tf.function retracing" warning is expected here, and only noise.
    tf_logger = logging.getLogger("tensorflow")
    tf_level = tf_logger.level
    tf_logger.setLevel(logging.ERROR)
    try:
        study.optimize(
            objective,
            n_trials=trials,
            timeout=timeout,
            catch=(ModelError,),
            callbacks=[report],
            gc_after_trial=True,
        )
    finally:
        tf_logger.setLevel(tf_level)
        keras.backend.clear_session()
    records = [_record(t) for t in study.trials]
    done = [r for r in records if r.value is not None]
    if not done:
        raise ModelError(
            f"no trial completed ({len(records)} failed); lower the learning-rate range or "
            "check the data"
        )
    best = min(done, key=lambda r: (r.value, r.number))
    default_runs = [r for r in done if r.defaults]
    return TuneResult(
        metric=metric,
        best_params=best.params,
        best_config=replace(base, **best.params),
        best_score=float(best.value),  # type: ignore[arg-type]
        best_trial=best.number,
        default_score=default_runs[0].value if default_runs else None,
        seed=seed,
        split=split,
        trials=records,
        budget=budget,
        space=space,
        baselines=baselines,
        study={"name": study_name, "storage": storage},
        seconds=time.perf_counter() - started,
    )


# --------------------------------------------------------------------------------------------
# After the search
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# Reading settings back (``trendcast train --config``)
# --------------------------------------------------------------------------------------------

_CONFIG_ADAPTER: TypeAdapter[TrainConfig] = TypeAdapter(TrainConfig)


def config_from_json(path: Path | str, **overrides: Any) -> TrainConfig:
    """A :class:`TrainConfig` from a JSON file, with ``overrides`` (explicit flags) on top.

    The file is either a ``best.json`` of ``trendcast tune`` (its ``config`` is used) or a
    plain object of :class:`TrainConfig` fields (missing ones keep their defaults).

    Raises:
        ConfigError: Unreadable file, not JSON, unknown fields, or values of the wrong type
            or out of range.
    """
    source = Path(path)
    try:
        document = orjson.loads(source.read_bytes())
    except FileNotFoundError as exc:
        raise ConfigError(f"--config: file not found: {source}") from exc
    except (OSError, orjson.JSONDecodeError) as exc:
        raise ConfigError(f"--config {source}: expected a JSON object, got {exc}") from exc
    if isinstance(document, dict) and isinstance(document.get("config"), dict):
        document = document["config"]
    if not isinstance(document, dict):
        raise ConfigError(
            f"--config {source}: expected a JSON object of training settings, got "
            f"{type(document).__name__}"
        )
    known = {f.name for f in fields(TrainConfig)}
    unknown = sorted(set(document) - known)
    if unknown:
        raise ConfigError(f"--config {source}: expected TrainConfig fields, got unknown {unknown}")
    try:
        config = _CONFIG_ADAPTER.validate_python({**document, **overrides})
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise ConfigError(f"--config {source}: {where}: {first['msg']}") from exc
    config.validate()
    return config
