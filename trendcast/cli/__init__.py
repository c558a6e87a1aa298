"""The ``trendcast`` console script: the typer app built from the command groups, and main()."""

from __future__ import annotations

import logging
import sys

import typer
from pydantic import ValidationError

from trendcast.cli import dev, explain, offline, subscribers, tune, worker
from trendcast.config import OfflineSettings
from trendcast.exceptions import TrendcastError

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

# Listed, not gathered per group, to keep the order `trendcast --help` has always shown.
for _command in (
    offline.forecast,
    offline.train,
    offline.export,
    offline.evaluate,
    tune.tune,
    explain.explain,
    worker.worker,
    dev.replay,
    dev.tail,
    worker.inspect,
    worker.promote,
    offline.report,
    dev.up,
    subscribers.schema,
):
    app.command()(_command)


@app.callback()
def _root(ctx: typer.Context) -> None:
    """trendcast: streaming, real-time sales forecasting."""
    settings = ctx.obj if isinstance(ctx.obj, OfflineSettings) else OfflineSettings()
    logging.basicConfig(
        level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    ctx.obj = settings


def main() -> None:
    """Console-script entry point: run the app, turning errors into one line and an exit code.

    A :class:`~trendcast.exceptions.TrendcastError` is one line on stderr and exit code 1;
    usage errors exit 2, Ctrl-C 130, a bug 70. Nothing prints a traceback unless
    ``TRENDCAST_DEBUG=1``. The command groups import heavy libraries (TensorFlow, Faust, ONNX
    Runtime) only inside the commands that need them, so ``trendcast --help`` is instant and
    ``trendcast forecast`` never loads TensorFlow.
    """
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
