"""The layering of the code base, checked on the import graph (grimp, import-linter's engine).

From the bottom up (a module may import only from its own layer or below)::

    core        trendcast.*  (data, features, bundle, metrics, forecasting, freq, ...)
    halves      stream | training -> export   (stream never imports training or export)
    tools       trendcast.devtools            (embedded services, up, replay, tail)
    cli         trendcast.cli                 (the console script)
    testkit     trendcast.testkit             (doubles and helpers for tests and benches)

Inside ``stream`` the sub-packages are layered too, top to bottom: worker, pipeline,
lifecycle, monitoring, inference, state, settings. No module import cycle anywhere.

The same rules are import-linter contracts in pyproject.toml (``lint-imports``, run by ``make
lint``); this test holds them without import-linter's list of core modules, so a new module
is covered the day it is added. Function-level (lazy) imports count like module-level ones.
The worker's freedom from TensorFlow is also checked at run time, in a fresh interpreter.
"""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import grimp
import pytest

ROOTS = ("trendcast", "stream", "training", "export")
FORBIDDEN = ("tensorflow", "keras", "tf2onnx", "training", "export")
#: Top-level layers, bottom first; the halves share a rank.
_RANKS = {"core": 0, "stream": 1, "training": 1, "export": 1, "devtools": 2, "cli": 3, "testkit": 4}
#: The halves that may import each other: export converts what training made.
_HALF_IMPORTS = {("export", "training")}
#: ``stream``'s sub-packages, top first.
STREAM_LAYERS = (
    "worker",
    "pipeline",
    "lifecycle",
    "monitoring",
    "inference",
    "state",
    "settings",
)
_PYPROJECT = Path(__file__).resolve().parents[2] / "pyproject.toml"


@pytest.fixture(scope="module")
def graph() -> grimp.ImportGraph:
    return grimp.build_graph(*ROOTS, include_external_packages=False, cache_dir=None)


def _layer(module: str) -> str:
    parts = module.split(".")
    if parts[0] != "trendcast":
        return parts[0]
    if len(parts) > 1 and parts[1] in ("devtools", "cli", "testkit"):
        return parts[1]
    return "core"


def _stream_rank(module: str) -> int | None:
    """Rank of a stream sub-package (0 = bottom); None for stream itself and __main__."""
    parts = module.split(".")
    if parts[0] != "stream" or len(parts) < 2 or parts[1] not in STREAM_LAYERS:
        return None
    return len(STREAM_LAYERS) - 1 - STREAM_LAYERS.index(parts[1])


def _imports(graph: grimp.ImportGraph) -> list[tuple[str, str]]:
    return sorted(
        (importer, imported)
        for importer in graph.modules
        for imported in graph.find_modules_directly_imported_by(importer)
    )


def _where(graph: grimp.ImportGraph, importer: str, imported: str) -> str:
    details = graph.get_import_details(importer=importer, imported=imported)
    lines = ", ".join(str(d["line_number"]) for d in details)
    return f"{importer} -> {imported} (line {lines})"


def test_no_import_runs_against_the_layers(graph: grimp.ImportGraph) -> None:
    wrong = []
    for importer, imported in _imports(graph):
        a, b = _layer(importer), _layer(imported)
        if (
            _RANKS[a] < _RANKS[b]
            or _RANKS[a] == _RANKS[b] == 1
            and a != b
            and (a, b) not in _HALF_IMPORTS
        ):
            wrong.append(_where(graph, importer, imported))
    assert not wrong, "imports against the layering:\n" + "\n".join(wrong)


def test_stream_sub_packages_import_only_downwards(graph: grimp.ImportGraph) -> None:
    wrong = []
    for importer, imported in _imports(graph):
        a, b = _stream_rank(importer), _stream_rank(imported)
        if a is not None and b is not None and a < b:
            wrong.append(_where(graph, importer, imported))
    assert not wrong, "stream imports against its layers:\n" + "\n".join(wrong)


def test_every_stream_sub_package_has_a_layer_and_a_purpose() -> None:
    root = Path(__file__).resolve().parents[2] / "stream"
    packages = {p.parent.name for p in root.glob("*/__init__.py")}
    assert packages == set(STREAM_LAYERS)
    layout = (root / "__init__.py").read_text()
    for name in packages:
        assert f"{name}/" in layout, f"stream/__init__.py's layout map misses {name}/"
        doc = (root / name / "__init__.py").read_text().strip()
        assert doc.startswith('"""') and len(doc.splitlines()) == 1, f"{name}: one-line purpose"


def test_no_import_cycle(graph: grimp.ImportGraph) -> None:
    """Tarjan's strongly connected components over the module graph: all of size one."""
    edges = {m: sorted(graph.find_modules_directly_imported_by(m)) for m in graph.modules}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    cycles: list[list[str]] = []
    counter = 0
    for root in sorted(edges):
        if root in index:
            continue
        work = [(root, iter(edges[root]))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(edges[child])))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    cycles.append(sorted(component))
    assert not cycles, f"import cycles: {cycles}"


def test_import_linter_lists_every_core_module(graph: grimp.ImportGraph) -> None:
    """pyproject's core contract names each core module (import-linter cannot say "all but")."""
    config = tomllib.loads(_PYPROJECT.read_text())["tool"]["importlinter"]["contracts"]
    (core,) = [c for c in config if c["name"].startswith("The core")]
    listed = set(core["source_modules"])
    actual = {
        ".".join(m.split(".")[:2])
        for m in graph.modules
        if _layer(m) == "core" and m != "trendcast"
    }
    assert listed == actual


def _modules_after(code: str) -> set[str]:
    out = subprocess.run(
        [sys.executable, "-c", f"{code}\nimport sys\nprint('\\n'.join(sys.modules))"],
        check=True,
        capture_output=True,
        text=True,
    )
    return {line.split(".")[0] for line in out.stdout.splitlines()}


def test_the_worker_never_imports_tensorflow_training_or_export() -> None:
    loaded = _modules_after(
        "import stream.worker.app, stream.worker.runner, stream.pipeline.processor, "
        "stream.state.redis_store, stream.state.memory, stream.inference.batching, "
        "trendcast.forecasting.onnx, stream.__main__"
    )
    assert not loaded & set(FORBIDDEN), loaded & set(FORBIDDEN)


def test_importing_the_runner_module_is_cheap() -> None:
    loaded = _modules_after("import stream.worker.runner")
    assert not loaded & {"faust", "redis", "onnxruntime", "aiokafka", "tensorflow"}
