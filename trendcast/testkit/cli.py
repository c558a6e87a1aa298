"""Running the ``trendcast`` console script in-process and checking its one-line errors."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

from trendcast.cli import main

if TYPE_CHECKING:
    import pytest

__all__ = ["assert_one_line_error", "run_cli"]


def run_cli(
    args: list[str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> tuple[int, str, str]:
    """Run ``trendcast ARGS`` in this process: ``(exit code, stdout, stderr)``."""
    monkeypatch.setattr(sys, "argv", ["trendcast", *args])
    try:
        main()
    except SystemExit as exc:
        code = exc.code
    else:  # pragma: no cover - main() always exits
        raise AssertionError("trendcast main() returned without exiting")
    out, err = capsys.readouterr()
    return (code if isinstance(code, int) else 0), out, err


def assert_one_line_error(err: str, fragment: str) -> None:
    """``err`` is one ``error: ...`` line containing ``fragment``, with no traceback."""
    lines = [line for line in err.splitlines() if line.strip()]
    if len(lines) != 1 or not lines[0].startswith("error: ") or fragment not in lines[0]:
        raise AssertionError(f"expected one 'error: ...{fragment}...' line, got {err!r}")
    if "Traceback" in err:
        raise AssertionError(f"expected no traceback, got {err!r}")
