"""The published topic schemas: well-formed, versioned, and held by what the code produces."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import jsonschema
import numpy as np
import orjson
import pandas as pd
import pytest

from stream.inference.model_info import ModelInfo
from stream.inference.observers import ScoredBatch
from stream.monitoring.trends import TrendTracker
from stream.pipeline.events import REASONS, dead_letter_value
from trendcast import contract
from trendcast.devtools.replay import encode_events
from trendcast.exceptions import ContractError
from trendcast.forecasting.base import ForecastBatch, WindowBatch
from trendcast.freq import parse_freq
from trendcast.testkit.doubles import tracker_records

KINDS = {"sales", "sales.dlq", "forecasts", "alerts", "trends", "forecast-accuracy"}


def test_every_topic_has_a_versioned_draft_2020_12_schema() -> None:
    assert set(contract.names()) == KINDS
    for name in contract.names():
        body = contract.schema(name)
        jsonschema.Draft202012Validator.check_schema(body)
        assert body["$schema"] == "https://json-schema.org/draft/2020-12/schema"
        assert body["$id"] == f"urn:trendcast:schema:{name}:v1"
        assert body["title"] and body["description"]


def test_unknown_kind_is_a_clear_error() -> None:
    with pytest.raises(ContractError, match="expected one of .*got 'nope'"):
        contract.schema("nope")


def test_replayed_sales_and_bad_sales() -> None:
    lines = pd.DataFrame(
        {
            "item_id": ["a", "b"],
            "quantity": [2.0, -1.0],
            "price": [1.5, float("nan")],
            "ts": pd.to_datetime(["2011-01-05 10:00", "2011-01-06 00:00"]),
        }
    )
    for _, value, _ in encode_events(lines, "f.csv"):
        contract.validate("sales", value)
    for broken in (
        {"ts": 1_300_000_000_000, "quantity": 1},  # no item
        {"item_id": "", "ts": 1_300_000_000_000, "quantity": 1},
        {"item_id": "a", "ts": True, "quantity": 1},
        {"item_id": "a", "ts": 1_300_000_000_000, "quantity": "2"},
        {"item_id": "a", "ts": 1_300_000_000_000, "quantity": 1, "price": -1},
    ):
        with pytest.raises(ContractError):
            contract.validate("sales", broken)


def test_dead_letters_of_every_reason() -> None:
    for reason in REASONS:
        extra = {"item_id": "a", "event_ts_ms": 5, "late_by_ms": 3} if reason == "late" else None
        value = dead_letter_value(
            b"\xff" * 10,
            reason=reason,
            detail="d",
            topic="sales",
            partition=1,
            offset=7,
            key=b"k",
            timestamp_ms=1,
            dead_lettered_at_ms=2,
            extra=extra,
        )
        contract.validate("sales.dlq", value)
    good = orjson.loads(value)
    for field, bad in (("reason", "other"), ("source", {"topic": "s"}), ("surprise", 1)):
        broken = {**good, field: bad}
        with pytest.raises(ContractError):
            contract.validate("sales.dlq", broken)


def test_accuracy_and_trends_records() -> None:
    records = tracker_records()
    assert records
    for record in records:
        contract.validate("forecast-accuracy", record)
    with pytest.raises(ContractError, match=r"at \$\.role"):
        contract.validate("forecast-accuracy", {**records[0], "role": "other"})

    tracker = TrendTracker()
    info = ModelInfo(freq=parse_freq("1D"), window=8, horizon=10, model_version="v1")
    n = 3
    mean = np.array([[1.0] * 10, [3.0] * 10, [0.5] * 10], dtype=np.float32)
    batch = WindowBatch(
        item_ids=["a", "b", "c"],
        quantities=np.ones((n, 8), dtype=np.float32),
        prices=None,
        last_start_ms=np.full(n, 20 * 86_400_000, dtype=np.int64),
        history_len=np.full(n, 8, dtype=np.int64),
    )
    result = ForecastBatch(mean=mean, p10=mean, p50=mean, p90=mean, fallback=np.zeros(n, bool))
    tracker.on_forecasts(ScoredBatch(model=info, role="live", batch=batch, result=result))
    snapshot = tracker.snapshot(5, now_ms=1)
    assert snapshot is not None
    contract.validate("trends", snapshot)
    value = orjson.loads(snapshot)
    value["rising"][0].pop("item_id")
    with pytest.raises(ContractError, match="item_id"):
        contract.validate("trends", value)


def test_error_names_the_field() -> None:
    with pytest.raises(ContractError, match=r"at \$\.source\.partition"):
        contract.validate(
            "sales.dlq",
            orjson.loads(
                dead_letter_value(b"x", reason="empty", detail="", topic="t", partition=0, offset=0)
            )
            | {"source": {"topic": "t", "partition": -1, "offset": 0}},
        )
    with pytest.raises(ContractError, match="expected JSON"):
        contract.validate("sales", b"{not json")


def test_broker_registry_wraps_key_and_value(tmp_path: Path) -> None:
    (written,) = contract.write_broker_registry(tmp_path, {"forecasts": "fc-eu"})
    assert written.name == "fc-eu.json"
    body: dict[str, Any] = orjson.loads(written.read_bytes())
    assert body["properties"]["value"] == contract.schema("forecasts")
    jsonschema.Draft202012Validator.check_schema(body)


def test_schemas_are_fresh_copies() -> None:
    first = contract.schema("sales")
    first["title"] = "changed"
    assert contract.schema("sales")["title"] != "changed"
    assert copy.deepcopy(contract.schema("sales")) == contract.schema("sales")
