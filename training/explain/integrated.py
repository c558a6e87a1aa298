"""The integral: integrated gradients of a forecast target along a straight path.

The method, the midpoint rule and the completeness check are described in the
:mod:`training.explain` package docstring.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, Literal

import keras
import numpy as np
import numpy.typing as npt
import tensorflow as tf

from trendcast.exceptions import ConfigError

__all__ = [
    "COMPLETENESS_TOLERANCE",
    "DEFAULT_STEPS",
    "MAX_STEPS",
    "OutputName",
    "integrated_gradients",
]

logger = logging.getLogger(__name__)

F32 = npt.NDArray[np.float32]
F64 = npt.NDArray[np.float64]
OutputName = Literal["mean", "p50"]

#: Intervals of the integral (midpoint rule) to start with; the
#: :class:`~training.explain.Explainer` doubles them for the items whose completeness gap is
#: above :data:`COMPLETENESS_TOLERANCE`.
DEFAULT_STEPS = 64
#: Where the doubling stops (unless more steps were asked for).
MAX_STEPS = 1024
#: Widest completeness gap accepted without refining, as a share of the attributions' size.
COMPLETENESS_TOLERANCE = 0.01
# Windows per gradient call: items x (steps + 1) path points; bounds the LSTM's activations.
_ROWS_PER_CALL = 4096


def _target(out: Any, scale: Any, output: OutputName, steps: Sequence[int] | None) -> Any:
    """``[rows]`` target: the output in units, clipped at zero, summed over ``steps``."""
    raw = tf.convert_to_tensor(out["mean"] if output == "mean" else out["quantiles"][..., 1])
    picked = raw if steps is None else tf.gather(raw, list(steps), axis=1)
    return tf.reduce_sum(tf.nn.relu(picked * scale[:, None]), axis=1)


def integrated_gradients(
    model: keras.Model,
    x: F32,
    reference: F32,
    scale: F32,
    reference_scale: F32,
    *,
    output: OutputName = "mean",
    steps: Sequence[int] | None = None,
    n_steps: int = DEFAULT_STEPS,
) -> tuple[F64, F64, F64, F64]:
    """Integrated gradients of the target along the straight path ``reference -> x``.

    The item scale is a path variable too (target = ``sum_h relu(scale * output_h)``), so a
    path whose scale changes (a comparison of an item the bundle does not know) stays complete.

    Args:
        model: Keras model: ``model(x)`` returns ``mean`` ``[n, horizon]`` and ``quantiles``
            ``[n, horizon, 3]`` in scaled units.
        x: ``[n, window, features]`` inputs explained.
        reference: Same shape: where each path starts.
        scale: ``[n]`` item scales at ``x``.
        reference_scale: ``[n]`` item scales at ``reference``.
        output: ``mean`` or ``p50``.
        steps: Horizon steps (0-based) summed into the target; default all.
        n_steps: Intervals of the midpoint rule.

    Returns:
        ``(attr_x [n, window, features], attr_scale [n], f(x) [n], f(reference) [n])``, the
        attributions summing to ``f(x) - f(reference)`` up to the integral's error.

    Raises:
        ConfigError: ``n_steps`` below 1 or shapes that do not match.
    """
    if n_steps < 1:
        raise ConfigError(f"expected at least 1 integration step, got {n_steps}")
    if x.shape != reference.shape or x.ndim != 3:
        raise ConfigError(
            f"expected x and reference of one [n, window, features] shape, got "
            f"{x.shape} and {reference.shape}"
        )
    n, window, n_features = x.shape
    # Midpoint rule: gradients at the n_steps interval midpoints, values at both ends. Not the
    # trapezoid rule: its end points sit exactly on the kink of the clip at zero whenever the
    # reference forecasts nothing (zero sales often do), where the gradient is 0 and the
    # integral would lose 1 / (2 * n_steps) of the difference.
    alphas = np.r_[0.0, (np.arange(n_steps) + 0.5) / n_steps, 1.0]
    weights = np.r_[0.0, np.full(n_steps, 1.0 / n_steps), 0.0]
    k = n_steps + 2
    grad_x = np.zeros((n, window, n_features), dtype=np.float64)
    grad_s = np.zeros(n, dtype=np.float64)
    values = np.zeros((n, k), dtype=np.float64)
    per_call = max(1, _ROWS_PER_CALL // k)
    for lo in range(0, n, per_call):
        hi = min(n, lo + per_call)
        dx = (x[lo:hi] - reference[lo:hi]).astype(np.float64)
        path = reference[lo:hi, None].astype(np.float64) + alphas[None, :, None, None] * dx[:, None]
        ds = (scale[lo:hi] - reference_scale[lo:hi]).astype(np.float64)
        path_s = reference_scale[lo:hi, None].astype(np.float64) + alphas[None, :] * ds[:, None]
        xt = tf.constant(path.reshape(-1, window, n_features), dtype=tf.float32)
        st = tf.constant(path_s.reshape(-1), dtype=tf.float32)
        with tf.GradientTape() as tape:
            tape.watch([xt, st])
            target = _target(model(xt, training=False), st, output, steps)
            total = tf.reduce_sum(target)
        gx, gs = tape.gradient(total, [xt, st])
        rows = hi - lo
        w = weights[None, :]
        gx_np = np.asarray(gx, dtype=np.float64).reshape(rows, k, window, n_features)
        grad_x[lo:hi] = (gx_np * w[..., None, None]).sum(axis=1)
        grad_s[lo:hi] = (np.asarray(gs, dtype=np.float64).reshape(rows, k) * w).sum(axis=1)
        values[lo:hi] = np.asarray(target, dtype=np.float64).reshape(rows, k)
    attr_x = (x - reference).astype(np.float64) * grad_x
    attr_s = (scale - reference_scale).astype(np.float64) * grad_s
    return attr_x, attr_s, values[:, -1], values[:, 0]
