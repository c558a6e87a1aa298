"""The worker end to end on real services: Tansu (Kafka) + Redis, worker as a subprocess.

One module-scoped run keeps the suite fast (~20 s): three weeks of the shipped sample are
produced to a 2-partition topic, then one bad event of each kind; the worker (``python -m
stream`` against a hand-built ONNX bundle) must forecast every item active at each closed
bucket exactly once, store windows equal to the offline aggregation, dead-letter each bad
event with its reason, and ignore a full re-production of the same events.
"""

from __future__ import annotations

import contextlib
import signal
import subprocess
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pandas as pd
import pytest
import redis

from stream.settings.worker import WorkerSettings
from stream.worker.runner import inspect_items
from trendcast import contract
from trendcast.bundle import load_bundle
from trendcast.data import bucketize, read_lines, sample_data_path
from trendcast.devtools.embedded import free_port
from trendcast.devtools.replay import encode_events
from trendcast.freq import parse_freq
from trendcast.testkit.bundles import make_fake_bundle
from trendcast.testkit.kafka import committed_offsets, consume_all, produce, wait_until
from trendcast.testkit.processes import start_worker

pytestmark = pytest.mark.integration

START, END = "2010-03-01", "2010-03-22"
WINDOW, HORIZON = 14, 7
FREQ = parse_freq("1D")
DAY = FREQ.step_ms
LATE_ITEM_TS = "2010-01-04T00:00:00Z"

BAD_EVENTS: list[tuple[bytes, bytes | None, str]] = [
    (b"bad-utf8", b"\xff\xfe\x00", "not_utf8"),
    (b"bad-json", b"{'item_id': 1}", "not_json"),
    (b"bad-object", b"[1, 2, 3]", "not_object"),
    (b"bad-missing", b'{"item_id": "x", "quantity": 1}', "missing_field"),
    (b"bad-type", b'{"item_id": "x", "ts": "2010-03-05T00:00:00Z", "quantity": "1"}', "bad_type"),
    (b"bad-nan", b'{"item_id": "x", "ts": "2010-03-05T00:00:00Z", "quantity": NaN}', "not_finite"),
    (b"bad-ts", b'{"item_id": "x", "ts": "2999-01-01T00:00:00Z", "quantity": 1}', "bad_timestamp"),
    (b"bad-naive", b'{"item_id": "x", "ts": "2010-03-05", "quantity": 1}', "bad_timestamp"),
    (
        b"bad-long",
        orjson.dumps({"item_id": "x" * 200, "ts": 1267747200000, "quantity": 1}),
        "too_long",
    ),
    (
        b"bad-price",
        b'{"item_id": "x", "ts": 1267747200000, "quantity": 1, "price": -1}',
        "negative_price",
    ),
    (b"bad-empty", None, "empty"),
    (b"bad-huge", b'{"pad": "' + b"x" * 70_000 + b'"}', "too_large"),
]


@dataclass
class Run:
    bootstrap: str
    settings: WorkerSettings
    lines: pd.DataFrame
    events: list[tuple[bytes, bytes, int]]
    sales: list[Any]  # records of the sales topic after the first production
    late_item: str
    redis: redis.Redis


def _settings(bootstrap: str, url: str, tmp: Path, topics: dict[str, str]) -> WorkerSettings:
    suffix = topics["sales"].rsplit("-", 1)[-1]
    return WorkerSettings(
        kafka_brokers=f"kafka://{bootstrap}",
        fetch_max_wait_ms=50,  # Tansu holds fetches for the full wait
        redis_url=url,
        bundle=make_fake_bundle(tmp / "bundle", window=WINDOW, horizon=HORIZON),
        sales_topic=topics["sales"],
        dlq_topic=topics["dlq"],
        forecasts_topic=topics["forecasts"],
        accuracy_topic=f"acc-{suffix}",
        trends_topic=f"trends-{suffix}",
        publish_interval_s=1.0,
        shadow_bundle=make_fake_bundle(tmp / "shadow", window=WINDOW, horizon=HORIZON),
        consumer_group=f"worker-{suffix}",
        state_prefix=f"tcw-{suffix}",
        web_enabled=True,
        web_port=free_port(),
        data_dir=tmp / "faust",
        batch_size=200,
        batch_timeout_s=0.2,
        broker_rebalance_timeout_s=3,
        broker_session_timeout_s=6,
        commit_interval_s=0.5,
        catchup="every",  # the checks expect a forecast per item and closed bucket
    )


@pytest.fixture(scope="module")
def run(kafka_bootstrap, redis_url, tmp_path_factory) -> Iterator[Run]:  # noqa: F811
    tmp = tmp_path_factory.mktemp("worker")
    from trendcast.devtools.embedded import ensure_topics

    suffix = tmp.name.replace("_", "-")[-12:]
    topics = {"sales": f"sales-{suffix}", "dlq": f"dlq-{suffix}", "forecasts": f"fc-{suffix}"}
    ensure_topics(kafka_bootstrap, {topics["sales"]: 2, topics["dlq"]: 1, topics["forecasts"]: 2})
    settings = _settings(kafka_bootstrap, redis_url, tmp, topics)
    lines, _ = read_lines(sample_data_path())
    lines = lines[(lines["ts"] >= START) & (lines["ts"] < END)].sort_values("ts", kind="stable")
    events = encode_events(lines, "sample")
    produce(kafka_bootstrap, settings.sales_topic, [(k, v) for k, v, _ in events])
    sales = consume_all(kafka_bootstrap, settings.sales_topic, idle_timeout_s=1.0)
    late_item = lines["item_id"].iloc[0]
    bad = [(k, v) for k, v, _ in BAD_EVENTS]
    bad.append(
        (
            late_item.encode(),
            orjson.dumps({"item_id": late_item, "ts": LATE_ITEM_TS, "quantity": 5}),
        )
    )
    produce(kafka_bootstrap, settings.sales_topic, bad)

    log = (tmp / "worker.log").open("wb")
    proc = start_worker(settings, log)
    client = redis.Redis.from_url(redis_url)
    try:
        yield Run(kafka_bootstrap, settings, lines, events, sales, late_item, client)
    finally:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            code = proc.wait()
        log.close()
        keys = list(client.scan_iter(match=f"{settings.state_prefix}:*", count=1000))
        if keys:
            client.delete(*keys)
        client.close()
        assert code == 0, (tmp / "worker.log").read_text()[-3000:]


def expected_forecasts(run: Run) -> Counter[tuple[str, str]]:
    """(item, as_of) per closed bucket of the module's run."""
    return expected_from_records(run.sales, int(run.settings.allowed_lateness_s * 1000))


def expected_from_records(sales: list[Any], lateness_ms: int) -> Counter[tuple[str, str]]:
    """(item, as_of) per closed bucket, computed from the events as each partition saw them."""
    by_partition: dict[int, list[tuple[str, int]]] = defaultdict(list)
    for rec in sales:
        value = orjson.loads(rec.value)
        ts = int(pd.Timestamp(value["ts"]).value // 1_000_000)
        by_partition[rec.partition].append((value["item_id"], ts))
    expected: Counter[tuple[str, str]] = Counter()
    lateness = lateness_ms
    for events in by_partition.values():
        first_open = FREQ.floor_ms(events[0][1] - lateness)
        end_open = FREQ.floor_ms(max(ts for _, ts in events) - lateness)
        sold: dict[str, set[int]] = defaultdict(set)
        for item, ts in events:
            sold[item].add(FREQ.floor_ms(ts))
        for bucket in range(first_open, end_open, DAY):
            for item, buckets in sold.items():
                if any(bucket - (WINDOW - 1) * DAY <= b <= bucket for b in buckets):
                    as_of = pd.Timestamp(bucket + DAY, unit="ms").strftime("%Y-%m-%dT%H:%M:%SZ")
                    expected[(item, as_of)] += 1
    return expected


def forecast_pairs(run: Run, idle_s: float = 0.5) -> list[tuple[str, str]]:
    records = consume_all(run.bootstrap, run.settings.forecasts_topic, idle_timeout_s=idle_s)
    return [(r.key.decode(), orjson.loads(r.value)["as_of"]) for r in records]


def dead_letters(run: Run) -> list[dict[str, Any]]:
    return [
        orjson.loads(r.value)
        for r in consume_all(run.bootstrap, run.settings.dlq_topic, idle_timeout_s=0.5)
    ]


def test_every_active_item_gets_exactly_one_forecast_per_closed_bucket(run: Run) -> None:
    expected = expected_forecasts(run)
    assert len(expected) > 300
    got = wait_until(
        lambda: forecast_pairs(run),
        lambda p: len(p) >= len(expected),
        timeout_s=40,
        what="forecasts",
    )
    assert Counter(got) == expected
    records = consume_all(run.bootstrap, run.settings.forecasts_topic, idle_timeout_s=0.5)
    for rec in records:  # every record the worker wrote keeps the published contract
        contract.validate("forecasts", rec.value)
    record = orjson.loads(records[0].value)
    assert set(record) == {
        "item_id",
        "as_of",
        "freq",
        "horizon",
        "model_version",
        "fallback",
        "emitted_at_ms",
        "kind",
        "open_bucket",
    }
    assert {orjson.loads(r.value)["kind"] for r in records} <= {"close", "late"}
    assert record["freq"] == "1D" and record["model_version"].startswith("test-")
    assert len(record["horizon"]) == HORIZON
    assert set(record["horizon"][0]) == {"date", "mean", "p10", "p50", "p90"}


def test_each_bad_event_is_dead_lettered_with_its_reason(run: Run) -> None:
    wanted = len(BAD_EVENTS) + 1
    dead = wait_until(
        lambda: dead_letters(run), lambda d: len(d) >= wanted, timeout_s=30, what="dead letters"
    )
    by_key = {d["key_b64"]: d for d in dead}
    import base64

    for key, value, reason in BAD_EVENTS:
        record = by_key[base64.b64encode(key).decode()]
        assert record["reason"] == reason, record
        assert record["source"]["topic"] == run.settings.sales_topic
        assert record["source"]["offset"] >= 0
        if value is not None:
            assert base64.b64decode(record["value_b64"]) == value
    for record in dead:
        contract.validate("sales.dlq", record)
    late = [d for d in dead if d["reason"] == "late"]
    assert len(late) == 1 and late[0]["item_id"] == run.late_item
    assert late[0]["late_by_ms"] > 0


def test_stored_windows_equal_the_offline_aggregation(run: Run) -> None:
    wait_until(
        lambda: forecast_pairs(run),
        lambda p: len(p) >= len(expected_forecasts(run)),
        timeout_s=40,
        what="forecasts",
    )
    items = sorted(run.lines["item_id"].unique())
    shown = list(inspect_items(run.settings, items, freq="1D"))
    offline = _offline_windows(run.lines)
    assert [s["item_id"] for s in shown] == items
    compared = 0
    for item in shown:
        assert item["freq"] == "1D"
        assert item["buckets"], item
        for bucket in item["buckets"]:
            assert bucket["quantity"] == offline[(item["item_id"], bucket["start"])], bucket
            compared += 1
        last_sale = max(t for (i, t), q in offline.items() if i == item["item_id"])
        assert item["buckets"][-1]["start"] <= last_sale
    assert compared > 200


def test_reproducing_the_same_events_changes_nothing(run: Run) -> None:
    before_pairs = wait_until(
        lambda: forecast_pairs(run),
        lambda p: len(p) >= len(expected_forecasts(run)),
        timeout_s=40,
        what="forecasts",
    )
    prefix = run.settings.state_prefix

    def snapshot() -> dict[bytes, Any]:
        """Partition clocks, and what later forecasts can still read: the buckets of the
        last window (retention may trim older ones at any batch, which changes no window)."""
        keys = list(run.redis.scan_iter(match=f"{prefix}:*", count=1000))
        # The clocks' "o" (next source offset) moves on: the copies have new offsets.
        clocks = {
            k: {f: v for f, v in run.redis.hgetall(k).items() if f != b"o"}
            for k in keys
            if k.endswith(b":s")
        }
        emitted_to = min(int(c[b"e"]) for c in clocks.values())
        cutoff_ms = emitted_to - WINDOW * DAY
        out: dict[bytes, Any] = dict(clocks)
        for key in keys:
            if key.endswith(b":w"):
                out[key] = {
                    f: v
                    for f, v in run.redis.hgetall(key).items()
                    if f == b"f" or int(f) * DAY >= cutoff_ms
                }
            elif key.endswith(b":a"):
                out[key] = run.redis.zrangebyscore(key, cutoff_ms, "+inf", withscores=True)
        return out

    # Clocks of delivered batches are stored with the next round trip or by a 1 s timer.
    before = wait_until(snapshot, lambda snap: snap == snapshot(), timeout_s=10, what="clocks")
    time.sleep(1.5)
    before = snapshot()
    produce(run.bootstrap, run.settings.sales_topic, [(k, v) for k, v, _ in run.events])
    ends: dict[int, int] = Counter()
    for rec in consume_all(run.bootstrap, run.settings.sales_topic, idle_timeout_s=1.0):
        ends[rec.partition] = max(ends[rec.partition], rec.offset + 1)
    wait_until(
        lambda: committed_offsets(
            run.bootstrap, run.settings.consumer_group, run.settings.sales_topic
        ),
        lambda c: all((c.get(p) or 0) >= end for p, end in ends.items()),
        timeout_s=30,
        what="offsets committed past the re-produced events",
    )
    time.sleep(1.5)  # the last clocks are flushed by the 1 s timer
    assert snapshot() == before
    assert Counter(forecast_pairs(run)) == Counter(before_pairs)


def _offline_windows(lines: pd.DataFrame) -> dict[tuple[str, str], float]:
    panel = bucketize(lines, FREQ, has_price=True).frame
    return {
        (i, t.strftime("%Y-%m-%dT%H:%M:%SZ")): q
        for i, t, q in zip(panel["item_id"], panel["ts"], panel["quantity"], strict=True)
    }


@pytest.mark.slow
def test_a_killed_worker_is_replaced_without_double_counting(
    kafka_bootstrap,  # noqa: F811
    redis_url,  # noqa: F811
    unique_topic,  # noqa: F811
    tmp_path: Path,
) -> None:
    """SIGKILL mid-stream, a second worker takes over from Redis and the committed offsets.

    Sums must equal the offline aggregation (re-delivered events are deduplicated); forecasts
    are at-least-once across the crash: every expected (item, as_of) at least once.
    """
    topics = {
        "sales": unique_topic(2, "sales"),
        "dlq": unique_topic(1, "dlq"),
        "forecasts": unique_topic(2, "fc"),
    }
    settings = _settings(kafka_bootstrap, redis_url, tmp_path, topics).model_copy(
        update={"batch_size": 20, "batch_timeout_s": 0.05}
    )
    lines, _ = read_lines(sample_data_path())
    lines = lines[(lines["ts"] >= START) & (lines["ts"] < END)].sort_values("ts", kind="stable")
    events = encode_events(lines, "sample")
    produce(kafka_bootstrap, settings.sales_topic, [(k, v) for k, v, _ in events])
    sales = consume_all(kafka_bootstrap, settings.sales_topic, idle_timeout_s=1.0)
    expected = expected_from_records(sales, int(settings.allowed_lateness_s * 1000))
    ends: dict[int, int] = Counter()
    for rec in sales:
        ends[rec.partition] = max(ends[rec.partition], rec.offset + 1)

    def pairs() -> list[tuple[str, str]]:
        records = consume_all(kafka_bootstrap, settings.forecasts_topic, idle_timeout_s=0.3)
        return [(r.key.decode(), orjson.loads(r.value)["as_of"]) for r in records]

    client = redis.Redis.from_url(redis_url)
    with (tmp_path / "a.log").open("wb") as log_a, (tmp_path / "b.log").open("wb") as log_b:
        first = start_worker(settings, log_a)
        try:
            wait_until(pairs, lambda p: len(p) > 0, timeout_s=30, what="first forecasts")
        finally:
            first.kill()
            first.wait()
        second = start_worker(settings, log_b)
        try:
            got = wait_until(
                pairs,
                lambda p: set(p) >= set(expected),
                timeout_s=60,
                what="all forecasts after the take-over",
            )
            wait_until(
                lambda: committed_offsets(
                    kafka_bootstrap, settings.consumer_group, settings.sales_topic
                ),
                lambda c: all((c.get(p) or 0) >= end for p, end in ends.items()),
                timeout_s=30,
                what="offsets committed to the end",
            )
            items = sorted(lines["item_id"].unique())
            offline = _offline_windows(lines)
            for item in inspect_items(settings, items, freq="1D"):
                for bucket in item["buckets"]:
                    assert bucket["quantity"] == offline[(item["item_id"], bucket["start"])]
        finally:
            second.send_signal(signal.SIGTERM)
            assert second.wait(timeout=20) == 0
            keys = list(client.scan_iter(match=f"{settings.state_prefix}:*", count=1000))
            if keys:
                client.delete(*keys)
            client.close()
    assert set(got) == set(expected)
    duplicates = sum(got.count(p) - 1 for p in set(got))
    print(f"\nforecasts: {len(expected)} expected, {duplicates} repeated across the crash")


def test_online_accuracy_is_published_for_live_and_shadow_and_trends_too(run: Run) -> None:
    """The shadow model is scored like the live one but never reaches the forecasts topic."""
    settings = run.settings
    live = load_bundle(settings.bundle).meta.model_version
    assert settings.shadow_bundle is not None
    shadow = load_bundle(settings.shadow_bundle).meta.model_version
    records = wait_until(
        lambda: [
            orjson.loads(r.value)
            for r in consume_all(run.bootstrap, settings.accuracy_topic, idle_timeout_s=0.5)
        ],
        lambda recs: (
            {(r["role"], r["model_version"]) for r in recs} >= {("live", live), ("shadow", shadow)}
        ),
        timeout_s=40,
        what="accuracy records of both models",
    )
    for record in records:
        contract.validate("forecast-accuracy", record)
    latest = {r["role"]: r for r in records}
    for record in latest.values():
        assert record["n"] > 0
        assert 0.0 <= record["coverage"] <= 1.0 and record["wape"] >= 0.0
        assert len(record["steps"]) == HORIZON
    emitted = consume_all(run.bootstrap, settings.forecasts_topic, idle_timeout_s=0.5)
    assert {orjson.loads(r.value)["model_version"] for r in emitted} == {live}  # no shadow

    trends = [
        orjson.loads(r.value)
        for r in consume_all(run.bootstrap, settings.trends_topic, idle_timeout_s=0.5)
    ]
    assert trends, "no trends record"
    for record in trends:
        contract.validate("trends", record)
    last = trends[-1]
    assert last["items_considered"] > 0 and last["rising"] + last["falling"]
    for entry in last["rising"]:
        assert entry["change"] > 0 and entry["next_week"] - entry["last_week"] > 0


def test_metrics_are_served(run: Run) -> None:
    import urllib.request

    wait_until(
        lambda: dead_letters(run),
        lambda d: len(d) >= len(BAD_EVENTS) + 1,
        timeout_s=30,
        what="dead letters",
    )
    url = f"http://127.0.0.1:{run.settings.web_port}/metrics"
    body = urllib.request.urlopen(url, timeout=5).read().decode()  # noqa: S310 - local URL
    assert 'trendcast_dead_letters_total{reason="late"}' in body  # more after re-production
    assert 'trendcast_dead_letters_total{reason="not_utf8"} 1.0' in body
    assert "trendcast_forecasts_total" in body
    assert f'trendcast_watermark_ms{{partition="0",topic="{run.settings.sales_topic}"}}' in body
