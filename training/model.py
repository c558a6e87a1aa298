"""The global LSTM: one network for every item, on scaled windows.

Inputs are ``[window, n_features]`` windows from
:func:`trendcast.forecasting.features.build_inputs`; outputs are in scaled units
(quantity / item scale):

* ``mean`` ``[horizon]``: the expected value, non-negative by construction (softplus terms
  only), trained with a Poisson (default), Tweedie or squared-error loss. Poisson and
  Tweedie suit intermittent retail demand (many zeros, occasional large orders) far better
  than squared error, which chases the spikes.
* ``quantiles`` ``[horizon, 3]``: p10, p50, p90 trained with the pinball loss. Monotone by
  construction: p10 = p50 - softplus(a), p90 = p50 + softplus(b), so quantiles never cross.
  p10 and p50 may go below zero; inference clips at zero. Each offset then passes through a
  frozen diagonal layer (``p10_offset_cal``, ``p90_offset_cal``), identity during training;
  the trainer sets per-step factors afterwards (:func:`calibrate_band`) so the band holds
  about 84% of the validation actuals (:mod:`training.calibration`).

With ``level_skip`` (default) the mean and p50 heads are ``base + w7 * level7 + w28 * level28``
where the levels are the window's mean scaled quantity over its last 7 and 28 buckets and the
weights are non-negative functions of the LSTM state: the network starts from the strong
"recent mean" forecast and learns corrections (measured: better validation RMSSE and WAPE than
the same LSTM without it).

Both the mean and the p50 pass through a frozen combination with level28,
``w * network + (1 - w) * level28``, identity (``w = 1``) during training; the trainer sets ``w``
afterwards (:func:`set_blend`), so the exported model carries the forecast combination.

Only standard Keras layers are used, so ``model.keras`` loads without custom objects or
``safe_mode=False``, and tf2onnx maps the recurrent part onto one ONNX ``LSTM`` op
(``recurrent_dropout`` stays 0 for that reason).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any, Literal, get_args

import keras
from keras import ops

from trendcast.exceptions import ConfigError

__all__ = [
    "QUANTILES",
    "LossName",
    "build_model",
    "calibrate_band",
    "calibrate_mean",
    "mean_calibration",
    "mean_loss",
    "pinball_loss",
    "set_blend",
]

logger = logging.getLogger(__name__)

LossName = Literal["poisson", "mse", "tweedie"]
QUANTILES = (0.1, 0.5, 0.9)
_EPS = 1e-6

LossFn = Callable[[Any, Any], Any]


def mean_loss(name: str, *, tweedie_power: float = 1.5) -> LossFn:
    """Loss of the ``mean`` output.

    Raises:
        ConfigError: Unknown loss name.
    """
    if name == "poisson":

        def poisson(y_true: Any, y_pred: Any) -> Any:
            y_pred = ops.maximum(y_pred, _EPS)
            return ops.mean(y_pred - y_true * ops.log(y_pred), axis=-1)

        return poisson
    if name == "mse":

        def mse(y_true: Any, y_pred: Any) -> Any:
            return ops.mean(ops.square(y_true - y_pred), axis=-1)

        return mse
    if name == "tweedie":
        p = tweedie_power

        def tweedie(y_true: Any, y_pred: Any) -> Any:
            # Negative Tweedie log-likelihood (up to terms without y_pred), 1 < p < 2.
            mu = ops.maximum(y_pred, _EPS)
            a = -y_true * ops.power(mu, 1.0 - p) / (1.0 - p)
            b = ops.power(mu, 2.0 - p) / (2.0 - p)
            return ops.mean(a + b, axis=-1)

        return tweedie
    raise ConfigError(f"expected loss in {list(get_args(LossName))}, got {name!r}")


def pinball_loss(quantiles: Sequence[float] = QUANTILES) -> LossFn:
    """Mean pinball loss over horizon and quantiles; ``y_true`` is ``[n, horizon, 1]``."""
    levels = ops.convert_to_tensor(list(quantiles), dtype="float32")

    def pinball(y_true: Any, y_pred: Any) -> Any:
        diff = y_true - y_pred
        loss = ops.maximum(levels * diff, (levels - 1.0) * diff)
        return ops.mean(loss, axis=(-2, -1))

    return pinball


LEVEL_SPANS = (7, 28)


def _recent_levels(x: Any, window: int, n_features: int) -> list[Any]:
    """``[n, 1]`` means of feature 0 (scaled quantity) over the last 7 and 28 buckets.

    Each is a frozen Dense over the flattened window with fixed averaging weights: a standard
    layer, so the model saves, loads and converts (one MatMul in ONNX) without custom code.
    """
    import numpy as np

    flat = keras.layers.Flatten(name="flat_window")(x)
    levels = []
    for span in LEVEL_SPANS:
        used = min(span, window)
        weights = np.zeros((window * n_features, 1), dtype=np.float32)
        weights[np.arange(window - used, window) * n_features, 0] = 1.0 / used
        layer = keras.layers.Dense(1, use_bias=False, trainable=False, name=f"level{span}")
        levels.append(layer(flat))
        layer.set_weights([weights])
    return levels


#: Buckets of the seasonal level: eight whole weeks, so every weekday counts alike.
SEASONAL_SPAN = 56
#: A bucket counts in the seasonal level up to this many times the eight weeks' mean: one
#: wholesale order of a hundred times the usual would otherwise set the level for weeks.
ROBUST_CAP = 3.0
#: Sharpness of the frozen weekday one-hot: relu(1 - 2k + 2k cos(angle to weekday d)) is 1 on
#: weekday d and 0 on every other (their cosine is at most cos(2 pi / 7) = 0.62).
_ONEHOT_K = 2.0


def _seasonal_level(
    x: Any,
    window: int,
    n_features: int,
    horizon: int,
    weekday_columns: tuple[int, int],
    weekday_factors: Sequence[float],
) -> Any:
    """``[n, horizon]``: the item's robust recent level times the weekday factor of each step.

    ``level56 * g[weekday of step h]``, where level56 is the window's mean scaled quantity
    over its last eight weeks, each bucket capped at :data:`ROBUST_CAP` times that mean, and
    ``g`` the catalogue's weekday shares (mean 1) learned from the training data. Measured on
    the UCI backtest (5 weekly origins, RMSSE): flat 28-day mean 0.437, eight weeks' mean
    times ``g`` 0.428 (a flat level forecasts every Saturday, when the shop is closed, at a
    seventh of the week), capped as here 0.420 (a one-off wholesale order no longer lifts the
    next four weeks).

    Made of standard frozen layers, so the model saves, loads and converts without custom
    code: the weekday of step ``h`` is that of the window bucket ``window - 7 + h % 7``, read
    from its ``dow_sin``/``dow_cos`` features by a Dense + ReLU one-hot (the seven weekdays are
    seven points on the unit circle, and ``sin a sin d + cos a cos d = cos(a - d)``), turned
    into ``g`` by a Dense, spread over the horizon by a 0/1 Dense, times level56 (Dense,
    Minimum and Dense over the last eight weeks' scaled quantities).
    """
    import numpy as np

    layers = keras.layers
    sin_col, cos_col = weekday_columns
    last_week = layers.Cropping1D((window - 7, 0), name="last_week")(x)
    onehot_layer = layers.Dense(7, activation="relu", trainable=False, name="weekday_onehot")
    onehot = onehot_layer(last_week)
    angles = 2.0 * np.pi * np.arange(7) / 7.0
    kernel = np.zeros((n_features, 7), dtype=np.float32)
    kernel[sin_col] = 2.0 * _ONEHOT_K * np.sin(angles)
    kernel[cos_col] = 2.0 * _ONEHOT_K * np.cos(angles)
    onehot_layer.set_weights([kernel, np.full(7, 1.0 - 2.0 * _ONEHOT_K, dtype=np.float32)])
    factor_layer = layers.Dense(1, use_bias=False, trainable=False, name="weekday_factor")
    factor = layers.Flatten(name="weekday_factor_flat")(factor_layer(onehot))
    factor_layer.set_weights([np.asarray(weekday_factors, dtype=np.float32).reshape(7, 1)])
    spread_layer = layers.Dense(horizon, use_bias=False, trainable=False, name="step_factor")
    per_step = spread_layer(factor)
    spread = np.zeros((7, horizon), dtype=np.float32)
    spread[np.arange(horizon) % 7, np.arange(horizon)] = 1.0
    spread_layer.set_weights([spread])
    flat = layers.Flatten(name="flat_window_seasonal")(x)
    used = min(SEASONAL_SPAN, window)
    weights = np.zeros((window * n_features, used), dtype=np.float32)
    weights[np.arange(window - used, window) * n_features, np.arange(used)] = 1.0
    recent_layer = layers.Dense(used, use_bias=False, trainable=False, name="recent_sales")
    recent = recent_layer(flat)  # [n, used]: the scaled quantities of the last eight weeks
    recent_layer.set_weights([weights])
    mean_layer = layers.Dense(1, use_bias=False, trainable=False, name=f"level{SEASONAL_SPAN}")
    cap_layer = layers.Dense(1, use_bias=False, trainable=False, name=f"level{SEASONAL_SPAN}_cap")
    cap = cap_layer(recent)
    capped = layers.Minimum(name="recent_sales_capped")([recent, cap])
    level = mean_layer(capped)
    cap_layer.set_weights([np.full((used, 1), ROBUST_CAP / used, dtype=np.float32)])
    mean_layer.set_weights([np.full((used, 1), 1.0 / used, dtype=np.float32)])
    return layers.Multiply(name="seasonal_level")([per_step, level])


def _head(
    h: Any,
    levels: list[Any] | None,
    horizon: int,
    name: str,
    base_activation: str | None,
    seasonal: Any = None,
) -> Any:
    """``base(h) + sum_k softplus(w_k(h)) * level_k``: a learned correction of recent levels
    (and of the seasonal level, per step, when given)."""
    layers = keras.layers
    if levels is None:
        return layers.Dense(horizon, activation=base_activation, name=name)(h)
    terms = [layers.Dense(horizon, activation=base_activation, name=f"{name}_base")(h)]
    for span, level in zip(LEVEL_SPANS, levels, strict=True):
        weight = layers.Dense(horizon, activation="softplus", name=f"{name}_w{span}")(h)
        terms.append(layers.Multiply(name=f"{name}_x{span}")([weight, level]))
    if seasonal is not None:
        weight = layers.Dense(horizon, activation="softplus", name=f"{name}_wseasonal")(h)
        terms.append(layers.Multiply(name=f"{name}_xseasonal")([weight, seasonal]))
    return layers.Add(name=name)(terms)


def _frozen(units: int, name: str, *, identity: bool = True) -> Any:
    """A frozen bias-free Dense: identity (or zeros) until set after training.

    The model's after-training parts (blends, calibrations) are such layers, so the final
    model saves, loads and converts like the rest (one MatMul each in ONNX, no custom object).
    """
    initializer = keras.initializers.Identity() if identity else keras.initializers.Zeros()
    return keras.layers.Dense(
        units, use_bias=False, trainable=False, kernel_initializer=initializer, name=name
    )


def _blend(model_out: Any, level: Any, horizon: int, name: str) -> Any:
    """``w * model_out + (1 - w) * level`` with frozen weights, identity (w = 1) until
    :func:`set_blend` sets ``w`` after training: a forecast combination with the recent-mean
    forecast, in-graph so the exported model carries it (two MatMuls and an Add in ONNX)."""
    own = _frozen(horizon, f"{name}_own")(model_out)
    lvl = _frozen(horizon, f"{name}_level", identity=False)(level)
    return keras.layers.Add(name=name)([own, lvl])


def set_blend(model: keras.Model, name: str, weight: float) -> None:
    """Set the combination ``name`` (``mean_blend`` or ``p50``) to ``weight * model + (1 -
    weight) * level``, the level being level28 (``[n, 1]``) or the seasonal level (``[n,
    horizon]``, step by step)."""
    import numpy as np

    own = model.get_layer(f"{name}_own")
    horizon = int(own.units)
    own.set_weights([np.eye(horizon, dtype=np.float32) * np.float32(weight)])
    level = model.get_layer(f"{name}_level")
    rows = int(level.get_weights()[0].shape[0])
    kernel = (
        np.eye(horizon, dtype=np.float32)
        if rows == horizon
        else np.ones((1, horizon), dtype=np.float32)
    )
    level.set_weights([kernel * np.float32(1.0 - weight)])


def _band_calibration(offset: Any, horizon: int, name: str) -> Any:
    """Frozen diagonal Dense ``{name}_offset_cal`` on a quantile offset, identity until
    :func:`calibrate_band` sets its per-step factors (one MatMul in ONNX, no custom object)."""
    return _frozen(horizon, f"{name}_offset_cal")(offset)


def build_model(
    *,
    window: int,
    n_features: int,
    horizon: int,
    units: int = 64,
    dropout: float = 0.2,
    loss: str = "poisson",
    learning_rate: float = 1e-3,
    quantile_weight: float = 1.0,
    tweedie_power: float = 1.5,
    level_skip: bool = True,
    weekday_columns: tuple[int, int] | None = None,
    weekday_factors: Sequence[float] | None = None,
) -> keras.Model:
    """Build and compile the LSTM.

    Args:
        window: Input buckets.
        n_features: Features per bucket.
        horizon: Buckets forecast.
        units: LSTM and hidden layer width.
        dropout: Dropout on LSTM inputs and on the hidden layer (regularises a small data set).
        loss: ``poisson``, ``mse`` or ``tweedie`` for the mean.
        learning_rate: Adam learning rate.
        quantile_weight: Weight of the pinball loss relative to the mean loss.
        tweedie_power: Variance power of the Tweedie loss.
        level_skip: Add the window's recent levels (mean scaled quantity of the last 7 and 28
            buckets, read from feature 0) to the heads, each times a learned non-negative
            per-step weight. The recurrent state then only has to learn corrections to
            "sell what you sold lately", which intermittent series otherwise teach slowly.

    Raises:
        ConfigError: Invalid sizes or loss.
    """
    if min(window, n_features, horizon, units) <= 0:
        raise ConfigError(
            "expected positive window, features, horizon and units, got "
            f"{window}, {n_features}, {horizon}, {units}"
        )
    if not 0.0 <= dropout < 1.0:
        raise ConfigError(f"expected 0 <= dropout < 1, got {dropout}")
    if weekday_factors is not None and len(weekday_factors) != 7:
        raise ConfigError(f"expected 7 weekday factors, got {len(weekday_factors)}")
    mean_fn = mean_loss(loss, tweedie_power=tweedie_power)
    layers = keras.layers
    x = keras.Input(shape=(window, n_features), name="x")
    h = layers.LSTM(units, dropout=dropout, recurrent_dropout=0.0, name="lstm")(x)
    h = layers.Dropout(dropout, name="dropout")(h)
    h = layers.Dense(units, activation="relu", name="hidden")(h)
    recent = _recent_levels(x, window, n_features)
    levels = recent if level_skip else None
    level28 = recent[-1]
    seasonal = None
    if level_skip and weekday_columns is not None and weekday_factors is not None and window >= 7:
        seasonal = _seasonal_level(x, window, n_features, horizon, weekday_columns, weekday_factors)
    raw_mean = _head(h, levels, horizon, "raw_mean", "softplus", seasonal=seasonal)
    raw_mean = _blend(raw_mean, level28 if seasonal is None else seasonal, horizon, "mean_blend")
    # Frozen diagonal calibration, identity until :func:`calibrate_mean` sets it (a standard
    # layer, so the calibrated model saves, loads and converts like the rest: one MatMul).
    mean = _frozen(horizon, "mean")(raw_mean)
    # Linear base, not softplus: most scaled targets are 0, and a softplus median pushed
    # towards 0 early in training saturates (zero gradient) and never recovers. Inference
    # clips at 0.
    # The median gets the seasonal level as a learned term too (its blend stays with level28,
    # at weight 1 by default): on smooth series the median is near the mean.
    p50 = _blend(
        _head(h, levels, horizon, "p50_raw", None, seasonal=seasonal), level28, horizon, "p50"
    )
    down = _band_calibration(
        layers.Dense(horizon, activation="softplus", name="p10_offset")(h), horizon, "p10"
    )
    up = _band_calibration(
        layers.Dense(horizon, activation="softplus", name="p90_offset")(h), horizon, "p90"
    )
    p10 = layers.Subtract(name="p10")([p50, down])
    p90 = layers.Add(name="p90")([p50, up])
    columns = [
        layers.Reshape((horizon, 1), name=f"{n}_col")(t)
        for n, t in (("p10", p10), ("p50", p50), ("p90", p90))
    ]
    quantiles = layers.Concatenate(axis=-1, name="quantiles")(columns)
    model = keras.Model(
        inputs=x, outputs={"mean": mean, "quantiles": quantiles}, name="trendcast_lstm"
    )
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate=learning_rate, clipnorm=1.0),
        loss={"mean": mean_fn, "quantiles": pinball_loss(QUANTILES)},
        loss_weights={"mean": 1.0, "quantiles": quantile_weight},
    )
    return model


def mean_calibration(
    y_scaled: Any, pred_scaled: Any, *, low: float = 0.5, high: float = 1.5
) -> float:
    """Factor that makes the mean forecast unbiased on held-out windows (scaled units).

    ``sum(y) / sum(pred)`` over all rows and steps, clipped to ``[low, high]``: a global
    model trained on a growing catalogue tends to over-forecast a quieter period, and an
    over-forecast mean costs squared error on every item.

    >>> mean_calibration([[1.0, 1.0]], [[2.0, 2.0]])
    0.5
    >>> mean_calibration([[0.0]], [[0.0]])
    1.0
    """
    import numpy as np

    total_pred = float(np.sum(pred_scaled))
    if total_pred <= 0:
        return 1.0
    return float(np.clip(float(np.sum(y_scaled)) / total_pred, low, high))


def calibrate_mean(model: keras.Model, factor: float) -> None:
    """Set the frozen ``mean`` calibration layer to ``factor`` times the identity."""
    import numpy as np

    layer = model.get_layer("mean")
    horizon = int(layer.units)
    layer.set_weights([np.eye(horizon, dtype=np.float32) * np.float32(factor)])


def calibrate_band(model: keras.Model, p10: Sequence[float], p90: Sequence[float]) -> None:
    """Set the frozen band calibration layers: ``p10 = p50 - diag(p10) @ down`` and
    ``p90 = p50 + diag(p90) @ up``, one factor per horizon step
    (:func:`training.calibration.fit_band_scales` fits them)."""
    import numpy as np

    for name, factors in (("p10", p10), ("p90", p90)):
        layer = model.get_layer(f"{name}_offset_cal")
        values = np.asarray(factors, dtype=np.float32)
        if values.shape != (int(layer.units),):
            raise ConfigError(
                f"expected {int(layer.units)} {name} band factors, got shape {values.shape}"
            )
        layer.set_weights([np.diag(values)])
