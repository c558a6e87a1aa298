"""The streaming half of trendcast: sales events in, per-item forecasts out.

Layout, top to bottom; a sub-package imports only from those below it (import-linter and
``tests/unit/test_layers.py`` hold this), and nothing here imports TensorFlow, ``training``
or ``export``::

    worker/      the running worker: Faust app wiring, batch consumer, runner, GC tuning
    pipeline/    one batch of events: validate (events), event-time clock (watermark),
                 store, close buckets, forecast, commit bookkeeping (processor)
    lifecycle/   which bundle is live (live_pointer) and swapping to a new one (hot_reload)
    monitoring/  Prometheus metrics, readiness and logs (telemetry), health, online
                 accuracy, trends
    inference/   model info, observer protocol, window stacking, micro-batched ONNX
                 inference and the forecast records (C writer ``_recordfmt.c``)
    state/       the WindowStore interface, in-memory and Redis implementations (Lua)
    settings/    WorkerSettings (env prefix TRENDCAST_), Kafka/Redis security, redaction
    __main__.py  ``python -m stream``: the worker from TRENDCAST_* settings

Data flow: ``worker`` hands each fetched batch to ``pipeline``, which validates it,
writes bucket sums to ``state``, closes buckets by event time, stacks the windows of due
items and forecasts them through ``inference``, sends the records, then tells the
``monitoring`` observers. The developer tools around the worker (embedded services, ``up``,
``replay``, ``tail``) live in :mod:`trendcast.devtools`, on top of both halves.
"""

__all__: list[str] = []
