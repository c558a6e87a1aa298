"""The streaming half of trendcast: sales events in, per-item forecasts out.

Layout (dependencies point downwards; nothing here imports TensorFlow, ``training`` or
``export``)::

    config.py      WorkerSettings (env prefix TRENDCAST_)
    events.py      bytes -> SaleEvent, or EventError(reason) for the dead-letter topic
    watermark.py   per-partition event-time clock: closed buckets, late events
    windows/       WindowStore interface + Redis (Lua) and in-memory implementations
    inference/     windows -> WindowBatch -> Forecaster -> forecast records
    processor.py   one batch of events: validate, store, close buckets, forecast
    app.py         the Faust app: only wiring
    cli.py         run_worker / inspect_items for the typer CLI
    __main__.py    ``python -m stream``: the worker from TRENDCAST_* settings

Around the worker: ``embedded.py`` (Tansu / redis-server on free ports), ``replay.py``
(sales files -> events), ``tail.py`` (read a topic), ``up.py`` (everything at once).
"""

__all__: list[str] = []
