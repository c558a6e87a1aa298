"""The worker as a subprocess (``python -m stream``), as integration tests and benches run it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

from stream.settings.worker import WorkerSettings
from trendcast.devtools.up import worker_env

__all__ = ["start_worker"]

#: The checkout's root: ``python -m stream`` runs from it, so the tree under test is imported.
_REPO = Path(__file__).resolve().parents[2]


def start_worker(settings: WorkerSettings, log: Any) -> subprocess.Popen[bytes]:
    """``python -m stream`` with ``settings`` passed as ``TRENDCAST_*`` variables."""
    return subprocess.Popen(
        [sys.executable, "-m", "stream"],
        env=worker_env(settings),
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=str(_REPO),
    )
