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

from training.explain.explainer import DEFAULT_TOP, KERAS_MODEL, Explainer
from training.explain.integrated import (
    COMPLETENESS_TOLERANCE,
    DEFAULT_STEPS,
    MAX_STEPS,
    OutputName,
    integrated_gradients,
)
from training.explain.report import explanation_table, plot_explanation, write_explanations
from training.explain.results import Attribution, InputAttribution, ItemExplanation

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
