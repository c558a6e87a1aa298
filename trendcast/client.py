"""A typed consumer for Python subscribers of the forecasts and alerts topics.

The topics' JSON Schemas (:mod:`trendcast.contract`) are the contract for every language;
this module is the Python convenience on top: :func:`parse_forecast` and :func:`parse_alert`
check a record value against its schema and return a frozen, typed object, and
:func:`subscribe` is an async iterator over a topic (aiokafka underneath)::

    async for record in subscribe("forecasts", "localhost:9092", group_id="replenishment"):
        forecast = record.value          # a Forecast
        print(forecast.item_id, forecast.kind, forecast.horizon[0].mean)

Records are decoded with msgspec (C speed), after the schema check, so a value that
breaks the contract raises :class:`~trendcast.exceptions.ContractError` with the field at
fault instead of surfacing later as a ``KeyError``.

>>> value = (b'{"item_id":"A","as_of":"2011-01-02T00:00:00Z","freq":"1D","horizon":'
...     b'[{"date":"2011-01-02","mean":1.5,"p10":0.0,"p50":1.0,"p90":3.0}],'
...     b'"model_version":"v1","fallback":false,"emitted_at_ms":1,"kind":"close",'
...     b'"open_bucket":null}')
>>> f = parse_forecast(value)
>>> f.item_id, f.kind, f.horizon[0].p90, f.open_bucket is None
('A', 'close', 3.0, True)
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Generic, Literal, TypeVar

import msgspec

from trendcast import contract
from trendcast.exceptions import BrokerError, ContractError

__all__ = [
    "Alert",
    "Forecast",
    "ForecastStep",
    "OpenBucket",
    "Received",
    "parse_alert",
    "parse_forecast",
    "subscribe",
]

logger = logging.getLogger(__name__)

_T = TypeVar("_T")


class ForecastStep(msgspec.Struct, frozen=True):
    """One forecast bucket: its start and the expected value with its quantiles.

    Numbers are ``None`` only where the model produced a non-finite value.
    """

    date: str
    mean: float | None
    p10: float | None
    p50: float | None
    p90: float | None


class OpenBucket(msgspec.Struct, frozen=True):
    """The bucket still open when a ``refresh`` record was made: sold so far and nowcast."""

    start: str
    so_far: float
    expected_so_far: float | None
    nowcast: float | None
    p10: float | None
    p90: float | None


class Forecast(msgspec.Struct, frozen=True):
    """A record of the forecasts topic (see ``trendcast schema forecasts``)."""

    item_id: str
    as_of: str
    freq: str
    horizon: tuple[ForecastStep, ...]
    model_version: str
    fallback: bool
    emitted_at_ms: int
    kind: Literal["close", "refresh", "late"]
    open_bucket: OpenBucket | None
    #: True when the window reached back before the first event the ``sales`` log still
    #: held when the worker rebuilt lost state from it (retention); absent in the record
    #: otherwise, hence the default.
    partial_history: bool = False


class Alert(msgspec.Struct, frozen=True):
    """A record of the alerts topic (see ``trendcast schema alerts``)."""

    kind: Literal["surge", "stall"]
    item_id: str
    freq: str
    bucket_start: str
    bucket_start_ms: int
    so_far: float
    expected_so_far: float
    expected_total: float
    p10: float
    p90: float
    nowcast: float
    probability: float
    threshold: float
    as_of: str
    model_version: str
    event_ms: int
    detected_at_ms: int


_DECODERS: dict[str, msgspec.json.Decoder[Any]] = {
    "forecasts": msgspec.json.Decoder(Forecast),
    "alerts": msgspec.json.Decoder(Alert),
}


def _parse(kind: str, value: bytes, validate: bool) -> Any:
    if validate:
        contract.validate(kind, value)
    try:
        return _DECODERS[kind].decode(value)
    except msgspec.DecodeError as exc:  # only without validate: the schema is stricter
        raise ContractError(f"{kind} record: {exc}") from exc


def parse_forecast(value: bytes, *, validate: bool = True) -> Forecast:
    """A forecasts record's value as a :class:`Forecast`.

    Args:
        value: The record value (JSON bytes).
        validate: Check it against the published schema first (ranges, patterns, no
            unknown fields); off, only the types are checked (faster).

    Raises:
        ContractError: The value breaks the contract.
    """
    result: Forecast = _parse("forecasts", value, validate)
    return result


def parse_alert(value: bytes, *, validate: bool = True) -> Alert:
    """An alerts record's value as an :class:`Alert` (see :func:`parse_forecast`)."""
    result: Alert = _parse("alerts", value, validate)
    return result


@dataclass(frozen=True, slots=True)
class Received(Generic[_T]):
    """A parsed record with where it came from."""

    topic: str
    partition: int
    offset: int
    key: str | None
    value: _T
    timestamp_ms: int


async def subscribe(
    topic: str,
    bootstrap_servers: str,
    *,
    kind: Literal["forecasts", "alerts"] | None = None,
    group_id: str | None = None,
    from_beginning: bool = False,
    on_invalid: Literal["raise", "skip"] = "raise",
    **consumer_kwargs: Any,
) -> AsyncIterator[Received[Any]]:
    """Typed records of a forecasts or alerts topic, as they arrive.

    Args:
        topic: The topic to read.
        bootstrap_servers: Kafka bootstrap, ``host:port[,host:port]``.
        kind: ``forecasts`` or ``alerts``; by default taken from the topic name (a name
            containing ``alert`` is an alerts topic).
        group_id: Consumer group (offsets committed by aiokafka's auto-commit); ``None``
            reads without a group.
        from_beginning: Start at the earliest offset when the group has none (else latest).
        on_invalid: A record that breaks the contract raises :class:`ContractError`
            (``raise``) or is logged and skipped (``skip``).
        **consumer_kwargs: Passed to :class:`aiokafka.AIOKafkaConsumer` (TLS, SASL, …).

    Yields:
        :class:`Received` records whose ``value`` is a :class:`Forecast` or :class:`Alert`.

    Raises:
        BrokerError: The broker cannot be reached.
        ContractError: An invalid record, with ``on_invalid="raise"``.
    """
    from aiokafka import AIOKafkaConsumer
    from aiokafka.errors import KafkaError

    chosen = kind or ("alerts" if "alert" in topic else "forecasts")
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=bootstrap_servers,
        group_id=group_id,
        auto_offset_reset="earliest" if from_beginning else "latest",
        **consumer_kwargs,
    )
    try:
        await consumer.start()
    except KafkaError as exc:
        await consumer.stop()
        raise BrokerError(f"cannot read {topic!r} from {bootstrap_servers}: {exc}") from exc
    try:
        async for msg in consumer:
            if msg.value is None:
                continue
            try:
                value = _parse(chosen, msg.value, True)
            except ContractError:
                if on_invalid == "raise":
                    raise
                logger.warning("skipping %s[%d]@%d: breaks the contract", *_where(msg))
                continue
            yield Received(
                msg.topic,
                msg.partition,
                msg.offset,
                None if msg.key is None else msg.key.decode("utf-8", "replace"),
                value,
                msg.timestamp,
            )
    finally:
        await consumer.stop()


def _where(msg: Any) -> tuple[str, int, int]:
    return msg.topic, msg.partition, msg.offset
