"""Micro-batched inference: stored windows -> :class:`WindowBatch` -> forecast records.

The worker forecasts many items at once when a bucket closes; one ``Forecaster.predict`` per
micro-batch amortises the ONNX session call (the per-call overhead dominates for small models)
while bounding memory and latency. Records follow the forecasts topic contract::

    key   item_id (UTF-8)
    value {"item_id", "as_of", "freq", "horizon": [{"date", "mean", "p10", "p50", "p90"}],
           "model_version", "fallback", "emitted_at_ms"}

``as_of`` is the end of the last closed bucket the window includes, ISO-8601 UTC; ``date`` is
each forecast bucket's start, spelled like the offline forecast table (``YYYY-MM-DD`` for
daily-or-coarser buckets).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

import numpy as np
import orjson

from stream.observers import ForecastObserver, Role, ScoredBatch
from stream.windows.base import ItemWindow
from trendcast.exceptions import ForecastError
from trendcast.forecasting.base import ForecastBatch, Forecaster, WindowBatch
from trendcast.freq import Freq

__all__ = ["ForecastRequest", "ModelInfo", "build_batch", "forecast", "forecast_records", "iso_utc"]

logger = logging.getLogger(__name__)

_DAY_MS = 86_400_000


@dataclass(frozen=True, slots=True)
class ModelInfo:
    """What the worker needs to know about the model besides the forecaster itself.

    Attributes:
        freq: Bucket frequency the model was trained on.
        window: Input buckets per window.
        horizon: Forecast buckets.
        model_version: Written into every forecast record.
        uses_prices: Whether windows must carry prices (the model has a price feature);
            otherwise the store skips price sums and items stay smaller.
    """

    freq: Freq
    window: int
    horizon: int
    model_version: str
    uses_prices: bool = False


@dataclass(frozen=True, slots=True)
class ForecastRequest:
    """Forecast ``item_id`` from its window ending with the bucket starting ``last_start_ms``."""

    item_id: str
    last_start_ms: int


def iso_utc(ms: int, *, date_only: bool = False) -> str:
    """Epoch ms as ISO-8601 UTC.

    >>> iso_utc(86_400_000), iso_utc(86_400_000, date_only=True)
    ('1970-01-02T00:00:00Z', '1970-01-02')
    """
    moment = datetime.fromtimestamp(ms / 1000, tz=UTC)
    return moment.strftime("%Y-%m-%d") if date_only else moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def build_batch(
    requests: Sequence[ForecastRequest], windows: Mapping[str, ItemWindow], model: ModelInfo
) -> WindowBatch:
    """Assemble the model input for ``requests`` from the items' stored windows."""
    n = len(requests)
    quantities = np.zeros((n, model.window), dtype=np.float32)
    prices = np.full((n, model.window), np.nan, dtype=np.float32) if model.uses_prices else None
    history = np.zeros(n, dtype=np.int64)
    for row, req in enumerate(requests):
        stored = windows.get(req.item_id) or ItemWindow(req.item_id, None, {})
        q, p, h = stored.window(
            req.last_start_ms, model.window, model.freq, with_prices=prices is not None
        )
        quantities[row], history[row] = q, h
        if prices is not None and p is not None:
            prices[row] = p
    return WindowBatch(
        item_ids=[r.item_id for r in requests],
        quantities=quantities,
        prices=prices,
        last_start_ms=np.array([r.last_start_ms for r in requests], dtype=np.int64),
        history_len=history,
    )


def _check(result: ForecastBatch, n: int, horizon: int) -> None:
    for name in ("mean", "p10", "p50", "p90"):
        shape = getattr(result, name).shape
        if shape != (n, horizon):
            raise ForecastError(
                f"expected forecaster {name} of shape ({n}, {horizon}), got {shape}"
            )
    if result.fallback.shape != (n,):
        raise ForecastError(f"expected fallback of shape ({n},), got {result.fallback.shape}")


def forecast_records(
    batch: WindowBatch, result: ForecastBatch, model: ModelInfo, emitted_at_ms: int
) -> list[tuple[str, bytes]]:
    """One ``(key, JSON value)`` per item of the batch.

    Values are rounded to 4 decimals like the offline forecast table, which also keeps
    float32 noise (``0.10000000149011612``) out of the records.

    A bucket close forecasts thousands of items at once, and building 28 dicts per record
    for orjson was the largest cost of a close. Records are therefore written from one
    ``%``-template per forecast date range (one C-level format per record) filled with the
    numbers as orjson writes them for the whole array at once; rows with a non-finite value
    take the dict + orjson path, which writes ``null`` for them. Both give the same JSON.
    """
    n, horizon = len(batch), model.horizon
    if n == 0:
        return []
    stacked = np.stack([result.mean, result.p10, result.p50, result.p90], axis=-1)
    values = np.round(stacked.astype(np.float64), 4).reshape(n, horizon * 4)
    finite: list[bool] = np.isfinite(values).all(axis=1).astype(bool).tolist()
    step = model.freq.step_ms
    date_only = step % _DAY_MS == 0
    version = orjson.dumps(model.model_version).decode()
    templates: dict[int, str] = {}
    # orjson formats floats far faster than str(): format the whole array once, then cut
    # it into rows and numbers with C-level splits.
    text_rows = orjson.dumps(values, option=orjson.OPT_SERIALIZE_NUMPY).decode()[2:-2]
    rows = [r.split(",") for r in text_rows.split("],[")]
    fallback = result.fallback.tolist()
    out: list[tuple[str, bytes]] = []
    slow: list[int] = []
    for row, item_id in enumerate(batch.item_ids):
        if not finite[row]:
            slow.append(row)
            out.append((item_id, b""))
            continue
        last = int(batch.last_start_ms[row])
        template = templates.get(last)
        if template is None:
            # %-templates on purpose: JSON braces would all need escaping in str.format.
            steps = ",".join(
                '{"date":"%s","mean":%%s,"p10":%%s,"p50":%%s,"p90":%%s}'  # noqa: UP031
                % iso_utc(last + (h + 1) * step, date_only=date_only)
                for h in range(horizon)
            )
            template = templates[last] = (
                '{"item_id":%%s,"as_of":"%s","freq":"%s","horizon":[%s],'  # noqa: UP031
                '"model_version":%s,"fallback":%%s,"emitted_at_ms":%d}'
                % (iso_utc(last + step), model.freq.name, steps, version, emitted_at_ms)
            )
        text = template % (
            orjson.dumps(item_id).decode(),
            *rows[row],
            "true" if fallback[row] else "false",
        )
        out.append((item_id, text.encode()))
    for row in slow:
        one = np.array([row], dtype=np.int64)
        out[row] = _records_slow(batch.take(one), result.take(one), model, emitted_at_ms)[0]
    return out


def _records_slow(
    batch: WindowBatch, result: ForecastBatch, model: ModelInfo, emitted_at_ms: int
) -> list[tuple[str, bytes]]:
    """:func:`forecast_records` built with dicts and orjson (rows with non-finite values)."""
    step = model.freq.step_ms
    date_only = step % _DAY_MS == 0
    columns = [
        np.round(a.astype(np.float64), 4).tolist()
        for a in (result.mean, result.p10, result.p50, result.p90)
    ]
    dates: dict[int, list[str]] = {}  # most rows of a batch share their last bucket
    out: list[tuple[str, bytes]] = []
    for row, item_id in enumerate(batch.item_ids):
        last = int(batch.last_start_ms[row])
        if last not in dates:
            dates[last] = [
                iso_utc(last + (h + 1) * step, date_only=date_only) for h in range(model.horizon)
            ]
        horizon = [
            {"date": d, "mean": m, "p10": lo, "p50": mid, "p90": hi}
            for d, m, lo, mid, hi in zip(dates[last], *(c[row] for c in columns), strict=True)
        ]
        value = {
            "item_id": item_id,
            "as_of": iso_utc(last + step),
            "freq": model.freq.name,
            "horizon": horizon,
            "model_version": model.model_version,
            "fallback": bool(result.fallback[row]),
            "emitted_at_ms": emitted_at_ms,
        }
        out.append((item_id, orjson.dumps(value)))
    return out


async def forecast(
    forecaster: Forecaster,
    requests: Sequence[ForecastRequest],
    windows: Mapping[str, ItemWindow],
    model: ModelInfo,
    batch_size: int,
    *,
    observers: Sequence[ForecastObserver] = (),
    role: Role = "live",
    emit: bool = True,
) -> list[tuple[str, bytes]]:
    """Forecast every request, ``batch_size`` windows per ``predict`` call.

    ``predict`` runs in a thread so that a large batch does not stall the event loop (the
    Kafka consumer's heartbeats and fetches keep going while ONNX computes). Every result is
    shown to ``observers`` (online accuracy, trends) on the event loop; an observer that
    fails is logged and never fails the forecast.

    Args:
        forecaster: The model.
        requests: Who to forecast as of which bucket.
        windows: The stored windows of the requested items.
        model: Window, horizon, freq and version of ``forecaster``.
        batch_size: Windows per ``predict`` call.
        observers: Shown every scored micro-batch.
        role: ``live`` (emitted) or ``shadow`` (scored only).
        emit: Build forecast records (False for a shadow model: nothing is returned).

    Raises:
        ForecastError: The forecaster failed or returned wrongly shaped arrays.
    """
    records: list[tuple[str, bytes]] = []
    for start in range(0, len(requests), batch_size):
        chunk = requests[start : start + batch_size]
        batch = build_batch(chunk, windows, model)
        try:
            result = await asyncio.to_thread(forecaster.predict, batch)
        except ForecastError:
            raise
        except Exception as exc:  # a model bug must surface as ours, with the cause kept
            raise ForecastError(f"{forecaster.name} failed on {len(chunk)} windows: {exc}") from exc
        _check(result, len(chunk), model.horizon)
        if observers:
            scored = ScoredBatch(model, role, batch, result)
            for observer in observers:
                try:
                    observer.on_forecasts(scored)
                except Exception:  # scoring is a side show: it must not stop forecasts
                    logger.exception("forecast observer %r failed", observer)
        if emit:
            records += forecast_records(batch, result, model, int(time.time() * 1000))
    return records
