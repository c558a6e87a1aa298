"""Settings of the stream worker (one pydantic-settings class, env prefix ``TRENDCAST_``).

Built once by the CLI and passed down; nothing else in ``stream`` reads the environment, so a
test configures the worker through constructor arguments only.
"""

from __future__ import annotations

import logging
from pathlib import Path

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = ["WorkerSettings"]

logger = logging.getLogger(__name__)


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
        bundle: Model bundle directory (see :mod:`trendcast.bundle`).
        sales_topic: Input topic (key = item id, value = JSON sale).
        dlq_topic: Dead-letter topic for invalid and too-late events.
        forecasts_topic: Output topic (key = item id, value = JSON forecast).
        consumer_group: Kafka consumer group, also the Faust app id.
        state_prefix: Prefix of every Redis key the worker writes.
        lateness_buckets: Watermark = max event time seen on the partition minus this many
            buckets; a bucket closes (and is forecast) once the watermark passes its end.
        grace_buckets: Closed buckets still accepting late events; an event for an older
            bucket goes to the dead-letter topic with reason ``late``.
        batch_size: Events taken from the stream per batch (one Redis round trip per batch).
        batch_timeout_s: Longest wait to fill a batch before processing what arrived.
        inference_batch_size: Windows per ``Forecaster.predict`` call.
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
        data_dir: Faust's local data directory.
        broker_rebalance_timeout_s: Faust/aiokafka rebalance timeout.
        broker_session_timeout_s: Consumer session timeout (how fast a dead worker is noticed).
        broker_heartbeat_interval_s: Consumer heartbeat interval.
        commit_interval_s: How often acked offsets are committed.
    """

    model_config = SettingsConfigDict(env_prefix="TRENDCAST_", frozen=True, extra="ignore")

    kafka_brokers: str = "kafka://127.0.0.1:9092"
    redis_url: str = "redis://127.0.0.1:6379/0"
    redis_cluster: bool = False
    bundle: Path = Path("artifacts/bundle")
    sales_topic: str = Field(default="sales", min_length=1)
    dlq_topic: str = Field(default="sales.dlq", min_length=1)
    forecasts_topic: str = Field(default="forecasts", min_length=1)
    consumer_group: str = Field(default="trendcast-worker", min_length=1)
    state_prefix: str = Field(default="trendcast", min_length=1, pattern=r"^[^{}\s]+$")
    lateness_buckets: int = Field(default=1, ge=0)
    grace_buckets: int = Field(default=1, ge=0)
    batch_size: int = Field(default=500, gt=0)
    batch_timeout_s: float = Field(default=0.5, gt=0)
    inference_batch_size: int = Field(default=256, gt=0)
    state_ttl_s: int | None = Field(default=None, gt=0)
    max_message_bytes: int = Field(default=64 * 1024, gt=0)
    max_future_s: float = Field(default=86_400.0, ge=0)
    topic_partitions: int = Field(default=4, gt=0)
    topic_replicas: int = Field(default=1, gt=0)
    web_enabled: bool = True
    web_port: int = Field(default=6066, gt=0, lt=65536)
    data_dir: Path = Path(".trendcast/worker")
    broker_rebalance_timeout_s: float = Field(default=10.0, gt=0)
    broker_session_timeout_s: float = Field(default=10.0, gt=0)
    broker_heartbeat_interval_s: float = Field(default=1.0, gt=0)
    commit_interval_s: float = Field(default=1.0, gt=0)

    @field_validator("redis_url")
    @classmethod
    def _check_redis_url(cls, value: str) -> str:
        if not value.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError(f"expected a redis://, rediss:// or unix:// URL, got {value!r}")
        return value

    @model_validator(mode="after")
    def _check_topics(self) -> WorkerSettings:
        topics = {self.sales_topic, self.dlq_topic, self.forecasts_topic}
        if len(topics) != 3:
            raise ValueError(
                "expected distinct sales, dead-letter and forecasts topics, got "
                f"{self.sales_topic!r}, {self.dlq_topic!r}, {self.forecasts_topic!r}"
            )
        if self.broker_heartbeat_interval_s >= self.broker_session_timeout_s:
            raise ValueError(
                "expected broker_heartbeat_interval_s < broker_session_timeout_s, got "
                f"{self.broker_heartbeat_interval_s} >= {self.broker_session_timeout_s}"
            )
        return self
