"""``trendcast explain``: integrated-gradients attributions of a tiny trained bundle's forecasts."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import orjson
import pandas as pd
import pytest

from trendcast.bundle import load_bundle
from trendcast.data import Panel, sample_data_path
from trendcast.exceptions import BundleError, ConfigError, DataError
from trendcast.testkit.cli import assert_one_line_error, run_cli
from trendcast.testkit.trained_bundle import (
    TINY_HORIZON,
    TINY_WINDOW,
    tiny_panel,
)

pytest.importorskip("tensorflow")
pytest.importorskip("tf2onnx")

from training.explain import (  # noqa: E402 - after the skips: it imports TensorFlow
    Attribution,
    Explainer,
    explanation_table,
    integrated_gradients,
    write_explanations,
)

ITEM = "20725"
OTHER = "15044A"


def _complete(part: Attribution) -> bool:
    """Completeness: the attributions sum to the explained difference, within 1% of their size.

    Not of the difference: two large opposite contributions (day of month against day of week)
    can leave a small difference, and the gap scales with the attributions.
    """
    size = sum(abs(i.attribution) for i in part.inputs)
    assert part.completeness_error == pytest.approx(abs(part.total - part.delta))
    return part.completeness_error <= 0.01 * size + 1e-3 and part.completeness_share <= 0.01


@pytest.fixture(scope="module")
def bundle_dir(tiny_bundle: Path) -> Path:
    return tiny_bundle


@pytest.fixture(scope="module")
def p50(bundle_dir: Path) -> Explainer:
    """The p50 head: the tiny model's mean is blended to the plain level, its p50 is not."""
    return Explainer(load_bundle(bundle_dir), output="p50")


@pytest.fixture(scope="module")
def panel() -> Panel:
    # Two items more than the bundle was trained on: their scale is their window mean.
    return tiny_panel(8)


@pytest.mark.parametrize("output", ["mean", "p50"])
def test_one_forecast_is_complete_and_is_the_served_one(
    bundle_dir: Path, panel, output: str
) -> None:
    explainer = Explainer(load_bundle(bundle_dir), output=output)  # type: ignore[arg-type]
    [item, other] = explainer.explain(panel, [ITEM, OTHER])
    for result in (item, other):
        assert result.explained and not result.fallback and result.mode == "forecast"
        assert result.forecast is not None
        # The Keras forecast explained is the served ONNX one.
        assert result.forecast == pytest.approx(sum(result.served), rel=1e-3, abs=1e-3)
        assert len(result.served) == TINY_HORIZON
        assert set(result.parts) == {"sales", "context"}
        for part in result.parts.values():
            assert part.end == pytest.approx(result.forecast)
            assert _complete(part), (output, part)
            assert sum(part.groups.values()) == pytest.approx(part.total)
    sales, context = item.parts["sales"], item.parts["context"]
    assert {i.group for i in sales.inputs} == {"sales"}
    assert [i.lag for i in sales.inputs] == list(range(1, TINY_WINDOW + 1))
    assert sales.inputs[0].name == "sales t-1" and sales.inputs[0].date == "2011-08-31"
    assert sales.inputs[-1].date == "2011-08-04"
    assert set(context.groups) == {"price", "day of week", "day of month", "month"}
    assert item.at == "2011-09-01"
    assert len(item.top) == 5
    magnitudes = [abs(i.attribution) for i in item.top]
    assert magnitudes == sorted(magnitudes, reverse=True)
    assert "moved most by" in item.summary


def test_the_network_reads_the_calendar(p50: Explainer, panel) -> None:
    [item] = p50.explain(panel, [ITEM])
    assert abs(item.parts["context"].delta) > 0.1  # the p50 head is not just the level
    assert item.parts["sales"].delta > 0


def test_one_step(bundle_dir: Path, panel) -> None:
    explainer = Explainer(load_bundle(bundle_dir), output="p50", step=2, n_steps=64, top=3)
    [item] = explainer.explain(panel, [ITEM], at=pd.Timestamp("2011-07-15"))
    assert explainer.horizon_steps == [2]
    assert item.at == "2011-07-15"
    assert item.forecast == pytest.approx(item.served[0], rel=1e-3, abs=1e-3)
    assert len(item.top) == 3
    for part in item.parts.values():
        assert _complete(part)


def test_a_wide_gap_is_refined(bundle_dir: Path, panel: Panel) -> None:
    """Two steps cannot follow the p50 head's kinks: the explainer doubles them where needed."""
    explainer = Explainer(load_bundle(bundle_dir), output="p50", n_steps=2)
    parts = [p for item in explainer.explain(panel, [ITEM, OTHER]) for p in item.parts.values()]
    assert max(p.integration_steps for p in parts) > 2
    assert all(_complete(p) for p in parts)


def test_change_attributions_sum_to_the_change(p50: Explainer, panel) -> None:
    vs = pd.Timestamp("2011-07-31")
    [change] = p50.compare(panel, [ITEM], vs=vs)
    [new] = p50.explain(panel, [ITEM])
    [old] = p50.explain(panel, [ITEM], at=vs)
    assert change.mode == "change" and (change.at, change.vs) == ("2011-09-01", "2011-07-31")
    assert change.forecast == pytest.approx(new.forecast)
    assert change.previous == pytest.approx(old.forecast)
    assert change.change == pytest.approx(new.forecast - old.forecast)  # type: ignore[operator]
    part = change.parts["change"]
    assert _complete(part)
    t1 = part.inputs[0]
    assert (t1.name, t1.date, t1.old_date) == ("sales t-1", "2011-08-31", "2011-07-30")
    assert "item scale" not in part.groups  # a known item keeps its bundle scale
    direction = "up" if part.delta > 0 else "down"
    assert f"went {direction} by" in change.summary


def test_an_item_unknown_to_the_bundle_moves_its_scale(p50: Explainer, panel) -> None:
    unknown = sorted(panel.frame["item_id"].unique())[-1]
    assert unknown not in p50.bundle.scales
    [change] = p50.compare(panel, [unknown], vs=pd.Timestamp("2011-06-30"))
    part = change.parts["change"]
    assert "item scale" in part.groups
    assert _complete(part)


def test_short_history_is_not_attributed(p50: Explainer, panel) -> None:
    [short, full] = p50.explain(panel, [OTHER, ITEM], at=pd.Timestamp("2009-12-20"))
    assert short.fallback and not short.explained and short.forecast is None
    assert short.note is not None and "seasonal-naive fallback" in short.note
    assert len(short.served) == TINY_HORIZON  # what production serves instead
    # 20725 starts on 2009-12-01: 19 buckets, also short.
    assert full.fallback
    [none] = p50.explain(panel, [OTHER], at=pd.Timestamp("2009-12-03"))
    assert none.note is not None and "no sales before" in none.note and none.served == []


def test_bad_requests_are_clear_errors(p50: Explainer, panel) -> None:
    with pytest.raises(DataError, match="unknown item NOPE: expected ids in the data"):
        p50.explain(panel, [ITEM, "NOPE"])
    with pytest.raises(DataError, match="--at 2013-01-01: expected a date"):
        p50.explain(panel, [ITEM], at=pd.Timestamp("2013-01-01"))
    with pytest.raises(DataError, match="expected a date before the --at origin"):
        p50.compare(panel, [ITEM], vs=pd.Timestamp("2011-08-01"), at=pd.Timestamp("2011-07-01"))
    with pytest.raises(ConfigError, match="--step: expected 1..7"):
        Explainer(p50.bundle, step=8)


def test_bundle_without_keras_model(bundle_dir: Path, tmp_path: Path) -> None:
    copy = Path(shutil.copytree(bundle_dir, tmp_path / "bundle"))
    (copy / "training" / "model.keras").unlink()
    with pytest.raises(BundleError, match="expected the Keras model"):
        Explainer(load_bundle(copy))


def test_json_and_pngs_are_written(p50: Explainer, panel, tmp_path: Path) -> None:
    results = p50.explain(panel, [ITEM, OTHER]) + p50.explain(
        panel, [OTHER], at=pd.Timestamp("2009-12-20")
    )
    json_path, pngs = write_explanations(p50, results, tmp_path / "out")
    assert sorted(p.name for p in pngs) == [f"{OTHER}.png", f"{ITEM}.png"]
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)
    data = orjson.loads(json_path.read_bytes())
    assert data["output"] == "p50" and data["horizon_steps"] == list(range(1, TINY_HORIZON + 1))
    assert data["min_integration_steps"] == 64
    first = data["items"][0]
    # Relative to the attributions' size: the capped seasonal level makes the path kinked.
    assert first["item_id"] == ITEM and first["parts"]["sales"]["completeness_share"] < 0.02
    assert len(first["top"]) == 5 and first["top"][0]["attribution"] != 0
    assert data["items"][2]["fallback"] is True and data["items"][2]["parts"] == {}
    assert explanation_table(results[0]).row_count == 5 + 2


def test_integrated_gradients_of_an_untrained_network() -> None:
    """Completeness on a network that reads every feature (no level blend, random weights)."""
    from training.model import build_model

    model = build_model(window=8, n_features=3, horizon=4, units=4, dropout=0.0)
    rng = np.random.default_rng(0)
    x = rng.random((3, 8, 3), dtype=np.float32)
    reference = np.zeros_like(x)
    scale = np.array([2.0, 5.0, 1.0], np.float32)
    attr_x, attr_s, f_x, f_ref = integrated_gradients(
        model, x, reference, scale, scale * 0.5, output="mean", n_steps=64
    )
    assert attr_x.shape == x.shape and attr_s.shape == (3,)
    total = attr_x.sum(axis=(1, 2)) + attr_s
    assert np.allclose(total, f_x - f_ref, rtol=5e-3, atol=1e-4)
    with pytest.raises(ConfigError):
        integrated_gradients(model, x, reference[:, :4], scale, scale)


def test_cli(
    bundle_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    base = ["explain", "--bundle", str(bundle_dir), "--data", str(sample_data_path())]
    out = tmp_path / "explain"
    code, stdout, err = run_cli(
        [*base, ITEM, "--output", "p50", "--vs", "2011-08-01", "--out", str(out)],
        monkeypatch,
        capsys,
    )
    assert code == 0, err
    assert "went" in stdout and "moved it by" in stdout
    assert (out / "explain.json").is_file() and (out / f"{ITEM}.png").is_file()
    data = orjson.loads((out / "explain.json").read_bytes())
    assert data["items"][0]["mode"] == "change"

    code, _, err = run_cli([*base, "NOPE", "--out", str(out)], monkeypatch, capsys)
    assert code == 1
    assert_one_line_error(err, "unknown item NOPE")

    code, stdout, err = run_cli(
        [*base, OTHER, "--at", "2009-12-20", "--out", str(out)], monkeypatch, capsys
    )
    assert code == 1
    assert "seasonal-naive fallback" in stdout
    assert_one_line_error(err, f"(not explained): {OTHER}")

    code, _, err = run_cli(
        [*base, ITEM, "--at", "2020-01-01", "--out", str(out)], monkeypatch, capsys
    )
    assert code == 1
    assert_one_line_error(err, "--at 2020-01-01: expected a date")

    code, _, _ = run_cli([*base, ITEM, "--output", "p90", "--out", str(out)], monkeypatch, capsys)
    assert code == 2
