"""``trendcast tune``: a tiny real Optuna search (seeded), its periods, the bundle from it."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
from rich.console import Console

from trendcast.data import Panel, sample_data_path
from trendcast.exceptions import ConfigError
from trendcast.testkit.cli import assert_one_line_error, run_cli
from trendcast.testkit.trained_bundle import tiny_panel

pytest.importorskip("tensorflow")
pytest.importorskip("optuna")

import training.tuning as tuning  # noqa: E402

HORIZON = 7
SPACE = tuning.SearchSpace(windows=(14, 28), units=(8,))
BUDGET: dict[str, Any] = {"horizon": HORIZON, "epochs": 1, "max_windows": 300, "space": SPACE}
QUIET = Console(quiet=True)


@pytest.fixture(scope="module")
def seen() -> dict[str, list[Panel]]:
    return {"train": [], "backtest": []}


@pytest.fixture(scope="module")
def storage(tmp_path_factory: pytest.TempPathFactory) -> str:
    return f"sqlite:///{tmp_path_factory.mktemp('study') / 'tune.db'}"


@pytest.fixture(scope="module")
def searched(seen: dict[str, list[Panel]], storage: str) -> tuning.TuneResult:
    """Two trials with seed 5, recording every panel that training and scoring were given."""
    patch = pytest.MonkeyPatch()
    study = tuning.study  # the module whose trials train and score
    train, backtest = study.train, study.backtest

    def recording_train(panel: Panel, *args: Any, **kwargs: Any) -> Any:
        seen["train"].append(panel)
        return train(panel, *args, **kwargs)

    def recording_backtest(panel: Panel, *args: Any, **kwargs: Any) -> Any:
        seen["backtest"].append(panel)
        return backtest(panel, *args, **kwargs)

    patch.setattr(study, "train", recording_train)
    patch.setattr(study, "backtest", recording_backtest)
    try:
        return tuning.tune(tiny_panel(), trials=2, seed=5, storage=storage, console=QUIET, **BUDGET)
    finally:
        patch.undo()


def test_no_trial_sees_the_test_period(
    searched: tuning.TuneResult, seen: dict[str, list[Panel]]
) -> None:
    split = searched.split
    assert split.test_end == tiny_panel().end
    assert len(seen["train"]) == 2 and len(seen["backtest"]) == 3  # baselines + 2 trials
    for panel in seen["train"]:
        assert panel.end < split.train_until == split.origins[0]
    for panel in seen["backtest"]:
        assert panel.end == split.tuning_end < split.test_start


def test_result_and_json(searched: tuning.TuneResult, tmp_path: Path) -> None:
    assert [t.state for t in searched.trials] == ["COMPLETE", "COMPLETE"]
    best = min(searched.trials, key=lambda t: t.value or np.inf)
    assert searched.best_trial == best.number and searched.best_score == best.value
    assert searched.best_config.window == searched.best_params["window"]
    assert searched.best_config.epochs == 25  # train's budget, not the trials'
    assert searched.default_score is None  # window 56 is not in this space
    doc = orjson.loads(searched.write(tmp_path / "best.json").read_bytes())
    assert doc["metric"] == "rmsse" and doc["seed"] == 5
    assert doc["periods"]["test_start"] == searched.split.test_start.isoformat()
    assert {"seasonal_naive7", "mean28"} <= set(doc["baselines"])
    assert len(doc["trials"]) == 2 and doc["trials"][0]["scores"]["rmsse"] > 0
    assert tuning.config_from_json(tmp_path / "best.json") == searched.best_config


@pytest.mark.slow  # a second two-trial search
def test_same_seed_same_trials(searched: tuning.TuneResult) -> None:
    again = tuning.tune(tiny_panel(), trials=2, seed=5, console=QUIET, **BUDGET)
    assert [t.params for t in again.trials] == [t.params for t in searched.trials]
    assert searched.trials[0].params != searched.trials[1].params


@pytest.mark.slow  # two more searches on the stored study
def test_a_stored_study_resumes_with_new_trials_and_refuses_other_settings(
    searched: tuning.TuneResult, storage: str
) -> None:
    resumed = tuning.tune(tiny_panel(), trials=1, seed=5, storage=storage, console=QUIET, **BUDGET)
    assert [t.number for t in resumed.trials] == [0, 1, 2]
    assert resumed.trials[2].params not in [t.params for t in searched.trials]
    with pytest.raises(ConfigError, match="tuned with other settings \\(metric\\)"):
        tuning.tune(
            tiny_panel(), trials=1, seed=5, storage=storage, metric="wape", console=QUIET, **BUDGET
        )


@pytest.mark.slow  # a full train, an ONNX export and a test-period backtest
def test_train_best_scores_the_test_period_and_keras_equals_onnx(
    searched: tuning.TuneResult, tmp_path: Path
) -> None:
    from export import export_bundle
    from trendcast.bundle import load_bundle
    from trendcast.forecasting.onnx import OnnxForecaster
    from trendcast.forecasting.windows import windows_from_panel

    quick = replace(searched, best_config=replace(searched.best_config, epochs=1, max_windows=300))
    panel = tiny_panel()
    trained = tuning.train_best(panel, quick, console=QUIET)
    assert trained.data_end < searched.split.test_start.isoformat()
    loaded = load_bundle(export_bundle(trained, tmp_path / "bundle"))
    onnx = OnnxForecaster(loaded, threads=1)
    batch = windows_from_panel(panel, loaded.meta.window)
    keras_out, onnx_out = tuning.KerasForecaster(trained).predict(batch), onnx.predict(batch)
    np.testing.assert_allclose(keras_out.mean, onnx_out.mean, rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(keras_out.p90, onnx_out.p90, rtol=1e-3, atol=1e-3)
    assert (keras_out.fallback == onnx_out.fallback).all()
    test = tuning.score_test_period(panel, searched.split, onnx, window=loaded.meta.window)
    assert [o.isoformat() for o in test.origins] == [searched.split.test_start.isoformat()]
    assert list(test.metrics.index) == ["lstm", "seasonal_naive7", "mean28"]


def test_cli_tune_then_train_from_its_json(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    data = ["--data", str(sample_data_path()), "--item-pattern", "^2072"]
    out = tmp_path / "best.json"
    args = ["tune", *data, "--horizon", "7", "--trials", "1", "--epochs", "1"]
    code, stdout, err = run_cli(
        [*args, "--max-windows", "300", "--out", str(out)], monkeypatch, capsys
    )
    assert code == 0, err
    assert "best: trial 0, rmsse" in stdout and "(train's defaults" in stdout
    doc = orjson.loads(out.read_bytes())
    assert doc["trials"][0]["defaults"] is True and doc["config"]["window"] == 56
    bundle = tmp_path / "bundle"
    train = ["train", *data, "--bundle", str(bundle), "--config", str(out)]
    code, stdout, err = run_cli(
        [*train, "--epochs", "1", "--max-windows", "300", "--window", "28"], monkeypatch, capsys
    )
    assert code == 0, err
    assert "flags over" in err and "epochs, max_windows, window" in err
    config = orjson.loads((bundle / "bundle.json").read_bytes())["training"]["extra"]["config"]
    assert (config["window"], config["epochs"], config["horizon"]) == (28, 1, 7)


@pytest.mark.parametrize(
    ("extra", "fragment"),
    [
        (["--trials", "0"], "expected --trials >= 1, got 0"),
        (["--origins", "200"], "before the first tuning origin"),
        (["--test-weeks", "1"], "test period of at least the horizon"),
    ],
)
def test_cli_bad_input_is_one_line(
    extra: list[str],
    fragment: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
) -> None:
    args = ["tune", "--data", str(sample_data_path()), "--out", str(tmp_path / "b.json")]
    code, _, err = run_cli([*args, *extra], monkeypatch, capsys)
    assert code == 1
    assert_one_line_error(err, fragment)
