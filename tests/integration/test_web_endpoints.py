"""The worker's web endpoints on a real worker (``python -m stream``, Tansu, its own Redis).

One worker run with JSON logs: ``/metrics`` serves every named metric once a few events went
through, ``/health`` answers 200, ``/ready`` 200 — then 503 naming Redis while its Redis is
killed, and 200 again once Redis is back. Every line the worker wrote must be one JSON
object.
"""

from __future__ import annotations

import contextlib
import signal
import subprocess
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from typing import Any

import orjson
import pytest

from stream.settings.worker import WorkerSettings
from trendcast.devtools.embedded import RedisServer, ensure_topics, free_port
from trendcast.testkit.bundles import make_fake_bundle
from trendcast.testkit.kafka import produce, wait_until
from trendcast.testkit.processes import start_worker

pytestmark = pytest.mark.integration

DAY = 86_400_000
T0 = 14_975 * DAY  # 2011-01-01

NAMED_METRICS = (
    "trendcast_events_in_total",
    "trendcast_events_total",
    "trendcast_dead_letters_total",
    "trendcast_late_by_ms",
    "trendcast_forecasts_total",
    "trendcast_predictions_total",
    "trendcast_batch_size",
    "trendcast_batch_seconds",
    "trendcast_inference_seconds",
    "trendcast_redis_seconds",
    "trendcast_consumer_lag",
    "trendcast_watermark_ms",
    "trendcast_model_info",
)


def get(port: int, path: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as resp:  # noqa: S310
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
    except OSError:
        return 0, b""  # not listening yet


@pytest.fixture(scope="module")
def worker(kafka_bootstrap: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    tmp = tmp_path_factory.mktemp("web")
    suffix = uuid.uuid4().hex[:8]
    topics = {"sales": f"ws-{suffix}", "dlq": f"wd-{suffix}", "forecasts": f"wf-{suffix}"}
    ensure_topics(kafka_bootstrap, {topics["sales"]: 1, topics["dlq"]: 1, topics["forecasts"]: 1})
    redis_server = RedisServer(data_dir=tmp / "redis", appendonly=True).start()
    settings = WorkerSettings(
        kafka_brokers=f"kafka://{kafka_bootstrap}",
        fetch_max_wait_ms=50,  # Tansu holds fetches for the full wait
        redis_url=redis_server.url,
        bundle=make_fake_bundle(tmp / "bundle", window=14, horizon=7),
        sales_topic=topics["sales"],
        dlq_topic=topics["dlq"],
        forecasts_topic=topics["forecasts"],
        consumer_group=f"web-{suffix}",
        state_prefix=f"web-{suffix}",
        web_port=free_port(),
        data_dir=tmp / "faust",
        batch_size=50,
        batch_timeout_s=0.2,
        broker_rebalance_timeout_s=3,
        broker_session_timeout_s=6,
        commit_interval_s=0.5,
        log_format="json",
        ready_timeout_s=1.0,
    )
    events: list[tuple[str, Any]] = [
        ("a", {"item_id": "a", "ts": T0 + d * DAY + 3_600_000, "quantity": d + 1}) for d in range(5)
    ]
    events.append(("bad", b"{not json"))
    produce(kafka_bootstrap, settings.sales_topic, events)
    log_path = tmp / "worker.log"
    log = log_path.open("wb")
    proc = start_worker(settings, log)
    try:
        yield settings, redis_server, proc, log_path
    finally:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
        redis_server.stop()


def test_endpoints(worker: Any) -> None:
    settings, redis_server, proc, log_path = worker
    port = settings.web_port

    def ready() -> tuple[int, bytes]:
        assert proc.poll() is None, log_path.read_text()[-3000:]
        return get(port, "/ready")

    status, body = wait_until(ready, lambda r: r[0] == 200, timeout_s=40, what="/ready 200")
    checks = orjson.loads(body)["checks"]
    assert checks["redis"]["ok"] and checks["broker"]["ok"]
    assert checks["bundle"]["model_version"].startswith("test-")

    assert get(port, "/health")[0] == 200

    # Four closed days -> forecasts -> every histogram has observations.
    _, metrics = wait_until(
        lambda: get(port, "/metrics"),
        lambda r: (
            b"trendcast_inference_seconds_count 0.0" not in r[1]
            and b"trendcast_inference_seconds_count" in r[1]
            and b"trendcast_consumer_lag{" in r[1]
        ),
        timeout_s=30,
        what="forecasts and lag in /metrics",
    )
    text = metrics.decode()
    for name in NAMED_METRICS:
        assert f"# TYPE {name}" in text, name
    assert 'trendcast_dead_letters_total{reason="not_json"} 1.0' in text
    assert "trendcast_events_in_total 6.0" in text
    assert f'trendcast_consumer_lag{{partition="0",topic="{settings.sales_topic}"}}' in text
    assert f'trendcast_watermark_ms{{partition="0",topic="{settings.sales_topic}"}}' in text
    assert 'trendcast_redis_seconds_count{operation="apply"}' in text
    assert "trendcast_model_info{" in text and 'version="test-' in text

    # Redis gone: not ready, and the body says which dependency.
    redis_server.kill()
    status, body = wait_until(ready, lambda r: r[0] == 503, timeout_s=15, what="/ready 503")
    report = orjson.loads(body)
    assert report["ready"] is False
    assert report["checks"]["redis"]["ok"] is False
    assert report["checks"]["broker"]["ok"] is True

    redis_server.restart()
    wait_until(ready, lambda r: r[0] == 200, timeout_s=20, what="/ready 200 after Redis is back")


def test_logs_are_json_lines(worker: Any) -> None:
    settings, _, proc, log_path = worker
    lines = [line for line in log_path.read_text().splitlines() if line.strip()]
    assert lines, "the worker logged nothing"
    bad = []
    for line in lines:
        try:
            record = orjson.loads(line)
        except orjson.JSONDecodeError:
            bad.append(line)
            continue
        assert {"ts", "level", "logger", "message"} <= record.keys()
    assert not bad, bad[:5]
    dead = [orjson.loads(line) for line in lines if "dead-lettering" in line]
    assert dead and dead[0]["topic"] == settings.sales_topic and dead[0]["offset"] == 5
