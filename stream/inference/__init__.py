"""Inference for the stream: micro-batches of stored windows through a Forecaster."""

from stream.inference.batching import (
    ForecastRequest,
    ModelInfo,
    build_batch,
    forecast,
    forecast_records,
    iso_utc,
)

__all__ = ["ForecastRequest", "ModelInfo", "build_batch", "forecast", "forecast_records", "iso_utc"]
