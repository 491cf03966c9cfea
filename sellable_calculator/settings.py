"""Settings of one sellable-calculator instance, read from the environment.

Instances find each other through the calculator group (a Kafka consumer group): two
instances of the default deployment differ only in their port::

    python -m sellable_calculator                      # port 9094
    CALCULATOR_PORT=9095 python -m sellable_calculator
"""

from __future__ import annotations

import socket
from pathlib import Path
from urllib.parse import urlsplit

from pydantic import Field

from service_runtime.settings import HttpServerSettings, KafkaSettings
from shared_schemas.topics import changelog_topic

_ANY_ADDRESS = frozenset({"0.0.0.0", "::", ""})
_LOOPBACK = frozenset({"127.0.0.1", "localhost", "::1"})


class CalculatorSettings(KafkaSettings, HttpServerSettings):
    """One calculator instance: who it is, what it owns, where it keeps state."""

    calculator_host: str = Field("127.0.0.1", description="Address the REST API binds to.")
    calculator_port: int = Field(9094, ge=1, le=65535, description="Port of the REST API.")
    calculator_instance_id: str | None = Field(
        None,
        description="Instance id in the group and the routing table, and the name of its state "
        "directory; default calculator-<port> (calculator-<host>-<port> when the advertised host "
        "is not a loopback address).",
    )
    calculator_group_id: str = Field(
        "sellable-calculator",
        pattern=r"^[A-Za-z0-9._-]{1,200}$",
        description="Kafka consumer group the instances form: it assigns the partitions. "
        "Its changelog topic is <group>-changelog.",
    )
    calculator_session_timeout_seconds: float = Field(
        3.0,
        ge=1,
        description="How long the group waits for a silent instance (killed or frozen) before "
        "it reassigns its partitions.",
    )
    calculator_standby_replicas: int = Field(
        1,
        ge=0,
        description="Other instances that keep each partition warm as a standby replica (from "
        "its changelog): a failover then restores only the tail, and while the owner is "
        "unavailable a standby answers, marked stale. Fewer while there are fewer other "
        "instances (none while an instance is alone).",
    )
    calculator_advertised_url: str | None = Field(
        None,
        description="Base URL other instances use to reach this one; default http://<host>:<port> "
        "(the host name when bound to 0.0.0.0).",
    )
    calculator_workers: int = Field(1, ge=1, description="Bytewax workers in this instance.")
    calculator_state_dir: Path = Field(
        Path(".local/calculator"),
        description="Parent directory of the per-instance store (a relative path is taken from "
        "the working directory).",
    )
    calculator_mutator_url: str = Field(
        "http://127.0.0.1:9091",
        description="The mutator, asked about a validated reservation this instance knows no "
        "decision on: only the mutator that accepted it can say PENDING. Empty: not asked.",
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

    @property
    def instance_id(self) -> str:
        """The id this instance joins the group and advertises with."""
        if self.calculator_instance_id:
            return self.calculator_instance_id
        host = urlsplit(self.advertised_url).hostname or ""
        if host in _LOOPBACK:
            return f"calculator-{self.calculator_port}"
        return f"calculator-{host}-{self.calculator_port}"

    @property
    def advertised_url(self) -> str:
        """The base URL this instance advertises, without a trailing slash."""
        if self.calculator_advertised_url:
            return self.calculator_advertised_url.rstrip("/")
        host = self.calculator_host
        if host in _ANY_ADDRESS:  # bound to every address: others reach us by host name
            host = socket.gethostname()
        return f"http://{host}:{self.calculator_port}"

    @property
    def changelog_topic(self) -> str:
        """The group's changelog topic (:func:`shared_schemas.topics.changelog_topic`)."""
        return changelog_topic(self.calculator_group_id).name

    @property
    def instance_dir(self) -> Path:
        """This instance's own state: ``<state dir>/<instance id>``."""
        return self.calculator_state_dir / self.instance_id
