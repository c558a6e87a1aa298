"""Redis clients for the window store: one server or a Redis Cluster, chosen by configuration.

The worker talks to Redis through a handful of commands (EVALSHA, SCRIPT LOAD, HGETALL, PING,
pipelines) that ``redis.asyncio.Redis`` and ``redis.asyncio.cluster.RedisCluster`` both offer
with the same signatures, so everything above this module only sees :data:`AsyncRedisClient`.
What differs is handled by redis-py's cluster client, as long as every multi-key command stays
in one hash slot (see :mod:`stream.state.redis_store`):

* keyed commands are routed to the primary owning the key's slot, following ``MOVED``/``ASK``
  after a resharding or failover;
* a pipeline is split per node and the per-node pipelines are sent concurrently — one round
  trip per node instead of one per batch;
* ``SCRIPT LOAD`` is sent to every primary, so EVALSHA finds the scripts wherever the key lives.

Cluster mode is explicit (``TRENDCAST_REDIS_CLUSTER=true``) rather than guessed from the URL:
the URL only names a seed node, and a client in the wrong mode fails with confusing
``MOVED`` errors (plain client on a cluster) or "cluster support disabled" (cluster client on a
plain server) instead of one clear message.

Both asyncio clients pack commands with hiredis when it is installed (see
:func:`use_hiredis_packer`): redis-py's asyncio connection encodes every argument in Python,
which cost the worker about as much as Redis took to run its scripts.
"""

from __future__ import annotations

import codecs
import logging
from collections.abc import Callable, Iterable
from typing import Any, TypeAlias, TypeVar
from urllib.parse import parse_qs, urlsplit

import redis
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster
from redis.asyncio.connection import AbstractConnection
from redis.cluster import RedisCluster
from redis.exceptions import RedisClusterException, RedisError
from redis.typing import EncodableT
from redis.utils import HIREDIS_AVAILABLE

from trendcast.exceptions import ConfigError

__all__ = [
    "CLIENT_ERRORS",
    "AsyncRedisClient",
    "SyncRedisClient",
    "async_client",
    "check_cluster_url",
    "sync_client",
    "use_hiredis_packer",
]

logger = logging.getLogger(__name__)

#: An asyncio client of one Redis server or of a Redis Cluster.
AsyncRedisClient: TypeAlias = aioredis.Redis | AsyncRedisCluster
#: A synchronous client of one Redis server or of a Redis Cluster (for startup checks).
SyncRedisClient: TypeAlias = redis.Redis | RedisCluster

#: What a Redis client raises. ``RedisClusterException`` (no reachable seed node, slots not
#: covered, keys of one command in several slots) does not derive from ``RedisError``.
CLIENT_ERRORS: tuple[type[Exception], ...] = (RedisError, RedisClusterException)


def check_cluster_url(url: str) -> str:
    """Refuse URLs a Redis Cluster cannot serve, with a message naming the setting.

    A cluster has a single database and redis-py's cluster client speaks TCP only; caught here
    so the worker fails at startup with one line instead of a RedisClusterException later.

    >>> check_cluster_url("redis://10.0.0.1:7000/0")
    'redis://10.0.0.1:7000/0'
    >>> check_cluster_url("redis://10.0.0.1:7000/2")
    Traceback (most recent call last):
    ...
    trendcast.exceptions.ConfigError: expected database 0 in TRENDCAST_REDIS_URL with \
TRENDCAST_REDIS_CLUSTER (a cluster has one database), got 2
    """
    if url.startswith("unix://"):
        raise ConfigError(
            "expected a redis:// or rediss:// URL with TRENDCAST_REDIS_CLUSTER "
            f"(the cluster client speaks TCP only), got {url!r}"
        )
    parts = urlsplit(url)
    db = parts.path.strip("/") or parse_qs(parts.query).get("db", ["0"])[0]
    if db not in ("", "0"):
        raise ConfigError(
            "expected database 0 in TRENDCAST_REDIS_URL with TRENDCAST_REDIS_CLUSTER "
            f"(a cluster has one database), got {db}"
        )
    return url


def async_client(url: str, *, cluster: bool = False, **kwargs: Any) -> AsyncRedisClient:
    """An asyncio client for ``url``; connects lazily, on the first command.

    Args:
        url: ``redis://host:port[/db]``; with ``cluster`` any node of the cluster (the others
            are discovered with ``CLUSTER SLOTS``).
        cluster: Use redis-py's cluster client.
        **kwargs: Connection options passed to ``from_url`` (e.g. ``socket_timeout``).

    Raises:
        ConfigError: ``cluster`` with a URL a cluster cannot serve.
    """
    client: AsyncRedisClient
    if cluster:
        client = AsyncRedisCluster.from_url(check_cluster_url(url), **kwargs)
    else:
        client = aioredis.Redis.from_url(url, **kwargs)
    return use_hiredis_packer(client)


def sync_client(url: str, *, cluster: bool = False, **kwargs: Any) -> SyncRedisClient:
    """A synchronous client for ``url`` (see :func:`async_client`).

    Unlike the asyncio one, the synchronous cluster client connects at once to discover the
    slots, so it may raise any of :data:`CLIENT_ERRORS`.

    Raises:
        ConfigError: ``cluster`` with a URL a cluster cannot serve.
    """
    if cluster:
        return RedisCluster.from_url(check_cluster_url(url), **kwargs)
    return redis.Redis.from_url(url, **kwargs)


if HIREDIS_AVAILABLE:
    import hiredis

    # Typed loosely: hiredis's stub declares a one-element tuple.
    _hiredis_pack: Callable[[tuple[Any, ...]], bytes] = hiredis.pack_command


class _HiredisPacking(AbstractConnection):
    """Packs commands with ``hiredis.pack_command`` (C) instead of redis-py's Python packer.

    redis-py's synchronous connection already does this (``HiredisRespSerializer``); its
    asyncio connection still encodes and joins argument by argument in Python, which for the
    window store's pipelines (a few thousand arguments per batch) took as long as Redis
    took to run the scripts. The bytes sent are the same: hiredis encodes ``str`` as UTF-8
    and numbers with ``repr``, like redis-py's encoder — so a connection configured with
    another encoding (or non-strict encoding errors) keeps redis-py's packer.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        encoder = self.encoder
        self._hiredis_packs = (
            codecs.lookup(encoder.encoding).name == "utf-8" and encoder.encoding_errors == "strict"
        )

    def pack_command(self, *args: EncodableT) -> list[bytes]:
        if not self._hiredis_packs:
            return super().pack_command(*args)
        return [self._pack(args)]

    def pack_commands(self, commands: Iterable[Iterable[EncodableT]]) -> list[bytes]:
        if not self._hiredis_packs:
            return super().pack_commands(commands)
        # One buffer for the whole pipeline: the transport sends it in one write.
        return [b"".join([self._pack(tuple(cmd)) for cmd in commands])]

    def _pack(self, args: tuple[EncodableT, ...]) -> bytes:
        # Like redis-py: a command name such as "SCRIPT LOAD" goes as two arguments.
        name = args[0]
        if isinstance(name, str):
            args = (*name.encode().split(), *args[1:])
        elif isinstance(name, bytes) and b" " in name:
            args = (*name.split(), *args[1:])
        try:
            return _hiredis_pack(args)
        except TypeError:
            # hiredis refuses bytearray (redis-py takes it) as well as bool and None (redis-py
            # raises DataError): redis-py's encoder raises for those, the rest goes as bytes.
            encode: Callable[[Any], bytes] = self.encoder.encode
            return _hiredis_pack(tuple(bytes(encode(a)) for a in args))


_C = TypeVar("_C", bound=type[AbstractConnection])
_HIREDIS_CLASSES: dict[type[AbstractConnection], type[AbstractConnection]] = {}


def _hiredis_class(base: _C) -> _C:
    """``base`` (Connection, SSLConnection, UnixDomainSocketConnection...) packing with hiredis.

    Made once per base and shared by every client, named after it ("HiredisSSLConnection")
    so that reprs and logs still say which transport a connection uses.
    """
    if issubclass(base, _HiredisPacking):
        return base
    cls = _HIREDIS_CLASSES.get(base)
    if cls is None:
        name = f"Hiredis{base.__name__}"
        cls = type(name, (_HiredisPacking, base), {"__module__": __name__, "__qualname__": name})
        _HIREDIS_CLASSES[base] = cls
    return cls  # type: ignore[return-value]


def use_hiredis_packer(client: AsyncRedisClient) -> AsyncRedisClient:
    """Make ``client``'s connections pack commands with hiredis (see :class:`_HiredisPacking`).

    The connection class is chosen by redis-py from the URL (TCP, TLS, unix socket); this
    swaps it for the same class with the faster packer, before any connection is opened
    (connections are created lazily). A cluster client builds a node object per node it
    discovers from a shared keyword dictionary, and its seed nodes before that: both are
    updated. Without hiredis the client is returned unchanged.

    Args:
        client: A client that has not opened connections yet (as built by
            :func:`async_client`).

    Returns:
        ``client`` itself.
    """
    if not HIREDIS_AVAILABLE:
        return client
    if isinstance(client, AsyncRedisCluster):
        shared = client.get_connection_kwargs()  # also the NodesManager's, for new nodes
        shared["connection_class"] = _hiredis_class(
            shared.get("connection_class") or aioredis.Connection
        )
        for node in client.startup_nodes:
            node.connection_class = _hiredis_class(node.connection_class)
    else:
        pool = client.connection_pool
        pool.connection_class = _hiredis_class(pool.connection_class)
    return client
