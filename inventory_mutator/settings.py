"""Settings of the inventory mutator, read from the environment."""

from __future__ import annotations

from pydantic import Field

from service_runtime.settings import HttpServerSettings, KafkaSettings


class MutatorSettings(KafkaSettings, HttpServerSettings):
    """The command side: where it listens and how long it waits for the broker."""

    mutator_host: str = Field("127.0.0.1", description="Address the REST API binds to.")
    mutator_port: int = Field(9091, ge=1, le=65535, description="Port of the REST API.")
    mutator_delivery_timeout_seconds: float = Field(
        5.0, gt=0, description="Longest wait for the broker's acknowledgement before a 503."
    )
    mutator_max_body_bytes: int = Field(
        16_384, ge=256, description="Largest request body accepted; larger ones get 413."
    )
    mutator_idempotency_window_seconds: float = Field(
        600.0, gt=0, description="How long an Idempotency-Key's first answer is remembered."
    )
    mutator_idempotency_max_keys: int = Field(
        100_000, ge=1, description="Most Idempotency-Keys remembered at once (oldest go first)."
    )
    mutator_decision_wait_seconds: float = Field(
        5.0,
        ge=0,
        le=30,
        description="How long a validated reservation waits for its decision by default "
        "(`?wait=` overrides, up to 30 s) before a 202 with the URL to ask later.",
    )
    mutator_results_max: int = Field(
        1_000_000,
        ge=1,
        description="Most decisions on validated reservations the mutator remembers for "
        "GET /inventory/reservations/{id} (oldest go first; the calculators and the "
        "Cassandra service keep every one).",
    )
    mutator_ensure_topics: bool = Field(
        True,
        description="Create missing topics at start-up, and again whenever the broker "
        "is found without them (a restarted in-memory broker).",
    )
    mutator_shutdown_timeout_seconds: float = Field(
        3.0,
        gt=0,
        description="On SIGTERM/SIGINT, longest wait for Kafka to acknowledge the records "
        "in flight; then their requests get a 503 and the process exits.",
    )
