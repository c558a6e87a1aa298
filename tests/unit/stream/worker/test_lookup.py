"""The lookup endpoints through the worker's Faust views, on the in-memory store and real Redis.

Forecasts are made by the real pipeline (a fetch handed to the app, the fake model), kept by
:class:`stream.worker.runtime.LatestForecastSink` once the sink has them, and read back
through ``GET /forecasts/{item_id}`` and ``GET /forecasts?items=...`` exactly as Faust's web
server dispatches a request (its view's ``dispatch``). The Redis runs use the session Redis of
:mod:`tests.services`; the worker end to end (a real web server, a real broker) is in
``tests/integration/test_lookup_api.py``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiokafka.structs import ConsumerRecord
from faust.types import TP
from multidict import CIMultiDict, MultiDict
from pydantic import ValidationError

from stream.settings.worker import WorkerSettings
from stream.state.base import WindowStore
from stream.state.memory import MemoryWindowStore
from stream.state.redis_store import RedisWindowStore
from stream.worker.app import MAX_LOOKUP_ITEMS, create_app
from stream.worker.runtime import LatestForecastSink
from trendcast import contract
from trendcast.exceptions import StateStoreError
from trendcast.testkit.doubles import FREQ, MODEL, FakeForecaster, day_iso, sale

TOKEN = "s3cret-token"  # noqa: S105  (a test token)


class BytesSink:
    """Keeps every forecast record as the bytes sent (what the topic would hold)."""

    def __init__(self) -> None:
        self.forecasts: list[tuple[str, bytes]] = []

    async def send_forecasts(self, records: Sequence[tuple[str, bytes]]) -> None:
        self.forecasts += records

    async def send_dead_letters(self, records: Sequence[tuple[bytes | None, bytes]]) -> None:
        pass

    def newest(self, item_id: str) -> bytes:
        """The item's newest record: the largest (as_of, emitted_at_ms)."""
        mine = [orjson.loads(v) | {"_raw": v} for k, v in self.forecasts if k == item_id]
        return max(mine, key=lambda r: (r["as_of"], r["emitted_at_ms"]))["_raw"]  # type: ignore[no-any-return]


class Get:
    """The little of an aiohttp request a Faust view reads."""

    method = "GET"

    def __init__(
        self,
        match_info: dict[str, str] | None = None,
        query: list[tuple[str, str]] | None = None,
        authorization: str | None = None,
    ) -> None:
        self.match_info = match_info or {}
        self.query = MultiDict(query or [])
        self.headers = CIMultiDict(
            {} if authorization is None else {"Authorization": authorization}
        )


@pytest.fixture(params=["memory", "redis"])
def store(request: pytest.FixtureRequest) -> Iterator[WindowStore]:
    if request.param == "memory":
        yield MemoryWindowStore(FREQ)
    else:
        url = request.getfixturevalue("redis_url")
        yield RedisWindowStore.from_url(url, FREQ, request.getfixturevalue("redis_prefix"))


def _records(values: Sequence[tuple[bytes, bytes]], first_offset: int = 0) -> list[Any]:
    return [
        ConsumerRecord("sales", 0, first_offset + n, 0, 0, k, v, None, len(k), len(v), ())
        for n, (k, v) in enumerate(values)
    ]


def _run(tmp_path: Path, store: WindowStore, scenario: Any, **settings: Any) -> Any:
    """Feed sales of items a and b through a worker app, then run ``scenario(app, sink)``.

    Days 0..3 sell; the sale of day 3 closes day 2 (allowed lateness 60 s), so both items
    get a forecast as of the end of day 2. Everything runs on one loop, and the store is
    closed on it (Redis pools belong to their loop).
    """
    sink = BytesSink()
    config = WorkerSettings(web_enabled=False, data_dir=tmp_path, **settings)
    app = create_app(config, FakeForecaster(), store, MODEL, sink=sink)
    values = [(b"a", sale("a", d + 0.5, d + 1)) for d in range(3)]
    values += [(b"b", sale("b", 1.5, 4)), (b"a", sale("a", 3.5, 1))]

    async def main() -> Any:
        try:
            assert await app.trendcast_handle_fetch({TP("sales", 0): _records(values)}) is not None
            await _until_found(app, "a", TOKEN if "web_token" in settings else None)
            return await scenario(app, sink)
        finally:
            await store.aclose()

    return asyncio.run(main())


async def _page(app: Any, path: str, request: Get) -> Any:
    return await app.web.views[path].dispatch(request)


async def _until_found(app: Any, item_id: str, token: str | None) -> None:
    auth = None if token is None else f"Bearer {token}"
    for _ in range(500):
        response = await _page(app, "/forecasts/{item_id}", Get({"item_id": item_id}, None, auth))
        if response.status == 200:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"no forecast of {item_id} kept in time")


def test_a_kept_record_is_served_as_sent_and_an_unknown_item_is_404(
    tmp_path: Path, store: WindowStore
) -> None:
    async def scenario(app: Any, sink: BytesSink) -> None:
        for item in ("a", "b"):
            response = await _page(app, "/forecasts/{item_id}", Get({"item_id": item}))
            assert (response.status, response.content_type) == (200, "application/json")
            assert response.body == sink.newest(item)  # byte for byte what the topic got
            contract.validate("forecasts", response.body)
            assert orjson.loads(response.body)["as_of"] == day_iso(3)
        missing = await _page(app, "/forecasts/{item_id}", Get({"item_id": "nope"}))
        assert (missing.status, missing.content_type) == (404, "application/json")
        assert orjson.loads(missing.body) == {"error": "no forecast for item 'nope'"}

    _run(tmp_path, store, scenario)


def test_batch_lookup_answers_records_and_nulls_and_refuses_too_many(
    tmp_path: Path, store: WindowStore
) -> None:
    async def scenario(app: Any, sink: BytesSink) -> None:
        response = await _page(app, "/forecasts", Get(query=[("items", "b,nope,a,b")]))
        assert (response.status, response.content_type) == (200, "application/json")
        body = orjson.loads(response.body)
        assert list(body) == ["b", "nope", "a"]
        assert body["nope"] is None
        for item in ("a", "b"):
            assert orjson.dumps(body[item]) == orjson.dumps(orjson.loads(sink.newest(item)))
            assert sink.newest(item) in response.body  # the records' bytes, not re-encoded
            contract.validate("forecasts", orjson.dumps(body[item]))

        most = ",".join(f"i{n}" for n in range(MAX_LOOKUP_ITEMS))
        full = await _page(app, "/forecasts", Get(query=[("items", most)]))
        assert full.status == 200 and len(orjson.loads(full.body)) == MAX_LOOKUP_ITEMS
        too_many = await _page(app, "/forecasts", Get(query=[("items", most + ",one-more")]))
        assert (too_many.status, too_many.content_type) == (400, "application/json")
        assert orjson.loads(too_many.body) == {
            "error": f"expected at most {MAX_LOOKUP_ITEMS} item ids in items, got 501"
        }
        for query in ([], [("items", "")], [("items", ",,")]):
            none = await _page(app, "/forecasts", Get(query=query))
            assert none.status == 400 and "expected a query parameter items" in str(
                orjson.loads(none.body)["error"]
            )

    _run(tmp_path, store, scenario)


def test_the_lookups_need_the_token_and_the_probes_do_not(
    tmp_path: Path, store: WindowStore
) -> None:
    async def scenario(app: Any, sink: BytesSink) -> None:
        single = ("/forecasts/{item_id}", {"item_id": "a"}, [])
        batch = ("/forecasts", {}, [("items", "a")])
        for path, match, query in (single, batch):
            for auth in (None, "Bearer", "Basic czNjcmV0LXRva2Vu", f"Token {TOKEN}"):
                response = await _page(app, path, Get(match, query, auth))
                assert response.status == 401, (path, auth)
                assert response.headers["WWW-Authenticate"].startswith("Bearer")
                assert "Authorization: Bearer" in orjson.loads(response.body)["error"]
            for wrong in ("s3cret-tokem", "s3cret-token-and-more", "x", TOKEN.upper()):
                response = await _page(app, path, Get(match, query, f"Bearer {wrong}"))
                assert response.status == 401, (path, wrong)
                assert 'error="invalid_token"' in response.headers["WWW-Authenticate"]
                assert TOKEN not in response.body.decode()
            for right in (f"Bearer {TOKEN}", f"bearer {TOKEN}"):
                response = await _page(app, path, Get(match, query, right))
                assert response.status == 200, (path, right)
        assert (await _page(app, "/health", Get())).status == 200
        assert (await _page(app, "/metrics", Get())).status == 200
        assert (await _page(app, "/ready", Get())).status == 503  # no broker: but not 401

    _run(tmp_path, store, scenario, web_token=TOKEN)


def test_a_failing_store_answers_503_without_its_reason(tmp_path: Path) -> None:
    class Down(MemoryWindowStore):
        async def read_latest(self, item_ids: Sequence[str]) -> dict[str, bytes | None]:
            raise StateStoreError("Redis at redis://10.1.2.3:6379 is unavailable")

    app = create_app(
        WorkerSettings(web_enabled=False, data_dir=tmp_path),
        FakeForecaster(),
        Down(FREQ),
        MODEL,
        sink=BytesSink(),
    )

    async def scenario() -> None:
        for path, request in (
            ("/forecasts/{item_id}", Get({"item_id": "a"})),
            ("/forecasts", Get(query=[("items", "a")])),
        ):
            response = await _page(app, path, request)
            assert response.status == 503
            assert "10.1.2.3" not in response.body.decode()

    asyncio.run(scenario())


def test_the_sink_keeps_only_after_delivery_and_skips_what_it_cannot_order() -> None:
    class Failing(BytesSink):
        async def send_forecasts(self, records: Sequence[tuple[str, bytes]]) -> None:
            raise StateStoreError("not delivered")

    record = b'{"item_id":"a","as_of":"2011-01-04T00:00:00Z","emitted_at_ms":1,"kind":"close"}'

    async def scenario() -> tuple[Any, Any]:
        store = MemoryWindowStore(FREQ)
        failing = LatestForecastSink(Failing(), store, lambda: 1000)
        with pytest.raises(StateStoreError):
            await failing.send_forecasts([("a", record)])
        before = await store.read_latest(["a"])
        sink = LatestForecastSink(BytesSink(), store, lambda: 1000)
        await sink.send_forecasts([("a", record), ("b", b"{not a record")])
        return before, await store.read_latest(["a", "b"])

    before, after = asyncio.run(scenario())
    assert before == {"a": None}
    assert after == {"a": record, "b": None}


def test_settings_web_bind_and_token() -> None:
    settings = WorkerSettings()
    assert (settings.web_bind, settings.web_token) == ("0.0.0.0", None)  # noqa: S104
    local = WorkerSettings(web_bind="127.0.0.1", web_token=TOKEN)
    assert local.web_token is not None and local.web_token.get_secret_value() == TOKEN
    assert TOKEN not in repr(local)
    with pytest.raises(ValidationError, match="non-empty web_token"):
        WorkerSettings(web_token=" ")  # noqa: S106  (the empty token it refuses)


def test_the_faust_app_binds_the_configured_address(tmp_path: Path) -> None:
    settings = WorkerSettings(web_enabled=False, data_dir=tmp_path, web_bind="127.0.0.2")
    app = create_app(settings, FakeForecaster(), MemoryWindowStore(FREQ), MODEL, sink=BytesSink())
    assert app.conf.web_bind == "127.0.0.2"
