"""The seasonal level frozen into the model equals its numpy definition."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

keras = pytest.importorskip("keras")

from training.model import ROBUST_CAP, build_model  # noqa: E402
from trendcast.forecasting.base import WindowBatch  # noqa: E402
from trendcast.forecasting.features import build_inputs, feature_names  # noqa: E402
from trendcast.freq import parse_freq  # noqa: E402

DAY_MS = 86_400_000


def test_seasonal_level_is_the_capped_eight_week_mean_times_the_weekday_factor() -> None:
    freq = parse_freq("1D")
    window, horizon, n = 63, 10, 40
    features = feature_names(False, freq=freq)
    rng = np.random.default_rng(3)
    q = rng.poisson(2.0, (n, window)).astype(np.float32)
    q[::5, -20] = 500.0  # a wholesale order in some windows
    last = (pd.Timestamp("2011-06-01").value // 1_000_000 // DAY_MS + np.arange(n)) * DAY_MS
    batch = WindowBatch([f"i{k}" for k in range(n)], q, None, last, np.full(n, window))
    x, scale = build_inputs(batch, features, {}, {}, freq)
    factors = [1.2, 1.4, 1.2, 1.5, 1.0, 0.0, 0.7]
    model = build_model(
        window=window,
        n_features=len(features),
        horizon=horizon,
        units=4,
        weekday_columns=(features.index("dow_sin"), features.index("dow_cos")),
        weekday_factors=factors,
    )
    seasonal = keras.Model(model.inputs, model.get_layer("seasonal_level").output)
    got = np.asarray(seasonal.predict(x, verbose=0))

    recent = x[:, -56:, 0].astype(np.float64)
    level = np.minimum(recent, ROBUST_CAP * recent.mean(axis=1, keepdims=True)).mean(axis=1)
    step_days = last[:, None] // DAY_MS + 1 + np.arange(horizon)[None, :]
    weekday = (step_days + 3) % 7  # 1970-01-01 was a Thursday (Monday = 0)
    want = level[:, None] * np.asarray(factors)[weekday]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert scale.shape == (n,)
