"""Live sales, live forecasts: a worker on Tansu and Redis with one-minute buckets.

Events carry the wall clock's time (``ts = now``), as a shop's do. The worker must close every
minute within the allowed lateness (1 s here) plus two seconds of its end, the last minute
too although no later event comes (its clock follows the wall clock), send ``refresh``
forecasts with the open minute's nowcast while it sells, and a ``surge`` alert within a
second or two of a burst. Every record must keep the published contract.

Takes one to two minutes (it waits for two minute boundaries of the wall clock).
"""

from __future__ import annotations

import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest

from stream.settings.worker import WorkerSettings
from trendcast import contract
from trendcast.devtools.embedded import free_port
from trendcast.testkit.bundles import make_fake_bundle
from trendcast.testkit.kafka import consume_values, produce, wait_until
from trendcast.testkit.processes import start_worker

pytestmark = pytest.mark.integration

MINUTE = 60_000
LATENESS_S = 1.0
#: The issue's bound is lateness + 2 s; the check allows 2 s more for a loaded CI machine.
CLOSE_SLACK_MS = 4_000


def _now_ms() -> int:
    return int(time.time() * 1000)


def _sale(item: str, qty: float) -> tuple[bytes, bytes]:
    return item.encode(), orjson.dumps({"item_id": item, "ts": _now_ms(), "quantity": qty})


def _ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/ready", timeout=1) as resp:  # noqa: S310
            return bool(resp.status == 200)
    except OSError:
        return False


def _sleep_until(ms: int) -> None:
    delay = (ms - _now_ms()) / 1000
    if delay > 0:
        time.sleep(delay)


def test_minutes_close_on_time_refresh_and_surge(
    kafka_bootstrap: str,
    redis_url: str,
    redis_prefix: str,
    unique_topic: Callable[..., str],
    tmp_path: Path,
) -> None:
    topics = {
        "sales": unique_topic(1, "live-sales"),
        "dlq": unique_topic(1, "live-dlq"),
        "forecasts": unique_topic(1, "live-fc"),
        "alerts": unique_topic(1, "live-alerts"),
    }
    web_port = free_port()
    settings = WorkerSettings(
        kafka_brokers=f"kafka://{kafka_bootstrap}",
        fetch_max_wait_ms=50,  # Tansu holds fetches for the full wait
        redis_url=redis_url,
        bundle=make_fake_bundle(tmp_path / "bundle", window=3, horizon=2, freq="1min"),
        sales_topic=topics["sales"],
        dlq_topic=topics["dlq"],
        forecasts_topic=topics["forecasts"],
        alerts_topic=topics["alerts"],
        accuracy_topic=f"{topics['sales']}-acc",
        trends_topic=f"{topics['sales']}-trends",
        consumer_group=f"live-{redis_prefix}",
        state_prefix=redis_prefix,
        allowed_lateness_s=LATENESS_S,
        refresh_s=5.0,
        alert_probability=0.001,
        web_enabled=True,
        web_port=web_port,
        data_dir=tmp_path / "faust",
        batch_timeout_s=0.2,
        broker_rebalance_timeout_s=3,
        broker_session_timeout_s=6,
        commit_interval_s=0.5,
    )
    log_path = tmp_path / "worker.log"
    with log_path.open("wb") as log:
        worker = start_worker(settings, log)
        try:
            wait_until(lambda: _ready(web_port), bool, timeout_s=60, what="the worker's /ready")
            time.sleep(3)  # the group join
            # Minute 0: steady sales of a, b, c (at least 15 s of it before the boundary).
            start = _now_ms()
            m0 = start - start % MINUTE
            if m0 + MINUTE - start < 15_000:
                m0 += MINUTE
                _sleep_until(m0 + 200)
            m1, m2 = m0 + MINUTE, m0 + 2 * MINUTE
            while _now_ms() < m1 - 300:
                produce(kafka_bootstrap, topics["sales"], [_sale(i, 1.0) for i in "abc"])
                time.sleep(0.5)
            # Minute 1: minute 0 closes a second after its end; then b sells on, and a bursts.
            _sleep_until(m1 + 4_000)
            produce(kafka_bootstrap, topics["sales"], [_sale("b", 1.0)])
            burst_ms = _now_ms()
            produce(kafka_bootstrap, topics["sales"], [_sale("a", 400.0)])
            produce(kafka_bootstrap, topics["sales"], [_sale("b", 1.0)])
            # Nothing more: minute 1 must close by the wall clock alone.
            _sleep_until(m2 + int(LATENESS_S * 1000) + CLOSE_SLACK_MS + 1_000)
            forecasts: list[dict[str, Any]] = consume_values(
                kafka_bootstrap, topics["forecasts"], idle_timeout_s=1.0
            )
            alerts: list[dict[str, Any]] = consume_values(
                kafka_bootstrap, topics["alerts"], idle_timeout_s=1.0
            )
        finally:
            worker.terminate()
            worker.wait(timeout=60)
    context = log_path.read_text()[-3000:]

    for value in forecasts:
        contract.validate("forecasts", value)
    for value in alerts:
        contract.validate("alerts", value)

    def closes(as_of_ms: int) -> list[dict[str, Any]]:
        as_of = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(as_of_ms / 1000))
        return [v for v in forecasts if v["kind"] == "close" and v["as_of"] == as_of]

    for end in (m1, m2):  # minute 0, and minute 1 that nothing followed
        got = closes(end)
        assert {v["item_id"] for v in got} >= ({"a", "b", "c"} if end == m1 else {"a", "b"}), (
            end,
            forecasts,
            context,
        )
        late_by = max(v["emitted_at_ms"] for v in got) - end
        assert late_by <= LATENESS_S * 1000 + CLOSE_SLACK_MS, (late_by, context)

    refreshes = [v for v in forecasts if v["kind"] == "refresh"]
    assert refreshes, (forecasts, context)
    assert all(v["open_bucket"] is not None for v in refreshes)
    in_minute_1 = [
        v for v in refreshes if v["item_id"] == "b" and v["open_bucket"]["so_far"] >= 1.0
    ]
    assert in_minute_1, refreshes

    surges = [a for a in alerts if a["kind"] == "surge"]
    assert [a["item_id"] for a in surges] == ["a"], (alerts, context)
    assert surges[0]["bucket_start_ms"] == m1
    assert surges[0]["detected_at_ms"] - burst_ms <= 3_000, surges
