"""``trendcast promote`` with the ``current`` file: verify first, then rename a new pointer in.

The Redis-key variant needs a real Redis and lives in tests/integration/test_model_lifecycle.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from stream.lifecycle.hot_reload import load_model, resolve_bundle
from stream.lifecycle.live_pointer import write_pointer
from trendcast.cli import app
from trendcast.exceptions import BundleError
from trendcast.testkit.bundles import make_fake_bundle
from trendcast.testkit.cli import assert_one_line_error, run_cli


@pytest.fixture
def bundles(tmp_path: Path) -> Path:
    location = tmp_path / "bundles"
    make_fake_bundle(location / "v1", window=7, horizon=3)
    make_fake_bundle(location / "v2", window=7, horizon=4)
    write_pointer(location, "v1")
    return location


def _promote(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, ["promote", *args])
    return result.exit_code, result.output


def test_promote_points_current_at_a_verified_bundle_and_back(bundles: Path) -> None:
    v2 = load_model(bundles / "v2").model.model_version
    code, out = _promote("v2", "--bundles", str(bundles))
    assert code == 0, out
    assert f"promoted v2 (model {v2})" in out
    assert resolve_bundle(bundles) == bundles / "v2"
    assert (bundles / "current").read_text() == "v2\n"
    # Readable by a worker running as another user, and no temp file left behind.
    assert (bundles / "current").stat().st_mode & 0o777 == 0o644
    assert sorted(p.name for p in bundles.iterdir()) == ["current", "v1", "v2"]

    code, out = _promote("v1", "--bundles", str(bundles))  # rollback
    assert code == 0, out
    assert resolve_bundle(bundles) == bundles / "v1"


@pytest.mark.parametrize(
    ("version", "fragment"),
    [
        ("v9", "bundle directory not found"),
        ("bad", "checksum mismatch"),
        ("/etc", "expected one line naming a bundle directory"),
    ],
)
def test_promote_refuses_a_bad_bundle_in_one_line_and_keeps_current(
    bundles: Path,
    version: str,
    fragment: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    bad = make_fake_bundle(bundles / "bad", window=7, horizon=5)
    with (bad / "model.onnx").open("ab") as f:
        f.write(b"tampered")
    code, _, err = run_cli(["promote", version, "--bundles", str(bundles)], monkeypatch, capsys)
    assert code == 1
    assert_one_line_error(err, fragment)
    assert resolve_bundle(bundles) == bundles / "v1"


def test_promote_wants_a_key_with_a_redis_url(
    bundles: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run_cli(
        ["promote", "v2", "--bundles", str(bundles), "--redis-url", "redis://127.0.0.1:1/0"],
        monkeypatch,
        capsys,
    )
    assert code == 1
    assert_one_line_error(err, "--redis-url: expected --key")
    assert resolve_bundle(bundles) == bundles / "v1"


def test_write_pointer_refuses_a_name_that_is_no_relative_directory(bundles: Path) -> None:
    for name in ("", "/abs", "v1\nv2"):
        with pytest.raises(BundleError, match="expected one line naming a bundle directory"):
            write_pointer(bundles, name)
    assert resolve_bundle(bundles) == bundles / "v1"
