"""The one exception tree of trendcast.

Every error that trendcast raises on purpose derives from :class:`TrendcastError`, so the CLI
can turn it into one line and a non-zero exit, and library users can catch one type::

    TrendcastError
    ├── ConfigError          settings or CLI flags that make no sense together
    ├── DataError            input data: missing file, columns, timestamps, values
    ├── BundleError          model bundle missing, corrupt, checksum or shape mismatch
    ├── ModelError           training or export failed (e.g. ONNX != Keras)
    ├── ForecastError        inference could not produce a forecast
    ├── ContractError        a record breaks its topic's published schema
    └── StreamError          the stream worker and its services
        ├── BrokerError      Kafka unreachable or misbehaving
        ├── StateStoreError  Redis unreachable or misbehaving
        │   └── StateLostError  a partition's state is gone (rebuilt from the log;
        │                       defined in stream.state.base)
        └── EventError       one event is invalid (carries the dead-letter reason)

Third-party errors are wrapped with ``raise X(...) from exc`` so the cause stays visible in
logs while users see our message.
"""

from __future__ import annotations

__all__ = [
    "BrokerError",
    "BundleError",
    "ConfigError",
    "ContractError",
    "DataError",
    "EventError",
    "ForecastError",
    "ModelError",
    "StateStoreError",
    "StreamError",
    "TrendcastError",
]


class TrendcastError(Exception):
    """Root of every error trendcast raises on purpose."""


class ConfigError(TrendcastError):
    """Settings or flags are invalid or inconsistent."""


class DataError(TrendcastError):
    """Input data cannot be used (missing file, columns, bad timestamps or values)."""


class BundleError(TrendcastError):
    """A model bundle is missing, corrupt, or does not match what it claims."""


class ModelError(TrendcastError):
    """Training or export failed."""


class ForecastError(TrendcastError):
    """Inference could not produce a forecast."""


class ContractError(TrendcastError):
    """A record does not match its topic's published schema (:mod:`trendcast.contract`)."""


class StreamError(TrendcastError):
    """The stream worker or one of its services failed."""


class BrokerError(StreamError):
    """The Kafka broker is unreachable or misbehaving."""


class StateStoreError(StreamError):
    """The state store (Redis) is unreachable or misbehaving."""


class EventError(StreamError):
    """One event is invalid; ``reason`` is the short code written to the dead-letter topic."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail
