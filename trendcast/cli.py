"""The ``trendcast`` console script: thin commands that parse, build settings, call a library.

Heavy libraries (TensorFlow, Faust, ONNX Runtime) are imported inside the commands that need
them, so ``trendcast --help`` is instant and ``trendcast forecast`` never loads TensorFlow.
Every :class:`~trendcast.exceptions.TrendcastError` reaches the user as one line on stderr and
exit code 1; usage errors exit 2; nothing prints a traceback unless ``TRENDCAST_DEBUG=1``.
"""

from __future__ import annotations

import logging
import sys
from datetime import datetime
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from pydantic import ValidationError

from trendcast.config import OfflineSettings
from trendcast.exceptions import ConfigError, TrendcastError

if TYPE_CHECKING:
    import pandas as pd

    from export import QuantizeReport
    from trendcast.data import ColumnMap, Panel

__all__ = ["app", "main"]

logger = logging.getLogger(__name__)

app = typer.Typer(
    name="trendcast",
    help="Streaming, real-time sales forecaster: train, export, forecast, evaluate, stream.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

# Shared options (typer has no option groups; these Annotated aliases keep commands in sync).
DataOpt = Annotated[
    Path, typer.Option("--data", help="CSV/Parquet of sales lines or pre-aggregated series.")
]
ItemCol = Annotated[str, typer.Option("--item-col", help="Column holding the item id.")]
TimeCol = Annotated[str, typer.Option("--time-col", help="Column holding the timestamp.")]
QtyCol = Annotated[str, typer.Option("--qty-col", help="Column holding the quantity.")]
PriceCol = Annotated[
    str, typer.Option("--price-col", help="Column holding the unit price (used if present).")
]
ItemPattern = Annotated[
    str | None,
    typer.Option("--item-pattern", help=r"Keep items whose id matches this regex, e.g. '^\d{5}'."),
]


class ReturnsChoice(StrEnum):
    """What to do with negative quantities (returns, cancellations)."""

    drop = "drop"
    net = "net"


class LossChoice(StrEnum):
    """Loss of the LSTM's expected-value output."""

    poisson = "poisson"
    tweedie = "tweedie"
    mse = "mse"


Returns = Annotated[
    ReturnsChoice,
    typer.Option(
        "--returns",
        help="drop: ignore negative quantities; net: subtract them within a bucket.",
    ),
]
FreqOpt = Annotated[str, typer.Option("--freq", help="Bucket size: 1h, 6h, 1D, 7D, 1W…")]
MinActive = Annotated[
    int, typer.Option("--min-active", min=0, help="Keep items with at least N selling buckets.")
]
BundleOpt = Annotated[Path | None, typer.Option("--bundle", help="Model bundle directory.")]


def _settings(ctx: typer.Context) -> OfflineSettings:
    obj = ctx.find_root().obj
    if not isinstance(obj, OfflineSettings):  # pragma: no cover - set by the callback
        raise ConfigError("settings not initialised")
    return obj


@app.callback()
def _root(ctx: typer.Context) -> None:
    """trendcast: streaming, real-time sales forecasting."""
    settings = ctx.obj if isinstance(ctx.obj, OfflineSettings) else OfflineSettings()
    logging.basicConfig(
        level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    ctx.obj = settings


def _load_panel(
    data: Path,
    *,
    freq: str,
    item_col: str,
    time_col: str,
    qty_col: str,
    price_col: str,
    item_pattern: str | None,
    returns: ReturnsChoice,
    min_active: int = 0,
) -> Panel:
    from trendcast.data import load_sales
    from trendcast.freq import parse_freq

    return load_sales(
        data,
        parse_freq(freq),
        columns=_columns(item_col, time_col, qty_col, price_col),
        item_pattern=item_pattern,
        returns=returns.value,
        min_active=min_active,
    )


def _columns(item_col: str, time_col: str, qty_col: str, price_col: str) -> ColumnMap:
    from trendcast.data import ColumnMap

    return ColumnMap(item=item_col, time=time_col, quantity=qty_col, price=price_col)


def _date(value: str | None, flag: str) -> datetime | None:
    if value is None:
        return None
    try:
        return datetime.fromisoformat(value)
    except ValueError as exc:
        raise ConfigError(f"{flag}: expected a date like 2011-06-30, got {value!r}") from exc


@app.command()
def forecast(
    ctx: typer.Context,
    data: DataOpt,
    out: Annotated[Path, typer.Option("--out", help="Output CSV file.")],
    bundle: BundleOpt = None,
    item_col: ItemCol = "item_id",
    time_col: TimeCol = "ts",
    qty_col: QtyCol = "quantity",
    price_col: PriceCol = "price",
    item_pattern: ItemPattern = None,
    returns: Returns = ReturnsChoice.drop,
    quantized: Annotated[bool, typer.Option(help="Use the INT8 model if present.")] = False,
) -> None:
    """Forecast the next horizon for every item from the end of the data (ONNX Runtime only).

    Example: trendcast forecast --bundle artifacts/bundle --data sales.csv --out forecast.csv
    """
    from trendcast.bundle import load_bundle
    from trendcast.forecasting.onnx import OnnxForecaster
    from trendcast.forecasting.output import forecast_frame
    from trendcast.forecasting.windows import windows_from_panel

    settings = _settings(ctx)
    loaded = load_bundle(bundle or settings.bundle)
    panel = _load_panel(
        data,
        freq=loaded.meta.freq,
        item_col=item_col,
        time_col=time_col,
        qty_col=qty_col,
        price_col=price_col,
        item_pattern=item_pattern,
        returns=returns,
    )
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


@app.command()
def train(
    ctx: typer.Context,
    data: DataOpt,
    bundle: BundleOpt = None,
    item_col: ItemCol = "item_id",
    time_col: TimeCol = "ts",
    qty_col: QtyCol = "quantity",
    price_col: PriceCol = "price",
    item_pattern: ItemPattern = None,
    returns: Returns = ReturnsChoice.drop,
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
) -> None:
    """Train the global LSTM and export a verified ONNX bundle.

    Example: trendcast train --data sales.csv --bundle artifacts/bundle --epochs 20
    """
    from rich.console import Console

    settings = _settings(ctx)
    panel = _load_panel(
        data,
        freq=freq,
        item_col=item_col,
        time_col=time_col,
        qty_col=qty_col,
        price_col=price_col,
        item_pattern=item_pattern,
        returns=returns,
        min_active=min_active,
    )
    cutoff = _date(until, "--until")
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
    config = TrainConfig(
        window=window,
        horizon=horizon,
        epochs=epochs,
        seed=seed,
        loss=loss.value,
        units=units,
        batch_size=batch_size,
        max_windows=max_windows,
    )
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


@app.command()
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

    settings = _settings(ctx)
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


@app.command()
def evaluate(
    ctx: typer.Context,
    data: DataOpt,
    out: Annotated[Path, typer.Option("--out", help="Report directory.")],
    bundle: BundleOpt = None,
    item_col: ItemCol = "item_id",
    time_col: TimeCol = "ts",
    qty_col: QtyCol = "quantity",
    price_col: PriceCol = "price",
    item_pattern: ItemPattern = None,
    returns: Returns = ReturnsChoice.drop,
    freq: FreqOpt = "1D",
    min_active: MinActive = 0,
    weeks: Annotated[int, typer.Option(min=1, help="Backtest over the last N weeks.")] = 8,
    horizon: Annotated[
        int, typer.Option(min=1, help="Buckets forecast (from the bundle if given).")
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
    panel = _load_panel(
        data,
        freq=freq,
        item_col=item_col,
        time_col=time_col,
        qty_col=qty_col,
        price_col=price_col,
        item_pattern=item_pattern,
        returns=returns,
        min_active=min_active,
    )
    panel.require_history(horizon)
    evaluation = run_evaluation(panel, out, bundle=loaded, weeks=weeks, horizon=horizon)
    print_metrics(evaluation.result)
    for warning in evaluation.warnings:
        typer.secho(f"warning: {warning}", err=True, fg="yellow")
    typer.echo(f"wrote {', '.join(str(p) for p in evaluation.files.values())}")


def main() -> None:
    """Console-script entry point: run the app, turning errors into one line and an exit code."""
    try:
        settings = OfflineSettings()
    except ValidationError as exc:
        first = exc.errors()[0]
        typer.secho(
            f"error: TRENDCAST_{str(first['loc'][0]).upper()}: {first['msg']}", err=True, fg="red"
        )
        sys.exit(2)
    try:
        app(standalone_mode=False, obj=settings)
    except TrendcastError as exc:
        if settings.debug:
            raise
        typer.secho(f"error: {exc}", err=True, fg="red")
        sys.exit(1)
    except typer.Abort:
        typer.echo("aborted", err=True)
        sys.exit(130)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except typer.TyperException as exc:  # usage errors: typer prints them like click does
        show = getattr(exc, "show", None)
        if callable(show):
            show()
        else:
            typer.echo(f"error: {exc}", err=True)
        sys.exit(int(getattr(exc, "exit_code", 2)))
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)
    except Exception as exc:  # a bug: still one line, the traceback only on request
        if settings.debug:
            raise
        typer.secho(
            f"internal error: {type(exc).__name__}: {exc} (set TRENDCAST_DEBUG=1 for a traceback)",
            err=True,
            fg="red",
        )
        sys.exit(70)
    sys.exit(0)


if __name__ == "__main__":  # pragma: no cover
    main()
