"""The ``trendcast`` console script: thin commands that parse, build settings, call a library.

Heavy libraries (TensorFlow, Faust, ONNX Runtime) are imported inside the commands that need
them, so ``trendcast --help`` is instant and ``trendcast forecast`` never loads TensorFlow.
Every :class:`~trendcast.exceptions.TrendcastError` reaches the user as one line on stderr and
exit code 1; usage errors exit 2; nothing prints a traceback unless ``TRENDCAST_DEBUG=1``.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
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
    from stream.settings.worker import WorkerSettings
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


@dataclass(frozen=True)
class _DataFlags:
    """The data-reading flags of ``forecast``, ``train``, ``evaluate`` and ``replay``.

    Typer takes options only from a command's own signature, so each command still lists
    them (as the shared ``Annotated`` aliases above); this keeps what is done with them in
    one place.
    """

    data: Path
    item_col: str
    time_col: str
    qty_col: str
    price_col: str
    item_pattern: str | None
    returns: ReturnsChoice

    @property
    def columns(self) -> ColumnMap:
        from trendcast.data import ColumnMap

        return ColumnMap(
            item=self.item_col, time=self.time_col, quantity=self.qty_col, price=self.price_col
        )

    def panel(self, freq: str, *, min_active: int = 0) -> Panel:
        """The cleaned panel of ``data`` in buckets of ``freq``."""
        from trendcast.data import load_sales
        from trendcast.freq import parse_freq

        return load_sales(
            self.data,
            parse_freq(freq),
            columns=self.columns,
            item_pattern=self.item_pattern,
            returns=self.returns.value,
            min_active=min_active,
        )


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
    flags = _DataFlags(data, item_col, time_col, qty_col, price_col, item_pattern, returns)
    panel = flags.panel(loaded.meta.freq)
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
    flags = _DataFlags(data, item_col, time_col, qty_col, price_col, item_pattern, returns)
    panel = flags.panel(freq, min_active=min_active)
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
    flags = _DataFlags(data, item_col, time_col, qty_col, price_col, item_pattern, returns)
    panel = flags.panel(freq, min_active=min_active)
    panel.require_history(horizon)
    evaluation = run_evaluation(panel, out, bundle=loaded, weeks=weeks, horizon=horizon)
    print_metrics(evaluation.result)
    for warning in evaluation.warnings:
        typer.secho(f"warning: {warning}", err=True, fg="yellow")
    typer.echo(f"wrote {', '.join(str(p) for p in evaluation.files.values())}")


def _worker_settings() -> WorkerSettings:
    from stream.settings.worker import WorkerSettings

    try:
        return WorkerSettings()
    except ValidationError as exc:
        first = exc.errors()[0]
        raise ConfigError(f"TRENDCAST_{str(first['loc'][0]).upper()}: {first['msg']}") from exc


@app.command()
def worker(
    loglevel: Annotated[str, typer.Option(help="Faust log level.")] = "info",
) -> None:
    """Run the stream worker (settings from TRENDCAST_* environment variables).

    Example: TRENDCAST_KAFKA_BROKERS=kafka://localhost:9092 TRENDCAST_BUNDLE=artifacts/bundle
    trendcast worker
    """
    from stream.worker.runner import run_worker

    run_worker(_worker_settings(), loglevel=loglevel)


@app.command()
def replay(
    data: DataOpt,
    item_col: ItemCol = "item_id",
    time_col: TimeCol = "ts",
    qty_col: QtyCol = "quantity",
    price_col: PriceCol = "price",
    item_pattern: ItemPattern = None,
    returns: Returns = ReturnsChoice.drop,
    from_: Annotated[
        str | None, typer.Option("--from", help="First event time to publish (inclusive).")
    ] = None,
    to: Annotated[
        str | None, typer.Option("--to", help="Event time to stop before (exclusive).")
    ] = None,
    speed: Annotated[
        str | None, typer.Option(help="N times real time, or 'max' (default: max).")
    ] = None,
    rate: Annotated[float | None, typer.Option(min=0.001, help="Cap events per second.")] = None,
    topic: Annotated[
        str | None, typer.Option(help="Topic (default TRENDCAST_SALES_TOPIC).")
    ] = None,
) -> None:
    """Publish a file's sales lines as events, in event-time order, with stable event ids.

    Example: trendcast replay --data sales.csv --from 2011-06-01 --to 2011-07-01 --speed 86400
    """
    from stream.settings.security import KafkaSecurity
    from trendcast.data import read_lines
    from trendcast.devtools.embedded import to_bootstrap
    from trendcast.devtools.replay import parse_speed, source_identity
    from trendcast.devtools.replay import replay as run_replay

    if speed is not None and rate is not None:
        raise ConfigError("give either --speed or --rate, not both")
    start, end = _date(from_, "--from"), _date(to, "--to")
    settings = _worker_settings()
    flags = _DataFlags(data, item_col, time_col, qty_col, price_col, item_pattern, returns)
    lines, _ = read_lines(
        data, columns=flags.columns, item_pattern=item_pattern, returns=returns.value
    )
    report = run_replay(
        lines,
        bootstrap=to_bootstrap(settings.kafka_brokers),
        topic=topic or settings.sales_topic,
        speed=parse_speed(speed) if speed is not None else None,
        rate=rate,
        start=start,
        end=end,
        source=source_identity(data),
        progress=True,
        create_partitions=settings.topic_partitions,
        security=KafkaSecurity.from_settings(settings),
    )
    typer.echo(
        f"published {report.events:,} events for {report.items:,} items "
        f"({report.first_ts}..{report.last_ts}) in {report.elapsed_s:.1f}s "
        f"({report.events_per_s:,.0f} events/s)"
    )


@app.command()
def tail(
    topic: Annotated[str | None, typer.Option(help="Topic (default: the forecasts topic).")] = None,
    n: Annotated[int, typer.Option("-n", "--lines", min=0, help="Show the last N records.")] = 10,
    follow: Annotated[bool, typer.Option("-f", "--follow", help="Keep printing new ones.")] = False,
) -> None:
    """Print a topic's records as JSON lines.

    Example: trendcast tail --topic sales.dlq -n 5
    """
    from stream.settings.security import KafkaSecurity
    from trendcast.devtools.embedded import to_bootstrap
    from trendcast.devtools.tail import print_tail

    settings = _worker_settings()
    print_tail(
        to_bootstrap(settings.kafka_brokers),
        topic or settings.forecasts_topic,
        n=n,
        follow=follow,
        security=KafkaSecurity.from_settings(settings),
    )


@app.command()
def inspect(
    item_ids: Annotated[list[str], typer.Argument(help="Item ids to show.")],
    freq: Annotated[str | None, typer.Option(help="Bucket size (default: the bundle's).")] = None,
) -> None:
    """Print each item's window from Redis as one JSON object per line.

    Example: trendcast inspect 85123A 22423
    """
    import orjson

    from stream.worker.runner import inspect_items

    for record in inspect_items(_worker_settings(), item_ids, freq=freq):
        typer.echo(orjson.dumps(record).decode())


@app.command()
def promote(
    version: Annotated[
        str,
        typer.Argument(metavar="VERSION", help="Bundle under --bundles to make live, e.g. v3."),
    ],
    bundles: Annotated[
        Path,
        typer.Option(
            "--bundles", metavar="DIR", help="Directory of bundles (workers' TRENDCAST_BUNDLE)."
        ),
    ],
    redis_url: Annotated[
        str | None,
        typer.Option(
            "--redis-url",
            help="Redis holding --key (default: TRENDCAST_REDIS_URL; credentials, TLS and "
            "cluster mode from the TRENDCAST_REDIS_* settings).",
        ),
    ] = None,
    key: Annotated[
        str | None,
        typer.Option(
            "--key",
            help="Set this Redis key (the workers' TRENDCAST_BUNDLE_REDIS_KEY) instead of "
            "writing DIR/current.",
        ),
    ] = None,
) -> None:
    """Verify the bundle DIR/VERSION, then make it live (DIR/current or a Redis key).

    Workers switch at their next poll; roll back by promoting the previous version.

    Example: trendcast promote v3 --bundles /bundles --key trendcast:bundle:current
    """
    from stream.lifecycle.live_pointer import CURRENT_FILE, PointerFile, RedisKey
    from stream.lifecycle.live_pointer import promote as promote_bundle
    from stream.settings.redaction import redact_url
    from trendcast.sync_bridge import run_sync

    if key is None and redis_url is not None:
        raise ConfigError("--redis-url: expected --key with it, got none")
    if key is not None and not key.strip():
        raise ConfigError(f"--key: expected a Redis key name, got {key!r}")
    settings: WorkerSettings | None = None
    if key is not None:
        from stream.settings.worker import WorkerSettings

        try:
            settings = WorkerSettings(redis_url=redis_url) if redis_url else WorkerSettings()
        except ValidationError as exc:
            first = exc.errors()[0]
            name = str(first["loc"][0]) if first["loc"] else "redis_url"
            flag = "--redis-url" if redis_url is not None and name == "redis_url" else name
            raise ConfigError(f"{flag}: {first['msg']}") from exc

    async def run() -> str:
        if key is None or settings is None:
            return (await promote_bundle(bundles, version, PointerFile(bundles))).meta.model_version
        target = RedisKey.from_settings(settings, key)
        try:
            return (await promote_bundle(bundles, version, target)).meta.model_version
        finally:
            await target.aclose()

    model_version = run_sync(run())
    where = (
        str(bundles / CURRENT_FILE)
        if settings is None
        else f"Redis key {key!r} at {redact_url(settings.redis_url)}"
    )
    typer.echo(f"promoted {version} (model {model_version}): {where} now names it")


@app.command("report")
def report_command(
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

        settings = _worker_settings()
        bootstrap = to_bootstrap(brokers or settings.kafka_brokers)
        security = KafkaSecurity.from_settings(settings)
        records = [r["value"] for r in read_topic(bootstrap, topic, n=None, security=security)]
        source = f"{topic} on {bootstrap}"
    result = build_report(records, out, source=source)
    typer.echo(f"wrote {', '.join(str(p) for p in result.files.values())}")


def _train_sample_bundle(target: Path) -> Path:
    """Train the small bundle `trendcast up` serves when none is given (shipped sample)."""
    from rich.console import Console

    from export import export_bundle
    from training import TrainConfig
    from training import train as train_model
    from trendcast.data import load_sales, sample_data_path
    from trendcast.freq import parse_freq

    panel = load_sales(sample_data_path(), parse_freq("1D"))
    config = TrainConfig(window=28, horizon=14, epochs=4, units=32, max_windows=8_000)
    result = train_model(panel, config, console=Console(stderr=True))
    return export_bundle(result, target)


@app.command()
def up(
    bundle: BundleOpt = None,
    data: Annotated[
        Path | None, typer.Option(help="Canonical sales file to replay (default: the sample).")
    ] = None,
    speed: Annotated[str, typer.Option(help="Live replay speed: N x real time or 'max'.")] = (
        "86400"
    ),
    weeks: Annotated[float, typer.Option(min=0.1, help="Weeks replayed live.")] = 4.0,
    duration: Annotated[
        float | None, typer.Option(help="Stop after this many seconds (default: Ctrl-C).")
    ] = None,
    exit_when_done: Annotated[
        bool, typer.Option(help="Stop once the replay is over and forecasts stop.")
    ] = False,
) -> None:
    """The embedded default: broker, Redis, bundle, worker, replay and live forecasts.

    Starts a Tansu broker without TRENDCAST_KAFKA_BROKERS, a Redis server without
    TRENDCAST_REDIS_URL (unless one answers on 6379), trains a small bundle from the shipped
    sample without --bundle; Ctrl-C stops all of it.
    """
    from trendcast.devtools.replay import parse_speed
    from trendcast.devtools.up import run_up

    report = run_up(
        _worker_settings(),
        train_bundle=_train_sample_bundle,
        bundle=bundle,
        data=data,
        speed=parse_speed(speed),
        live_weeks=weeks,
        max_seconds=duration,
        exit_when_done=exit_when_done,
    )
    typer.echo(f"stopped ({report.stopped_by})")


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
