"""A worker refuses to start on a bundle it cannot verify: one line, exit code 1, no forecast.

Loader-level cases live in tests/unit/trendcast/test_bundle.py; these check the same refusals where
an
operator meets them: ``python -m stream`` and ``trendcast worker``. The bundle is verified
before anything connects, so the broker and Redis addresses point at closed ports: reaching
them would be a failure of its own (a hang or a different message), not a pass.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import orjson
import pytest

from trendcast.bundle import sha256_file
from trendcast.devtools.embedded import free_port
from trendcast.testkit.bundles import fake_onnx, make_fake_bundle

pytestmark = pytest.mark.integration

_REPO = Path(__file__).resolve().parents[2]


def _rewrite_checksums(path: Path) -> None:
    meta = orjson.loads((path / "bundle.json").read_bytes())
    meta["files"] = {name: sha256_file(path / name) for name in meta["files"]}
    (path / "bundle.json").write_bytes(orjson.dumps(meta))


def _flip_a_byte(path: Path) -> None:
    data = bytearray((path / "model.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (path / "model.onnx").write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    data = (path / "model.onnx").read_bytes()
    (path / "model.onnx").write_bytes(data[: len(data) // 3])
    _rewrite_checksums(path)  # even with a matching checksum, the model must parse


def _shape_mismatch(path: Path) -> None:
    import onnx

    # A model for 7-bucket windows under metadata promising 14, with honest checksums.
    onnx.save(fake_onnx(7, 7, 7), str(path / "model.onnx"))
    _rewrite_checksums(path)


def _corrupt_meta(path: Path) -> None:
    (path / "bundle.json").write_bytes(b'{"format_version": 1, "window": ')


CORRUPTIONS: dict[str, tuple[Callable[[Path], None], str]] = {
    "checksum": (_flip_a_byte, "checksum mismatch"),
    "truncated": (_truncate, "not a readable ONNX model"),
    "shape": (_shape_mismatch, "expected input"),
    "corrupt_meta": (_corrupt_meta, "corrupt JSON"),
}


def _env(bundle: Path, tmp: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRENDCAST_")}
    env.update(
        TRENDCAST_BUNDLE=str(bundle),
        TRENDCAST_KAFKA_BROKERS=f"kafka://127.0.0.1:{free_port()}",
        TRENDCAST_REDIS_URL=f"redis://127.0.0.1:{free_port()}/0",
        TRENDCAST_DATA_DIR=str(tmp / "faust"),
        TRENDCAST_WEB_ENABLED="false",
    )
    return env


def _run(argv: list[str], bundle: Path, tmp: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        argv,
        env=_env(bundle, tmp),
        cwd=str(_REPO),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.mark.parametrize("corruption", sorted(CORRUPTIONS))
def test_worker_main_refuses_an_unverifiable_bundle(
    corruption: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """``python -m stream``'s entry point, in process (one subprocess per case is slow)."""
    from stream.__main__ import main

    damage, message = CORRUPTIONS[corruption]
    bundle = make_fake_bundle(tmp_path / "bundle")
    damage(bundle)
    for key, value in _env(bundle, tmp_path).items():
        if key.startswith("TRENDCAST_"):
            monkeypatch.setenv(key, value)
    assert main() == 1
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err[-2000:]
    assert lines[0].startswith("error: ") and message in lines[0], lines[0]


def test_python_m_stream_exits_1_with_one_line(tmp_path: Path) -> None:
    bundle = make_fake_bundle(tmp_path / "bundle")
    _flip_a_byte(bundle)
    result = _run([sys.executable, "-m", "stream"], bundle, tmp_path)
    assert result.returncode == 1, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "checksum mismatch" in lines[0], result.stderr[-2000:]
    assert "Traceback" not in result.stderr


def test_trendcast_worker_refuses_a_checksum_mismatch(tmp_path: Path) -> None:
    bundle = make_fake_bundle(tmp_path / "bundle")
    _flip_a_byte(bundle)
    script = Path(sys.executable).with_name("trendcast")
    if not script.exists():
        pytest.skip(f"console script not installed next to {sys.executable}")
    result = _run([str(script), "worker"], bundle, tmp_path)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "checksum mismatch" in lines[0], result.stderr[-2000:]
    assert "Traceback" not in result.stderr
