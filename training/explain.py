"""Why the model forecast what it did: integrated-gradients attributions of a bundle's forecasts.

``trendcast explain`` (:mod:`trendcast.cli.explain`) calls :class:`Explainer`. It reads the
Keras model kept in the bundle (``training/model.keras``; ONNX Runtime has no gradients), cuts
each item's window exactly as the served forecast does
(:func:`~trendcast.forecasting.windows.windows_from_panel`, then
:func:`~trendcast.forecasting.features.build_inputs` with the bundle's features, scales and
prices) and checks that the Keras model reproduces the served ONNX forecast on those windows, so
what is explained is what production serves.

**What is explained.** The target is the forecast in units of one output (``mean`` or ``p50``)
summed over the horizon, or one step (``step``): ``sum_h max(scale * output_h, 0)``, the same
clip at zero the served forecast applies (:func:`trendcast.forecasting.onnx.unscale_outputs`).

**Integrated gradients** (Sundararajan et al., 2017) attribute ``f(x) - f(x')`` to the inputs
along the straight path from a reference ``x'`` to ``x``: input ``i`` gets
``(x_i - x'_i) * mean over the path of df/dx_i``, integrated here with the midpoint rule over
``steps`` intervals. The attributions sum to ``f(x) - f(x')`` (*completeness*); the gap, which
shrinks with more steps, is reported in every :class:`Attribution` as ``completeness_error``
(units) and as ``completeness_share``, its share of the attributions' total size (sum of their
absolute values: a gap is small or large against what a reader compares, and a difference of
two large opposite contributions may itself be near zero). The model's ReLU layers make the
path piecewise smooth, so the gap falls slowly and erratically with the steps; the explainer
therefore starts with ``steps`` (64) and doubles them, up to 1024, for the items whose gap is
above 1% (``integration_steps`` says what each path took).

**References.** One reference cannot answer both questions people ask, so one forecast gets two
paths, each complete on its own:

* ``sales``: the same window with **zero sales** but its own calendar and prices (and its own
  item scale). Each ``sales t-k`` says how many units that bucket's sales added to the forecast
  over "sold nothing". Zero is also what the window holds for buckets before an item's first
  sale, so the reference is a state the model has seen.
* ``context``: the same sales on **an average calendar day at the usual price**. Every calendar
  feature is a sine/cosine pair on the unit circle, and the circle's centre ``(0, 0)`` is the
  mean of the pair over a full cycle (of weekdays, days of month, months…): the calendar's "no
  particular date". The price feature is the price over the item's mean price, and ``1.0`` is
  exactly what the model is fed when the price is unknown ("usual price"). Other features a
  future bundle may add (e.g. a holiday flag) get ``0`` ("absent"). The ``context`` inputs
  (calendar kinds and ``price t-k``) say how much this window's dates and prices moved the
  forecast, given its own sales. The model is not linear: the forecast at the centre of the
  circles is not the average of the forecasts over all dates; it is a reference, not a
  counterfactual anyone observed, and the trained network is steep next to it (the paths that
  need the most integration steps are these).

The two paths do not add up to one number: ``sales`` explains ``f(x) - f(no sales)``,
``context`` explains ``f(x) - f(average day, usual price)``; both are in forecast units, so
their inputs are ranked together for "what moved it most".

**Change between two forecasts** (``--vs``): the path runs from the item's window as of the
earlier date to its window as of the later one, every feature moving at once, so the
attributions sum to ``f(new) - f(old)``, exactly the change. The two windows are shifted in
time, so inputs are named by lag position (``sales t-1`` is the last bucket before each
origin) and carry both dates. An item the bundle has no scale for is scaled by its window mean
(as the worker does), which then differs between the two windows: the scale moves along the
path too and its share is the ``item scale`` input.

Items with less than a window of history are served the seasonal-naive fallback, not the model:
they are reported as such (``fallback``, ``note``), never attributed.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import keras
import numpy as np
import numpy.typing as npt
import orjson
import pandas as pd
import tensorflow as tf
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from rich.table import Table

from trendcast.bundle import Bundle
from trendcast.data import Panel
from trendcast.exceptions import BundleError, ConfigError, DataError
from trendcast.forecasting.base import WindowBatch
from trendcast.forecasting.features import QTY_FEATURES, build_inputs
from trendcast.forecasting.onnx import OnnxForecaster
from trendcast.forecasting.windows import windows_from_panel
from trendcast.freq import Freq

__all__ = [
    "COMPLETENESS_TOLERANCE",
    "DEFAULT_STEPS",
    "DEFAULT_TOP",
    "KERAS_MODEL",
    "MAX_STEPS",
    "Attribution",
    "Explainer",
    "InputAttribution",
    "ItemExplanation",
    "OutputName",
    "explanation_table",
    "integrated_gradients",
    "plot_explanation",
    "write_explanations",
]

logger = logging.getLogger(__name__)

F32 = npt.NDArray[np.float32]
F64 = npt.NDArray[np.float64]
OutputName = Literal["mean", "p50"]

#: Where export keeps the Keras model inside a bundle (``export.onnx_export`` writes it;
#: training may not import export, so the path is repeated here).
KERAS_MODEL = Path("training") / "model.keras"
#: Intervals of the integral (midpoint rule) to start with; :class:`Explainer` doubles them
#: for the items whose completeness gap is above :data:`COMPLETENESS_TOLERANCE`.
DEFAULT_STEPS = 64
#: Where the doubling stops (unless more steps were asked for).
MAX_STEPS = 1024
#: Widest completeness gap accepted without refining, as a share of the attributions' size.
COMPLETENESS_TOLERANCE = 0.01
DEFAULT_TOP = 5
# Windows per gradient call: items x (steps + 1) path points; bounds the LSTM's activations.
_ROWS_PER_CALL = 4096
# Keras (TensorFlow) and ONNX Runtime agree within 1e-4 scaled units per output at export;
# summed over up to a horizon of steps and times the scale, with room for float32 rounding.
_PARITY_SCALED = 1e-3
_KIND_LABELS = {
    "dow": "day of week",
    "dom": "day of month",
    "month": "month",
    "moh": "minute of hour",
    "hod": "hour of day",
}
_SCALE_GROUP = "item scale"
# How the table names each path: where it starts.
_PART_LABELS = {
    "sales": "from zero sales",
    "context": "from an average day, usual price",
    "change": "from the older forecast",
}


@dataclass(frozen=True)
class InputAttribution:
    """How much one input moved the forecast, in forecast units.

    Attributes:
        name: ``sales t-1`` … (one per bucket, ``t-1`` the window's last), ``price t-k``, a
            calendar kind (``day of week``, summed over the window's buckets and the sine and
            cosine), or ``item scale``.
        group: ``sales``, ``price``, the calendar kind, or ``item scale``.
        attribution: Units of forecast this input added (negative: removed).
        lag: Buckets before the forecast origin (``1`` = the last bucket); ``None`` for
            inputs over the whole window.
        date: The bucket's start (the newer window's in a comparison).
        value: The input as people know it: units sold, unit price (``None`` if unknown),
            the scale; ``None`` for calendar kinds.
        old_date: In a comparison, the older window's bucket at the same lag.
        old_value: In a comparison, the older window's value.
    """

    name: str
    group: str
    attribution: float
    lag: int | None = None
    date: str | None = None
    value: float | None = None
    old_date: str | None = None
    old_value: float | None = None

    def label(self) -> str:
        """``name (date)``, or ``name (date vs old_date)`` in a comparison."""
        if self.date is None:
            return self.name
        if self.old_date is None:
            return f"{self.name} ({self.date})"
        return f"{self.name} ({self.date} vs {self.old_date})"


@dataclass(frozen=True)
class Attribution:
    """One integrated-gradients path: from ``reference`` (value ``start``) to the forecast.

    Attributes:
        reference: What the path starts from, in words.
        start: The target at the reference (units).
        end: The target at the explained input (units).
        inputs: Attribution of every input the path moves.
        groups: Sum of ``inputs`` per group.
        total: Sum of all attributions.
        completeness_error: ``|total - (end - start)|`` (units): the integral's error.
        completeness_share: ``completeness_error`` over the sum of ``|attribution|``.
        integration_steps: Intervals the integral took (more than asked when refined).
    """

    reference: str
    start: float
    end: float
    inputs: list[InputAttribution]
    groups: dict[str, float]
    total: float
    completeness_error: float
    completeness_share: float
    integration_steps: int

    @property
    def delta(self) -> float:
        """``end - start``: what the attributions explain."""
        return self.end - self.start


@dataclass(frozen=True)
class ItemExplanation:
    """The explanation of one item's forecast (or of the change between two of them).

    Attributes:
        item_id: The item.
        mode: ``forecast`` (one forecast, paths ``sales`` and ``context``) or ``change``
            (path ``change`` from the forecast as of ``vs`` to the one as of ``at``).
        at: Origin of the forecast: its first bucket (the window ends just before it).
        forecast: The explained target in units (Keras), ``None`` when not attributed.
        served: The served forecast of the output per explained step (ONNX Runtime, or the
            seasonal-naive fallback), empty when the item has no history at all.
        fallback: The item gets the seasonal-naive fallback, not the model: not attributed.
        note: Why the item was not attributed, when it was not.
        vs: Origin of the older forecast (``change`` mode).
        previous: The older forecast (``change`` mode).
        change: ``forecast - previous`` (``change`` mode).
        parts: The integrated-gradients paths by name.
        top: The inputs that moved the forecast most, largest ``|attribution|`` first.
        summary: One sentence saying it.
    """

    item_id: str
    mode: Literal["forecast", "change"]
    at: str
    forecast: float | None
    served: list[float]
    fallback: bool = False
    note: str | None = None
    vs: str | None = None
    previous: float | None = None
    change: float | None = None
    parts: dict[str, Attribution] = field(default_factory=dict)
    top: list[InputAttribution] = field(default_factory=list)
    summary: str = ""

    @property
    def explained(self) -> bool:
        """Whether the item has attributions (it is served by the model)."""
        return bool(self.parts)


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


@dataclass(frozen=True)
class _Layout:
    """Which feature columns are sales, price, and each calendar (or other) kind."""

    features: list[str]
    sales: int
    price: int | None
    kinds: dict[str, list[int]]

    @classmethod
    def of(cls, features: Sequence[str]) -> _Layout:
        sales = [j for j, f in enumerate(features) if f in QTY_FEATURES]
        if len(sales) != 1:
            raise BundleError(
                f"expected exactly one of {QTY_FEATURES} in the bundle's features, got "
                f"{list(features)}"
            )
        price = features.index("price") if "price" in features else None
        kinds: dict[str, list[int]] = {}
        for j, name in enumerate(features):
            if j == sales[0] or j == price:
                continue
            kind = re.sub(r"_(sin|cos)$", "", name)
            kinds.setdefault(_KIND_LABELS.get(kind, kind), []).append(j)
        return cls(list(features), sales[0], price, kinds)

    def context_reference(self, x: F32) -> F32:
        """``x`` on an average calendar day at the usual price (module docstring)."""
        ref = x.copy()
        for columns in self.kinds.values():
            ref[..., columns] = 0.0  # circle centres; other features: absent
        if self.price is not None:
            ref[..., self.price] = 1.0
        return ref

    def by_input(self, attr_x: F64) -> F64:
        """``[n, inputs]``: attributions per reported input (sales and price per bucket,
        calendar kinds over the window) from ``[n, window, features]`` ones."""
        columns = [attr_x[:, :, self.sales]]
        if self.price is not None:
            columns.append(attr_x[:, :, self.price])
        columns.extend(attr_x[:, :, idx].sum(axis=(1, 2))[:, None] for idx in self.kinds.values())
        return np.concatenate(columns, axis=1)

    def sales_reference(self, x: F32) -> F32:
        """``x`` with zero sales, its own calendar and prices."""
        ref = x.copy()
        ref[..., self.sales] = 0.0
        return ref


def _fmt(value: float) -> str:
    return f"{value:+,.2f}"


class Explainer:
    """Attributes a bundle's forecasts to their inputs (see the module docstring).

    Args:
        bundle: A bundle verified by :func:`trendcast.bundle.load_bundle`.
        output: ``mean`` or ``p50``: the forecast explained.
        step: One horizon step (1-based) instead of the sum over the horizon.
        n_steps: Intervals of the integrals (midpoint rule).
        top: How many inputs :attr:`ItemExplanation.top` lists.

    Raises:
        BundleError: The bundle keeps no Keras model, or it cannot be loaded, or its
            features have no sales column.
        ConfigError: ``step`` outside the horizon, ``n_steps`` or ``top`` below 1.
    """

    def __init__(
        self,
        bundle: Bundle,
        *,
        output: OutputName = "mean",
        step: int | None = None,
        n_steps: int = DEFAULT_STEPS,
        top: int = DEFAULT_TOP,
    ) -> None:
        meta = bundle.meta
        if output not in ("mean", "p50"):
            raise ConfigError(f"expected output mean or p50, got {output!r}")
        if step is not None and not 1 <= step <= meta.horizon:
            raise ConfigError(f"--step: expected 1..{meta.horizon} (the horizon), got {step}")
        if n_steps < 1 or top < 1:
            raise ConfigError(f"expected steps and top of at least 1, got {n_steps} and {top}")
        self.bundle = bundle
        self.output: OutputName = output
        self.step = step
        self.n_steps = n_steps
        self.top = top
        self._layout = _Layout.of(meta.features)
        self._freq: Freq = bundle.freq
        self._steps = list(range(meta.horizon)) if step is None else [step - 1]
        path = bundle.path / KERAS_MODEL
        if not path.is_file():
            raise BundleError(
                f"{bundle.path}: expected the Keras model the bundle was exported from at "
                f"{KERAS_MODEL}, got none (explanations need gradients, which the ONNX model "
                "does not give; export the bundle with trendcast train)"
            )
        try:
            self._model = keras.models.load_model(path, compile=False)
        except Exception as exc:  # keras raises ValueError, OSError, zipfile errors…
            raise BundleError(f"{path}: cannot load the Keras model ({exc})") from exc
        self._onnx = OnnxForecaster(bundle, threads=1)

    @property
    def what(self) -> str:
        """The explained target in words, e.g. ``mean, steps 1-7 summed``."""
        if self.step is not None:
            return f"{self.output}, step {self.step}"
        return f"{self.output}, steps 1-{self.bundle.meta.horizon} summed"

    # -- windows -------------------------------------------------------------------------

    def _cutoff(self, panel: Panel, at: pd.Timestamp | None, flag: str) -> pd.Timestamp:
        """The forecast origin (first forecast bucket) for ``at``, checked against the data."""
        step = self._freq.timedelta
        last_origin = panel.end + step
        if at is None:
            return last_origin
        ms = int(pd.Timestamp(at).as_unit("ms").value // 1_000_000)
        origin = pd.Timestamp(self._freq.floor_ms(ms), unit="ms")
        if not panel.start < origin <= last_origin:
            raise DataError(
                f"{flag} {self._freq.label(pd.Timestamp(at))}: expected a date after the "
                f"data's first bucket ({self._freq.label(panel.start)}) and at most its last "
                f"plus one ({self._freq.label(last_origin)}), got bucket {self._freq.label(origin)}"
            )
        return origin

    def _windows(
        self, panel: Panel, items: Sequence[str], cutoff: pd.Timestamp
    ) -> tuple[WindowBatch, dict[str, int]]:
        """The items' windows before ``cutoff`` and each item's row (absent: no history)."""
        frame = panel.frame[panel.frame["item_id"].isin(list(items))].reset_index(drop=True)
        window = self.bundle.meta.window
        if not (frame["ts"] < cutoff).any():
            # windows_from_panel assumes at least one bucket before the cutoff.
            empty = np.zeros((0, window), dtype=np.float32)
            no_ms = np.zeros(0, dtype=np.int64)
            batch = WindowBatch([], empty, empty.copy() if panel.has_price else None, no_ms, no_ms)
            return batch, {}
        sub = Panel(frame=frame, freq=panel.freq, has_price=panel.has_price)
        batch = windows_from_panel(sub, window, cutoff)
        return batch, {item: row for row, item in enumerate(batch.item_ids)}

    def _inputs(self, batch: WindowBatch) -> tuple[F32, F32]:
        meta = self.bundle.meta
        return build_inputs(
            batch,
            meta.features,
            self.bundle.scales,
            self.bundle.prices,
            self._freq,
            meta.scaling.epsilon,
        )

    @property
    def horizon_steps(self) -> list[int]:
        """The explained horizon steps, 1-based."""
        return [s + 1 for s in self._steps]

    def _served(self, batch: WindowBatch) -> F32:
        """The served forecast of the output per explained step, ``[n, steps]``."""
        if not len(batch):
            return np.zeros((0, len(self._steps)), dtype=np.float32)
        out = self._onnx.predict(batch)
        values = out.mean if self.output == "mean" else out.p50
        return np.asarray(values[:, self._steps], dtype=np.float32)

    def _check_parity(self, items: Sequence[str], keras_f: F64, served: F32, scale: F32) -> None:
        """Refuse to explain a Keras model that is not the served ONNX model."""
        onnx_f = served.astype(np.float64).sum(axis=1)
        tol = _PARITY_SCALED * scale.astype(np.float64) * len(self._steps) + 1e-4 * np.abs(onnx_f)
        bad = np.flatnonzero(np.abs(keras_f - onnx_f) > tol)
        if bad.size:
            i = int(bad[0])
            raise BundleError(
                f"{self.bundle.path}: expected {KERAS_MODEL} to reproduce model.onnx, got "
                f"{keras_f[i]:.4f} vs {onnx_f[i]:.4f} for item {items[i]!r} (was the Keras "
                "model replaced after export?)"
            )

    def _integrate(
        self, x: F32, reference: F32, scale: F32, reference_scale: F32
    ) -> tuple[F64, F64, F64, F64, npt.NDArray[np.int64]]:
        """:func:`integrated_gradients`, refined where the completeness gap is too wide.

        Rows whose attributions miss ``f(x) - f(reference)`` by more than
        :data:`COMPLETENESS_TOLERANCE` of their size are integrated again with twice the
        steps, up to :data:`MAX_STEPS` (or the steps asked, if more). The ReLU kinks of the
        model make the gap erratic in the step count (64 steps left 6% on one item of a
        sample-trained model, 128 steps 0.2%), so a fixed count is either slow everywhere or
        wrong somewhere.

        Returns:
            As :func:`integrated_gradients`, plus the steps each row took.
        """

        def run(rows: npt.NDArray[np.int64], n_steps: int) -> tuple[F64, F64, F64, F64]:
            return integrated_gradients(
                self._model,
                x[rows],
                reference[rows],
                scale[rows],
                reference_scale[rows],
                output=self.output,
                steps=self._steps,
                n_steps=n_steps,
            )

        def wide(ax: F64, a_s: F64, fx: F64, fr: F64) -> npt.NDArray[np.bool_]:
            gap = np.abs(ax.sum(axis=(1, 2)) + a_s - (fx - fr))
            # The size of what is reported (calendar sines and cosines summed per kind, as
            # the Attribution's completeness_share counts it).
            size = np.abs(self._layout.by_input(ax)).sum(axis=1) + np.abs(a_s)
            # The floor: float32 rounding of the model's outputs, not an integration error.
            floor = 1e-5 * (np.abs(fx) + np.abs(fr)) + 1e-6
            out: npt.NDArray[np.bool_] = gap > COMPLETENESS_TOLERANCE * size + floor
            return out

        everything = np.arange(len(x), dtype=np.int64)
        n_steps = self.n_steps
        attr_x, attr_s, f_x, f_ref = run(everything, n_steps)
        used = np.full(len(x), n_steps, dtype=np.int64)
        todo = everything[wide(attr_x, attr_s, f_x, f_ref)]
        while todo.size and n_steps < max(self.n_steps, MAX_STEPS):
            n_steps *= 2
            ax, a_s, fx, fr = run(todo, n_steps)
            attr_x[todo], attr_s[todo], used[todo] = ax, a_s, n_steps
            logger.info("refined %d integrals to %d steps", todo.size, n_steps)
            todo = todo[wide(ax, a_s, fx, fr)]
        return attr_x, attr_s, f_x, f_ref, used

    def _lags(
        self, batch: WindowBatch, row: int
    ) -> tuple[list[str], F32, npt.NDArray[np.float32] | None]:
        """Dates (``t-1`` first), quantities and prices of one window, newest first."""
        window = batch.window
        last = pd.Timestamp(int(batch.last_start_ms[row]), unit="ms")
        step = self._freq.timedelta
        dates = [self._freq.label(last - step * k) for k in range(window)]
        qty = batch.quantities[row, ::-1]
        prices = None if batch.prices is None else batch.prices[row, ::-1]
        return dates, qty, prices

    def _attribution(
        self,
        reference: str,
        start: float,
        end: float,
        attr_x: F64,
        attr_s: float,
        n_steps: int,
        *,
        moved: Sequence[str],
        new: tuple[list[str], F32, F32 | None],
        old: tuple[list[str], F32, F32 | None] | None = None,
        scales: tuple[float, float] | None = None,
    ) -> Attribution:
        """One path's :class:`Attribution` from its ``[window, features]`` attributions.

        ``moved`` names the groups the path moves (``sales``, ``price``, ``calendar``).
        """
        layout = self._layout
        by_lag = attr_x[::-1]  # row 0 = t-1
        inputs: list[InputAttribution] = []

        def per_lag(name: str, column: int, values: F32 | None, old_values: F32 | None) -> None:
            for k in range(by_lag.shape[0]):
                value = None if values is None else float(values[k])
                old_value = None if old_values is None else float(old_values[k])
                inputs.append(
                    InputAttribution(
                        name=f"{name} t-{k + 1}",
                        group=name,
                        attribution=float(by_lag[k, column]),
                        lag=k + 1,
                        date=new[0][k],
                        value=None if value is None or not math.isfinite(value) else value,
                        old_date=None if old is None else old[0][k],
                        old_value=(
                            None if old_value is None or not math.isfinite(old_value) else old_value
                        ),
                    )
                )

        if "sales" in moved:
            per_lag("sales", layout.sales, new[1], None if old is None else old[1])
        if "price" in moved and layout.price is not None:
            per_lag("price", layout.price, new[2], None if old is None else old[2])
        if "calendar" in moved:
            for kind, columns in layout.kinds.items():
                inputs.append(
                    InputAttribution(
                        name=kind, group=kind, attribution=float(attr_x[:, columns].sum())
                    )
                )
        if scales is not None and scales[0] != scales[1]:
            inputs.append(
                InputAttribution(
                    name=_SCALE_GROUP,
                    group=_SCALE_GROUP,
                    attribution=attr_s,
                    value=scales[0],
                    old_value=scales[1],
                )
            )
        groups: dict[str, float] = {}
        for item in inputs:
            groups[item.group] = groups.get(item.group, 0.0) + item.attribution
        total = float(sum(i.attribution for i in inputs))
        error = abs(total - (end - start))
        size = float(sum(abs(i.attribution) for i in inputs))
        share = error / size if size > 0 else 0.0
        if share > COMPLETENESS_TOLERANCE * 1.01:  # refined up to MAX_STEPS, still wide
            logger.warning(
                "integrated gradients from %s: the attributions miss the difference by %.2f "
                "units (%.1f%% of their size) after %d steps; more --steps narrow the gap",
                reference,
                error,
                100 * share,
                n_steps,
            )
        return Attribution(
            reference=reference,
            start=start,
            end=end,
            inputs=inputs,
            groups=groups,
            total=total,
            completeness_error=error,
            completeness_share=share,
            integration_steps=n_steps,
        )

    def _top(self, parts: Sequence[Attribution]) -> list[InputAttribution]:
        every = [i for p in parts for i in p.inputs]
        return sorted(every, key=lambda i: abs(i.attribution), reverse=True)[: self.top]

    def _not_attributed(
        self,
        item: str,
        mode: Literal["forecast", "change"],
        at: str,
        served: list[float],
        note: str,
        vs: str | None = None,
    ) -> ItemExplanation:
        return ItemExplanation(
            item_id=item,
            mode=mode,
            at=at,
            forecast=None,
            served=served,
            fallback=True,
            note=note,
            vs=vs,
            summary=note,
        )

    def _short_note(self, item: str, history: int, origin: pd.Timestamp) -> str:
        window = self.bundle.meta.window
        if history == 0:
            return f"{item} has no sales before {self._freq.label(origin)}: no forecast to explain"
        return (
            f"{item} has {history} buckets of history before {self._freq.label(origin)}, fewer "
            f"than the model's window of {window}: production serves it the seasonal-naive "
            "fallback, not the model, so there is nothing to attribute"
        )

    @staticmethod
    def _check_items(panel: Panel, items: Sequence[str]) -> list[str]:
        wanted = list(dict.fromkeys(str(i) for i in items))
        if not wanted:
            raise ConfigError("expected at least one item id, got none")
        known = set(panel.frame["item_id"].unique())
        unknown = [i for i in wanted if i not in known]
        if unknown:
            some = ", ".join(sorted(map(str, known))[:5])
            raise DataError(
                f"unknown item{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}: expected "
                f"ids in the data ({len(known)} items, e.g. {some})"
            )
        return wanted

    # -- one forecast --------------------------------------------------------------------

    def explain(
        self, panel: Panel, items: Sequence[str], *, at: pd.Timestamp | None = None
    ) -> list[ItemExplanation]:
        """Explain each item's forecast as of ``at`` (default: from the end of the data).

        ``at`` is the forecast's origin: its first bucket; the window is the buckets before.

        Raises:
            DataError: An item not in ``panel``, or ``at`` outside the data.
            BundleError: The Keras model does not reproduce the served ONNX forecast.
        """
        wanted = self._check_items(panel, items)
        origin = self._cutoff(panel, at, "--at")
        at_label = self._freq.label(origin)
        batch, rows = self._windows(panel, wanted, origin)
        window = self.bundle.meta.window
        served = self._served(batch)
        full = [i for i in wanted if i in rows and batch.history_len[rows[i]] >= window]
        results: dict[str, ItemExplanation] = {}
        for item in wanted:
            if item in full:
                continue
            history = int(batch.history_len[rows[item]]) if item in rows else 0
            values = served[rows[item]].tolist() if item in rows else []
            results[item] = self._not_attributed(
                item, "forecast", at_label, values, self._short_note(item, history, origin)
            )
        if full:
            sub = batch.take(np.array([rows[i] for i in full], dtype=np.int64))
            x, scale = self._inputs(sub)
            layout = self._layout
            sales = self._integrate(x, layout.sales_reference(x), scale, scale)
            context = self._integrate(x, layout.context_reference(x), scale, scale)
            sub_served = served[[rows[i] for i in full]]
            self._check_parity(full, sales[2], sub_served, scale)
            for r, item in enumerate(full):
                lags = self._lags(sub, r)
                forecast = float(sales[2][r])
                parts = {
                    "sales": self._attribution(
                        "the same window with zero sales, its own calendar and prices",
                        float(sales[3][r]),
                        forecast,
                        sales[0][r],
                        0.0,
                        int(sales[4][r]),
                        moved=("sales",),
                        new=lags,
                    ),
                    "context": self._attribution(
                        "the same sales on an average calendar day (sine/cosine pairs at "
                        "their circle's centre) at the usual price (price feature 1.0)",
                        float(context[3][r]),
                        forecast,
                        context[0][r],
                        0.0,
                        int(context[4][r]),
                        moved=("price", "calendar"),
                        new=lags,
                    ),
                }
                top = self._top(list(parts.values()))
                results[item] = ItemExplanation(
                    item_id=item,
                    mode="forecast",
                    at=at_label,
                    forecast=forecast,
                    served=sub_served[r].tolist(),
                    parts=parts,
                    top=top,
                    summary=self._forecast_summary(forecast, parts, top),
                )
        return [results[i] for i in wanted]

    def _forecast_summary(
        self, forecast: float, parts: dict[str, Attribution], top: Sequence[InputAttribution]
    ) -> str:
        sales, context = parts["sales"], parts["context"]
        moved = ", ".join(f"{i.label()} {_fmt(i.attribution)}" for i in top)
        return (
            f"forecast {forecast:,.2f} units ({self.what}); with zero sales it would be "
            f"{sales.start:,.2f} (sales added {_fmt(sales.delta)}), on an average day at the "
            f"usual price {context.start:,.2f} (calendar and price added "
            f"{_fmt(context.delta)}); moved most by: {moved}"
        )

    # -- the change between two forecasts -------------------------------------------------

    def compare(
        self,
        panel: Panel,
        items: Sequence[str],
        *,
        vs: pd.Timestamp,
        at: pd.Timestamp | None = None,
    ) -> list[ItemExplanation]:
        """Explain the change of each item's forecast from the one as of ``vs`` to ``at``'s.

        Raises:
            DataError: An item not in ``panel``, a date outside the data, or ``vs`` not
                before ``at``.
            BundleError: The Keras model does not reproduce the served ONNX forecast.
        """
        wanted = self._check_items(panel, items)
        origin = self._cutoff(panel, at, "--at")
        old_origin = self._cutoff(panel, vs, "--vs")
        if old_origin >= origin:
            raise DataError(
                f"--vs {self._freq.label(old_origin)}: expected a date before the --at origin "
                f"({self._freq.label(origin)}), got bucket {self._freq.label(old_origin)}"
            )
        at_label, vs_label = self._freq.label(origin), self._freq.label(old_origin)
        window = self.bundle.meta.window
        new_batch, new_rows = self._windows(panel, wanted, origin)
        old_batch, old_rows = self._windows(panel, wanted, old_origin)
        new_served = self._served(new_batch)
        old_served = self._served(old_batch)

        def history(batch: WindowBatch, rows: dict[str, int], item: str) -> int:
            return int(batch.history_len[rows[item]]) if item in rows else 0

        results: dict[str, ItemExplanation] = {}
        full: list[str] = []
        for item in wanted:
            old_h = history(old_batch, old_rows, item)
            if old_h >= window:
                full.append(item)
                continue
            new_h = history(new_batch, new_rows, item)
            short = (
                self._short_note(item, new_h, origin)
                if new_h < window
                else self._short_note(item, old_h, old_origin)
            )
            values = new_served[new_rows[item]].tolist() if item in new_rows else []
            results[item] = self._not_attributed(item, "change", at_label, values, short, vs_label)
        if full:
            new_sub = new_batch.take(np.array([new_rows[i] for i in full], dtype=np.int64))
            old_sub = old_batch.take(np.array([old_rows[i] for i in full], dtype=np.int64))
            x_new, s_new = self._inputs(new_sub)
            x_old, s_old = self._inputs(old_sub)
            attr_x, attr_s, f_new, f_old, used = self._integrate(x_new, x_old, s_new, s_old)
            sub_new = new_served[[new_rows[i] for i in full]]
            sub_old = old_served[[old_rows[i] for i in full]]
            self._check_parity(full, f_new, sub_new, s_new)
            self._check_parity(full, f_old, sub_old, s_old)
            for r, item in enumerate(full):
                part = self._attribution(
                    f"the window as of {vs_label}, moved in a straight line to the one as of "
                    f"{at_label}",
                    float(f_old[r]),
                    float(f_new[r]),
                    attr_x[r],
                    float(attr_s[r]),
                    int(used[r]),
                    moved=("sales", "price", "calendar"),
                    new=self._lags(new_sub, r),
                    old=self._lags(old_sub, r),
                    scales=(float(s_new[r]), float(s_old[r])),
                )
                top = self._top([part])
                results[item] = ItemExplanation(
                    item_id=item,
                    mode="change",
                    at=at_label,
                    forecast=float(f_new[r]),
                    served=sub_new[r].tolist(),
                    vs=vs_label,
                    previous=float(f_old[r]),
                    change=part.delta,
                    parts={"change": part},
                    top=top,
                    summary=self._change_summary(part, top, at_label, vs_label),
                )
        return [results[i] for i in wanted]

    def _change_summary(
        self, part: Attribution, top: Sequence[InputAttribution], at: str, vs: str
    ) -> str:
        delta = part.delta
        direction = "up" if delta > 0 else "down" if delta < 0 else "nowhere"
        moved = ", ".join(f"{i.label()} {_fmt(i.attribution)}" for i in top)
        return (
            f"forecast ({self.what}) went {direction} by {abs(delta):,.2f} units, from "
            f"{part.start:,.2f} as of {vs} to {part.end:,.2f} as of {at}; inputs that moved it "
            f"most: {moved}"
        )


# -- output ---------------------------------------------------------------------------------


def explanation_table(item: ItemExplanation) -> Table:
    """A short rich table: what moved the item's forecast most, then the groups."""
    title = f"{item.item_id}: " + (item.note or item.summary.split(";")[0])
    table = Table(title=title, title_justify="left")
    table.add_column("input")
    table.add_column("date")
    table.add_column("value", justify="right")
    table.add_column("moved it by", justify="right")
    for i in item.top:
        date = i.date if i.old_date is None else f"{i.date} vs {i.old_date}"
        value = "" if i.value is None else f"{i.value:,.2f}"
        if i.old_value is not None:
            value = f"{value} vs {i.old_value:,.2f}"
        color = "green" if i.attribution > 0 else "red"
        table.add_row(i.name, date or "", value, f"[{color}]{_fmt(i.attribution)}[/{color}]")
    for name, part in item.parts.items():
        table.add_section()
        groups = ", ".join(f"{g} {_fmt(v)}" for g, v in part.groups.items())
        table.add_row(
            f"[dim]{_PART_LABELS.get(name, name)}[/dim]",
            "",
            f"[dim]{part.start:,.2f} -> {part.end:,.2f}[/dim]",
            f"[dim]{groups}[/dim]",
        )
    return table


def _safe_name(item_id: str) -> str:
    """A file name for an item id (ids may hold ``/`` or spaces)."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", item_id) or "_"


def plot_explanation(item: ItemExplanation, path: Path | str) -> Path:
    """PNG of one explanation: the window's sales, attribution per bucket, and per group.

    Buckets are drawn by lag position, oldest left, so a comparison's two windows line up.

    Raises:
        ConfigError: The item was not attributed (a fallback item).
    """
    if not item.explained:
        raise ConfigError(f"expected an attributed item, got {item.item_id} ({item.note})")
    parts = list(item.parts.values())
    sales = [i for p in parts for i in p.inputs if i.group == "sales"]
    prices = [i for p in parts for i in p.inputs if i.group == "price"]
    sales.sort(key=lambda i: -(i.lag or 0))
    prices.sort(key=lambda i: -(i.lag or 0))
    pos = np.arange(len(sales))
    fig = Figure(figsize=(10, 8))
    ax_sales, ax_attr, ax_groups = fig.subplots(3, 1, gridspec_kw={"height_ratios": [2, 2, 1.6]})
    qty = [i.value or 0.0 for i in sales]
    if item.mode == "change":
        old = [i.old_value or 0.0 for i in sales]
        ax_sales.bar(pos - 0.2, old, width=0.4, color="0.65", label=f"window as of {item.vs}")
        ax_sales.bar(pos + 0.2, qty, width=0.4, color="tab:blue", label=f"as of {item.at}")
        ax_sales.legend(fontsize=7, loc="upper left")
    else:
        ax_sales.bar(pos, qty, color="tab:blue")
    ax_sales.set_ylabel("units sold", fontsize=8)
    every = max(1, math.ceil(len(sales) / 7))  # about 7 date labels: readable at any window
    ticks = pos[::-1][::every]
    labels = []
    for p in ticks:
        i = sales[int(p)]
        labels.append(f"t-{i.lag}\n{i.date}" + ("" if i.old_date is None else f"\n{i.old_date}"))
    for ax in (ax_sales, ax_attr):
        ax.set_xticks(ticks, labels, fontsize=7)
        ax.tick_params(axis="y", labelsize=7)
        ax.grid(alpha=0.3, axis="y")
    attr = np.array([i.attribution for i in sales])
    width = 0.4 if prices else 0.8
    ax_attr.bar(
        pos - (0.2 if prices else 0.0),
        attr,
        width=width,
        color=np.where(attr >= 0, "tab:green", "tab:red"),
    )
    if prices:
        ax_attr.bar(
            pos + 0.2,
            [i.attribution for i in prices],
            width=width,
            color="tab:purple",
        )
    handles = [
        Patch(color="tab:green", label="sales: added"),
        Patch(color="tab:red", label="sales: removed"),
    ]
    if prices:
        handles.append(Patch(color="tab:purple", label="price"))
    ax_attr.legend(handles=handles, fontsize=7, loc="upper left")
    ax_attr.axhline(0, color="0.3", lw=0.8)
    ax_attr.set_ylabel("moved forecast by (units)", fontsize=8)
    groups: dict[str, float] = {}
    for p in parts:
        for g, v in p.groups.items():
            groups[g] = groups.get(g, 0.0) + v
    names = list(groups)
    values = np.array([groups[g] for g in names])
    ax_groups.barh(names, values, color=np.where(values >= 0, "tab:green", "tab:red"))
    ax_groups.axvline(0, color="0.3", lw=0.8)
    ax_groups.tick_params(labelsize=7)
    ax_groups.set_xlabel(
        "moved forecast by (units), per group"
        + (
            ""
            if item.mode == "change"
            else " (sales: over zero sales; calendar, price: over an average day at usual price)"
        ),
        fontsize=8,
    )
    ax_groups.grid(alpha=0.3, axis="x")
    if item.mode == "change":
        head = (
            f"{item.item_id}: forecast {item.previous:,.2f} (as of {item.vs}) -> "
            f"{item.forecast:,.2f} (as of {item.at}), change {_fmt(item.change or 0.0)}"
        )
    else:
        sales_ref, context_ref = item.parts["sales"].start, item.parts["context"].start
        head = (
            f"{item.item_id}: forecast {item.forecast:,.2f} as of {item.at}; with zero sales "
            f"{sales_ref:,.2f}, on an average day at the usual price {context_ref:,.2f}"
        )
    fig.suptitle(head, fontsize=9)
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)  # Agg explicitly: no GUI backend is ever chosen (trendcast.plots)
    fig.savefig(out, dpi=110)
    return out


def write_explanations(
    explainer: Explainer, items: Sequence[ItemExplanation], out_dir: Path | str
) -> tuple[Path, list[Path]]:
    """Write ``explain.json`` (every item) and a PNG per attributed item into ``out_dir``.

    Returns:
        The JSON file and the PNG files.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    meta = explainer.bundle.meta
    payload = {
        "bundle": str(explainer.bundle.path),
        "model_version": meta.model_version,
        "output": explainer.output,
        "horizon_steps": explainer.horizon_steps,
        "min_integration_steps": explainer.n_steps,
        "method": "integrated gradients (midpoint rule) on the bundle's Keras model",
        "items": [asdict(i) for i in items],
    }
    json_path = out / "explain.json"
    json_path.write_bytes(orjson.dumps(payload, option=orjson.OPT_INDENT_2))
    pngs = [plot_explanation(i, out / f"{_safe_name(i.item_id)}.png") for i in items if i.explained]
    logger.info("wrote %s and %d PNGs", json_path, len(pngs))
    return json_path, pngs
