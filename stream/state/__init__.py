"""Window state: the :class:`WindowStore` interface, its in-memory and Redis implementations."""
