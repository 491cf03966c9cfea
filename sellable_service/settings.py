"""Settings of the Cassandra-backed sellable service, read from the environment."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from service_runtime.settings import CommaSeparated, HttpServerSettings, KafkaSettings
from shared_schemas.topics import RESERVATION_RESULTS, SELLABLE_INVENTORY


class ServiceSettings(KafkaSettings, HttpServerSettings):
    """The read model: where Cassandra is and how the topics are consumed into it."""

    service_host: str = Field("127.0.0.1", description="Address the REST API binds to.")
    service_port: int = Field(9093, ge=1, le=65535, description="Port of the REST API.")
    service_workers: int = Field(
        1,
        ge=1,
        le=64,
        description="Processes serving the REST API. 1: one process serves and writes; "
        "more: that many API processes share the port and one more process writes "
        "(sellable_service/workers.py).",
    )
    cassandra_contact_points: CommaSeparated = Field(
        ["127.0.0.1"], min_length=1, description="Cassandra hosts, comma-separated."
    )
    cassandra_port: int = Field(9042, ge=1, le=65535, description="Cassandra's CQL port.")
    cassandra_protocol_version: int | None = Field(
        None,
        description="CQL native protocol version; unset lets the driver negotiate "
        "(the embedded Cassandra 2.1 needs 3).",
    )
    cassandra_keyspace: str = Field(
        "sellable_inventory", pattern=r"^[a-zA-Z][a-zA-Z0-9_]{0,47}$", description="Keyspace."
    )
    cassandra_replication: str = Field(
        "{'class': 'SimpleStrategy', 'replication_factor': 1}",
        description="Replication map used when the keyspace is created.",
    )
    cassandra_write_consistency: Literal[
        "ANY", "ONE", "TWO", "THREE", "QUORUM", "ALL", "LOCAL_QUORUM", "EACH_QUORUM", "LOCAL_ONE"
    ] = Field(
        "QUORUM",
        description="Consistency level of the writer's writes. QUORUM: with replication "
        "factor 3 a write is acknowledged (and its offset committed) only once 2 replicas "
        "hold it; with factor 1 it is the same as ONE.",
    )
    cassandra_request_timeout_seconds: float = Field(
        2.0, gt=0, description="Longest wait for one Cassandra request (then 503 / retry)."
    )
    service_topic: str = Field(
        SELLABLE_INVENTORY.name, description="Topic consumed into Cassandra (tests use their own)."
    )
    service_results_topic: str = Field(
        RESERVATION_RESULTS.name,
        description="Topic of reservation results consumed into Cassandra, by the same "
        "consumer as SERVICE_TOPIC (tests use their own).",
    )
    service_consumer_group: str = Field("sellable-service", description="Kafka consumer group.")
    service_max_poll_interval_ms: int = Field(
        10_000,
        ge=1_000,
        description="Consumer max.poll.interval.ms; short, because the embedded broker "
        "holds a group's first join for about this long.",
    )
    service_batch_size: int = Field(
        5_000, ge=1, description="Most records consumed and written as one unit."
    )
    service_write_concurrency: int = Field(
        128,
        ge=1,
        description="Cassandra batches in flight at once. High because a durable write "
        "waits for its commit-log sync: writes in flight together share one sync.",
    )

    @model_validator(mode="after")
    def _topics_differ(self) -> ServiceSettings:
        if self.service_results_topic == self.service_topic:
            raise ValueError("SERVICE_RESULTS_TOPIC must differ from SERVICE_TOPIC")
        return self

    def connections(self) -> str:
        """What the service reads from and writes to, for its start-up log line."""
        return (
            f"Kafka {self.kafka_bootstrap_servers}, topics {self.service_topic} and "
            f"{self.service_results_topic}; "
            f"Cassandra {','.join(self.cassandra_contact_points)}:{self.cassandra_port}"
        )
