"""``python -m stream``: run the worker with settings from ``TRENDCAST_*`` (no typer needed).

The ``trendcast worker`` command is the documented entry point; this one exists so the
worker can run (and be tested as a subprocess) with the stream package alone.
"""

from __future__ import annotations

import logging
import sys

from pydantic import ValidationError

from stream.settings.worker import WorkerSettings
from stream.worker.runner import run_worker
from trendcast.exceptions import TrendcastError

__all__ = ["main"]

logger = logging.getLogger(__name__)


def main() -> int:
    """Run the worker; errors become one line on stderr and exit code 1."""
    try:
        settings = WorkerSettings()
    except ValidationError as exc:
        first = exc.errors()[0]
        name = "_".join(str(p) for p in first["loc"]).upper() or "settings"
        print(f"error: invalid TRENDCAST_{name}: {first['msg']}", file=sys.stderr)
        return 1
    try:
        run_worker(settings)
    except TrendcastError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
