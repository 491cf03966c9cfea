"""Settings every service shares, read from the environment (pydantic-settings).

Each service's own settings class inherits from :class:`KafkaSettings`, so the same
variable means the same thing everywhere.
"""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from shared_schemas.topics import DEFAULT_PARTITIONS


class KafkaSettings(BaseSettings):
    """Where Kafka and the schema registry are, and how the topics are laid out."""

    model_config = SettingsConfigDict(env_prefix="", extra="ignore")

    kafka_bootstrap_servers: str = Field(
        "127.0.0.1:9092", description="Kafka bootstrap servers (host:port, comma-separated)."
    )
    schema_registry_url: str | None = Field(
        None,
        description="Schema registry URL. Unset: values use Avro single-object encoding; "
        "set: Confluent wire format with ids from the registry.",
    )
    topic_partitions: int = Field(
        DEFAULT_PARTITIONS, ge=1, description="Partition count of the co-partitioned topics."
    )
    topic_replication_factor: int = Field(1, ge=1, description="Replication factor of new topics.")
