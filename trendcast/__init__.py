"""trendcast: streaming, real-time sales forecasting.

The ``trendcast`` package is the TensorFlow-free core shared by every deployable: the data
contract, bucketing, features, the model bundle format, ONNX inference, metrics, baselines and
the CLI. ``training`` and ``export`` (TensorFlow, tf2onnx) and ``stream`` (Faust) build on it;
dependencies point one way: training -> export -> bundle files -> stream.
"""

__all__ = ["__version__"]

__version__ = "0.1.0"
