"""What a trial may set (the search space), and training settings read back from JSON.

:func:`config_from_json` reads the ``config`` of a ``best.json`` (or a plain object of
:class:`~training.trainer.TrainConfig` fields) for ``trendcast train --config``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import optuna
import orjson
from pydantic import TypeAdapter, ValidationError

from training.model import LossName
from training.trainer import TrainConfig
from trendcast.exceptions import ConfigError

__all__ = [
    "SearchSpace",
    "config_from_json",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SearchSpace:
    """What a trial may set; the rest of its :class:`TrainConfig` is the base config's.

    Attributes:
        windows: Input lengths (buckets); those that do not fit the training period are
            dropped (:meth:`fitting`).
        units: LSTM widths.
        dropout: ``(low, high)`` of a uniform float.
        learning_rate: ``(low, high)`` of a log-uniform float.
        losses: Losses of the mean output.
        quantile_weight: ``(low, high)`` of a log-uniform float (weight of the pinball loss).
        mean_blends: Weights of the network against level28 in the mean; ``None`` = chosen on
            ``train()``'s validation split (the default of ``train``).
    """

    windows: tuple[int, ...] = (28, 56, 84)
    units: tuple[int, ...] = (32, 64, 128)
    dropout: tuple[float, float] = (0.0, 0.4)
    learning_rate: tuple[float, float] = (5e-4, 1e-2)
    losses: tuple[LossName, ...] = ("poisson", "tweedie", "mse")
    quantile_weight: tuple[float, float] = (1.0, 30.0)
    mean_blends: tuple[float | None, ...] = (None, 0.25, 0.5, 0.75, 1.0)

    def suggest(self, trial: optuna.Trial) -> dict[str, Any]:
        """One trial's settings (the :class:`TrainConfig` field names)."""
        return {
            "window": trial.suggest_categorical("window", list(self.windows)),
            "units": trial.suggest_categorical("units", list(self.units)),
            "dropout": trial.suggest_float("dropout", *self.dropout),
            "learning_rate": trial.suggest_float("learning_rate", *self.learning_rate, log=True),
            "loss": trial.suggest_categorical("loss", list(self.losses)),
            "quantile_weight": trial.suggest_float(
                "quantile_weight", *self.quantile_weight, log=True
            ),
            "mean_blend": trial.suggest_categorical("mean_blend", list(self.mean_blends)),
        }

    def fitting(self, max_window: int) -> SearchSpace:
        """The space without windows longer than ``max_window``.

        Raises:
            ConfigError: Not even the shortest window fits.
        """
        windows = tuple(w for w in self.windows if w <= max_window)
        if not windows:
            raise ConfigError(
                f"expected room for a window of {min(self.windows)} buckets before the first "
                f"tuning origin, got room for {max_window}; use fewer --origins, a shorter "
                "--test-weeks or --horizon, or more data"
            )
        if len(windows) < len(self.windows):
            logger.warning("windows %s dropped: too long for the training period", self.windows)
        return replace(self, windows=windows)

    def contains(self, params: Mapping[str, Any]) -> bool:
        """Whether ``params`` (e.g. the defaults of ``train``) is a point of this space."""
        return (
            params["window"] in self.windows
            and params["units"] in self.units
            and self.dropout[0] <= params["dropout"] <= self.dropout[1]
            and self.learning_rate[0] <= params["learning_rate"] <= self.learning_rate[1]
            and params["loss"] in self.losses
            and self.quantile_weight[0] <= params["quantile_weight"] <= self.quantile_weight[1]
            and params["mean_blend"] in self.mean_blends
        )

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready description (ranges as ``[low, high]``)."""
        return {f.name: list(getattr(self, f.name)) for f in fields(self)}


def _params_of(config: TrainConfig) -> dict[str, Any]:
    """The searched settings of ``config`` (as :meth:`SearchSpace.suggest` names them)."""
    return {
        "window": config.window,
        "units": config.units,
        "dropout": config.dropout,
        "learning_rate": config.learning_rate,
        "loss": config.loss,
        "quantile_weight": config.quantile_weight,
        "mean_blend": config.mean_blend,
    }


# --------------------------------------------------------------------------------------------
# Reading settings back (``trendcast train --config``)
# --------------------------------------------------------------------------------------------

_CONFIG_ADAPTER: TypeAdapter[TrainConfig] = TypeAdapter(TrainConfig)


def config_from_json(path: Path | str, **overrides: Any) -> TrainConfig:
    """A :class:`TrainConfig` from a JSON file, with ``overrides`` (explicit flags) on top.

    The file is either a ``best.json`` of ``trendcast tune`` (its ``config`` is used) or a
    plain object of :class:`TrainConfig` fields (missing ones keep their defaults).

    Raises:
        ConfigError: Unreadable file, not JSON, unknown fields, or values of the wrong type
            or out of range.
    """
    source = Path(path)
    try:
        document = orjson.loads(source.read_bytes())
    except FileNotFoundError as exc:
        raise ConfigError(f"--config: file not found: {source}") from exc
    except (OSError, orjson.JSONDecodeError) as exc:
        raise ConfigError(f"--config {source}: expected a JSON object, got {exc}") from exc
    if isinstance(document, dict) and isinstance(document.get("config"), dict):
        document = document["config"]
    if not isinstance(document, dict):
        raise ConfigError(
            f"--config {source}: expected a JSON object of training settings, got "
            f"{type(document).__name__}"
        )
    known = {f.name for f in fields(TrainConfig)}
    unknown = sorted(set(document) - known)
    if unknown:
        raise ConfigError(f"--config {source}: expected TrainConfig fields, got unknown {unknown}")
    try:
        config = _CONFIG_ADAPTER.validate_python({**document, **overrides})
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise ConfigError(f"--config {source}: {where}: {first['msg']}") from exc
    config.validate()
    return config
