"""`trendcast report`: accuracy records (file or Kafka) -> plot, CSV, markdown; bad input."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pandas as pd
import pytest

from trendcast.report import accuracy_frame
from trendcast.testkit.cli import run_cli
from trendcast.testkit.doubles import tracker_records

DAY = 86_400_000


def one_line_error(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ") and "Traceback" not in err
    return lines[0]


def write_lines(path: Path, values: list[Any]) -> Path:
    path.write_bytes(b"".join(orjson.dumps(v) + b"\n" for v in values))
    return path


def test_report_from_a_file_of_tracker_records(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    records = tracker_records()
    # `trendcast tail` lines and bare values, and a blank line, are all accepted.
    tail_lines = [
        {"topic": "forecast-accuracy", "offset": i, "value": v} for i, v in enumerate(records[:4])
    ]
    path = write_lines(tmp_path / "acc.jsonl", [*tail_lines, *records[4:]])
    path.write_bytes(path.read_bytes() + b"\n")
    code, out, err = run_cli(
        ["report", "--input", str(path), "--out", str(tmp_path / "r")], monkeypatch, capsys
    )
    assert code == 0, err
    assert "Online accuracy" in out and "m-live" in out and "m-shadow" in out
    for name in ("online_accuracy.png", "accuracy.csv", "summary.csv", "summary.md"):
        assert (tmp_path / "r" / name).stat().st_size > 0
    summary = pd.read_csv(tmp_path / "r" / "summary.csv").set_index("role").to_dict("index")
    live, shadow = summary["live"], summary["shadow"]
    assert live["model_version"] == "m-live"
    assert live["points"] == 11  # the first day has nothing to score yet
    last_live = [r for r in records if r["role"] == "live"][-1]
    assert live["rmsse"] == pytest.approx(last_live["rmsse"])
    assert live["wape"] < shadow["wape"]  # the shadow model is biased
    md = (tmp_path / "r" / "summary.md").read_text()
    assert md.startswith("| model version | role |") and "| m-shadow | shadow |" in md


def test_instances_are_pooled_from_their_sums_and_the_latest_record_wins() -> None:
    base = {"model_version": "v", "role": "live", "target_to_ms": 5 * DAY}

    def rec(instance: str, at: int, n: float, sae: float, err: float, act: float, cov: float):
        sums = {
            "n": n,
            "n_scaled": n,
            "sae": sae,
            "abs_err": err,
            "abs_actual": act,
            "covered": cov,
        }
        return {
            **base,
            "instance": instance,
            "emitted_at_ms": at,
            "n": n,
            "rmsse": sae / n,
            "wape": err / act,
            "coverage": cov / n,
            "sums": sums,
        }

    records = [
        rec("a", 1, 10, 99, 99, 99, 0),  # superseded by a's later record for the same target
        rec("a", 2, 10, 5, 4, 10, 8),
        rec("b", 1, 30, 30, 6, 20, 24),
    ]
    (row,) = accuracy_frame(records).to_dict("records")
    assert row["instances"] == 2 and row["n"] == 40
    assert row["rmsse"] == pytest.approx(35 / 40)
    assert row["wape"] == pytest.approx(10 / 30)
    assert row["coverage"] == pytest.approx(32 / 40)


GOOD = {
    "model_version": "v",
    "role": "live",
    "target_to_ms": 0,
    "n": 1,
    "rmsse": 1.0,
    "wape": 1.0,
    "coverage": None,
}


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        (None, "accuracy records file not found"),
        (b"", "no forecast-accuracy records in"),
        (orjson.dumps(GOOD) + b"\n{not json\n", "acc.jsonl:2: expected a JSON object"),
        (b"[1, 2]\n", "acc.jsonl:1: expected a JSON object"),
        (orjson.dumps({"model_version": "v", "role": "live"}), "missing target_to_ms, n, rmsse"),
        (orjson.dumps({**GOOD, "n": "many"}), "record 1: expected a number, got 'many'"),
    ],
)
def test_bad_input_is_one_line(
    content: bytes | None,
    fragment: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    path = tmp_path / "acc.jsonl"
    if content is not None:
        path.write_bytes(content)
    code, _, err = run_cli(
        ["report", "--input", str(path), "--out", str(tmp_path / "r")], monkeypatch, capsys
    )
    assert code == 1
    assert fragment in one_line_error(err)


def test_input_and_brokers_together_are_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["report", "--input", "x", "--brokers", "localhost:1", "--out", str(tmp_path)]
    code, _, err = run_cli(args, monkeypatch, capsys)
    assert code == 1
    assert "either --input or --brokers" in one_line_error(err)
