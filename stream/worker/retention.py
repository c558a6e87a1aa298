"""Check at start that the ``sales`` topic keeps events long enough to rebuild lost state.

Why: when Redis loses a partition's state the worker rebuilds it from the ``sales`` log
(:mod:`stream.pipeline.recovery`), which works only as far back as the log reaches. The topic
must keep at least the kept buckets (window + lateness + grace) plus a margin for how long a
loss can go unnoticed; the worker asks the broker (DescribeConfigs ``retention.ms``) once at
start and says in the log whether that holds. A broker that does not answer (Tansu may not
implement DescribeConfigs) gets one line saying the retention could not be checked.
"""

from __future__ import annotations

import logging
from typing import Any

from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

__all__ = ["RETENTION_MARGIN_MS", "check_retention", "required_retention_ms"]

logger = logging.getLogger(__name__)

#: Beyond the kept buckets: how long a loss may go unnoticed (a worker stopped over a
#: weekend, a failover at night) and the rebuild still find every event it needs.
RETENTION_MARGIN_MS = 3 * 86_400_000


def required_retention_ms(kept_buckets: int, step_ms: int) -> int:
    """The retention the ``sales`` topic needs: the kept buckets plus the margin.

    >>> required_retention_ms(28 + 1 + 1 + 1, 86_400_000) // 86_400_000
    34
    """
    return kept_buckets * step_ms + RETENTION_MARGIN_MS


def _bootstrap(brokers: str) -> str:
    parts = [p.strip() for p in brokers.replace(";", ",").split(",") if p.strip()]
    return ",".join(p.split("://", 1)[1] if "://" in p else p for p in parts)


async def check_retention(
    brokers: str, topic: str, required_ms: int, client_kwargs: dict[str, Any]
) -> int | None:
    """Log whether ``topic`` keeps events ``required_ms``; its ``retention.ms`` or None.

    Never raises: the check is advice, and a worker must start even when the broker does
    not say (``None``; -1 means unlimited).
    """
    admin = AIOKafkaAdminClient(
        bootstrap_servers=_bootstrap(brokers), request_timeout_ms=5000, **client_kwargs
    )
    try:
        await admin.start()
        responses = await admin.describe_configs(
            [ConfigResource(ConfigResourceType.TOPIC, topic, None)]
        )
        retention = _retention_ms(responses)
    except Exception as exc:  # Tansu may not implement DescribeConfigs
        logger.warning(
            "could not check the retention of topic %s (%s: %s); rebuilding lost state needs "
            "it to keep at least %.1f days of events",
            topic,
            type(exc).__name__,
            exc,
            required_ms / 86_400_000,
        )
        return None
    finally:
        try:
            await admin.close()
        except Exception as exc:  # closing a client that never connected
            logger.debug("admin client close failed: %s", exc)
    if retention is None:
        logger.warning(
            "the broker did not report retention.ms of topic %s; rebuilding lost state needs "
            "it to keep at least %.1f days of events",
            topic,
            required_ms / 86_400_000,
        )
    elif 0 <= retention < required_ms:
        logger.warning(
            "topic %s keeps events %.1f days (retention.ms=%d), less than the %.1f days a "
            "rebuild of lost state needs: such a rebuild would use partial history",
            topic,
            retention / 86_400_000,
            retention,
            required_ms / 86_400_000,
        )
    else:
        logger.info(
            "topic %s keeps events long enough to rebuild lost state (retention.ms=%d)",
            topic,
            retention,
        )
    return retention


def _retention_ms(responses: list[Any]) -> int | None:
    """``retention.ms`` from DescribeConfigs responses (any version), if reported."""
    for response in responses:
        for resource in getattr(response, "resources", []):
            error_code, error_message = resource[0], resource[1]
            if error_code:
                raise RuntimeError(f"DescribeConfigs error {error_code}: {error_message}")
            for entry in resource[4]:
                if entry[0] == "retention.ms" and entry[1] is not None:
                    return int(entry[1])
    return None
