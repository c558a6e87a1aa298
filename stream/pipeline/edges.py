"""What the processor reads, where it writes and what it reports: its types at the worker's edge.

Why a module of their own: every part of the processor (:mod:`~stream.pipeline.ingest`,
:mod:`~stream.pipeline.staging`, the facade :mod:`~stream.pipeline.processor`) speaks of records,
sinks and batch stats, and none of those parts may import the facade that wires them (a cycle).
The facade re-exports them, so ``from stream.pipeline.processor import Record, Sink`` stays the
way the worker and the tests name them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from stream.pipeline.events import SaleEvent
from stream.state.base import PartitionId

__all__ = ["PROCESSOR_LOGGER", "BatchStats", "OnLate", "RawMessage", "Record", "Sink"]

logger = logging.getLogger(__name__)

#: The logger every part of the processor writes its batch log lines to (dead letters, forecasts
#: sent again, batch summaries, observer and shadow failures): one name for operators to filter
#: on and for the JSON logs' ``logger`` field, as when the processor was one module.
PROCESSOR_LOGGER = "stream.pipeline.processor"


class Record(Protocol):
    """What the processor reads of one Kafka record of a known partition.

    aiokafka's ``ConsumerRecord`` has exactly these attributes, so the worker's fast path
    (:mod:`stream.worker.batch_consumer`) hands fetched records over as they are, without building a
    Python object per event; tests use :class:`RawMessage`.
    """

    @property
    def offset(self) -> int: ...  # noqa: D102

    @property
    def key(self) -> bytes | None: ...  # noqa: D102

    @property
    def value(self) -> bytes | None: ...  # noqa: D102

    @property
    def timestamp(self) -> int | None:  # noqa: D102
        """Broker or producer timestamp, epoch ms."""
        ...


@dataclass(frozen=True, slots=True)
class RawMessage:
    """A Kafka record as the processor needs it (decoupled from Faust's types)."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    timestamp_ms: int | None = None

    @property
    def source(self) -> PartitionId:
        """The partition the record came from."""
        return PartitionId(self.topic, self.partition)

    @property
    def timestamp(self) -> int | None:
        """:class:`Record`'s name for ``timestamp_ms``."""
        return self.timestamp_ms


class Sink(Protocol):
    """Where the processor's output goes; each call returns once the broker has it."""

    async def send_forecasts(self, records: Sequence[tuple[str, bytes]]) -> None:
        """Send ``(item_id, JSON value)`` records to the forecasts topic."""
        ...

    async def send_dead_letters(self, records: Sequence[tuple[bytes | None, bytes]]) -> None:
        """Send ``(original key, JSON value)`` records to the dead-letter topic."""
        ...

    async def send_alerts(self, records: Sequence[tuple[str, bytes]]) -> None:
        """Send ``(item_id, JSON value)`` surge and stall alerts to the alerts topic."""
        ...


@dataclass
class BatchStats:
    """What one batch did (for logs and tests)."""

    valid: int = 0
    invalid: int = 0
    late: int = 0
    duplicates: int = 0
    redelivered: int = 0
    forecasts: int = 0
    reforecasts: int = 0
    #: Forecasts of open buckets (``refresh`` records), and alerts sent.
    refreshes: int = 0
    alerts: int = 0
    #: Closed buckets not forecast because a newer one of the same batch was (catch-up
    #: ``latest``).
    skipped_buckets: int = 0
    closed_buckets: dict[PartitionId, list[int]] = field(default_factory=dict)
    #: Wall seconds of the batch's steps (ingest, apply, read, forecast, send), for logs.
    timings: dict[str, float] = field(default_factory=dict)


#: Called for each late event with the event, its message and how far behind it was (ms).
OnLate = Callable[[SaleEvent, RawMessage, int], None]
