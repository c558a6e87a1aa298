"""Worker settings: the pydantic-settings class, Kafka/Redis security, URL redaction."""
