"""Run a coroutine to completion from synchronous code, with or without a running loop.

The embedded services, the replayer and ``tail`` are called from three places: the typer CLI
(no event loop), pytest fixtures (no loop, or a loop owned by an async test) and ``trendcast up``
(which may already be inside ``asyncio.run``). ``asyncio.run`` refuses to nest, so when a loop
is already running in this thread the coroutine runs on a fresh loop in a helper thread; the
caller blocks either way, which is what a synchronous API promises.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from typing import Any, ParamSpec, TypeVar

__all__ = ["blocking", "run_sync"]

logger = logging.getLogger(__name__)

T = TypeVar("T")
P = ParamSpec("P")


def run_sync(coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` to completion and return its result, blocking the caller.

    Args:
        coro: The coroutine to run. It must not depend on objects bound to another loop.

    Returns:
        Whatever the coroutine returns; its exceptions propagate unchanged.

    >>> async def answer() -> int:
    ...     return 42
    >>> run_sync(answer())
    42
    """
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="trendcast-sync") as pool:
        return pool.submit(asyncio.run, coro).result()


def blocking(fn: Callable[P, Coroutine[Any, Any, T]]) -> Callable[P, T]:
    """The blocking twin of the coroutine function ``fn``: the same arguments, via :func:`run_sync`.

    One definition of the arguments serves both, so the two cannot drift apart.

    >>> async def add(a: int, *, b: int = 1) -> int:
    ...     return a + b
    >>> blocking(add)(2, b=3)
    5
    """

    @functools.wraps(fn)
    def call(*args: P.args, **kwargs: P.kwargs) -> T:
        return run_sync(fn(*args, **kwargs))

    return call
