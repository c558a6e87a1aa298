"""The offline commands: one-line errors with non-zero exits, and `forecast` without TensorFlow."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from trendcast.data import sample_data_path
from trendcast.testkit.bundles import make_fake_bundle
from trendcast.testkit.cli import assert_one_line_error, run_cli


def test_missing_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    bundle = make_fake_bundle(tmp_path / "b")
    code, _, err = run_cli(
        [
            "forecast",
            "--bundle",
            str(bundle),
            "--data",
            str(tmp_path / "no.csv"),
            "--out",
            str(tmp_path / "f.csv"),
        ],
        monkeypatch,
        capsys,
    )
    assert code == 1
    assert_one_line_error(err, "data file not found")


def test_missing_columns(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    bundle = make_fake_bundle(tmp_path / "b")
    data = tmp_path / "s.csv"
    pd.DataFrame({"sku": ["a"], "when": ["2011-01-01"], "n": [1]}).to_csv(data, index=False)
    code, _, err = run_cli(
        [
            "forecast",
            "--bundle",
            str(bundle),
            "--data",
            str(data),
            "--out",
            str(tmp_path / "f.csv"),
        ],
        monkeypatch,
        capsys,
    )
    assert code == 1
    assert_one_line_error(err, "columns found: sku, when, n")


def test_bad_bundle(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run_cli(
        [
            "forecast",
            "--bundle",
            str(tmp_path),
            "--data",
            str(sample_data_path()),
            "--out",
            str(tmp_path / "f.csv"),
        ],
        monkeypatch,
        capsys,
    )
    assert code == 1
    assert_one_line_error(err, "not a bundle")


def test_forecast_from_bundle_never_imports_tensorflow(tmp_path: Path) -> None:
    """`trendcast forecast` runs on ONNX Runtime alone (the worker's dependency set)."""
    bundle = make_fake_bundle(tmp_path / "b", window=14, horizon=7)
    out = tmp_path / "forecast.csv"
    script = (
        "import sys\n"
        "from trendcast.cli import main\n"
        f"sys.argv = ['trendcast', 'forecast', '--bundle', {str(bundle)!r}, '--data', "
        f"{str(sample_data_path())!r}, '--out', {str(out)!r}]\n"
        "try:\n    main()\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'keras', 'tf2onnx')]\n"
        "assert not bad, bad\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr
    frame = pd.read_csv(out)
    assert list(frame.columns) == [
        "item_id",
        "date",
        "step",
        "mean",
        "p10",
        "p50",
        "p90",
        "fallback",
    ]
    assert frame["item_id"].nunique() == 40
    assert len(frame) == 40 * 7
    assert (frame["p10"] <= frame["p50"]).all() and (frame["p50"] <= frame["p90"]).all()
    assert frame["date"].min() == "2011-09-01"


def test_export_with_nothing_to_do(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run_cli(["export"], monkeypatch, capsys)
    assert code == 1
    assert_one_line_error(err, "nothing to do: pass --quantize and/or --reconvert")


def test_train_until_before_the_data(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["train", "--data", str(sample_data_path()), "--bundle", str(tmp_path / "b")]
    code, _, err = run_cli([*args, "--until", "1990-01-01"], monkeypatch, capsys)
    assert code == 1
    assert_one_line_error(err, "--until 1990-01-01: no data before that date")


def test_report_wants_input_or_brokers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["report", "--out", str(tmp_path), "--input", str(tmp_path / "a.jsonl")]
    code, _, err = run_cli([*args, "--brokers", "localhost:9092"], monkeypatch, capsys)
    assert code == 1
    assert_one_line_error(err, "give either --input or --brokers, not both")


def test_evaluate_intraday_scores_the_nowcasts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    bundle = make_fake_bundle(tmp_path / "b", window=28, horizon=7)
    sample = str(sample_data_path())
    args = ["evaluate", "--data", sample, "--out", str(tmp_path / "r"), "--intraday"]
    code, _, err = run_cli(args, monkeypatch, capsys)
    assert code == 1
    assert_one_line_error(err, "expected --bundle with --intraday")
    code, out, _ = run_cli([*args, "--bundle", str(bundle), "--buckets", "7"], monkeypatch, capsys)
    assert code == 0, out
    assert "nowcast at 50%" in out and "Recommended TRENDCAST_ALERT_PROBABILITY" in out
    assert (tmp_path / "r" / "intraday.md").exists()
