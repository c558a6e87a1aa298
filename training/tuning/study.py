"""The Optuna study: one trial per setting, trained then scored by the tuning backtest."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import keras
import optuna
from rich.console import Console

from training.trainer import TrainConfig, train
from training.tuning.periods import _DAY_MS, DEFAULT_ORIGINS, split_periods
from training.tuning.result import TrialRecord, TuneResult
from training.tuning.scoring import METRICS, KerasForecaster, _baselines, _scores
from training.tuning.space import SearchSpace, _params_of
from trendcast.backtest import backtest
from trendcast.data import Panel
from trendcast.exceptions import ConfigError, ModelError

__all__ = [
    "tune",
]

logger = logging.getLogger(__name__)


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
