"""The offline commands: ``forecast``, ``train``, ``export``, ``evaluate`` and ``report``.

TensorFlow (``training``, ``export``) is imported only inside ``train`` and ``export``:
``forecast`` runs on ONNX Runtime alone, like the worker.
"""

from __future__ import annotations

import logging
from datetime import datetime
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from trendcast.cli.options import (
    BundleOpt,
    FreqOpt,
    MinActive,
    SalesData,
    offline_settings,
    parse_date,
    sales_data_options,
    worker_settings,
)
from trendcast.exceptions import ConfigError

if TYPE_CHECKING:
    import pandas as pd

    from export import QuantizeReport

__all__ = ["LossChoice", "evaluate", "export", "forecast", "report", "train"]

logger = logging.getLogger(__name__)


class LossChoice(StrEnum):
    """Loss of the LSTM's expected-value output."""

    poisson = "poisson"
    tweedie = "tweedie"
    mse = "mse"


@sales_data_options
def forecast(
    ctx: typer.Context,
    out: Annotated[Path, typer.Option("--out", help="Output CSV file.")],
    bundle: BundleOpt = None,
    *,
    sales: SalesData,
    quantized: Annotated[bool, typer.Option(help="Use the INT8 model if present.")] = False,
) -> None:
    """Forecast the next horizon for every item from the end of the data (ONNX Runtime only).

    Example: trendcast forecast --bundle artifacts/bundle --data sales.csv --out forecast.csv
    """
    from trendcast.bundle import load_bundle
    from trendcast.forecasting.onnx import OnnxForecaster
    from trendcast.forecasting.output import forecast_frame
    from trendcast.forecasting.windows import windows_from_panel

    settings = offline_settings(ctx)
    loaded = load_bundle(bundle or settings.bundle)
    panel = sales.panel(loaded.meta.freq)
    forecaster = OnnxForecaster(loaded, quantized=quantized, threads=settings.threads or None)
    batch = windows_from_panel(panel, loaded.meta.window)
    frame = forecast_frame(batch, forecaster.predict(batch), loaded.freq)
    out.parent.mkdir(parents=True, exist_ok=True)
    frame.to_csv(out, index=False)
    n_fallback = int(frame.groupby("item_id")["fallback"].first().sum())
    typer.echo(
        f"wrote {out}: {batch.quantities.shape[0]} items x {loaded.meta.horizon} buckets "
        f"({n_fallback} items on the seasonal-naive fallback), model {loaded.meta.model_version}"
    )


@sales_data_options
def train(
    ctx: typer.Context,
    bundle: BundleOpt = None,
    *,
    sales: SalesData,
    freq: FreqOpt = "1D",
    min_active: MinActive = 0,
    until: Annotated[
        str | None, typer.Option("--until", help="Train only on data before this date.")
    ] = None,
    window: Annotated[int, typer.Option(min=2, help="Input buckets per window.")] = 56,
    horizon: Annotated[int, typer.Option(min=1, help="Buckets forecast.")] = 28,
    epochs: Annotated[int, typer.Option(min=1, help="Maximum epochs (early stopping).")] = 30,
    seed: Annotated[int, typer.Option(help="Seed of numpy, Python and TensorFlow.")] = 42,
    loss: Annotated[LossChoice, typer.Option(help="Loss of the mean output.")] = (
        LossChoice.poisson
    ),
    units: Annotated[int, typer.Option(min=1, help="LSTM units.")] = 64,
    batch_size: Annotated[int, typer.Option(min=1, help="Windows per step.")] = 256,
    max_windows: Annotated[
        int, typer.Option(min=1, help="Sample at most this many training windows.")
    ] = 60_000,
    quantize: Annotated[bool, typer.Option(help="Also export an INT8 model.")] = False,
    config_file: Annotated[
        Path | None,
        typer.Option(
            "--config",
            help="Training settings from JSON: the best.json of `trendcast tune` or TrainConfig "
            "fields. Flags given on the command line win over it.",
        ),
    ] = None,
) -> None:
    """Train the global LSTM and export a verified ONNX bundle.

    Example: trendcast train --data sales.csv --bundle artifacts/bundle --epochs 20
    """
    from rich.console import Console

    settings = offline_settings(ctx)
    panel = sales.panel(freq, min_active=min_active)
    cutoff = parse_date(until, "--until")
    if cutoff is not None:
        panel = panel.until(_timestamp(cutoff))
        if panel.frame.empty:
            raise ConfigError(f"--until {until}: no data before that date")
    panel.require_history(horizon)

    # TensorFlow is imported only here (and in export): the worker never needs it.
    from export import export_bundle, quantize_bundle
    from training import TrainConfig
    from training import train as train_model
    from trendcast.plots import plot_training_curves

    target = bundle or settings.bundle
    flags: dict[str, Any] = {
        "window": window,
        "horizon": horizon,
        "epochs": epochs,
        "seed": seed,
        "loss": loss.value,
        "units": units,
        "batch_size": batch_size,
        "max_windows": max_windows,
    }
    if config_file is None:
        config = TrainConfig(**flags)
    else:
        from training.tuning import config_from_json

        # Typer vendors its own click: compare the parameter source by name, not by enum.
        given = {
            k: v
            for k, v in flags.items()
            if getattr(ctx.get_parameter_source(k), "name", None) in ("COMMANDLINE", "ENVIRONMENT")
        }
        config = config_from_json(config_file, **given)
        if given:
            typer.echo(f"flags over {config_file}: {', '.join(sorted(given))}", err=True)
        panel.require_history(config.horizon)
    console = Console(stderr=True)
    result = train_model(panel, config, console=console)
    path = export_bundle(result, target)
    plot_training_curves(result.history, path / "training" / "training_curves.png")
    if quantize:
        _print_quantize(quantize_bundle(path, threads=settings.threads or None))
    from trendcast.bundle import load_bundle

    meta = load_bundle(path).meta
    typer.echo(
        f"bundle {path}: model {meta.model_version}, {meta.training.n_items} items, "
        f"window {meta.window}, horizon {meta.horizon}, freq {meta.freq}, "
        f"ONNX==Keras max diff {meta.parity.get('max_abs_diff', float('nan')):.2e}"
    )


def _timestamp(value: datetime) -> pd.Timestamp:
    import pandas as pd

    ts = pd.Timestamp(value)
    return ts.tz_convert("UTC").tz_localize(None) if ts.tzinfo is not None else ts


def _print_quantize(report: QuantizeReport) -> None:
    typer.echo(
        f"INT8 model {report.path.name}: max |int8-float| {report.max_abs_diff:.4f} "
        f"(mean {report.mean_abs_diff:.5f}); {report.int8_windows_per_s:,.0f} vs "
        f"{report.float_windows_per_s:,.0f} windows/s at batch {report.batch_size} "
        f"(speed-up x{report.speedup:.2f}); size {report.int8_bytes:,} vs "
        f"{report.float_bytes:,} bytes"
    )
    for name, value in report.float_scores.items():
        if name in report.int8_scores:
            typer.echo(f"  {name}: float {value:.4f} -> int8 {report.int8_scores[name]:.4f}")


def export(
    ctx: typer.Context,
    bundle: BundleOpt = None,
    quantize: Annotated[
        bool, typer.Option(help="Add an INT8 dynamically quantized model and report it.")
    ] = False,
    reconvert: Annotated[
        bool, typer.Option(help="Re-convert model.onnx from the kept Keras model first.")
    ] = False,
) -> None:
    """Re-export a bundle from its Keras model and/or add an INT8 model.

    Example: trendcast export --bundle artifacts/bundle --quantize
    """
    from trendcast.bundle import load_bundle

    settings = offline_settings(ctx)
    target = bundle or settings.bundle
    if not quantize and not reconvert:
        raise ConfigError("nothing to do: pass --quantize and/or --reconvert")
    from export import export_from_training_dir, quantize_bundle

    if reconvert:
        export_from_training_dir(target)
    else:
        load_bundle(target)  # refuse to touch a bundle that does not verify
    if quantize:
        _print_quantize(quantize_bundle(target, threads=settings.threads or None))
    typer.echo(f"bundle {target}: model {load_bundle(target).meta.model_version}")


@sales_data_options
def evaluate(
    out: Annotated[Path, typer.Option("--out", help="Report directory.")],
    bundle: BundleOpt = None,
    *,
    sales: SalesData,
    freq: FreqOpt = "1D",
    min_active: MinActive = 0,
    weeks: Annotated[int, typer.Option(min=1, help="Backtest over the last N weeks.")] = 8,
    horizon: Annotated[
        int, typer.Option(min=1, help="Buckets forecast (from the bundle if given).")
    ] = 28,
    intraday: Annotated[
        bool,
        typer.Option(
            "--intraday",
            help="Score the open-bucket nowcasts instead (needs --bundle and timestamped "
            "lines): the last N buckets replayed, nowcasts at 25/50/75% vs the forecast made "
            "at the bucket's start, and the alerts each threshold would raise.",
        ),
    ] = False,
    buckets: Annotated[
        int, typer.Option(min=1, help="With --intraday: test buckets at the end of the data.")
    ] = 28,
) -> None:
    """Rolling-origin backtest of the model (if --bundle) beside the baselines.

    Example: trendcast evaluate --data sales.csv --bundle artifacts/bundle --out report/
    """
    from trendcast.backtest import evaluate as run_evaluation
    from trendcast.backtest import print_metrics
    from trendcast.bundle import load_bundle

    loaded = load_bundle(bundle) if bundle is not None else None
    if loaded is not None:
        freq, horizon = loaded.meta.freq, loaded.meta.horizon
    panel = sales.panel(freq, min_active=min_active)
    if intraday:
        if loaded is None:
            raise ConfigError("expected --bundle with --intraday, got none")
        from trendcast.intraday import evaluate_intraday

        result = evaluate_intraday(panel, loaded, out, buckets=buckets)
        typer.echo(result.markdown())
        typer.echo(f"wrote {out}")
        return
    panel.require_history(horizon)
    evaluation = run_evaluation(panel, out, bundle=loaded, weeks=weeks, horizon=horizon)
    print_metrics(evaluation.result)
    for warning in evaluation.warnings:
        typer.secho(f"warning: {warning}", err=True, fg="yellow")
    typer.echo(f"wrote {', '.join(str(p) for p in evaluation.files.values())}")


def report(
    out: Annotated[Path, typer.Option("--out", help="Report directory.")],
    input_file: Annotated[
        Path | None,
        typer.Option(
            "--input",
            help="JSON lines of forecast-accuracy records (as `trendcast tail` prints them) "
            "instead of reading Kafka.",
        ),
    ] = None,
    brokers: Annotated[
        str | None, typer.Option(help="Kafka bootstrap (default: TRENDCAST_KAFKA_BROKERS).")
    ] = None,
    topic: Annotated[str, typer.Option(help="Topic of the accuracy records.")] = (
        "forecast-accuracy"
    ),
) -> None:
    """Plot and tabulate the worker's online accuracy (RMSSE, WAPE, coverage) over time.

    Reads the topic from its beginning to its current end, or --input.

    Example: trendcast report --input accuracy.jsonl --out artifacts/online
    """
    from trendcast.report import build_report, read_records

    if input_file is not None and brokers is not None:
        raise ConfigError("give either --input or --brokers, not both")
    if input_file is not None:
        records = read_records(input_file)
        source = str(input_file)
    else:
        from stream.settings.security import KafkaSecurity
        from trendcast.devtools.embedded import to_bootstrap
        from trendcast.devtools.tail import tail as read_topic

        settings = worker_settings()
        bootstrap = to_bootstrap(brokers or settings.kafka_brokers)
        security = KafkaSecurity.from_settings(settings)
        records = [r["value"] for r in read_topic(bootstrap, topic, n=None, security=security)]
        source = f"{topic} on {bootstrap}"
    result = build_report(records, out, source=source)
    typer.echo(f"wrote {', '.join(str(p) for p in result.files.values())}")
