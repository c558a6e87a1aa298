"""Forecasting: the model inputs (features), the Forecaster interface, ONNX and baselines."""

from trendcast.forecasting.base import ForecastBatch, Forecaster, WindowBatch

__all__ = ["ForecastBatch", "Forecaster", "WindowBatch"]
