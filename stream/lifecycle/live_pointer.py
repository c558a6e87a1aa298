"""Where the name of the live bundle comes from: the ``current`` file or a Redis key.

A directory of bundles (``TRENDCAST_BUNDLE``) holds one directory per version, and a *version
source* names the live one, relative to that directory::

    bundles/
    ├── current          "v2"   (PointerFile)
    ├── v1/              bundle.json, model.onnx, scales.json
    └── v2/
    redis> GET trendcast:bundle:current   "v2"   (RedisKey, TRENDCAST_BUNDLE_REDIS_KEY)

:class:`VersionSource` is the whole interface: ``await source.current()`` returns that name,
or ``None`` when the source names nothing (then the location is itself the bundle). It is
the only thing :class:`stream.lifecycle.hot_reload.BundleWatcher` asks, so both sources share the
watcher's
logic (verify, swap between batches, refuse once, roll back):

* :class:`PointerFile`: the file ``current``; deploy = write a new one aside and rename it
  over the old one. Needs a file system shared by every worker.
* :class:`RedisKey`: one ``SET`` deploys to every worker of a fleet, wherever its bundles
  directory lives. While the key is absent it asks a fallback source (the ``current`` file)
  and logs that once; a Redis error raises :class:`StateStoreError`, which the watcher logs
  while the running model keeps serving.

Both also :meth:`~VersionTarget.publish` a name, for ``trendcast promote`` (:func:`promote`),
which verifies the bundle first: a name that does not verify is never published.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from trendcast.bundle import Bundle, load_bundle
from trendcast.exceptions import BundleError, StateStoreError
from trendcast.sync_bridge import run_sync

if TYPE_CHECKING:
    from stream.settings.worker import WorkerSettings
    from stream.state.redis_clients import AsyncRedisClient

__all__ = [
    "CURRENT_FILE",
    "PointerFile",
    "RedisKey",
    "VersionSource",
    "VersionTarget",
    "check_name",
    "live_bundle",
    "promote",
    "read_pointer",
    "resolve_now",
    "version_source",
    "write_pointer",
]

logger = logging.getLogger(__name__)

#: Name of the pointer file inside a directory of bundles.
CURRENT_FILE = "current"
#: Connect and read timeout of the key's Redis client: a hung Redis must not hang a poll.
_REDIS_TIMEOUT_S = 5.0


class VersionSource(Protocol):
    """Names the live bundle of a directory of bundles."""

    async def current(self) -> str | None:
        """The live bundle's directory, relative to the bundles directory; None: no pointer.

        Raises:
            BundleError: The source holds something that names no bundle directory.
            StateStoreError: The source cannot be read now (Redis down).
        """
        ...


class VersionTarget(Protocol):
    """Where ``trendcast promote`` writes the live bundle's name."""

    async def publish(self, name: str) -> None:
        """Make ``name`` the live bundle (atomically: readers see the old or the new name)."""
        ...


def check_name(text: str, where: str, relative_to: object) -> str:
    """``text`` if it names a bundle directory relative to ``relative_to``, else BundleError.

    >>> check_name("v2", "current", "/bundles")
    'v2'
    >>> check_name("/etc", "current", "/bundles")
    Traceback (most recent call last):
    ...
    trendcast.exceptions.BundleError: current: expected one line naming a bundle directory \
relative to /bundles, got '/etc'
    """
    if not text or "\n" in text or "\r" in text or Path(text).is_absolute():
        raise BundleError(
            f"{where}: expected one line naming a bundle directory relative to "
            f"{relative_to}, got {text!r}"
        )
    return text


def read_pointer(location: Path) -> str | None:
    """The name in ``location/current`` (blocking); None when there is no such file.

    Raises:
        BundleError: ``current`` is unreadable or does not name a relative path on one line.
    """
    pointer = location / CURRENT_FILE
    if not pointer.is_file():
        return None
    try:
        text = pointer.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise BundleError(f"{pointer}: cannot read the bundle pointer ({exc})") from exc
    return check_name(text, str(pointer), location)


def write_pointer(location: Path, name: str) -> None:
    """Point ``location/current`` at ``name`` atomically (blocking): temp file, then rename.

    Raises:
        BundleError: ``name`` is no relative path, or the file cannot be written.
    """
    pointer = location / CURRENT_FILE
    check_name(name, str(pointer), location)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{CURRENT_FILE}-", dir=location)
    except OSError as exc:
        raise BundleError(f"{pointer}: cannot write the bundle pointer ({exc})") from exc
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(name + "\n")
            f.flush()
            os.fsync(f.fileno())
        # mkstemp creates 0600: workers running as another user must still read it.
        os.chmod(tmp, 0o644)  # noqa: S103 - a pointer holds a directory name, nothing secret
        os.replace(tmp, pointer)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise BundleError(f"{pointer}: cannot write the bundle pointer ({exc})") from exc


class PointerFile:
    """The file ``current`` inside a directory of bundles.

    Args:
        location: The bundles directory.
    """

    def __init__(self, location: Path) -> None:
        self.location = location

    def __repr__(self) -> str:
        return f"{self.location / CURRENT_FILE}"

    async def current(self) -> str | None:
        """The name in ``current``; None when the file does not exist."""
        return await asyncio.to_thread(read_pointer, self.location)

    async def publish(self, name: str) -> None:
        """Rename a new ``current`` naming ``name`` over the old one."""
        await asyncio.to_thread(write_pointer, self.location, name)


class RedisKey:
    """A Redis key whose value names the live bundle.

    The client is made on first use by ``connect`` and dropped by :meth:`aclose`, so one
    source can serve the start-up read (on a short-lived loop, see :func:`resolve_now`) and
    then the watcher on Faust's loop: an asyncio client must not cross event loops.

    Args:
        connect: Makes the asyncio client (one server or a cluster).
        key: The key, e.g. ``trendcast:bundle:current``.
        fallback: Asked while the key is absent (typically the ``current`` file).
    """

    def __init__(
        self,
        connect: Callable[[], AsyncRedisClient],
        key: str,
        *,
        fallback: VersionSource | None = None,
    ) -> None:
        self.key = key
        self.fallback = fallback
        self._connect = connect
        self._client: AsyncRedisClient | None = None
        self._absent_logged = False

    def __repr__(self) -> str:
        return f"Redis key {self.key!r}"

    @property
    def _redis(self) -> AsyncRedisClient:
        if self._client is None:
            self._client = self._connect()
        return self._client

    async def current(self) -> str | None:
        """The key's value; while the key is absent, the fallback's answer.

        Raises:
            BundleError: The value names no relative directory, or is not UTF-8.
            StateStoreError: Redis cannot be reached or refused the command.
        """
        from stream.state.redis_clients import CLIENT_ERRORS

        try:
            raw = await self._redis.get(self.key)
        except CLIENT_ERRORS as exc:
            raise StateStoreError(f"cannot read the Redis key {self.key!r}: {exc}") from exc
        if raw is None:
            if not self._absent_logged:
                logger.warning(
                    "Redis key %r is not set: the live bundle is named by %s",
                    self.key,
                    self.fallback if self.fallback is not None else "TRENDCAST_BUNDLE itself",
                )
                self._absent_logged = True
            return None if self.fallback is None else await self.fallback.current()
        self._absent_logged = False  # absent again later: say so again
        try:
            text = raw.decode("utf-8") if isinstance(raw, bytes) else str(raw)
        except UnicodeDecodeError as exc:
            raise BundleError(f"Redis key {self.key!r}: expected UTF-8, got {raw!r}") from exc
        return check_name(text.strip(), f"Redis key {self.key!r}", "TRENDCAST_BUNDLE")

    async def publish(self, name: str) -> None:
        """``SET`` the key to ``name``.

        Raises:
            StateStoreError: Redis cannot be reached or refused the command.
        """
        from stream.state.redis_clients import CLIENT_ERRORS

        check_name(name, f"Redis key {self.key!r}", "the bundles directory")
        try:
            await self._redis.set(self.key, name.encode("utf-8"))
        except CLIENT_ERRORS as exc:
            raise StateStoreError(f"cannot set the Redis key {self.key!r}: {exc}") from exc

    async def aclose(self) -> None:
        """Close the client (a later call makes a new one, on the then running loop)."""
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()

    @classmethod
    def from_settings(
        cls, settings: WorkerSettings, key: str, *, fallback: VersionSource | None = None
    ) -> RedisKey:
        """The key in the worker's Redis (``redis_url``, cluster mode, credentials, TLS)."""
        from stream.settings.security import redis_client_kwargs
        from stream.state.redis_clients import async_client

        def connect() -> AsyncRedisClient:
            return async_client(
                settings.redis_url,
                cluster=settings.redis_cluster,
                socket_connect_timeout=_REDIS_TIMEOUT_S,
                socket_timeout=_REDIS_TIMEOUT_S,
                **redis_client_kwargs(settings),
            )

        return cls(connect, key, fallback=fallback)


def version_source(settings: WorkerSettings) -> VersionSource:
    """The source the worker follows: the Redis key if configured (falling back to the
    ``current`` file while it is absent), else the ``current`` file."""
    pointer = PointerFile(settings.bundle)
    if settings.bundle_redis_key is None:
        return pointer
    return RedisKey.from_settings(settings, settings.bundle_redis_key, fallback=pointer)


async def live_bundle(location: Path, source: VersionSource) -> Path:
    """The live bundle directory: ``location / source.current()``, or ``location`` itself."""
    name = await source.current()
    return location if name is None else location / name


def resolve_now(location: Path, source: VersionSource) -> Path:
    """:func:`live_bundle`, blocking, leaving no connection open (start-up, ``trendcast up``).

    Raises:
        BundleError: The source names no bundle directory.
        StateStoreError: The Redis key cannot be read.
    """

    async def once() -> Path:
        try:
            return await live_bundle(location, source)
        finally:
            if isinstance(source, RedisKey):
                await source.aclose()

    return run_sync(once())


async def promote(location: Path, name: str, target: VersionTarget) -> Bundle:
    """Verify the bundle ``location / name`` (checksums, ONNX shapes), then publish ``name``.

    Rollback is a promote of the previous name. Workers pick the change up at their next
    poll (``TRENDCAST_BUNDLE_POLL_S``).

    Returns:
        The verified bundle, now live.

    Raises:
        BundleError: ``name`` is no relative path, or the bundle is missing or does not verify
            (nothing is published then).
        StateStoreError: The Redis key cannot be set.
    """
    check_name(name, "promote", location)
    bundle = await asyncio.to_thread(load_bundle, location / name)
    await target.publish(name)
    logger.info("promoted %s (model %s) in %r", name, bundle.meta.model_version, target)
    return bundle
