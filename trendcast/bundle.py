"""The versioned model bundle: ``model.onnx``, ``bundle.json``, ``scales.json`` (+ profiles).

A bundle is a directory written by ``trendcast export`` and read by ``trendcast forecast``
and the stream worker. It is plain files (ONNX protobuf and JSON), never pickle, so that a
worker can verify what it loads: :func:`load_bundle` checks the format version, the sha256 of
every file listed in ``files`` and the ONNX graph's input/output shapes against the metadata,
and refuses anything that does not match. A worker must never forecast from a model it could
not verify.

Layout::

    bundle/
      bundle.json          BundleMeta (below)
      model.onnx           input "x" [batch, window, n_features] float32;
                           outputs "mean" [batch, horizon], "quantiles" [batch, horizon, n_q]
      model.int8.onnx      optional dynamically-quantized copy (``export --quantize``)
      scales.json          {"items": {item_id: scale}, "price": {item_id: mean price}}
      profiles.json        optional: {"items": {item_id: [[share, ...], ...]}}, the per-item
                           intraday profiles ([rows][slots] like ``intraday.shares``)

Outputs are in scaled units; multiply by the item's scale to get quantities.

``intraday`` (:class:`IntradayMeta`, optional) is the intraday profile: how a bucket's units
spread over its duration, which the nowcast of an open bucket needs (see
:mod:`trendcast.forecasting.profile` for how it is learned and applied). It holds the kind
(``hour_by_weekday`` for daily buckets: 7 weekday rows x 24 hourly slots; ``day_of_week``
for weekly ones: 1 x 7; ``uniform``), the slot length, the learning parameters and the global
shares; per-item shares, when any item had enough history, are in ``intraday.items_file``
(``profiles.json``), listed in ``files`` with its sha256 and verified like every other file.
Bundles without ``intraday`` (written before it existed) load and get the uniform profile.
"""

from __future__ import annotations

import hashlib
import logging
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from trendcast.exceptions import BundleError
from trendcast.freq import Freq, parse_freq

__all__ = [
    "BUNDLE_FORMAT_VERSION",
    "Bundle",
    "BundleMeta",
    "IntradayMeta",
    "PROFILES_FILE",
    "ScalingMeta",
    "TrainingMeta",
    "load_bundle",
    "sha256_file",
    "write_bundle_meta",
]

logger = logging.getLogger(__name__)

BUNDLE_FORMAT_VERSION = 1
META_FILE = "bundle.json"
SCALES_FILE = "scales.json"
PROFILES_FILE = "profiles.json"
# Stored shares are rounded; a row may miss 1 by this much.
_SHARE_TOLERANCE = 1e-3


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ScalingMeta(_Frozen):
    """How quantities and prices are scaled per item.

    ``item_mean``: each item's quantities are divided by the mean of its training history
    (plus ``epsilon``); unknown items use the mean of their input window instead.
    """

    method: Literal["item_mean"] = "item_mean"
    epsilon: float = 1e-3
    unknown_items: Literal["window_mean"] = "window_mean"
    scales_file: str = SCALES_FILE


class TrainingMeta(_Frozen):
    """What the model was trained on and how."""

    data_start: str
    data_end: str
    n_items: int
    n_windows: int
    epochs: int
    loss: str
    seed: int
    short_items: Literal["fallback"] = "fallback"
    extra: dict[str, Any] = Field(default_factory=dict)


class IntradayMeta(_Frozen):
    """How a bucket's units spread over its duration (see the module docstring).

    Attributes:
        kind: ``hour_by_weekday``, ``day_of_week`` or ``uniform``.
        slot_ms: Length of one slot; a bucket is ``len(shares[0])`` slots.
        shares: Global shares, ``[rows][slots]``, each row summing to 1.
        min_buckets: Selling buckets an item needed for its own profile.
        prior_buckets: Weight of the global profile in an item's, in buckets per row.
        n_items: Items with their own profile (in ``items_file``).
        items_file: The per-item profiles' file, or ``None`` when no item has one.
        source: Where the profile came from (``lines``, or why it is uniform).
    """

    kind: Literal["uniform", "hour_by_weekday", "day_of_week"]
    slot_ms: int = Field(gt=0)
    shares: list[list[float]] = Field(min_length=1)
    min_buckets: int = Field(ge=0)
    prior_buckets: float = Field(ge=0)
    n_items: int = Field(ge=0)
    items_file: str | None = None
    source: str = "lines"


class BundleMeta(_Frozen):
    """Contents of ``bundle.json``."""

    format_version: int = BUNDLE_FORMAT_VERSION
    model_version: str
    created_at: datetime
    model_file: str = "model.onnx"
    quantized_file: str | None = None
    files: dict[str, str]  # file name -> sha256 hex
    input_name: str = "x"
    output_names: dict[str, str] = Field(
        default_factory=lambda: {"mean": "mean", "quantiles": "quantiles"}
    )
    window: int = Field(gt=0)
    horizon: int = Field(gt=0)
    freq: str
    quantiles: list[float]
    features: list[str]
    scaling: ScalingMeta = ScalingMeta()
    training: TrainingMeta
    metrics: dict[str, Any] = Field(default_factory=dict)
    parity: dict[str, Any] = Field(default_factory=dict)
    versions: dict[str, str] = Field(default_factory=dict)
    intraday: IntradayMeta | None = None


class Bundle:
    """A verified bundle on disk: metadata, scales, intraday profiles and the ONNX model's path.

    ``item_profiles`` holds the per-item intraday shares of ``profiles.json`` (empty without
    one); :meth:`trendcast.forecasting.profile.IntradayProfile.from_bundle` turns them and
    ``meta.intraday`` into the profile the nowcast reads.
    """

    def __init__(
        self,
        path: Path,
        meta: BundleMeta,
        scales: dict[str, float],
        prices: dict[str, float],
        item_profiles: dict[str, list[list[float]]] | None = None,
    ) -> None:
        self.path = path
        self.meta = meta
        self.scales = scales
        self.prices = prices
        self.item_profiles = item_profiles or {}

    @property
    def freq(self) -> Freq:
        """The bucket frequency the model was trained on."""
        return parse_freq(self.meta.freq)

    def model_path(self, quantized: bool = False) -> Path:
        """Path of the float (default) or quantized ONNX model.

        Raises:
            BundleError: ``quantized`` was asked for but the bundle has none.
        """
        if quantized:
            if self.meta.quantized_file is None:
                raise BundleError(f"{self.path}: bundle has no quantized model (export --quantize)")
            return self.path / self.meta.quantized_file
        return self.path / self.meta.model_file


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in chunks (models can be large)."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_bundle_meta(path: Path, meta: BundleMeta) -> None:
    """Write ``bundle.json`` atomically (temp file + rename) so readers never see half a file."""
    tmp = path / (META_FILE + ".tmp")
    tmp.write_bytes(orjson.dumps(meta.model_dump(mode="json"), option=orjson.OPT_INDENT_2))
    tmp.replace(path / META_FILE)


def _check_onnx_shapes(model_file: Path, meta: BundleMeta) -> None:
    """Check the ONNX graph's declared input/output shapes against the metadata."""
    import onnx  # local: only needed when verifying

    try:
        model = onnx.load(str(model_file), load_external_data=False)
    except Exception as exc:  # onnx raises DecodeError and others: all mean corrupt
        raise BundleError(f"{model_file}: not a readable ONNX model ({exc})") from exc

    def dims(value_info: Any) -> list[int | None]:
        shape = value_info.type.tensor_type.shape
        return [d.dim_value if d.HasField("dim_value") else None for d in shape.dim]

    inputs = {i.name: dims(i) for i in model.graph.input}
    outputs = {o.name: dims(o) for o in model.graph.output}
    expected_in = [None, meta.window, len(meta.features)]
    got_in = inputs.get(meta.input_name)
    if got_in is None or got_in[1:] != expected_in[1:] or got_in[0] is not None:
        raise BundleError(
            f"{model_file}: expected input {meta.input_name!r} of shape "
            f"[batch, {meta.window}, {len(meta.features)}] with dynamic batch, got {inputs}"
        )
    expected_out = {
        meta.output_names["mean"]: [meta.horizon],
        meta.output_names["quantiles"]: [meta.horizon, len(meta.quantiles)],
    }
    for name, tail in expected_out.items():
        got = outputs.get(name)
        if got is None or got[1:] != tail:
            raise BundleError(
                f"{model_file}: expected output {name!r} of shape [batch, "
                f"{', '.join(map(str, tail))}], got {outputs}"
            )


def _check_shares(rows: Any, n_rows: int, n_slots: int, where: str) -> None:
    """Require ``[n_rows][n_slots]`` finite non-negative shares, each row summing to 1."""
    ok = (
        isinstance(rows, list)
        and len(rows) == n_rows
        and all(isinstance(r, list) and len(r) == n_slots for r in rows)
    )
    if ok:
        try:
            ok = all(
                all(isinstance(v, int | float) and 0.0 <= v <= 1.0 for v in r)
                and abs(sum(r) - 1.0) <= _SHARE_TOLERANCE
                for r in rows
            )
        except TypeError:
            ok = False
    if not ok:
        raise BundleError(
            f"{where}: expected {n_rows} x {n_slots} shares in [0, 1], each row summing to 1"
        )


def _intraday_slots(meta: BundleMeta, meta_file: Path) -> tuple[int, int]:
    """Rows and slots of the bundle's intraday profile, checked against its frequency."""
    intraday = meta.intraday
    if intraday is None:  # pragma: no cover - callers check
        return 1, 1
    step = parse_freq(meta.freq).step_ms
    n_rows, n_slots = len(intraday.shares), len(intraday.shares[0])
    if step % intraday.slot_ms != 0 or step // intraday.slot_ms != n_slots:
        raise BundleError(
            f"{meta_file}: expected intraday slots covering one {meta.freq} bucket, got "
            f"{n_slots} slots of {intraday.slot_ms} ms"
        )
    _check_shares(intraday.shares, n_rows, n_slots, f"{meta_file}: intraday.shares")
    return n_rows, n_slots


def _load_item_profiles(path: Path, meta: BundleMeta, meta_file: Path) -> dict[str, Any]:
    intraday = meta.intraday
    if intraday is None:
        return {}
    n_rows, n_slots = _intraday_slots(meta, meta_file)
    if intraday.items_file is None:
        return {}
    file = path / intraday.items_file
    try:
        raw = orjson.loads(file.read_bytes())["items"]
    except (orjson.JSONDecodeError, KeyError, TypeError) as exc:
        raise BundleError(f"{file}: invalid intraday profiles ({exc})") from exc
    if not isinstance(raw, dict) or len(raw) != intraday.n_items:
        got = len(raw) if isinstance(raw, dict) else type(raw).__name__
        raise BundleError(f"{file}: expected {intraday.n_items} item profiles, got {got}")
    for item, rows in raw.items():
        _check_shares(rows, n_rows, n_slots, f"{file}: item {item!r}")
    return {str(k): v for k, v in raw.items()}


def load_bundle(path: Path | str, *, check_model: bool = True) -> Bundle:
    """Load and verify a bundle directory.

    Args:
        path: The bundle directory.
        check_model: Also parse the ONNX graph and check its shapes (default). The checksums
            are always verified.

    Raises:
        BundleError: Missing directory or files, invalid metadata, unsupported format
            version, checksum mismatch, or shapes that do not match the metadata.
    """
    path = Path(path)
    meta_file = path / META_FILE
    if not path.is_dir():
        raise BundleError(f"bundle directory not found: {path}")
    if not meta_file.is_file():
        raise BundleError(f"{path}: not a bundle (no {META_FILE})")
    try:
        raw = orjson.loads(meta_file.read_bytes())
    except orjson.JSONDecodeError as exc:
        raise BundleError(f"{meta_file}: corrupt JSON ({exc})") from exc
    if not isinstance(raw, dict):
        raise BundleError(f"{meta_file}: expected a JSON object, got {type(raw).__name__}")
    version = raw.get("format_version")
    if version != BUNDLE_FORMAT_VERSION:
        raise BundleError(
            f"{meta_file}: expected format_version {BUNDLE_FORMAT_VERSION}, got {version!r}"
        )
    try:
        meta = BundleMeta.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(map(str, first["loc"]))
        raise BundleError(f"{meta_file}: invalid metadata at {where}: {first['msg']}") from exc
    try:
        parse_freq(meta.freq)
    except Exception as exc:
        raise BundleError(f"{meta_file}: invalid freq {meta.freq!r}") from exc
    if len(meta.quantiles) != 3 or sorted(meta.quantiles) != meta.quantiles:
        raise BundleError(f"{meta_file}: expected 3 increasing quantiles, got {meta.quantiles}")
    required = {meta.model_file, meta.scaling.scales_file}
    if meta.quantized_file:
        required.add(meta.quantized_file)
    if meta.intraday is not None and meta.intraday.items_file is not None:
        required.add(meta.intraday.items_file)
    unlisted = required - set(meta.files)
    if unlisted:
        raise BundleError(f"{meta_file}: no checksum for {', '.join(sorted(unlisted))}")
    for name, expected in meta.files.items():
        file = path / name
        if not file.is_file():
            raise BundleError(f"{path}: missing {name}")
        actual = sha256_file(file)
        if actual != expected:
            raise BundleError(
                f"{file}: checksum mismatch (expected sha256 {expected[:12]}…, got {actual[:12]}…)"
            )
    try:
        scales_raw = orjson.loads((path / meta.scaling.scales_file).read_bytes())
        scales = {str(k): float(v) for k, v in scales_raw["items"].items()}
        prices = {str(k): float(v) for k, v in scales_raw.get("price", {}).items()}
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as exc:
        raise BundleError(f"{path / meta.scaling.scales_file}: invalid scales ({exc})") from exc
    item_profiles = _load_item_profiles(path, meta, meta_file)
    if check_model:
        _check_onnx_shapes(path / meta.model_file, meta)
        if meta.quantized_file:
            _check_onnx_shapes(path / meta.quantized_file, meta)
    logger.info("loaded bundle %s (model %s)", path, meta.model_version)
    return Bundle(path=path, meta=meta, scales=scales, prices=prices, item_profiles=item_profiles)
