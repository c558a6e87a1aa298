"""The lookup API on a real worker (``python -m stream``), Tansu and the session Redis.

One worker, bound to 127.0.0.2 with a bearer token, forecasts a few items from sales on a
real topic; its web server then answers ``GET /forecasts/{item_id}`` with exactly the newest
record of that item on the forecasts topic (what the check outside the project compares), a
batch lookup with records and ``null``, and refuses what it must: an unknown item (404), too
many items (400), a missing or wrong token (401). The probes answer without the token, and
nothing listens on 127.0.0.1: the bind address is honoured.
"""

from __future__ import annotations

import contextlib
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis

from stream.settings.worker import WorkerSettings
from stream.worker.app import MAX_LOOKUP_ITEMS
from trendcast import contract
from trendcast.devtools.embedded import ensure_topics, free_port
from trendcast.devtools.up import worker_env
from trendcast.testkit.bundles import make_fake_bundle
from trendcast.testkit.kafka import consume_all, produce, wait_until

pytestmark = pytest.mark.integration

DAY = 86_400_000
T0 = 14_975 * DAY  # 2011-01-01
BIND = "127.0.0.2"  # loopback, but not the address a default client tries
TOKEN = "lookup-test-token"  # noqa: S105  (a test token)
ITEMS = ["85123A", "a b/c", "ünï"]
ROOT = Path(__file__).resolve().parents[2]


def get(port: int, path: str, token: str | None = TOKEN, host: str = BIND) -> tuple[int, Any]:
    """Status, headers and body of ``GET path`` (status 0: nothing answered)."""
    headers = {} if token is None else {"Authorization": f"Bearer {token}"}
    request = urllib.request.Request(f"http://{host}:{port}{path}", headers=headers)  # noqa: S310
    try:
        with urllib.request.urlopen(request, timeout=5) as resp:  # noqa: S310
            return resp.status, (resp.headers, resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, (exc.headers, exc.read())
    except OSError:
        return 0, (None, b"")


def item_path(item_id: str) -> str:
    return "/forecasts/" + urllib.parse.quote(item_id, safe="")


@pytest.fixture(scope="module")
def worker(
    kafka_bootstrap: str, redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[WorkerSettings]:
    tmp = tmp_path_factory.mktemp("lookup")
    suffix = uuid.uuid4().hex[:8]
    topics = {"sales": f"ls-{suffix}", "dlq": f"ld-{suffix}", "forecasts": f"lf-{suffix}"}
    ensure_topics(kafka_bootstrap, dict.fromkeys(topics.values(), 2))
    settings = WorkerSettings(
        kafka_brokers=f"kafka://{kafka_bootstrap}",
        fetch_max_wait_ms=50,  # Tansu holds fetches for the full wait
        redis_url=redis_url,
        bundle=make_fake_bundle(tmp / "bundle", window=14, horizon=7),
        sales_topic=topics["sales"],
        dlq_topic=topics["dlq"],
        forecasts_topic=topics["forecasts"],
        consumer_group=f"lookup-{suffix}",
        state_prefix=f"lookup-{suffix}",
        web_port=free_port(),
        web_bind=BIND,
        data_dir=tmp / "faust",
        batch_size=20,
        batch_timeout_s=0.2,
        broker_rebalance_timeout_s=3,
        broker_session_timeout_s=6,
        commit_interval_s=0.5,
    )
    # Days 0..5 sell (the sales of day 5 close day 4); small batches spread the closes over
    # several deliveries.
    events: list[tuple[str, Any]] = [
        (item, {"item_id": item, "ts": T0 + d * DAY + 3_600_000 * (n + 1), "quantity": d + n})
        for d in range(6)
        for n, item in enumerate(ITEMS)
    ]
    produce(kafka_bootstrap, settings.sales_topic, events)
    log_path = tmp / "worker.log"
    # worker_env writes SecretStr settings masked (as model_dump does): pass the token itself.
    env = worker_env(settings, {"web_token": TOKEN})
    with log_path.open("wb") as log:
        proc = subprocess.Popen(  # noqa: S603
            [sys.executable, "-m", "stream"],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
        )
        try:
            wait_until(
                lambda: (proc.poll(), get(settings.web_port, "/health")[0]),
                lambda r: r[0] is not None or r[1] == 200,
                timeout_s=60,
                what="the worker's web server",
            )
            assert proc.poll() is None, log_path.read_text()[-3000:]
            yield settings
        finally:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            client = redis.Redis.from_url(redis_url)
            keys = list(client.scan_iter(match=f"*{settings.state_prefix}*", count=1000))
            if keys:
                client.delete(*keys)
            client.close()


def newest_on_topic(bootstrap: str, topic: str) -> dict[str, bytes]:
    """Each item's newest forecast record on the topic: largest (as_of, emitted_at_ms)."""
    newest: dict[str, tuple[tuple[str, int], bytes]] = {}
    for record in consume_all(bootstrap, topic, idle_timeout_s=1.0):
        value = orjson.loads(record.value)
        order = (value["as_of"], value["emitted_at_ms"])
        item = record.key.decode()
        if item not in newest or newest[item][0] <= order:
            newest[item] = (order, record.value)
    return {item: raw for item, (_, raw) in newest.items()}


def test_lookup_answers_the_newest_record_of_the_topic(
    worker: WorkerSettings, kafka_bootstrap: str
) -> None:
    port = worker.web_port

    def compare() -> tuple[dict[str, bytes], dict[str, Any]]:
        on_topic = newest_on_topic(kafka_bootstrap, worker.forecasts_topic)
        served = {item: get(port, item_path(item)) for item in ITEMS}
        return on_topic, served

    def agree(kind: str) -> Any:
        def done(result: tuple[dict[str, bytes], dict[str, Any]]) -> bool:
            on_topic, served = result
            return all(
                item in on_topic
                # Day 4 (2011-01-05) closed: the sales of day 5 moved the watermark past it.
                and orjson.loads(on_topic[item])["as_of"] == "2011-01-06T00:00:00Z"
                and orjson.loads(on_topic[ITEMS[0]])["kind"] == kind
                and served[item][0] == 200
                and served[item][1][1] == on_topic[item]
                for item in ITEMS
            )

        return done

    wait_until(compare, agree("close"), timeout_s=60, what="lookups = newest on topic")
    # A late (in-grace) sale of day 4: its re-forecast has the same as_of and a later
    # emitted_at_ms, so it becomes the newest record, on the topic and in the lookup.
    late = {"item_id": ITEMS[0], "ts": T0 + 4 * DAY + 60_000, "quantity": 9}
    produce(kafka_bootstrap, worker.sales_topic, [(ITEMS[0], late)])
    on_topic, served = wait_until(compare, agree("late"), timeout_s=60, what="the late one")
    for item in ITEMS:
        headers, body = served[item][1]
        assert headers["Content-Type"].startswith("application/json")
        contract.validate("forecasts", body)

    status, (headers, body) = get(port, "/forecasts/unknown-item")
    assert status == 404 and headers["Content-Type"].startswith("application/json")
    assert "error" in orjson.loads(body)

    query = urllib.parse.urlencode({"items": ",".join([*ITEMS, "unknown-item"])})
    status, (_, body) = get(port, f"/forecasts?{query}")
    assert status == 200
    batch = orjson.loads(body)
    assert batch["unknown-item"] is None
    for item in ITEMS:
        assert on_topic[item] in body  # the record's bytes, verbatim inside the object
        contract.validate("forecasts", orjson.dumps(batch[item]))

    too_many = ",".join(f"i{n}" for n in range(MAX_LOOKUP_ITEMS + 1))
    status, (_, body) = get(port, f"/forecasts?items={too_many}")
    assert status == 400 and "at most" in orjson.loads(body)["error"]
    status, (_, body) = get(port, "/forecasts")
    assert status == 400 and "items" in orjson.loads(body)["error"]


def test_the_token_guards_lookups_only(worker: WorkerSettings) -> None:
    port = worker.web_port
    for path in (item_path(ITEMS[0]), f"/forecasts?items={ITEMS[0]}"):
        missing, (headers, body) = get(port, path, token=None)
        assert missing == 401 and headers["WWW-Authenticate"].startswith("Bearer")
        assert "error" in orjson.loads(body)
        wrong, _ = get(port, path, token=TOKEN + "x")
        assert wrong == 401
        assert get(port, path, token=TOKEN)[0] in (200, 404)  # 404 only before a forecast
    for probe in ("/health", "/ready", "/metrics"):
        assert get(port, probe, token=None)[0] == 200, probe


def test_the_web_server_listens_on_the_bind_address_only(worker: WorkerSettings) -> None:
    port = worker.web_port
    assert get(port, "/health", token=None)[0] == 200
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
