"""The developer commands: ``up`` (the whole pipeline on one machine), ``replay`` and ``tail``.

They sit on both halves: ``up`` may train a sample bundle (TensorFlow, imported only then).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer

from trendcast.cli.options import (
    BundleOpt,
    SalesData,
    parse_date,
    sales_data_options,
    worker_settings,
)
from trendcast.exceptions import ConfigError

__all__ = ["replay", "tail", "up"]

logger = logging.getLogger(__name__)


@sales_data_options
def replay(
    *,
    sales: SalesData,
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
    from trendcast.devtools.embedded import to_bootstrap
    from trendcast.devtools.replay import parse_speed, source_identity
    from trendcast.devtools.replay import replay as run_replay

    if speed is not None and rate is not None:
        raise ConfigError("give either --speed or --rate, not both")
    start, end = parse_date(from_, "--from"), parse_date(to, "--to")
    settings = worker_settings()
    report = run_replay(
        sales.lines(),
        bootstrap=to_bootstrap(settings.kafka_brokers),
        topic=topic or settings.sales_topic,
        speed=parse_speed(speed) if speed is not None else None,
        rate=rate,
        start=start,
        end=end,
        source=source_identity(sales.path),
        progress=True,
        create_partitions=settings.topic_partitions,
        security=KafkaSecurity.from_settings(settings),
    )
    typer.echo(
        f"published {report.events:,} events for {report.items:,} items "
        f"({report.first_ts}..{report.last_ts}) in {report.elapsed_s:.1f}s "
        f"({report.events_per_s:,.0f} events/s)"
    )


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

    settings = worker_settings()
    print_tail(
        to_bootstrap(settings.kafka_brokers),
        topic or settings.forecasts_topic,
        n=n,
        follow=follow,
        security=KafkaSecurity.from_settings(settings),
    )


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
        worker_settings(),
        train_bundle=_train_sample_bundle,
        bundle=bundle,
        data=data,
        speed=parse_speed(speed),
        live_weeks=weeks,
        max_seconds=duration,
        exit_when_done=exit_when_done,
    )
    typer.echo(f"stopped ({report.stopped_by})")


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
