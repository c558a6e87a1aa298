"""Real bundles for the benches, trained by ``trendcast train`` once and cached.

Why: the throughput and scale figures must come from a model trained on the shared data (a
fake linear graph or the seasonal-naive fallback would flatter the forecast path), but a
default train takes minutes on this 2-core machine. So a bundle is trained once per data file
and settings, into ``artifacts/bench-bundle/<key>/``, where ``key`` hashes the data file's
size and modification time, the train flags and the code of ``training/`` and ``export/``;
later runs reuse it (the bench prints which). Delete the directory to retrain.

Two bundles:

* :func:`daily_bundle`: ``trendcast train`` with the README's ``RETAIL=`` flags and every
  default (daily buckets, window 56, horizon 28);
* :func:`minute_bundle`: ``trendcast train --freq 1min`` on the busiest days of the same data
  (one-minute buckets over the whole file would be ~900,000 buckets per item: the real-time
  part of the bench needs a model of the right kind, window and horizon, trained on the data's
  own intraday sales, not a year of minutes).
"""

from __future__ import annotations

import hashlib
import logging
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

__all__ = ["CACHE", "RETAIL_FLAGS", "daily_bundle", "minute_bundle", "train_cached"]

logger = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]
CACHE = REPO / "artifacts" / "bench-bundle"
#: The README's ``RETAIL=`` column flags for the UCI Online Retail file.
RETAIL_FLAGS = (
    "--item-col",
    "StockCode",
    "--time-col",
    "InvoiceDate",
    "--qty-col",
    "Quantity",
    "--price-col",
    "UnitPrice",
    "--item-pattern",
    r"^\d{5}[A-Z]?$",
)
#: Minute bundle: an hour of minutes in, a quarter of an hour out.
MINUTE_FLAGS = ("--freq", "1min", "--window", "60", "--horizon", "15", "--max-windows", "30000")
#: Days of the data the minute bundle trains on (the busiest weeks before Christmas 2010).
MINUTE_DAYS = ("2010-11-15", "2010-12-04")


def _code_digest() -> str:
    """Digest of the training and export code: a change there retrains the cached bundle."""
    digest = hashlib.sha256()
    for package in ("training", "export"):
        for path in sorted((REPO / package).rglob("*.py")):
            digest.update(path.relative_to(REPO).as_posix().encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def cache_key(data: Path, flags: Sequence[str]) -> str:
    """Key of a cached bundle: the data file (path, size, mtime), the flags and the code."""
    stat = data.stat()
    digest = hashlib.sha256()
    digest.update(f"{data.resolve()}|{stat.st_size}|{int(stat.st_mtime)}|".encode())
    digest.update("\x00".join(flags).encode())
    digest.update(_code_digest().encode())
    return digest.hexdigest()[:16]


def train_cached(data: Path, flags: Sequence[str], name: str) -> tuple[Path, bool]:
    """The bundle ``trendcast train --data data *flags`` makes, trained now or from the cache.

    Returns:
        The bundle directory and whether it came from the cache.
    """
    key = cache_key(data, flags)
    bundle = CACHE / f"{name}-{key}"
    if (bundle / "bundle.json").is_file():
        logger.info("bundle %s from the cache (%s)", name, bundle)
        return bundle, True
    bundle.parent.mkdir(parents=True, exist_ok=True)
    partial = bundle.with_name(bundle.name + ".partial")
    argv = [
        sys.executable,
        "-m",
        "trendcast.cli",
        "train",
        "--data",
        str(data),
        "--bundle",
        str(partial),
        *flags,
    ]
    logger.info("training %s: %s", name, " ".join(argv[2:]))
    started = time.perf_counter()
    log_path = bundle.with_name(bundle.name + ".log")
    with log_path.open("wb") as log:
        code = subprocess.call(argv, cwd=str(REPO), stdout=log, stderr=subprocess.STDOUT)  # noqa: S603
    if code != 0:
        tail = log_path.read_text(errors="replace").splitlines()[-20:]
        raise RuntimeError(f"trendcast train exited {code}:\n" + "\n".join(tail))
    partial.rename(bundle)
    logger.info("trained %s in %.0f s", name, time.perf_counter() - started)
    return bundle, False


def daily_bundle(data: Path) -> tuple[Path, bool]:
    """The default daily bundle of the shared data (window 56, horizon 28)."""
    return train_cached(data, RETAIL_FLAGS, "daily")


def minute_slice(data: Path) -> Path:
    """The busiest weeks of ``data`` as their own parquet file (cached beside the bundles)."""
    import pandas as pd

    out = CACHE / f"minutes-{cache_key(data, MINUTE_DAYS)}.parquet"
    if not out.is_file():
        frame = pd.read_parquet(data)
        ts = pd.to_datetime(frame["InvoiceDate"])
        keep = (ts >= pd.Timestamp(MINUTE_DAYS[0])) & (ts < pd.Timestamp(MINUTE_DAYS[1]))
        out.parent.mkdir(parents=True, exist_ok=True)
        frame[keep].reset_index(drop=True).to_parquet(out)
    return out


def minute_bundle(data: Path) -> tuple[Path, bool]:
    """A ``1min`` bundle trained on :func:`minute_slice` of the shared data."""
    return train_cached(minute_slice(data), (*RETAIL_FLAGS, *MINUTE_FLAGS), "minute")


if __name__ == "__main__":  # python -m bench._bundles DATA: train (or find) both bundles
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    source = Path(sys.argv[1])
    print(daily_bundle(source)[0])
    print(minute_bundle(source)[0])
