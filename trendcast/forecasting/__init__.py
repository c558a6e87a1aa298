"""Forecasters: the interface, the ONNX model and the baselines (no TensorFlow here)."""

from trendcast.forecasting.base import ForecastBatch, Forecaster, WindowBatch

__all__ = ["ForecastBatch", "Forecaster", "WindowBatch"]
