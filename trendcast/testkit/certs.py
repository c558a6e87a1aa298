"""Throw-away TLS files for tests, made with the ``openssl`` command (no Python dependency).

A CA, a server certificate for ``127.0.0.1``/``localhost`` signed by it, and a client
certificate: enough for a TLS Redis with verified hostnames and optional client auth.
EC P-256 keys keep generation in the tens of milliseconds.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

__all__ = ["TlsFiles", "make_tls_files", "openssl_available"]

_EC = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]


@dataclass(frozen=True)
class TlsFiles:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def openssl_available() -> bool:
    return shutil.which("openssl") is not None


def _run(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=30)


def _leaf(directory: Path, name: str, cn: str) -> None:
    _run("req", *_EC, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={cn}",
         cwd=directory)  # fmt: skip
    ext = directory / f"{name}.ext"
    ext.write_text(
        "subjectAltName=IP:127.0.0.1,DNS:localhost\n"
        "extendedKeyUsage=serverAuth,clientAuth\n"
        "keyUsage=critical,digitalSignature,keyEncipherment\n"
    )
    _run("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
         "-CAcreateserial", "-days", "2", "-out", f"{name}.crt", "-extfile", ext.name,
         cwd=directory)  # fmt: skip


def make_tls_files(directory: Path) -> TlsFiles:
    """Write ``ca.crt``, ``server.{crt,key}`` and ``client.{crt,key}`` into ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    _run("req", "-x509", *_EC, "-keyout", "ca.key", "-out", "ca.crt", "-days", "2",
         "-subj", "/CN=trendcast-test-ca",
         "-addext", "basicConstraints=critical,CA:TRUE",
         "-addext", "keyUsage=critical,keyCertSign,cRLSign",
         cwd=directory)  # fmt: skip
    _leaf(directory, "server", "localhost")
    _leaf(directory, "client", "trendcast-worker")
    return TlsFiles(
        ca=directory / "ca.crt",
        server_cert=directory / "server.crt",
        server_key=directory / "server.key",
        client_cert=directory / "client.crt",
        client_key=directory / "client.key",
    )
