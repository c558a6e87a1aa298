"""The framework floor for ``bench/throughput.py``: a plain Faust agent that only decodes.

Run as ``python -m bench._throughput_faust BOOTSTRAP TOPIC GROUP TOTAL OUT DATADIR``: a minimal
``faust.App`` (raw serializers, no web server, no tables) reads ``TOPIC`` from the beginning in
batches of 500 (``stream.take``, as the worker takes batches), ``orjson.loads`` each value and
counts. Every batch appends ``(perf_counter, count)`` to its progress; once ``TOTAL`` events
were counted the progress is written to ``OUT`` as JSON, and the parent stops the process with
SIGTERM. Measuring from the agent's own counter keeps start-up and the group join out of the
rate.
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path
from typing import Any

import faust
import orjson

__all__ = ["build_app", "main"]

logger = logging.getLogger(__name__)

#: Events per ``stream.take`` batch (Faust's own batching; the floor is per-event anyway).
BATCH = 500


def build_app(
    bootstrap: str, topic_name: str, group: str, total: int, out: Path, datadir: Path
) -> faust.App:
    """The decode-only app; it writes its progress to ``out`` after ``total`` events."""
    app = faust.App(
        group,
        broker=f"kafka://{bootstrap}",
        key_serializer="raw",
        value_serializer="raw",
        autodiscover=False,
        datadir=str(datadir),
        web_enabled=False,
        topic_disable_leader=True,
        consumer_auto_offset_reset="earliest",
        broker_commit_interval=1.0,
    )
    topic = app.topic(
        topic_name, key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer="raw"
    )
    progress: list[tuple[float, int]] = [(time.perf_counter(), 0)]

    @app.agent(topic, name="bench.decode")
    async def decode(stream: Any) -> None:
        count = 0
        written = False
        async for values in stream.take(BATCH, within=0.5):
            for value in values:
                orjson.loads(value)
            count += len(values)
            progress.append((time.perf_counter(), count))
            if count >= total and not written:
                out.write_bytes(orjson.dumps(progress))
                written = True

    return app


def main(argv: list[str]) -> int:
    """Run the app until SIGTERM."""
    bootstrap, topic, group, total, out, datadir = argv
    app = build_app(bootstrap, topic, group, int(total), Path(out), Path(datadir))
    worker = faust.Worker(app, loglevel="warning", quiet=True, redirect_stdouts=False)
    try:
        worker.execute_from_commandline()
    except SystemExit as exc:
        return int(exc.code or 0) if isinstance(exc.code, int) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
