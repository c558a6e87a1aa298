"""Every record example in the README and docs keeps the published contract.

An example is a ```json block right after a ``<!-- schema: NAME -->`` line; it is validated
against ``trendcast schema NAME``, so documentation cannot drift from what the worker writes.
"""

from __future__ import annotations

import re
from pathlib import Path

import orjson
import pytest

from trendcast import contract

ROOT = Path(__file__).resolve().parents[2]
_EXAMPLE = re.compile(r"<!-- schema: ([\w.-]+) -->\s*\n```json\n(.*?)\n```", re.S)


def _examples() -> list[tuple[str, str, str]]:
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    return [
        (f"{page.relative_to(ROOT)}#{n}", m.group(1), m.group(2))
        for page in pages
        for n, m in enumerate(_EXAMPLE.finditer(page.read_text()))
    ]


EXAMPLES = _examples()


@pytest.mark.parametrize(("where", "name", "text"), EXAMPLES, ids=[e[0] for e in EXAMPLES])
def test_example_keeps_the_contract(where: str, name: str, text: str) -> None:
    contract.validate(name, orjson.loads(text))


def test_the_record_kinds_subscribers_read_have_examples() -> None:
    assert {"forecasts", "alerts"} <= {name for _, name, _ in EXAMPLES}
