"""The explainer: a bundle's Keras model, its served windows, and the attributions per item.

:class:`Explainer` cuts windows as the served forecast does, checks Keras against ONNX, runs
:func:`~training.explain.integrated.integrated_gradients` (refined where the completeness gap
is wide) and turns the arrays into :mod:`~training.explain.results`; the method is described in
the :mod:`training.explain` package docstring.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import keras
import numpy as np
import numpy.typing as npt
import pandas as pd

from training.explain.integrated import (
    COMPLETENESS_TOLERANCE,
    DEFAULT_STEPS,
    MAX_STEPS,
    OutputName,
    integrated_gradients,
)
from training.explain.layout import InputLayout
from training.explain.results import Attribution, InputAttribution, ItemExplanation, fmt_units
from trendcast.bundle import Bundle
from trendcast.data import Panel
from trendcast.exceptions import BundleError, ConfigError, DataError
from trendcast.forecasting.base import WindowBatch
from trendcast.forecasting.features import build_inputs
from trendcast.forecasting.onnx import OnnxForecaster
from trendcast.forecasting.windows import windows_from_panel
from trendcast.freq import Freq

__all__ = ["DEFAULT_TOP", "KERAS_MODEL", "Explainer"]

logger = logging.getLogger(__name__)

F32 = npt.NDArray[np.float32]
F64 = npt.NDArray[np.float64]

#: Where export keeps the Keras model inside a bundle (``export.onnx_export`` writes it;
#: training may not import export, so the path is repeated here).
KERAS_MODEL = Path("training") / "model.keras"
DEFAULT_TOP = 5
# Keras (TensorFlow) and ONNX Runtime agree within 1e-4 scaled units per output at export;
# summed over up to a horizon of steps and times the scale, with room for float32 rounding.
_PARITY_SCALED = 1e-3
_SCALE_GROUP = "item scale"


class Explainer:
    """Attributes a bundle's forecasts to their inputs (see the package docstring).

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
        self._layout = InputLayout.of(meta.features)
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
        moved = ", ".join(f"{i.label()} {fmt_units(i.attribution)}" for i in top)
        return (
            f"forecast {forecast:,.2f} units ({self.what}); with zero sales it would be "
            f"{sales.start:,.2f} (sales added {fmt_units(sales.delta)}), on an average day at the "
            f"usual price {context.start:,.2f} (calendar and price added "
            f"{fmt_units(context.delta)}); moved most by: {moved}"
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
        moved = ", ".join(f"{i.label()} {fmt_units(i.attribution)}" for i in top)
        return (
            f"forecast ({self.what}) went {direction} by {abs(delta):,.2f} units, from "
            f"{part.start:,.2f} as of {vs} to {part.end:,.2f} as of {at}; inputs that moved it "
            f"most: {moved}"
        )
