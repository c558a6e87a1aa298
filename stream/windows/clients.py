"""Redis clients for the window store: one server or a Redis Cluster, chosen by configuration.

The worker talks to Redis through a handful of commands (EVALSHA, SCRIPT LOAD, HGETALL, PING,
pipelines) that ``redis.asyncio.Redis`` and ``redis.asyncio.cluster.RedisCluster`` both offer
with the same signatures, so everything above this module only sees :data:`AsyncRedisClient`.
What differs is handled by redis-py's cluster client, as long as every multi-key command stays
in one hash slot (see :mod:`stream.windows.redis`):

* keyed commands are routed to the primary owning the key's slot, following ``MOVED``/``ASK``
  after a resharding or failover;
* a pipeline is split per node and the per-node pipelines are sent concurrently — one round
  trip per node instead of one per batch;
* ``SCRIPT LOAD`` is sent to every primary, so EVALSHA finds the scripts wherever the key lives.

Cluster mode is explicit (``TRENDCAST_REDIS_CLUSTER=true``) rather than guessed from the URL:
the URL only names a seed node, and a client in the wrong mode fails with confusing
``MOVED`` errors (plain client on a cluster) or "cluster support disabled" (cluster client on a
plain server) instead of one clear message.
"""

from __future__ import annotations

import logging
from typing import Any, TypeAlias
from urllib.parse import parse_qs, urlsplit

import redis
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster
from redis.cluster import RedisCluster
from redis.exceptions import RedisClusterException, RedisError

from trendcast.exceptions import ConfigError

__all__ = [
    "CLIENT_ERRORS",
    "AsyncRedisClient",
    "SyncRedisClient",
    "async_client",
    "check_cluster_url",
    "sync_client",
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
    if cluster:
        return AsyncRedisCluster.from_url(check_cluster_url(url), **kwargs)
    return aioredis.Redis.from_url(url, **kwargs)


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
