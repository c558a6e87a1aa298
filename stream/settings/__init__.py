"""Worker settings: one pydantic-settings class and its translation into Kafka/Redis client
options."""
