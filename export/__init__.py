"""Export of a trained model into a verified ONNX bundle, and its INT8 variant.

``export_bundle(result, dir)`` after :func:`training.train`; ``export_from_training_dir(dir)``
re-exports from the Keras model kept in ``dir/training``; ``quantize_bundle(dir)`` adds
``model.int8.onnx`` and reports accuracy change and speed-up.
"""

import logging
import os

# Quiet TensorFlow's C++ start-up chatter; must happen before the first TensorFlow import,
# which the next import does when export is imported before training.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from export.onnx_export import (
    DEFAULT_TOLERANCE,
    check_lstm_op,
    convert_to_onnx,
    export_bundle,
    export_from_training_dir,
)
from export.quantize import QuantizeReport, quantize_bundle

# tf2onnx logs a harmless "TF freezing failed … Removed MatMul …" warning on every Keras 3
# export; real conversion problems surface as exceptions, which export turns into ModelError.
logging.getLogger("tf2onnx").setLevel(logging.ERROR)

__all__ = [
    "DEFAULT_TOLERANCE",
    "QuantizeReport",
    "check_lstm_op",
    "convert_to_onnx",
    "export_bundle",
    "export_from_training_dir",
    "quantize_bundle",
]
