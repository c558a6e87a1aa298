"""The published contract of every topic: JSON Schema (draft 2020-12) files shipped in the package.

Subscribers in any language read the records of trendcast's topics; these schemas are what
they may rely on. One file per record kind, ``trendcast/schemas/<name>.json``, named after
the topic's default name (``sales``, ``sales.dlq``, ``forecasts``, ``alerts``, ``trends``,
``forecast-accuracy``). Each ``$id`` carries its version (``urn:trendcast:schema:<name>:v1``):
a change that an existing valid record or an existing reader could notice either stays
backward compatible (a new optional field) or bumps the version.

``trendcast schema NAME`` prints one; :func:`validate` checks a record value against one
(the tests run every record the worker, ``replay`` and the dead-letter path produce through
it); :func:`write_broker_registry` lays the files out for a broker that validates records
itself (Tansu's ``--schema-registry file://DIR`` expects ``TOPIC.json`` describing the
record's ``value``, and its ``key`` when the file names one: ours do not, because a key is the
raw UTF-8 item id, not JSON).

>>> names()[:3]
['alerts', 'forecast-accuracy', 'forecasts']
>>> schema("forecasts")["$id"]
'urn:trendcast:schema:forecasts:v1'
>>> validate("sales", b'{"item_id": "A", "ts": 1300000000000, "quantity": 2}')
>>> validate("sales", b'{"item_id": "A", "quantity": 2}')
Traceback (most recent call last):
...
trendcast.exceptions.ContractError: sales record: 'ts' is a required property (at $)
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import Any

import orjson

from trendcast.exceptions import ContractError

__all__ = ["names", "schema", "validate", "validator", "write_broker_registry"]

logger = logging.getLogger(__name__)

_PACKAGE = "trendcast.schemas"


@functools.cache
def names() -> list[str]:
    """The record kinds with a schema, sorted."""
    files = resources.files(_PACKAGE).iterdir()
    return sorted(f.name.removesuffix(".json") for f in files if f.name.endswith(".json"))


@functools.cache
def _schema_text(name: str) -> str:
    if name not in names():
        raise ContractError(f"expected one of {', '.join(names())}, got {name!r}")
    return resources.files(_PACKAGE).joinpath(f"{name}.json").read_text(encoding="utf-8")


def schema(name: str) -> dict[str, Any]:
    """The schema of record kind ``name`` as a dict (a fresh copy: callers may change it).

    Raises:
        ContractError: No such record kind.
    """
    value: dict[str, Any] = orjson.loads(_schema_text(name))
    return value


@functools.cache
def validator(name: str) -> Any:
    """A compiled ``jsonschema`` validator of record kind ``name`` (format checks on)."""
    import jsonschema

    cls = jsonschema.validators.validator_for(schema(name))
    cls.check_schema(schema(name))
    return cls(schema(name), format_checker=cls.FORMAT_CHECKER)


def validate(name: str, value: bytes | str | Mapping[str, Any]) -> None:
    """Check one record value (its bytes, or the decoded object) against its schema.

    Raises:
        ContractError: Not JSON, or not what the schema says: the first error, with the
            path of the offending field.
    """
    if isinstance(value, bytes | str):
        try:
            value = orjson.loads(value)
        except orjson.JSONDecodeError as exc:
            raise ContractError(f"{name} record: expected JSON, got {exc}") from exc
    errors = sorted(validator(name).iter_errors(value), key=lambda e: list(e.absolute_path))
    if errors:
        first = errors[0]
        where = "$" + "".join(
            f"[{p}]" if isinstance(p, int) else f".{p}" for p in first.absolute_path
        )
        raise ContractError(f"{name} record: {first.message} (at {where})")


def write_broker_registry(directory: Path, topics: Mapping[str, str]) -> list[Path]:
    """Write ``TOPIC.json`` files for a broker-side schema registry (Tansu's ``file://`` one).

    Args:
        directory: Registry root (created if missing).
        topics: Record kind -> the topic name it is published under, e.g.
            ``{"forecasts": "forecasts-eu"}``.

    Returns:
        The files written. Each describes a record whose ``value`` is the record kind's
        schema; the key is left out (Tansu would parse a key it has a schema for as JSON).
    """
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, topic in topics.items():
        body = schema(name)
        wrapper = {
            "$schema": body.get("$schema"),
            "title": f"{topic}: {body.get('title', name)}",
            "type": "object",
            "properties": {"value": body},
            "required": ["value"],
        }
        path = directory / f"{topic}.json"
        path.write_bytes(orjson.dumps(wrapper, option=orjson.OPT_INDENT_2))
        written.append(path)
    return written
