"""Settings of the offline CLI (train, export, forecast, evaluate).

One pydantic-settings class per deployable, built once in ``main()`` and passed down; nothing
else reads the environment. The stream worker has its own class in ``stream.settings.worker``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = ["OfflineSettings"]


class OfflineSettings(BaseSettings):
    """Defaults for the offline commands; CLI flags override them.

    Attributes:
        bundle: Default bundle directory (``TRENDCAST_BUNDLE``), shared with the worker.
        log_level: Logging level (``TRENDCAST_LOG_LEVEL``).
        debug: Show tracebacks for unexpected errors (``TRENDCAST_DEBUG=1``).
        threads: Threads for ONNX Runtime and TensorFlow (0 = library default).
    """

    model_config = SettingsConfigDict(env_prefix="TRENDCAST_", frozen=True, extra="ignore")

    bundle: Path = Path("artifacts/bundle")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "WARNING"
    debug: bool = False
    threads: int = Field(default=0, ge=0)
