"""Running async window-store scenarios from synchronous tests."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeVar

from stream.state.base import WindowStore

__all__ = ["run"]

S = TypeVar("S", bound=WindowStore)
T = TypeVar("T")


def run(store: S, scenario: Callable[[S], Awaitable[T]]) -> T:
    """Run an async scenario and close the store on the same loop (Redis pools are per loop)."""

    async def main() -> T:
        try:
            return await scenario(store)
        finally:
            await store.aclose()

    return asyncio.run(main())
