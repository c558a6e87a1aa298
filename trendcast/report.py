"""``trendcast report``: plots and a table of the worker's online accuracy records.

The worker's :class:`stream.monitoring.online_accuracy.AccuracyTracker` publishes one record per
model version
and role to the ``forecast-accuracy`` topic whenever its rolling metrics change: RMSSE, WAPE
and coverage over the target buckets of the last ``rolling_buckets`` buckets, ending at
``target_to``. This module turns such records (from a JSON-lines file, or read from Kafka by
the CLI) into:

* ``online_accuracy.png``: overall RMSSE, WAPE and coverage against the newest target bucket,
  one line per model version and role (shadow dashed);
* ``accuracy.csv``: the series plotted;
* ``summary.csv`` / ``summary.md`` and a rich table: per model version and role, the metrics
  of the latest rolling window and the range of target buckets seen.

Several workers each publish their own items' metrics (records carry ``instance``). For each
model version, role and ``target_to`` the latest record of every instance is kept and the
instances are pooled from their raw ``sums`` — the metrics of all their forecasts together;
records without ``sums`` are combined by an ``n``-weighted mean instead, an approximation.

This module never imports :mod:`stream`: reading Kafka is the CLI's job (lazily), so the
report works from a file on a machine without the worker's dependencies.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from rich.console import Console
from rich.table import Table

from trendcast.exceptions import DataError

__all__ = [
    "Report",
    "accuracy_frame",
    "build_report",
    "plot_accuracy",
    "read_records",
    "summary_frame",
    "summary_markdown",
    "summary_table",
]

logger = logging.getLogger(__name__)

_DPI = 110
_METRICS = ("rmsse", "wape", "coverage")
_REQUIRED = ("model_version", "role", "target_to_ms", "n", *_METRICS)
_NOMINAL_COVERAGE = 0.8
_SUMS = ("n", "n_scaled", "sae", "abs_err", "abs_actual", "covered")


def read_records(path: Path) -> list[dict[str, Any]]:
    """The record values of a JSON-lines file; blank lines are skipped.

    A line is either a record value or a ``trendcast tail`` line (``{"topic", ..., "value"}``),
    whose ``value`` is taken, so ``trendcast tail --topic forecast-accuracy -n 100000 > f``
    makes a valid input.

    Raises:
        DataError: The file is missing or unreadable, or a line is not a JSON object.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise DataError(f"accuracy records file not found: {path}") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read accuracy records from {path}: {exc}") from exc
    records: list[dict[str, Any]] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            value = orjson.loads(line)
        except orjson.JSONDecodeError as exc:
            raise DataError(f"{path}:{number}: expected a JSON object, got {line[:60]!r}") from exc
        if isinstance(value, dict) and "topic" in value and "value" in value:
            value = value["value"]  # a `trendcast tail` line
        if not isinstance(value, dict):
            raise DataError(f"{path}:{number}: expected a JSON object, got {line[:60]!r}")
        records.append(value)
    return records


def _number(value: Any) -> float:
    if value is None:
        return math.nan
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"expected a number, got {value!r}")
    return float(value)


def _validated(records: Iterable[Any], source: str) -> pd.DataFrame:
    rows: list[dict[str, Any]] = []
    for i, record in enumerate(records, start=1):
        if not isinstance(record, Mapping):
            raise DataError(f"{source}: record {i}: expected a JSON object, got {record!r:.60}")
        missing = [key for key in _REQUIRED if key not in record]
        if missing:
            raise DataError(
                f"{source}: record {i}: expected forecast-accuracy fields "
                f"{', '.join(_REQUIRED)}; missing {', '.join(missing)}"
            )
        try:
            sums: Any = record.get("sums")
            row = {
                "model_version": str(record["model_version"]),
                "role": str(record["role"]),
                "instance": str(record.get("instance", "")),
                "target_to_ms": int(_number(record["target_to_ms"])),
                "emitted_at_ms": int(_number(record.get("emitted_at_ms", 0))),
                "n": _number(record["n"]),
                **{m: _number(record[m]) for m in _METRICS},
                "has_sums": isinstance(sums, Mapping) and all(k in sums for k in _SUMS),
            }
            for key in _SUMS:
                row[f"sum_{key}"] = _number(sums[key]) if row["has_sums"] else math.nan
        except (TypeError, ValueError, OverflowError) as exc:
            raise DataError(f"{source}: record {i}: {exc}") from exc
        rows.append(row)
    if not rows:
        raise DataError(f"no forecast-accuracy records in {source}")
    return pd.DataFrame(rows)


def _ratio(num: float, den: float) -> float:
    return num / den if den > 0 else math.nan


def _pool(group: pd.DataFrame) -> pd.Series:
    """One point from the latest record of each instance (see the module docstring)."""
    if len(group) == 1:
        row = group.iloc[0]
        values = {"n": row["n"], **{m: row[m] for m in _METRICS}}
    elif bool(group["has_sums"].all()):
        s = {key: float(group[f"sum_{key}"].sum()) for key in _SUMS}
        values = {
            "n": s["n"],
            "rmsse": _ratio(s["sae"], s["n_scaled"]),
            "wape": _ratio(s["abs_err"], s["abs_actual"]),
            "coverage": _ratio(s["covered"], s["n"]),
        }
    else:
        weights = group["n"].astype(float)
        values = {"n": float(weights.sum())}
        for m in _METRICS:
            ok = group[m].notna() & (weights > 0)
            values[m] = _ratio(float((group[m][ok] * weights[ok]).sum()), float(weights[ok].sum()))
    values["instances"] = len(group)
    return pd.Series(values)


def accuracy_frame(records: Iterable[Any], *, source: str = "input") -> pd.DataFrame:
    """One row per model version, role and target bucket: the pooled overall metrics.

    Columns: ``model_version, role, target, n, rmsse, wape, coverage, instances`` (``target``
    is the start of the newest target bucket of the rolling window, naive UTC).

    >>> recs = [{"model_version": "v1", "role": "live", "target_to_ms": 86_400_000, "n": 4,
    ...          "rmsse": 0.5, "wape": 0.4, "coverage": 0.75, "instance": "a"},
    ...         {"model_version": "v1", "role": "live", "target_to_ms": 86_400_000, "n": 1,
    ...          "rmsse": 1.0, "wape": 0.9, "coverage": 1.0, "instance": "b"}]
    >>> row = accuracy_frame(recs).iloc[0]
    >>> str(row["target"]), float(row["n"]), float(row["coverage"]), int(row["instances"])
    ('1970-01-02 00:00:00', 5.0, 0.8, 2)

    Raises:
        DataError: No records, or a record is not a forecast-accuracy record.
    """
    raw = _validated(records, source)
    keys = ["model_version", "role", "target_to_ms"]
    latest = (
        raw.sort_values("emitted_at_ms", kind="stable")
        .groupby([*keys, "instance"], sort=False)
        .tail(1)
    )
    values = ["n", *_METRICS, "has_sums", *(f"sum_{key}" for key in _SUMS)]
    pooled = latest.groupby(keys, sort=True)[values].apply(_pool).reset_index()
    pooled["target"] = pd.to_datetime(pooled["target_to_ms"], unit="ms")
    pooled["instances"] = pooled["instances"].astype(int)
    columns = ["model_version", "role", "target", "n", *_METRICS, "instances"]
    return pooled[columns].sort_values(["model_version", "role", "target"], ignore_index=True)


def summary_frame(frame: pd.DataFrame) -> pd.DataFrame:
    """Per model version and role: the latest rolling window's metrics and the range seen.

    Columns: ``model_version, role, first_target, last_target, points, n, rmsse, wape,
    coverage`` (metrics and ``n`` of the last target).
    """
    rows = []
    for (version, role), group in frame.groupby(["model_version", "role"], sort=True):
        last = group.iloc[-1]
        rows.append(
            {
                "model_version": version,
                "role": role,
                "first_target": group["target"].min(),
                "last_target": group["target"].max(),
                "points": len(group),
                "n": int(last["n"]),
                **{m: float(last[m]) for m in _METRICS},
            }
        )
    return pd.DataFrame(rows)


def _fmt(value: Any) -> str:
    return "—" if value is None or not math.isfinite(float(value)) else f"{float(value):.3f}"


def _date(ts: pd.Timestamp) -> str:
    return str(ts.date()) if ts == ts.normalize() else ts.isoformat()


def _cells(row: pd.Series) -> list[str]:
    return [
        str(row["model_version"]),
        str(row["role"]),
        f"{_date(row['first_target'])}..{_date(row['last_target'])}",
        f"{int(row['n']):,}",
        *(_fmt(row[m]) for m in _METRICS),
    ]


_HEADERS = ("model version", "role", "targets seen", "n", "RMSSE", "WAPE", "coverage")


def summary_table(summary: pd.DataFrame) -> Table:
    """A rich table of :func:`summary_frame`."""
    table = Table(title="Online accuracy (latest rolling window)")
    for i, header in enumerate(_HEADERS):
        table.add_column(header, justify="right" if i >= 3 else "left", no_wrap=i < 2)
    for _, row in summary.iterrows():
        table.add_row(*_cells(row))
    table.caption = f"coverage target {_NOMINAL_COVERAGE}; n = scored (forecast, step) pairs"
    return table


def summary_markdown(summary: pd.DataFrame) -> str:
    """A GitHub markdown table of :func:`summary_frame`.

    >>> s = pd.DataFrame([{"model_version": "v1", "role": "live",
    ...     "first_target": pd.Timestamp("2011-06-01"), "last_target": pd.Timestamp("2011-06-28"),
    ...     "points": 3, "n": 1200, "rmsse": 0.91, "wape": 0.62, "coverage": float("nan")}])
    >>> print(summary_markdown(s))
    | model version | role | targets seen | n | RMSSE | WAPE | coverage |
    |---|---|---|---:|---:|---:|---:|
    | v1 | live | 2011-06-01..2011-06-28 | 1,200 | 0.910 | 0.620 | — |
    """
    lines = ["| " + " | ".join(_HEADERS) + " |", "|---|---|---|" + "---:|" * 4]
    lines += ["| " + " | ".join(_cells(row)) + " |" for _, row in summary.iterrows()]
    return "\n".join(lines)


def plot_accuracy(frame: pd.DataFrame, path: Path) -> Path:
    """RMSSE, WAPE and coverage against the newest target bucket, one line per version/role.

    Rendered by the Agg canvas, never pyplot (see :mod:`trendcast.plots`).
    """
    fig = Figure(figsize=(10, 8))
    axes = fig.subplots(3, 1, sharex=True)
    for (version, role), group in frame.groupby(["model_version", "role"], sort=True):
        style = "--" if role == "shadow" else "-"
        for ax, metric in zip(axes, _METRICS, strict=True):
            ax.plot(
                group["target"], group[metric], ls=style, marker="o", ms=3, lw=1.2,
                label=f"{version} ({role})",
            )  # fmt: skip
    for ax, metric in zip(axes, _METRICS, strict=True):
        ax.set_ylabel(metric.upper() if metric != "coverage" else "coverage p10–p90")
        ax.grid(alpha=0.3)
    axes[2].axhline(_NOMINAL_COVERAGE, color="0.5", ls=":", lw=1)
    axes[2].set_xlabel("newest target bucket of the rolling window")
    axes[0].legend(fontsize=8)
    axes[0].set_title("Online accuracy over the rolling window")
    fig.autofmt_xdate()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=_DPI)
    logger.info("wrote %s", path)
    return path


@dataclass(frozen=True)
class Report:
    """What :func:`build_report` produced.

    Attributes:
        frame: :func:`accuracy_frame` (the plotted series).
        summary: :func:`summary_frame`.
        files: Name -> path of every file written.
    """

    frame: pd.DataFrame
    summary: pd.DataFrame
    files: dict[str, Path]


def build_report(
    records: Sequence[Any],
    out: Path,
    *,
    source: str = "input",
    console: Console | None = None,
) -> Report:
    """Write the plot, CSVs and markdown table into ``out`` and print the summary table.

    Raises:
        DataError: No records, or a record is not a forecast-accuracy record.
    """
    frame = accuracy_frame(records, source=source)
    summary = summary_frame(frame)
    try:
        out.mkdir(parents=True, exist_ok=True)
        files = {"plot": plot_accuracy(frame, out / "online_accuracy.png")}
        files["series"] = out / "accuracy.csv"
        frame.to_csv(files["series"], index=False)
        files["summary_csv"] = out / "summary.csv"
        summary.to_csv(files["summary_csv"], index=False)
        files["summary_md"] = out / "summary.md"
        files["summary_md"].write_text(summary_markdown(summary) + "\n", encoding="utf-8")
    except OSError as exc:
        raise DataError(f"cannot write the report into {out}: {exc}") from exc
    (console or Console()).print(summary_table(summary))
    return Report(frame=frame, summary=summary, files=files)
