"""Inference for the stream: stored windows stacked into micro-batches through a Forecaster."""
