"""Window state: the :class:`WindowStore` interface and its Redis and in-memory backends."""

from stream.windows.base import (
    ApplyResult,
    BucketDelta,
    BucketSums,
    ItemUpdate,
    ItemWindow,
    PartitionId,
    PartitionUpdate,
    WindowStore,
)

__all__ = [
    "ApplyResult",
    "BucketDelta",
    "BucketSums",
    "ItemUpdate",
    "ItemWindow",
    "PartitionId",
    "PartitionUpdate",
    "WindowStore",
]
