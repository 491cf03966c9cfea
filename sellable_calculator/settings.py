"""Settings of one sellable-calculator instance, read from the environment.

Two instances of the default deployment differ only in ``CALCULATOR_INSTANCE_INDEX``
and ``CALCULATOR_PORT``::

    CALCULATOR_INSTANCE_INDEX=0 CALCULATOR_PORT=9094 python -m sellable_calculator
    CALCULATOR_INSTANCE_INDEX=1 CALCULATOR_PORT=9095 python -m sellable_calculator
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, model_validator

from service_runtime.settings import CommaSeparatedInts, HttpServerSettings, KafkaSettings


class CalculatorSettings(KafkaSettings, HttpServerSettings):
    """One calculator instance: who it is, what it owns, where it keeps state."""

    calculator_host: str = Field("127.0.0.1", description="Address the REST API binds to.")
    calculator_port: int = Field(9094, ge=1, le=65535, description="Port of the REST API.")
    calculator_instance_count: int = Field(
        2, ge=1, description="How many calculator instances share the partitions."
    )
    calculator_instance_index: int = Field(
        0,
        ge=0,
        description="This instance's index: it owns the partitions p with p % count == index.",
    )
    calculator_instance_id: str | None = Field(
        None, description="Instance id in the routing table; default calculator-<index>."
    )
    calculator_partitions: CommaSeparatedInts | None = Field(
        None, description="Explicit comma-separated partitions to own, overriding index/count."
    )
    calculator_advertised_url: str | None = Field(
        None,
        description="Base URL other instances use to reach this one; default http://<host>:<port>.",
    )
    calculator_workers: int = Field(1, ge=1, description="Bytewax workers in this instance.")
    calculator_state_dir: Path = Field(
        Path(".local/calculator"),
        description="Parent directory of the per-instance store and recovery partitions "
        "(a relative path is taken from the working directory).",
    )
    calculator_epoch_seconds: float = Field(
        2.0, gt=0, description="Bytewax epoch length: how often state is snapshotted for recovery."
    )
    calculator_forward_timeout_seconds: float = Field(
        2.0, gt=0, description="How long a forwarded GET may take before answering 503."
    )
    calculator_wait_timeout_seconds: float = Field(
        5.0, gt=0, description="Default wait of a read-your-writes GET before answering 504."
    )
    calculator_max_wait_seconds: float = Field(
        30.0,
        gt=0,
        description="Longest read-your-writes wait a client may ask for (a longer timeout is 422).",
    )
    calculator_max_forwarded_waits: int = Field(
        100,
        ge=1,
        description="Most read-your-writes GETs this instance relays to other instances at "
        "once (each holds a connection for its wait); more get 503 with Retry-After.",
    )
    calculator_batch_size: int = Field(
        5000, ge=1, description="Most records one source partition hands the dataflow at once."
    )

    @model_validator(mode="after")
    def _index_in_range(self) -> CalculatorSettings:
        if self.calculator_instance_index >= self.calculator_instance_count:
            raise ValueError(
                f"CALCULATOR_INSTANCE_INDEX {self.calculator_instance_index} must be below "
                f"CALCULATOR_INSTANCE_COUNT {self.calculator_instance_count}"
            )
        owned = self.owned_partitions
        if not owned:
            raise ValueError("this instance owns no partitions: add partitions or lower the count")
        bad = [p for p in owned if p >= self.topic_partitions]
        if bad:
            raise ValueError(
                f"CALCULATOR_PARTITIONS {bad} not below TOPIC_PARTITIONS {self.topic_partitions}"
            )
        return self

    @property
    def instance_id(self) -> str:
        """The id this instance advertises."""
        return self.calculator_instance_id or f"calculator-{self.calculator_instance_index}"

    @property
    def advertised_url(self) -> str:
        """The base URL this instance advertises, without a trailing slash."""
        url = (
            self.calculator_advertised_url
            or f"http://{self.calculator_host}:{self.calculator_port}"
        )
        return url.rstrip("/")

    @property
    def owned_partitions(self) -> tuple[int, ...]:
        """The partitions of the co-partitioned topics this instance processes and serves."""
        if self.calculator_partitions:
            return tuple(sorted(set(self.calculator_partitions)))
        return tuple(
            p
            for p in range(self.topic_partitions)
            if p % self.calculator_instance_count == self.calculator_instance_index
        )

    @property
    def instance_dir(self) -> Path:
        """This instance's own state: ``<state dir>/<instance id>``."""
        return self.calculator_state_dir / self.instance_id
