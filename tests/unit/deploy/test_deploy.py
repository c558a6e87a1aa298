"""Deployment files: the compose file is valid, and the worker image holds no TensorFlow.

``docker-compose config -q`` validates the compose file without a Docker engine (skipped
when the binary is missing; CI installs it). The image is not built here — that needs an
engine and minutes — so the worker stage of the Dockerfile is checked statically instead:
it installs the base package without extras, pyproject's base dependencies name no
TensorFlow, Keras or tf2onnx, and the training/export sources are not copied into it.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
FORBIDDEN = re.compile(r"tensorflow|keras|tf2onnx|\[train\]|\.\[.*train", re.IGNORECASE)


def _stages(dockerfile: str) -> dict[str, list[str]]:
    """Stage name -> its instructions (continuation lines joined)."""
    text = re.sub(r"\\\n\s*", " ", dockerfile)
    stages: dict[str, list[str]] = {}
    current: list[str] | None = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        match = re.match(r"FROM\s+\S+(?:\s+AS\s+(\S+))?", line, re.IGNORECASE)
        if match:
            current = stages.setdefault(match.group(1) or f"stage{len(stages)}", [])
        if current is not None:
            current.append(line)
        else:
            raise AssertionError(f"instruction before FROM: {line}")
    return stages


def _ancestry(stages: dict[str, list[str]], name: str) -> list[str]:
    """Instructions of ``name`` and of the stages it is built FROM."""
    lines = stages[name]
    parent = re.match(r"FROM\s+(\S+)", lines[0], re.IGNORECASE)
    if parent and parent.group(1) in stages:
        return _ancestry(stages, parent.group(1)) + lines
    return lines


def test_compose_config_is_valid() -> None:
    binary = shutil.which("docker-compose")
    if binary is None:
        pytest.skip("docker-compose not installed (CI installs it: apt-get install docker-compose)")
    result = subprocess.run(
        [binary, "-f", str(ROOT / "docker-compose.yml"), "config", "-q"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr


def test_compose_has_prometheus_and_scalable_workers() -> None:
    text = (ROOT / "docker-compose.yml").read_text()
    assert "prom/prometheus" in text
    assert "./deploy/prometheus.yml:/etc/prometheus/prometheus.yml" in text
    worker = text.split("\n  worker:\n", 1)[1].split("\n  prometheus:\n", 1)[0]
    # A fixed container name or host port would make `--scale worker=N` fail.
    assert "container_name" not in worker
    assert "ports:" not in worker
    assert "target: worker" in worker
    prometheus = (ROOT / "deploy" / "prometheus.yml").read_text()
    assert 'names: ["worker"]' in prometheus and "port: 6066" in prometheus


def test_worker_image_has_no_tensorflow() -> None:
    stages = _stages((ROOT / "Dockerfile").read_text())
    assert {"worker", "trainer"} <= stages.keys()
    worker = _ancestry(stages, "worker")
    offending = [line for line in worker if FORBIDDEN.search(line)]
    assert not offending, offending
    installs = [line for line in worker if line.startswith("RUN") and "pip install" in line]
    assert installs, "the worker stage installs nothing"
    assert all(re.search(r"pip install [^|&]*\s\.(\s|$)", line) for line in installs), installs
    copied = " ".join(line for line in worker if line.startswith("COPY"))
    assert "training" not in copied and "export" not in copied
    # The trainer, by contrast, does get TensorFlow.
    assert any("[train]" in line for line in _ancestry(stages, "trainer"))


def test_base_dependencies_exclude_tensorflow() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    base = project["dependencies"]
    assert not [dep for dep in base if FORBIDDEN.search(dep)], base
    assert any("tensorflow" in dep for dep in project["optional-dependencies"]["train"])
