"""The start-up check of the sales topic's retention (rebuilding lost state needs it)."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from stream.worker.retention import _retention_ms, check_retention, required_retention_ms

DAY = 86_400_000


def _response(*entries: tuple[str, str | None], error: int = 0) -> SimpleNamespace:
    return SimpleNamespace(resources=[(error, None, 2, "sales", list(entries))])


def test_retention_ms_is_read_from_a_describe_configs_response() -> None:
    entries = (("cleanup.policy", "delete"), ("retention.ms", "604800000"))
    assert _retention_ms([_response(*entries)]) == 604_800_000
    assert _retention_ms([_response(("retention.ms", "-1"))]) == -1
    assert _retention_ms([_response(("cleanup.policy", "delete"))]) is None
    with pytest.raises(RuntimeError, match="error 29"):
        _retention_ms([_response(error=29)])


def test_the_required_retention_is_the_kept_buckets_plus_a_margin() -> None:
    assert required_retention_ms(31, DAY) == 34 * DAY


def test_an_unreachable_broker_is_logged_not_raised(caplog: pytest.LogCaptureFixture) -> None:
    got = asyncio.run(check_retention("kafka://127.0.0.1:1", "sales", 10 * DAY, {}))
    assert got is None
    assert "could not check the retention of topic sales" in caplog.text
