"""What a search found: every trial's record and the result written as ``best.json``."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
from rich.table import Table

from training.trainer import TrainConfig
from training.tuning.periods import TuningSplit
from training.tuning.space import SearchSpace

__all__ = [
    "TrialRecord",
    "TuneResult",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrialRecord:
    """One trial: its settings, scores on the tuning origins and cost.

    Attributes:
        number: Optuna's trial number (0-based, in order of start).
        state: ``COMPLETE``, ``FAIL`` (diverged…) or ``PRUNED``/``RUNNING`` (interrupted).
        params: The searched settings.
        value: The objective (``None`` if the trial did not complete).
        scores: rmsse, wape, mase, pinball, coverage, fallback_share on the tuning origins.
        seconds: Training plus scoring wall time.
        defaults: This trial is ``train``'s default settings (enqueued first for comparison).
        extra: Facts of the run: epochs run, the mean blend chosen, windows trained on.
    """

    number: int
    state: str
    params: dict[str, Any]
    value: float | None
    scores: dict[str, float]
    seconds: float | None
    defaults: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready (non-finite numbers as ``null``)."""
        return {
            "number": self.number,
            "state": self.state,
            "defaults": self.defaults,
            "params": self.params,
            "value": _finite(self.value),
            "scores": {k: _finite(v) for k, v in self.scores.items()},
            "seconds": None if self.seconds is None else round(self.seconds, 2),
            **self.extra,
        }


def _finite(value: float | None) -> float | None:
    return None if value is None or not math.isfinite(value) else round(float(value), 6)


@dataclass(frozen=True)
class TuneResult:
    """What :func:`tune` found (written as ``best.json`` by :meth:`to_json`).

    Attributes:
        metric: The objective (minimised) on the tuning origins.
        best_params: The best trial's searched settings.
        best_config: The full :class:`TrainConfig` they imply for a final run: the base
            config's budget (epochs, max windows), not the trials' smaller one.
        best_score: The best trial's ``metric``.
        best_trial: Its number.
        default_score: ``train``'s defaults scored the same way (``None`` if not run).
        seed: Sampler and training seed.
        split: The periods.
        trials: Every trial of the study, oldest first.
        budget: epochs, max_windows, trials, timeout of the search.
        space: The search space as searched.
        baselines: Baseline scores on the same tuning origins.
        study: Study name and storage (``None``: in memory).
        seconds: Wall time of this search.
    """

    metric: str
    best_params: dict[str, Any]
    best_config: TrainConfig
    best_score: float
    best_trial: int
    default_score: float | None
    seed: int
    split: TuningSplit
    trials: list[TrialRecord]
    budget: dict[str, Any]
    space: SearchSpace
    baselines: dict[str, dict[str, float]]
    study: dict[str, Any]
    seconds: float

    def to_json(self) -> dict[str, Any]:
        """The ``best.json`` document (``trendcast train --config`` reads its ``config``)."""
        return {
            "metric": self.metric,
            "best_score": _finite(self.best_score),
            "best_trial": self.best_trial,
            "default_score": _finite(self.default_score),
            "best_params": self.best_params,
            "config": self.best_config.as_dict(),
            "seed": self.seed,
            "periods": self.split.as_dict(),
            "budget": self.budget,
            "search_space": self.space.as_dict(),
            "baselines": {
                name: {k: _finite(v) for k, v in s.items()} for name, s in self.baselines.items()
            },
            "study": self.study,
            "seconds": round(self.seconds, 1),
            "trials": [t.as_dict() for t in self.trials],
        }

    def write(self, path: Path | str, extra: Mapping[str, Any] | None = None) -> Path:
        """Write :meth:`to_json` (plus ``extra`` keys, e.g. ``test``) to ``path``."""
        out = Path(path)
        out.parent.mkdir(parents=True, exist_ok=True)
        document = {**self.to_json(), **(extra or {})}
        out.write_bytes(orjson.dumps(document, option=orjson.OPT_INDENT_2) + b"\n")
        return out

    def table(self) -> Table:
        """Every trial with its settings and scores; the best one in bold green.

        Compact headers so it fits 100 columns: ``qw`` quantile weight, ``blend`` the mean's
        weight against level28 (``val``: chosen on validation), ``d`` marks the defaults.
        """
        table = Table(
            title=f"trials ({self.metric} on {len(self.split.origins)} tuning origins; "
            "d = train's defaults)"
        )
        columns = ("#", "window", "units", "dropout", "lr", "loss", "qw", "blend")
        for name in (*columns, "rmsse", "wape", "pinball", "s"):
            table.add_column(
                name,
                justify="left" if name in ("loss", "blend") else "right",
                no_wrap=True,
                min_width=len(name),
            )
        for t in self.trials:
            p = t.params
            blend = p.get("mean_blend")
            cells = [
                f"{t.number}{'d' if t.defaults else ''}",
                str(p.get("window", "")),
                str(p.get("units", "")),
                f"{p['dropout']:.2f}" if "dropout" in p else "",
                f"{p['learning_rate']:.1e}" if "learning_rate" in p else "",
                str(p.get("loss", "")),
                f"{p['quantile_weight']:.1f}" if "quantile_weight" in p else "",
                "val" if blend is None else f"{blend:.2f}",
            ]
            if t.state == "COMPLETE":
                cells += [f"{t.scores[k]:.4f}" for k in ("rmsse", "wape", "pinball")]
            else:
                cells += [t.state.lower(), "", ""]
            cells.append("" if t.seconds is None else f"{t.seconds:.0f}")
            table.add_row(*cells, style="bold green" if t.number == self.best_trial else None)
        return table
