"""``trendcast schema``: list the topics, print one schema as JSON, one-line error otherwise."""

from __future__ import annotations

import orjson
import pytest

from trendcast import contract
from trendcast.testkit.cli import assert_one_line_error, run_cli


def test_schema_lists_every_topic(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run_cli(["schema"], monkeypatch, capsys)
    assert code == 0
    assert [line.split("\t")[0] for line in out.splitlines()] == contract.names()


@pytest.mark.parametrize("name", contract.names())
def test_schema_prints_the_shipped_json(
    name: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run_cli(["schema", name], monkeypatch, capsys)
    assert code == 0
    assert orjson.loads(out) == contract.schema(name)


def test_unknown_topic_is_one_line_and_exit_1(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run_cli(["schema", "orders"], monkeypatch, capsys)
    assert code == 1
    assert_one_line_error(err, "expected one of alerts")
