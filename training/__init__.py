"""Offline training of the global LSTM (TensorFlow/Keras; never imported by the stream).

``train(panel, TrainConfig(...))`` returns a :class:`TrainResult` that
:func:`export.export_bundle` turns into a verified ONNX bundle.
"""

from training.model import QUANTILES, LossName, build_model
from training.trainer import TrainConfig, TrainResult, train

__all__ = ["QUANTILES", "LossName", "TrainConfig", "TrainResult", "build_model", "train"]
