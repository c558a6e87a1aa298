"""Dependency rules of the stream package, checked in a fresh interpreter."""

from __future__ import annotations

import subprocess
import sys

FORBIDDEN = ("tensorflow", "keras", "tf2onnx", "training", "export")


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


def test_importing_the_cli_module_is_cheap() -> None:
    loaded = _modules_after("import stream.worker.runner")
    assert not loaded & {"faust", "redis", "onnxruntime", "aiokafka", "tensorflow"}
