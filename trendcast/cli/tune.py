"""The ``tune`` command: Optuna search of the LSTM's settings, scored by a backtest.

TensorFlow and Optuna (:mod:`training.tuning`) are imported inside the command only, so
``trendcast --help`` stays instant.
"""

from __future__ import annotations

import logging
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import typer

from trendcast.cli.options import (
    FreqOpt,
    MinActive,
    SalesData,
    offline_settings,
    sales_data_options,
)

__all__ = ["MetricChoice", "tune"]

logger = logging.getLogger(__name__)


class MetricChoice(StrEnum):
    """What a trial is scored by on the tuning origins (lower is better)."""

    rmsse = "rmsse"
    wape = "wape"
    pinball = "pinball"


@sales_data_options
def tune(
    ctx: typer.Context,
    out: Annotated[
        Path, typer.Option("--out", help="Where the best settings and all trials go (JSON).")
    ] = Path("artifacts/tune/best.json"),
    *,
    sales: SalesData,
    freq: FreqOpt = "1D",
    min_active: MinActive = 0,
    horizon: Annotated[int, typer.Option(help="Buckets forecast (not searched).")] = 28,
    trials: Annotated[int, typer.Option(help="Trials to run (new ones when resuming).")] = 20,
    timeout: Annotated[
        float | None,
        typer.Option(help="Start no trial after this many seconds (a running one finishes)."),
    ] = None,
    test_weeks: Annotated[
        int | None,
        typer.Option(
            help="Weeks at the end of the data that no trial sees (default: the horizon, "
            "rounded up to whole weeks)."
        ),
    ] = None,
    origins: Annotated[
        int, typer.Option(help="Weekly tuning origins, just before the test period.")
    ] = 3,
    metric: Annotated[
        MetricChoice,
        typer.Option(help="Objective: RMSSE of the mean, WAPE of p50 or mean pinball loss."),
    ] = MetricChoice.rmsse,
    epochs: Annotated[int, typer.Option(help="Maximum epochs per trial.")] = 8,
    max_windows: Annotated[
        int, typer.Option(min=1, help="Training windows per trial (uniform sample).")
    ] = 20_000,
    seed: Annotated[int, typer.Option(help="Seed of the sampler and of every trial.")] = 42,
    storage: Annotated[
        str | None,
        typer.Option(help="Optuna RDB URL to keep and resume the study: sqlite:///tune.db."),
    ] = None,
    study_name: Annotated[str, typer.Option(help="The study's name in --storage.")] = (
        "trendcast-tune"
    ),
    defaults_first: Annotated[
        bool, typer.Option(help="Trial 0 = train's default settings, for comparison.")
    ] = True,
    train_bundle: Annotated[
        Path | None,
        typer.Option(
            help="Then train the best settings on the data before the test period, export "
            "that bundle here and score it on the test period."
        ),
    ] = None,
) -> None:
    """Search window, units, dropout, learning rate, loss, quantile weight and blend (Optuna).

    Each trial trains on the data before the tuning origins and is scored by a backtest on
    them; the last --test-weeks are never seen by any trial. Writes --out (best settings, the
    full training config, every trial); `trendcast train --config OUT` trains from it on all
    the data, the production bundle.

    Example: trendcast tune --data sales.csv --trials 30 --timeout 3600 --train-bundle
    artifacts/tuned
    """
    from rich.console import Console

    settings = offline_settings(ctx)
    panel = sales.panel(freq, min_active=min_active)
    panel.require_history(horizon)

    # TensorFlow and Optuna are imported only here.
    from training.tuning import tune as run_tune

    err = Console(stderr=True)
    result = run_tune(
        panel,
        horizon=horizon,
        trials=trials,
        timeout=timeout,
        n_origins=origins,
        test_weeks=test_weeks,
        metric=metric.value,
        epochs=epochs,
        max_windows=max_windows,
        seed=seed,
        defaults_first=defaults_first,
        storage=storage,
        study_name=study_name,
        console=err,
    )
    table_out = Console()
    if not table_out.is_terminal:  # a file or pipe: rich would cut the table at 80 columns
        table_out = Console(width=120)
    table_out.print(result.table())
    versus = (
        "" if result.default_score is None else f" (train's defaults {result.default_score:.4f})"
    )
    typer.echo(
        f"best: trial {result.best_trial}, {result.metric} {result.best_score:.4f}{versus}, "
        f"{_params_text(result.best_params)}"
    )
    path = result.write(out)
    typer.echo(f"wrote {path} in {result.seconds:.0f}s")
    if train_bundle is None:
        return

    from export import export_bundle
    from training.tuning import score_test_period, train_best
    from trendcast.backtest import print_metrics
    from trendcast.bundle import load_bundle
    from trendcast.forecasting.onnx import OnnxForecaster

    trained = train_best(panel, result, console=err)
    bundle_dir = export_bundle(trained, train_bundle)
    loaded = load_bundle(bundle_dir)
    test = score_test_period(
        panel,
        result.split,
        OnnxForecaster(loaded, threads=settings.threads or None),
        window=loaded.meta.window,
    )
    print_metrics(test)
    summary = test.to_json()
    result.write(
        out,
        extra={
            "test": {
                "bundle": str(bundle_dir),
                "model_version": loaded.meta.model_version,
                "origins": summary["origins"],
                "models": summary["models"],
            }
        },
    )
    scores = summary["models"]["lstm"]
    typer.echo(
        f"bundle {bundle_dir} (trained before {panel.freq.label(result.split.test_start)}): "
        f"test-period {result.metric} {scores[result.metric]:.4f}; added to {path}. For "
        f"production, train on all the data: trendcast train (same data flags) --config {path}"
    )


def _params_text(params: dict[str, Any]) -> str:
    """``window=56 units=64 …`` with floats short."""
    return " ".join(
        f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items()
    )
