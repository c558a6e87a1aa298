"""The developer commands refuse contradictory or malformed flags in one line, before I/O."""

from __future__ import annotations

from pathlib import Path

import pytest

from trendcast.testkit.cli import assert_one_line_error, run_cli


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--speed", "2", "--rate", "3"], "give either --speed or --rate, not both"),
        (["--from", "xx"], "--from: expected a date like 2011-06-30, got 'xx'"),
    ],
)
def test_replay_refuses_bad_flags(
    args: list[str],
    fragment: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, _, err = run_cli(
        ["replay", "--data", str(tmp_path / "none.csv"), *args], monkeypatch, capsys
    )
    assert code == 1
    assert_one_line_error(err, fragment)
