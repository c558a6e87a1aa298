"""Model hot reload: follow the bundle location and swap to a new verified bundle in place.

The bundle location (``TRENDCAST_BUNDLE``) is either a bundle directory itself or a
directory of bundles whose live one is named by a version source
(:mod:`stream.lifecycle.live_pointer`):
the file ``current`` inside it, or the Redis key ``TRENDCAST_BUNDLE_REDIS_KEY``::

    bundles/
    ├── current          "v2" (deploy: write a new file, rename it over this one)
    ├── v1/              bundle.json, model.onnx, scales.json
    └── v2/

A :class:`BundleWatcher` polls the source (a Faust timer, every
``TRENDCAST_BUNDLE_POLL_S``). When the live target or its ``bundle.json`` model_version
changed it loads and verifies the bundle off the event loop (checksums, ONNX shapes, an
ONNX Runtime session) and hands it to a swap callback; the stream processor installs it
between two batches (:meth:`stream.pipeline.processor.SalesProcessor.swap_model`), so one batch
never mixes two models and no event is dropped or counted twice: the swap touches neither
offsets nor window state. A bundle that fails verification, or that the running window
state cannot feed (other freq, larger window, prices the state does not keep), is refused
with one log line and ``trendcast_bundle_reload_failures_total``; the old model keeps
serving. Rollback is pointing ``current`` (or the key) back. A source that cannot be read
(Redis down) swaps nothing either: it is logged when it starts and when it ends.

This module must stay TensorFlow-free, like the rest of :mod:`stream`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import orjson

from stream.inference.model_info import ModelInfo
from stream.lifecycle.live_pointer import (
    CURRENT_FILE,
    PointerFile,
    VersionSource,
    live_bundle,
    read_pointer,
)
from stream.monitoring.telemetry import BUNDLE_RELOAD_FAILURES
from trendcast.bundle import META_FILE, Bundle, load_bundle
from trendcast.exceptions import BundleError, StateStoreError, TrendcastError
from trendcast.forecasting.base import Forecaster
from trendcast.forecasting.profile import IntradayProfile

__all__ = [
    "CURRENT_FILE",
    "BundleWatcher",
    "LoadedModel",
    "load_model",
    "model_info",
    "resolve_bundle",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class LoadedModel:
    """A verified bundle, ready to serve.

    Attributes:
        path: The bundle directory it was loaded from (after following ``current``).
        forecaster: The bundle's ONNX forecaster.
        model: Freq, window, horizon and version of the model.
    """

    path: Path
    forecaster: Forecaster
    model: ModelInfo


def resolve_bundle(location: Path) -> Path:
    """The live bundle directory of ``location``: the target of its ``current``, or itself.

    Only the file: the worker, which may follow a Redis key, uses
    :func:`stream.lifecycle.live_pointer.resolve_now` with its
    :func:`~stream.lifecycle.live_pointer.version_source`.

    >>> resolve_bundle(Path("/nonexistent/bundle"))
    PosixPath('/nonexistent/bundle')

    Raises:
        BundleError: ``current`` exists but does not name a relative path on one line.
    """
    name = read_pointer(location)
    return location if name is None else location / name


def model_info(bundle: Bundle) -> ModelInfo:
    """What the worker needs from a bundle besides the forecaster."""
    meta = bundle.meta
    return ModelInfo(
        freq=bundle.freq,
        window=meta.window,
        horizon=meta.horizon,
        model_version=meta.model_version,
        uses_prices="price" in meta.features,
        profile=IntradayProfile.from_bundle(bundle),
    )


def load_model(location: Path, threads: int | None = None) -> LoadedModel:
    """Resolve ``location``, verify the bundle and open its ONNX model (blocking) with
    ``threads`` intra-op threads (None: :func:`trendcast.forecasting.onnx.default_threads`).

    Raises:
        BundleError: Bad pointer, or a missing, corrupt or inconsistent bundle.
    """
    # Imported here: ONNX Runtime is heavy and `trendcast --help` imports this module's users.
    from trendcast.forecasting.onnx import OnnxForecaster

    path = resolve_bundle(location)
    bundle = load_bundle(path)
    return LoadedModel(path, OnnxForecaster(bundle, threads=threads), model_info(bundle))


#: What identifies a bundle on disk cheaply: (resolved directory, model_version, bundle.json
#: mtime). The mtime only matters for refused bundles: a bundle fixed in place is retried.
_Seen = tuple[Path, str | None, int]


def _peek(live: Path) -> _Seen:
    """The live bundle directory and the version it claims, without verifying anything."""
    target = live.resolve()
    meta_file = target / META_FILE
    try:
        raw = orjson.loads(meta_file.read_bytes())
        mtime_ns = meta_file.stat().st_mtime_ns
    except (OSError, orjson.JSONDecodeError):
        return target, None, 0  # the full load reports what exactly is wrong
    version = raw.get("model_version") if isinstance(raw, dict) else None
    return target, version if isinstance(version, str) else None, mtime_ns


class BundleWatcher:
    """Polls the bundle location and swaps in each new bundle that verifies.

    Args:
        location: ``settings.bundle``: a bundle, or a directory of bundles.
        serving: The model the worker runs now (loaded at start).
        loader: Loads and verifies a bundle directory (blocking; run in a thread).
            Injectable so tests can count loads.
        source: Names the live bundle under ``location`` (see :mod:`stream.lifecycle.live_pointer`);
            default: the file ``location/current``.
    """

    def __init__(
        self,
        location: Path,
        serving: LoadedModel,
        *,
        loader: Callable[[Path], LoadedModel] = load_model,
        source: VersionSource | None = None,
    ) -> None:
        self.location = location
        self.serving = serving
        self.source: VersionSource = source if source is not None else PointerFile(location)
        self._loader = loader
        self._serving_key = (serving.path.resolve(), serving.model.model_version)
        # The last refused state, so a bad bundle is logged and counted once, not every poll.
        self._refused: _Seen | tuple[str, str] | None = None
        # Why the source could not be read at the last poll (None: it could).
        self._unreadable: str | None = None

    async def aclose(self) -> None:
        """Release what the source holds (a Redis key source keeps a client between polls)."""
        close = getattr(self.source, "aclose", None)
        if close is not None:
            await close()

    async def poll(self, swap: Callable[[LoadedModel], None]) -> bool:
        """Check the source once; load, verify and ``swap`` in a changed bundle.

        ``swap`` installs the model; it raises :class:`BundleError` to refuse one the
        running state cannot serve. Never raises: a reload must not take down a worker
        that is serving fine. A source that cannot be read now (Redis down) is not a
        refusal: nothing is counted, the next poll tries again.

        Returns:
            Whether a new model was swapped in.
        """
        seen: _Seen | tuple[str, str]
        live: Path | None = None
        try:
            live = await live_bundle(self.location, self.source)
            seen = await asyncio.to_thread(_peek, live)
        except StateStoreError as exc:
            self._source_unreadable(str(exc))
            return False
        except TrendcastError as exc:
            seen = ("pointer", str(exc))
        except Exception as exc:  # a bug in a source must not stop serving either
            logger.exception("reading the live bundle's name from %r failed", self.source)
            seen = ("pointer", f"{type(exc).__name__}: {exc}")
        if self._unreadable is not None:
            logger.info("bundle source %r readable again", self.source)
            self._unreadable = None
        if seen == self._refused:
            return False
        if isinstance(seen[0], Path) and (seen[0], seen[1]) == self._serving_key:
            self._refused = None  # pointed back to what serves: nothing to do
            return False
        try:
            if live is None or not isinstance(seen[0], Path):
                raise BundleError(str(seen[1]))
            loaded = await asyncio.to_thread(self._loader, live)
            swap(loaded)
        except (TrendcastError, OSError) as exc:
            reason = str(exc)
        except Exception as exc:  # a bug in a loader must not stop serving either
            logger.exception("bundle reload from %s failed unexpectedly", live)
            reason = f"{type(exc).__name__}: {exc}"
        else:
            previous = self.serving.model.model_version
            self.serving = loaded
            self._serving_key = (loaded.path.resolve(), loaded.model.model_version)
            self._refused = None
            logger.info(
                "model reloaded: now serving %s from %s (was %s)",
                loaded.model.model_version,
                loaded.path,
                previous,
            )
            return True
        self._refused = seen
        BUNDLE_RELOAD_FAILURES.inc()
        logger.error(
            "bundle reload refused, still serving %s: %s",
            self.serving.model.model_version,
            reason,
        )
        return False

    def _source_unreadable(self, reason: str) -> None:
        """Log an outage of the source once, when it starts (each poll retries quietly)."""
        if self._unreadable is None:
            logger.warning(
                "cannot read the live bundle's name from %r, still serving %s: %s",
                self.source,
                self.serving.model.model_version,
                reason,
            )
        else:
            logger.debug("bundle source %r still unreadable: %s", self.source, reason)
        self._unreadable = reason
