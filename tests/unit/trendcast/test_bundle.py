"""Bundle verification: a worker must never load a model it could not verify."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest

from trendcast.bundle import load_bundle, sha256_file
from trendcast.exceptions import BundleError
from trendcast.testkit.bundles import fake_onnx, make_fake_bundle


def _edit_meta(path: Path, **changes: object) -> None:
    meta = orjson.loads((path / "bundle.json").read_bytes())
    meta.update(changes)
    (path / "bundle.json").write_bytes(orjson.dumps(meta))


def test_valid_bundle_loads(tmp_path: Path) -> None:
    bundle = load_bundle(make_fake_bundle(tmp_path / "b", scales={"a": 2.0}))
    assert bundle.meta.window == 14
    assert bundle.scales == {"a": 2.0}
    assert bundle.freq.name == "1D"
    assert bundle.model_path().name == "model.onnx"
    with pytest.raises(BundleError, match="no quantized model"):
        bundle.model_path(quantized=True)


def test_missing_directory_and_meta(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="bundle directory not found"):
        load_bundle(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(BundleError, match=r"not a bundle \(no bundle.json\)"):
        load_bundle(tmp_path / "empty")


def test_corrupt_model_bytes_fail_checksum(tmp_path: Path) -> None:
    path = make_fake_bundle(tmp_path / "b")
    data = bytearray((path / "model.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (path / "model.onnx").write_bytes(bytes(data))
    with pytest.raises(BundleError, match="checksum mismatch"):
        load_bundle(path)


def test_truncated_model_fails(tmp_path: Path) -> None:
    path = make_fake_bundle(tmp_path / "b")
    data = (path / "model.onnx").read_bytes()
    (path / "model.onnx").write_bytes(data[: len(data) // 3])
    with pytest.raises(BundleError, match="checksum mismatch"):
        load_bundle(path)
    # Even with a matching checksum, an unreadable model is refused.
    _edit_meta(
        path,
        files={
            "model.onnx": sha256_file(path / "model.onnx"),
            "scales.json": sha256_file(path / "scales.json"),
        },
    )
    with pytest.raises(BundleError, match="not a readable ONNX model"):
        load_bundle(path)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"window": 28}, "expected input 'x' of shape"),
        ({"horizon": 3}, "expected output 'mean'"),
        ({"features": ["qty"]}, "expected input 'x' of shape"),
        ({"format_version": 99}, "expected format_version 1, got 99"),
        ({"freq": "1M"}, "invalid freq"),
        ({"quantiles": [0.9, 0.5, 0.1]}, "3 increasing quantiles"),
        ({"window": "wide"}, "invalid metadata at window"),
    ],
)
def test_mismatched_metadata_is_refused(
    tmp_path: Path, change: dict[str, object], message: str
) -> None:
    path = make_fake_bundle(tmp_path / "b")
    _edit_meta(path, **change)
    with pytest.raises(BundleError, match=message):
        load_bundle(path)


def test_swapped_model_with_wrong_shape_is_refused(tmp_path: Path) -> None:
    import onnx

    path = make_fake_bundle(tmp_path / "b")
    onnx.save(fake_onnx(window=14, horizon=5, n_features=7), str(path / "model.onnx"))
    _edit_meta(
        path,
        files={
            "model.onnx": sha256_file(path / "model.onnx"),
            "scales.json": sha256_file(path / "scales.json"),
        },
    )
    with pytest.raises(BundleError, match="expected output 'mean' of shape"):
        load_bundle(path)


def test_corrupt_json_and_scales(tmp_path: Path) -> None:
    path = make_fake_bundle(tmp_path / "b")
    (path / "scales.json").write_bytes(b'{"nope": 1}')
    _edit_meta(
        path,
        files={
            "model.onnx": sha256_file(path / "model.onnx"),
            "scales.json": sha256_file(path / "scales.json"),
        },
    )
    with pytest.raises(BundleError, match="invalid scales"):
        load_bundle(path)
    (path / "bundle.json").write_bytes(b"{not json")
    with pytest.raises(BundleError, match="corrupt JSON"):
        load_bundle(path)


def test_missing_listed_file(tmp_path: Path) -> None:
    path = make_fake_bundle(tmp_path / "b")
    (path / "scales.json").unlink()
    with pytest.raises(BundleError, match="missing scales.json"):
        load_bundle(path)
