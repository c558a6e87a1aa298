"""The subscriber commands: ``schema`` prints the published contract of a topic's records."""

from __future__ import annotations

import logging
from typing import Annotated

import typer

__all__ = ["schema"]

logger = logging.getLogger(__name__)


def schema(
    topic: Annotated[
        str | None,
        typer.Argument(
            metavar="[TOPIC]",
            help="Record kind (its default topic name): sales, sales.dlq, forecasts, alerts, "
            "trends, forecast-accuracy. Without it, list them.",
        ),
    ] = None,
) -> None:
    """Print the JSON Schema of a topic's records (list the topics without an argument)."""
    from trendcast import contract

    if topic is None:
        for name in contract.names():
            typer.echo(f"{name}\t{contract.schema(name)['title']}")
        return
    import orjson

    body = contract.schema(topic)  # ContractError (one line, exit 1) for an unknown name
    typer.echo(orjson.dumps(body, option=orjson.OPT_INDENT_2).decode())
