"""Settings of the stream worker (one pydantic-settings class, env prefix ``TRENDCAST_``).

Built once by the CLI and passed down; nothing else in ``stream`` reads the environment, so a
test configures the worker through constructor arguments only.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import AliasChoices, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = ["KafkaProtocol", "SaslMechanism", "WorkerSettings"]

logger = logging.getLogger(__name__)

#: Kafka ``security.protocol`` values the worker supports.
KafkaProtocol = Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"]
#: SASL mechanisms the worker supports (GSSAPI and OAUTHBEARER need more than settings).
SaslMechanism = Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"]


class WorkerSettings(BaseSettings):
    """Everything the worker needs to run; every field is ``TRENDCAST_<NAME>`` in the env.

    Attributes:
        kafka_brokers: Faust broker URL(s), ``kafka://host:port[;kafka://host2:port]``.
        redis_url: Redis holding the window state (``redis://host:port/db``).
        redis_cluster: ``redis_url`` names a node of a Redis Cluster
            (``TRENDCAST_REDIS_CLUSTER=true``): the worker then uses redis-py's cluster client,
            which discovers the other nodes, routes each item's keys to the primary owning
            their slot and loads the Lua scripts on every primary; a batch costs one round
            trip per node instead of one. An explicit flag rather than a ``redis+cluster://``
            scheme, because redis-py knows no such scheme and the URL's only job stays naming
            a server; the database must be 0 (a cluster has only one).
        bundle: Model bundle directory (see :mod:`trendcast.bundle`), or a directory of
            bundles whose file ``current`` names the live one (see
            :mod:`stream.lifecycle.hot_reload`).
        bundle_poll_s: How often the worker checks ``bundle`` for a new model and swaps it
            in without a restart; 0 disables hot reload.
        bundle_redis_key: Redis key whose value names the live bundle, a directory under
            ``bundle`` (e.g. ``v3``); read from ``redis_url`` with the same credentials, at
            start and every ``bundle_poll_s``. While the key is absent the ``current`` file
            decides. ``None``: only the ``current`` file (see :mod:`stream.lifecycle.live_pointer`).
        sales_topic: Input topic (key = item id, value = JSON sale).
        dlq_topic: Dead-letter topic for invalid and too-late events.
        accuracy_topic: Where online accuracy records go (rolling RMSSE, WAPE, coverage per
            model version and role; see :mod:`stream.monitoring.online_accuracy`).
        trends_topic: Where the top rising and falling items go (:mod:`stream.monitoring.trends`).
        publish_interval_s: How often accuracy and trends are published (0 = never).
        trends_top_k: Items in each of the rising and falling lists.
        accuracy_rolling_buckets: Target buckets in the rolling accuracy window.
        accuracy_max_items: Items whose pending forecasts are kept for scoring (memory cap).
        shadow_bundle: A second bundle scored on the same windows as the live one; its
            forecasts feed accuracy (role ``shadow``) and never reach the forecasts topic.
        forecasts_topic: Output topic (key = item id, value = JSON forecast).
        consumer_group: Kafka consumer group, also the Faust app id.
        state_prefix: Prefix of every Redis key the worker writes.
        allowed_lateness_s: Watermark = max event time seen on the partition minus this many
            seconds; a bucket closes (and is forecast) once the watermark passes its end, so
            a daily bucket closes a minute after midnight (event time) by default. Replaces
            ``TRENDCAST_LATENESS_BUCKETS`` (whole buckets: a day's forecasts came a day late).
        grace_buckets: Closed buckets still accepting late events; an event for an older
            bucket goes to the dead-letter topic with reason ``late``.
        live_window_s: A partition whose newest event time is at most this far behind the
            wall clock is *live*: once it has nothing left to read, its watermark follows the
            wall clock (now minus the allowed lateness), so its buckets close on time even
            when no later event comes. Replays and catch-ups of history are never live.
        refresh_s: An item with new sales in the open bucket gets a ``refresh`` forecast
            (with the open bucket's nowcast) at most once per this many seconds; 0 = only
            ``close`` and ``late`` forecasts. Also how often stalls are checked.
        alerts_topic: Where surge and stall alerts go (key = item id).
        alert_probability: An alert is raised when what the open bucket sold so far is this
            improbable under the item's forecast (tail probability): a surge for too much, a
            stall for nothing sold although that was this unlikely.
        catchup: When one batch closes several buckets of a partition (a catch-up after an
            outage, a first load): ``latest`` forecasts each item only as of the newest of
            them (what subscribers want), ``every`` as of each (backfills).
        batch_size: Most records one fetch hands to the processor (Kafka
            ``max_poll_records``); a fetch is one batch: one Redis round trip, then one commit.
            It only binds while the worker is behind (a worker keeping up takes what arrived
            since its last fetch), and then larger batches cost Redis less per event: an
            item's events of one batch are one script update (docs/performance-log.md).
        batch_timeout_s: Longest wait of one fetch when nothing arrives.
        fetch_max_wait_ms: Kafka consumer ``fetch_max_wait_ms`` (Faust fixes 1500). Apache
            Kafka answers a fetch as soon as records arrive, so there it only bounds idle
            long polls; the embedded Tansu broker holds every fetch for the full wait, so
            ``trendcast up``, the tests and the benches set 50 ms.
        inference_batch_size: Windows per ``Forecaster.predict`` call.
        onnx_threads: ONNX Runtime intra-op threads of the worker's models; 0: the CPUs
            available, at most 4 (:func:`trendcast.forecasting.onnx.default_threads`).
        gc_threshold: Allocations between two collections of Python's youngest garbage
            collector generation (``gc.set_threshold``; 0 keeps Python's 700). A batch
            allocates hundreds of thousands of short-lived objects, and with Python's
            default a third of the worker's CPU went to collections that found almost
            nothing (docs/performance-log.md). The worker also freezes what startup built
            (``gc.freeze``), which no collection needs to walk again.
        state_ttl_s: TTL of an item's keys, refreshed on every write, so items that stop
            selling fade away; ``None`` = twice the time span of the kept buckets.
        max_message_bytes: Larger messages are dead-lettered (``too_large``) unread.
        max_future_s: Events more than this ahead of the wall clock are ``bad_timestamp``:
            one absurd timestamp would otherwise push the watermark years ahead and turn
            every later event into a late one.
        topic_partitions: Partitions of topics the worker creates.
        topic_replicas: Replication factor of topics the worker creates.
        web_enabled: Serve Faust's web endpoints (metrics, health).
        web_port: Port of the Faust web server.
        web_bind: Address the web server listens on (Faust's ``web_bind``). ``0.0.0.0``
            (every interface, Faust's default) suits a container, whose probes and scrapes
            come from outside; ``127.0.0.1`` keeps a worker on a shared host local.
        web_token: Bearer token the lookup endpoints (``/forecasts``) require
            (``Authorization: Bearer <token>``); ``None``: open. Probes (``/ready``,
            ``/health``) and ``/metrics`` never ask for it. Never logged.
        data_dir: Faust's local data directory.
        broker_rebalance_timeout_s: Faust/aiokafka rebalance timeout.
        broker_session_timeout_s: Consumer session timeout (how fast a dead worker is noticed).
        broker_heartbeat_interval_s: Consumer heartbeat interval.
        commit_interval_s: How often acked offsets are committed.
        log_format: ``text`` (Faust's colored lines) or ``json`` (one object per line with
            level, logger, message and topic/partition/offset where known) for log shippers.
        ready_timeout_s: Longest wait for one ``/ready`` probe (Redis PING, broker
            metadata); a dependency that does not answer in time counts as down.
        otel_traces_exporter: OpenTelemetry traces of the worker's batches
            (:mod:`stream.monitoring.tracing`, docs/tracing.md): ``none`` (off), ``otlp``
            (OTLP/HTTP to ``OTEL_EXPORTER_OTLP_ENDPOINT``), ``console`` (one JSON line per span
            on stdout), or a comma-separated list. Read from the standard
            ``OTEL_TRACES_EXPORTER``, or from ``TRENDCAST_OTEL_TRACES_EXPORTER``, which wins
            (child processes get every setting that way). Only this switch is a setting: the
            SDK reads its other ``OTEL_*`` variables itself. Without the ``tracing`` extra
            installed, tracing stays off.
        kafka_security_protocol: How the worker, ``replay`` and ``tail`` talk to Kafka.
        kafka_sasl_mechanism: SASL mechanism with ``SASL_PLAINTEXT`` / ``SASL_SSL``.
        kafka_sasl_username: SASL user (required with SASL).
        kafka_sasl_password: SASL password (required with SASL; never logged).
        kafka_ssl_cafile: CA bundle verifying the brokers (``SSL`` / ``SASL_SSL``); the
            system CAs when unset.
        kafka_ssl_certfile: Client certificate (PEM) for mutual TLS.
        kafka_ssl_keyfile: Private key of ``kafka_ssl_certfile`` (when not inside it).
        kafka_ssl_keyfile_password: Password of the encrypted private key.
        kafka_ssl_check_hostname: Verify that the broker certificate names the host.
        redis_username: Redis ACL user; alternatively ``redis://user:pass@host`` in the URL.
        redis_password: Redis password (``requirepass`` or the ACL user's); never logged.
            Give it here or in the URL, not both.
        redis_ssl_ca_certs: CA bundle verifying Redis (needs a ``rediss://`` URL).
        redis_ssl_certfile: Client certificate for Redis with ``tls-auth-clients yes``.
        redis_ssl_keyfile: Private key of ``redis_ssl_certfile``.
        redis_ssl_check_hostname: Verify that the Redis certificate names the host.
    """

    model_config = SettingsConfigDict(env_prefix="TRENDCAST_", frozen=True, extra="ignore")

    kafka_brokers: str = "kafka://127.0.0.1:9092"
    redis_url: str = "redis://127.0.0.1:6379/0"
    redis_cluster: bool = False
    bundle: Path = Path("artifacts/bundle")
    bundle_poll_s: float = Field(default=10.0, ge=0)
    bundle_redis_key: str | None = Field(
        default=None,
        min_length=1,
        description="Redis key naming the live bundle under `bundle` (deploy = SET, rollback = "
        "SET the old name); the `current` file decides while it is absent.",
    )
    sales_topic: str = Field(default="sales", min_length=1)
    dlq_topic: str = Field(default="sales.dlq", min_length=1)
    forecasts_topic: str = Field(default="forecasts", min_length=1)
    accuracy_topic: str = Field(default="forecast-accuracy", min_length=1)
    trends_topic: str = Field(default="trends", min_length=1)
    publish_interval_s: float = Field(default=10.0, ge=0)
    trends_top_k: int = Field(default=20, gt=0, le=1000)
    accuracy_rolling_buckets: int = Field(default=28, gt=0)
    accuracy_max_items: int = Field(default=10_000, gt=0)
    shadow_bundle: Path | None = None
    consumer_group: str = Field(default="trendcast-worker", min_length=1)
    state_prefix: str = Field(default="trendcast", min_length=1, pattern=r"^[^{}\s]+$")
    allowed_lateness_s: float = Field(default=60.0, ge=0)
    grace_buckets: int = Field(default=1, ge=0)
    live_window_s: float = Field(default=300.0, gt=0)
    refresh_s: float = Field(default=60.0, ge=0)
    alerts_topic: str = Field(default="alerts", min_length=1)
    alert_probability: float = Field(default=0.001, gt=0, lt=0.5)
    catchup: Literal["latest", "every"] = "latest"
    #: Replaced by ``allowed_lateness_s``; only read to refuse it with a clear message.
    lateness_buckets: int | None = Field(default=None, exclude=True, repr=False)
    batch_size: int = Field(default=15_000, gt=0)
    batch_timeout_s: float = Field(default=0.5, gt=0)
    fetch_max_wait_ms: int = Field(default=500, ge=1, le=30_000)
    inference_batch_size: int = Field(default=256, gt=0)
    onnx_threads: int = Field(default=0, ge=0, le=64)
    gc_threshold: int = Field(default=50_000, ge=0)
    state_ttl_s: int | None = Field(default=None, gt=0)
    max_message_bytes: int = Field(default=64 * 1024, gt=0)
    max_future_s: float = Field(default=86_400.0, ge=0)
    topic_partitions: int = Field(default=4, gt=0)
    topic_replicas: int = Field(default=1, gt=0)
    web_enabled: bool = True
    web_port: int = Field(default=6066, gt=0, lt=65536)
    # Every interface is what Faust has always bound, and what a container needs.
    web_bind: str = Field(default="0.0.0.0", min_length=1)  # noqa: S104
    web_token: SecretStr | None = None
    data_dir: Path = Path(".trendcast/worker")
    broker_rebalance_timeout_s: float = Field(default=10.0, gt=0)
    broker_session_timeout_s: float = Field(default=10.0, gt=0)
    broker_heartbeat_interval_s: float = Field(default=1.0, gt=0)
    commit_interval_s: float = Field(default=1.0, gt=0)
    log_format: Literal["text", "json"] = "text"
    ready_timeout_s: float = Field(default=2.0, gt=0)
    otel_traces_exporter: str = Field(
        default="none",
        validation_alias=AliasChoices(
            "TRENDCAST_OTEL_TRACES_EXPORTER", "OTEL_TRACES_EXPORTER", "otel_traces_exporter"
        ),
    )
    kafka_security_protocol: KafkaProtocol = "PLAINTEXT"
    kafka_sasl_mechanism: SaslMechanism = "PLAIN"
    kafka_sasl_username: str | None = None
    kafka_sasl_password: SecretStr | None = None
    kafka_ssl_cafile: Path | None = None
    kafka_ssl_certfile: Path | None = None
    kafka_ssl_keyfile: Path | None = None
    kafka_ssl_keyfile_password: SecretStr | None = None
    kafka_ssl_check_hostname: bool = True
    redis_username: str | None = None
    redis_password: SecretStr | None = None
    redis_ssl_ca_certs: Path | None = None
    redis_ssl_certfile: Path | None = None
    redis_ssl_keyfile: Path | None = None
    redis_ssl_check_hostname: bool = True

    @field_validator("redis_url")
    @classmethod
    def _check_redis_url(cls, value: str) -> str:
        if not value.startswith(("redis://", "rediss://", "unix://")):
            from stream.settings.redaction import redact_url

            raise ValueError(
                f"expected a redis://, rediss:// or unix:// URL, got {redact_url(value)!r}"
            )
        return value

    @field_validator("web_token")
    @classmethod
    def _check_web_token(cls, value: SecretStr | None) -> SecretStr | None:
        # An empty token would let every request through while the operator believes the
        # lookups are protected: refuse it rather than read it as "no token".
        if value is not None and not value.get_secret_value().strip():
            raise ValueError("expected a non-empty web_token (or none at all), got an empty one")
        return value

    @model_validator(mode="after")
    def _check_replaced(self) -> WorkerSettings:
        if self.lateness_buckets is not None:
            raise ValueError(
                "TRENDCAST_LATENESS_BUCKETS was replaced by TRENDCAST_ALLOWED_LATENESS_S "
                f"(seconds, default 60), got lateness_buckets={self.lateness_buckets}"
            )
        return self

    @model_validator(mode="after")
    def _check_topics(self) -> WorkerSettings:
        topics = {self.sales_topic, self.dlq_topic, self.forecasts_topic, self.alerts_topic}
        if len(topics) != 4:
            raise ValueError(
                "expected distinct sales, dead-letter, forecasts and alerts topics, got "
                f"{self.sales_topic!r}, {self.dlq_topic!r}, {self.forecasts_topic!r}, "
                f"{self.alerts_topic!r}"
            )
        if self.broker_heartbeat_interval_s >= self.broker_session_timeout_s:
            raise ValueError(
                "expected broker_heartbeat_interval_s < broker_session_timeout_s, got "
                f"{self.broker_heartbeat_interval_s} >= {self.broker_session_timeout_s}"
            )
        return self

    @model_validator(mode="after")
    def _check_security(self) -> WorkerSettings:
        # Settings that the chosen protocol would silently ignore are refused: a CA file
        # given with PLAINTEXT means the operator believes the traffic is encrypted.
        protocol = self.kafka_security_protocol
        sasl = protocol in ("SASL_PLAINTEXT", "SASL_SSL")
        tls = protocol in ("SSL", "SASL_SSL")
        if sasl and (not self.kafka_sasl_username or self.kafka_sasl_password is None):
            raise ValueError(
                f"expected kafka_sasl_username and kafka_sasl_password with {protocol}, "
                "got " + ("no password" if self.kafka_sasl_username else "no username")
            )
        if not sasl and (self.kafka_sasl_username or self.kafka_sasl_password is not None):
            raise ValueError(
                "expected kafka_security_protocol SASL_PLAINTEXT or SASL_SSL with "
                f"kafka_sasl_username/password, got {protocol}"
            )
        kafka_files = (
            self.kafka_ssl_cafile,
            self.kafka_ssl_certfile,
            self.kafka_ssl_keyfile,
            self.kafka_ssl_keyfile_password,
        )
        if not tls and any(f is not None for f in kafka_files):
            raise ValueError(
                f"expected kafka_security_protocol SSL or SASL_SSL with kafka_ssl_*, got {protocol}"
            )
        if self.kafka_ssl_keyfile is not None and self.kafka_ssl_certfile is None:
            raise ValueError("expected kafka_ssl_certfile with kafka_ssl_keyfile, got none")
        redis_tls = (self.redis_ssl_ca_certs, self.redis_ssl_certfile, self.redis_ssl_keyfile)
        if any(f is not None for f in redis_tls) and not self.redis_url.startswith("rediss://"):
            raise ValueError(
                "expected a rediss:// redis_url with redis_ssl_*, got "
                f"{self.redis_url.split('://', 1)[0]}://"
            )
        if self.redis_ssl_keyfile is not None and self.redis_ssl_certfile is None:
            raise ValueError("expected redis_ssl_certfile with redis_ssl_keyfile, got none")
        parts = urlsplit(self.redis_url)
        if self.redis_password is not None and parts.password:
            raise ValueError(
                "expected the Redis password either in redis_url or in redis_password, got both"
            )
        if self.redis_username is not None and parts.username:
            raise ValueError(
                "expected the Redis user either in redis_url or in redis_username, got both"
            )
        return self

    @field_validator("otel_traces_exporter")
    @classmethod
    def _check_traces_exporter(cls, value: str) -> str:
        # Checked with the settings rather than when tracing starts: a typo stops the worker
        # at start with one line instead of leaving it running untraced.
        names = [n.strip().lower() for n in value.split(",") if n.strip()] or ["none"]
        if any(n not in ("otlp", "console", "none") for n in names):
            raise ValueError(
                f"expected OTEL_TRACES_EXPORTER of otlp, console or none, got {value!r}"
            )
        return ",".join(dict.fromkeys(names))

    def __repr_args__(self) -> Any:
        # A password inside redis_url (redis://user:pass@host) must not reach logs or
        # tracebacks through repr(settings); SecretStr fields are masked by pydantic.
        from stream.settings.redaction import redact_url

        for name, value in super().__repr_args__():
            yield name, redact_url(value) if name == "redis_url" else value
