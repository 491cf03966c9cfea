"""Settings of the live console, read from the environment."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from service_runtime.settings import CommaSeparated, HttpServerSettings


class ConsoleSettings(HttpServerSettings):
    """Where the console listens, which services it shows, and whether it may stop and
    start calculators."""

    console_host: str = Field("127.0.0.1", description="Address the console binds to.")
    console_port: int = Field(9090, ge=1, le=65535, description="Port of the console.")
    console_mutator_url: str = Field(
        "http://127.0.0.1:9091", description="The mutator, to which the forms post."
    )
    console_service_url: str = Field(
        "http://127.0.0.1:9093", description="The Cassandra-backed service (read side)."
    )
    console_calculator_urls: CommaSeparated = Field(
        ["http://127.0.0.1:9094", "http://127.0.0.1:9095"],
        min_length=1,
        description="Calculator instances, comma-separated. Instances the group's routing "
        "table names besides these are shown too.",
    )
    console_interval_seconds: float = Field(
        0.4,
        ge=0.05,
        le=10,
        description="How often the console asks every backend for the state it pushes "
        "to the browsers (only while a browser is watching).",
    )
    console_backend_timeout_seconds: float = Field(
        1.0,
        gt=0,
        le=30,
        description="Longest wait for one backend answer; then that cell shows the time-out.",
    )
    console_max_watched_keys: int = Field(
        12, ge=1, le=100, description="Keys watched at once; adding one more drops the oldest."
    )
    console_allow_control: bool = Field(
        False,
        description="Show the buttons that stop and start calculator instances. `make up` "
        "sets it for the console it starts; by hand, only for a system on this machine.",
    )
    console_control_url: str | None = Field(
        None,
        description="local_stack's control API (`make up` sets it). Unset with "
        "CONSOLE_ALLOW_CONTROL: the console signals the calculator processes on this "
        "machine itself, found by their port.",
    )
    console_control_token: str | None = Field(
        None, description="The control API's token (`make up` sets it)."
    )
    console_results_dir: Path = Field(
        Path("results"),
        description="Where `make compare` writes its runs; the newest report.html is linked.",
    )
