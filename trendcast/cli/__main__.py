"""``python -m trendcast.cli``: the console script without its installed entry point."""

from __future__ import annotations

import logging

from trendcast.cli import main

__all__: list[str] = []

logger = logging.getLogger(__name__)

if __name__ == "__main__":  # pragma: no cover
    main()
