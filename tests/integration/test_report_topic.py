"""`trendcast report` reading the forecast-accuracy topic from a real broker (Tansu)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from trendcast.testkit.cli import run_cli
from trendcast.testkit.doubles import tracker_records


def test_report_reads_the_topic_to_its_end(
    kafka_bootstrap: str,
    unique_topic: Any,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from trendcast.testkit.kafka import produce

    topic = unique_topic(partitions=2, prefix="accuracy")
    records = tracker_records(days=4)
    produce(kafka_bootstrap, topic, [(r["model_version"], r) for r in records])
    args = ["report", "--brokers", kafka_bootstrap, "--topic", topic, "--out", str(tmp_path)]
    code, out, err = run_cli(args, monkeypatch, capsys)
    assert code == 0, err
    summary = pd.read_csv(tmp_path / "summary.csv")
    assert sorted(summary["role"]) == ["live", "shadow"]
    assert summary["points"].tolist() == [3, 3]
