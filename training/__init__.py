"""Offline training of the global LSTM (TensorFlow/Keras; never imported by the stream).

``train(panel, TrainConfig(...))`` returns a :class:`TrainResult` that
:func:`export.export_bundle` turns into a verified ONNX bundle.
"""

import os

# TensorFlow's C++ start-up chatter (CPU feature notes, absl warnings) drowns the progress
# output; errors still show. Set before the first TensorFlow import, which the next line does.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from training.model import QUANTILES, LossName, build_model
from training.trainer import TrainConfig, TrainResult, train

__all__ = ["QUANTILES", "LossName", "TrainConfig", "TrainResult", "build_model", "train"]
