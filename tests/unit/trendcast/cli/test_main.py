"""The app and ``main()``: every command in its usual order, usage errors, bad settings."""

from __future__ import annotations

import subprocess
import sys

import pytest

from trendcast.testkit.cli import run_cli

COMMANDS = (
    "forecast",
    "train",
    "export",
    "evaluate",
    "tune",
    "explain",
    "worker",
    "replay",
    "tail",
    "inspect",
    "promote",
    "report",
    "up",
    "schema",
)


def test_help_lists_every_command_in_order(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run_cli(["--help"], monkeypatch, capsys)
    assert code == 0
    listed = [line.strip("│ ").split()[0] for line in out.splitlines() if line.startswith("│ ")]
    assert [name for name in listed if name in COMMANDS] == list(COMMANDS)


def test_usage_error_exits_2(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run_cli(["forecast", "--returns", "sometimes"], monkeypatch, capsys)
    assert code == 2
    assert "Traceback" not in err


def test_unknown_command_exits_2(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run_cli(["nosuch"], monkeypatch, capsys)
    assert code == 2
    assert "No such command 'nosuch'" in err


def test_bad_env_setting_is_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("TRENDCAST_THREADS", "many")
    code, _, err = run_cli(["--help"], monkeypatch, capsys)
    assert code == 2
    assert err.startswith("error: TRENDCAST_THREADS")


def test_python_dash_m_runs_the_console_script() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "trendcast.cli", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "promote" in result.stdout
