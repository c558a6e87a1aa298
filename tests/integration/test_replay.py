"""Replaying the shipped sample into a real broker, and reading it back with ``tail``."""

from __future__ import annotations

import io
import threading
import time

import orjson
import pandas as pd
import pytest

from trendcast.data import read_lines, sample_data_path
from trendcast.devtools.embedded import ensure_topics, kafka_answers
from trendcast.devtools.replay import event_ids, replay
from trendcast.devtools.tail import print_tail, tail
from trendcast.exceptions import BrokerError, ConfigError, DataError
from trendcast.testkit.kafka import consume_all, consume_values, produce

pytestmark = pytest.mark.integration

START, END = "2010-03-01", "2010-03-15"


@pytest.fixture(scope="module")
def lines() -> pd.DataFrame:
    frame, has_price = read_lines(sample_data_path())
    assert has_price
    return frame


@pytest.fixture(scope="module")
def expected(lines: pd.DataFrame) -> pd.DataFrame:
    """The slice computed independently of the replayer: [START, END), stable ts order."""
    mask = (lines["ts"] >= pd.Timestamp(START)) & (lines["ts"] < pd.Timestamp(END))
    return lines[mask].sort_values("ts", kind="stable")


def test_replay_publishes_the_window_in_event_time_order(
    kafka_bootstrap, unique_topic, lines, expected
):
    topic = unique_topic(partitions=1)  # one partition: the topic order is the send order

    report = replay(lines, bootstrap=kafka_bootstrap, topic=topic, start=START, end=END)
    values = consume_values(kafka_bootstrap, topic)

    assert report.events == len(expected) == len(values) > 100
    assert report.items == expected["item_id"].nunique()
    assert report.first_ts == pd.Timestamp(START)
    stamps = pd.to_datetime([v["ts"] for v in values], utc=True)
    assert stamps.is_monotonic_increasing
    assert stamps.min() >= pd.Timestamp(START, tz="UTC")
    assert stamps.max() < pd.Timestamp(END, tz="UTC")
    assert all(v["ts"].endswith("Z") for v in values)
    assert [v["item_id"] for v in values] == expected["item_id"].tolist()
    assert [v["quantity"] for v in values] == expected["quantity"].tolist()
    assert [v["price"] for v in values] == pytest.approx(expected["price"].tolist())


def test_keys_are_item_ids_and_stay_on_one_partition(kafka_bootstrap, unique_topic, lines):
    topic = unique_topic(partitions=3)

    replay(lines, bootstrap=kafka_bootstrap, topic=topic, start=START, end=END)
    records = consume_all(kafka_bootstrap, topic)

    partitions: dict[bytes, set[int]] = {}
    for r in records:
        assert r.key.decode() == orjson.loads(r.value)["item_id"]
        partitions.setdefault(r.key, set()).add(r.partition)
    assert all(len(p) == 1 for p in partitions.values())
    assert len({p for ps in partitions.values() for p in ps}) > 1


def test_event_ids_are_deterministic_across_runs(kafka_bootstrap, unique_topic, lines):
    topic = unique_topic(partitions=1)

    first = replay(lines, bootstrap=kafka_bootstrap, topic=topic, start=START, end=END,
                   source="sample.csv.gz")  # fmt: skip
    replay(lines, bootstrap=kafka_bootstrap, topic=topic, start=START, end=END,
           source="sample.csv.gz")  # fmt: skip
    ids = [v["event_id"] for v in consume_values(kafka_bootstrap, topic)]

    assert len(ids) == 2 * first.events
    assert ids[: first.events] == ids[first.events :]
    assert len(set(ids)) == first.events, "ids are unique within one replay"


def test_event_ids_do_not_depend_on_the_filter(lines):
    window = lines[(lines["ts"] >= pd.Timestamp(START)) & (lines["ts"] < pd.Timestamp(END))]
    narrower = window[window["ts"] >= pd.Timestamp("2010-03-08")]

    wide = event_ids(window, "f").loc[narrower.index]
    assert wide.equals(event_ids(narrower, "f"))
    assert not wide.equals(event_ids(narrower, "other-file"))


def test_window_is_half_open(kafka_bootstrap, unique_topic, lines):
    topic = unique_topic(partitions=1)
    day = lines[lines["ts"] == pd.Timestamp("2010-03-02")]
    assert len(day) > 0

    report = replay(lines, bootstrap=kafka_bootstrap, topic=topic,
                    start="2010-03-02", end="2010-03-03")  # fmt: skip
    values = consume_values(kafka_bootstrap, topic)

    assert report.events == len(day) == len(values)
    assert {v["ts"] for v in values} == {"2010-03-02T00:00:00Z"}


def test_bad_windows_are_rejected(kafka_bootstrap, unique_topic, lines):
    topic = unique_topic()
    with pytest.raises(ConfigError, match="before"):
        replay(lines, bootstrap=kafka_bootstrap, topic=topic, start=END, end=START)
    with pytest.raises(DataError, match="no sales lines"):
        replay(lines, bootstrap=kafka_bootstrap, topic=topic, start="1999-01-01", end="1999-02-01")
    with pytest.raises(ConfigError, match="speed"):
        replay(lines, bootstrap=kafka_bootstrap, topic=topic, speed=0)


def test_missing_topic_is_an_error_not_auto_created(kafka_bootstrap, lines):
    name = f"missing-{time.monotonic_ns()}"
    with pytest.raises(BrokerError, match="does not exist"):
        replay(lines, bootstrap=kafka_bootstrap, topic=name, start=START, end=END)
    assert ensure_topics(kafka_bootstrap, {name: 1}) == [name], "the failed replay created it"


def test_create_partitions_creates_the_topic(kafka_bootstrap, lines):
    name = f"created-{time.monotonic_ns()}"
    report = replay(lines, bootstrap=kafka_bootstrap, topic=name, start=START, end="2010-03-03",
                    create_partitions=2)  # fmt: skip
    assert len(consume_all(kafka_bootstrap, name)) == report.events


def test_rate_is_roughly_respected(kafka_bootstrap, unique_topic, lines):
    topic = unique_topic()
    few = lines.iloc[:60]

    report = replay(few, bootstrap=kafka_bootstrap, topic=topic, rate=100.0)

    # 60 events at 100/s need >= 0.59 s; only a generous lower bound, never an upper one
    # beyond "finished", so a loaded CI machine cannot make this flaky.
    assert report.events == 60
    assert report.elapsed_s >= 0.45


def test_speed_paces_by_event_time(kafka_bootstrap, unique_topic, lines):
    topic = unique_topic()
    three_days = lines[(lines["ts"] >= pd.Timestamp(START)) & (lines["ts"] < "2010-03-04")]

    # 2 days of event-time gaps at 4 days per second: >= 0.5 s of pauses.
    report = replay(three_days, bootstrap=kafka_bootstrap, topic=topic, speed=4 * 86_400.0)
    assert report.elapsed_s >= 0.4


def test_replay_to_unreachable_broker_is_a_broker_error(lines):
    assert not kafka_answers("127.0.0.1:1", timeout_s=0.2)
    with pytest.raises(BrokerError):
        replay(lines.iloc[:5], bootstrap="127.0.0.1:1", topic="sales")


def test_tail_returns_the_last_n(kafka_bootstrap, unique_topic, lines, expected):
    topic = unique_topic(partitions=1)
    replay(lines, bootstrap=kafka_bootstrap, topic=topic, start=START, end=END)

    last = list(tail(kafka_bootstrap, topic, n=5))

    assert [r["value"]["item_id"] for r in last] == expected["item_id"].tolist()[-5:]
    assert [r["offset"] for r in last] == list(range(len(expected) - 5, len(expected)))
    assert {"topic", "partition", "offset", "key", "value"} <= set(last[0])
    assert len(list(tail(kafka_bootstrap, topic, n=len(expected) + 50))) == len(expected)
    assert list(tail(kafka_bootstrap, topic, n=0)) == []
    assert len(list(tail(kafka_bootstrap, topic, n=None))) == len(expected)


def test_tail_over_partitions(kafka_bootstrap, unique_topic, lines, expected):
    topic = unique_topic(partitions=3)
    replay(lines, bootstrap=kafka_bootstrap, topic=topic, start=START, end=END)
    records = consume_all(kafka_bootstrap, topic)
    last_offsets: dict[int, int] = {}
    for r in records:
        last_offsets[r.partition] = max(last_offsets.get(r.partition, -1), r.offset)

    last = list(tail(kafka_bootstrap, topic, n=7))

    assert len(last) == 7
    assert all(r["offset"] > last_offsets[r["partition"]] - 7 for r in last)
    assert len({(r["partition"], r["offset"]) for r in last}) == 7


def test_tail_decodes_non_json_as_base64(kafka_bootstrap, unique_topic):
    topic = unique_topic()
    produce(kafka_bootstrap, topic, [(b"\xff", b"\x00not json")])

    (record,) = tail(kafka_bootstrap, topic, n=1)

    assert record["key"] is None and record["key_b64"] == "/w=="
    assert record["value"] is None and record["value_b64"] == "AG5vdCBqc29u"


def test_tail_follow_sees_new_records(kafka_bootstrap, unique_topic):
    topic = unique_topic(partitions=2)
    produce(kafka_bootstrap, topic, [("old", {"i": -1})])
    later = threading.Timer(
        0.5, produce, args=(kafka_bootstrap, topic, [("k", {"i": i}) for i in range(3)])
    )
    later.start()
    try:
        seen = []
        for record in tail(kafka_bootstrap, topic, n=0, follow=True, timeout_s=8.0):
            seen.append(record["value"]["i"])
            if len(seen) == 3:
                break
    finally:
        later.join()
    assert seen == [0, 1, 2]


def test_tail_missing_topic_is_an_error(kafka_bootstrap):
    with pytest.raises(BrokerError, match="does not exist"):
        list(tail(kafka_bootstrap, f"nope-{time.monotonic_ns()}", n=1))


def test_print_tail_writes_json_lines(kafka_bootstrap, unique_topic):
    topic = unique_topic()
    produce(kafka_bootstrap, topic, [("a", {"i": i}) for i in range(4)])
    out = io.StringIO()

    assert print_tail(kafka_bootstrap, topic, n=3, out=out) == 3
    assert [orjson.loads(line)["value"]["i"] for line in out.getvalue().splitlines()] == [1, 2, 3]
