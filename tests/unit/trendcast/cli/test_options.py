"""The sales-data flags: defined once, the same in every command that reads sales data."""

from __future__ import annotations

from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from trendcast.cli import app
from trendcast.cli.options import ReturnsChoice, SalesData, sales_data_options
from trendcast.data import ColumnMap, sample_data_path

DATA_FLAGS = (
    "--data",
    "--item-col",
    "--time-col",
    "--qty-col",
    "--price-col",
    "--item-pattern",
    "--returns",
)


def _options(command: str) -> list[tuple[str, object]]:
    """(flag, default) of ``command``'s options, in --help order."""
    click_command = typer.main.get_command(app)
    ctx = click_command.make_context("trendcast", [command, "--help"], resilient_parsing=True)
    sub = click_command.get_command(ctx, command)  # type: ignore[attr-defined]
    return [(p.opts[0], p.default) for p in sub.params if p.opts[0].startswith("--")]


@pytest.mark.parametrize("command", ["forecast", "train", "evaluate", "replay"])
def test_every_data_reading_command_takes_the_same_data_flags(command: str) -> None:
    options = _options(command)
    flags = [flag for flag, _ in options]
    assert flags[0] == "--data"
    block = flags[flags.index("--item-col") : flags.index("--item-col") + len(DATA_FLAGS) - 1]
    assert block == list(DATA_FLAGS[1:])
    defaults = dict(options)
    assert [defaults[f] for f in DATA_FLAGS[1:]] == [
        "item_id",
        "ts",
        "quantity",
        "price",
        None,
        ReturnsChoice.drop,
    ]


def test_the_flags_reach_the_command_as_one_sales_data() -> None:
    seen: list[SalesData] = []

    @sales_data_options
    def show(
        out: str = "-",
        *,
        sales: SalesData,
    ) -> None:
        seen.append(sales)

    probe = typer.Typer()
    probe.command()(show)
    probe.command("other")(lambda: None)  # two commands make a group: `show` is named
    result = CliRunner().invoke(
        probe,
        ["show", "--data", "s.csv", "--item-col", "sku", "--returns", "net"],
    )
    assert result.exit_code == 0, result.output
    assert seen == [SalesData(Path("s.csv"), item_col="sku", returns=ReturnsChoice.net)]
    assert seen[0].columns == ColumnMap(item="sku", time="ts", quantity="quantity", price="price")


def test_a_command_without_sales_is_refused() -> None:
    def no_sales(out: str = "-") -> None:
        del out

    with pytest.raises(TypeError, match="no_sales: expected a 'sales' parameter"):
        sales_data_options(no_sales)


def test_sales_data_reads_lines_and_panel_alike() -> None:
    sales = SalesData(sample_data_path(), item_pattern=r"^2")
    lines = sales.lines()
    panel = sales.panel("1D")
    assert set(lines["item_id"]) == set(panel.frame["item_id"])
    assert all(item.startswith("2") for item in lines["item_id"])
