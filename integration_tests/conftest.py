"""The whole system, started exactly as ``make up`` starts it, once per test run.

``python -m local_stack up`` runs as a child process on free ports, with its state in a
temporary ``LOCAL_STACK_HOME`` (the Cassandra download is shared with the project's), and
is stopped with SIGTERM at the end. Tests talk to it over HTTP only.
"""

from __future__ import annotations

import os
import socket
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from local_stack.__main__ import READY_BANNER
from local_stack.cassandra import distribution_dir, ensure_cassandra_distribution
from local_stack.process import ManagedProcess, free_port, port_in_use

PARTITIONS = 6


def _two_free_consecutive_ports() -> int:
    for _ in range(50):
        port = free_port()
        if port < 65535 and not port_in_use(port + 1):
            with socket.socket() as probe:  # make sure port + 1 can be bound, too
                try:
                    probe.bind(("127.0.0.1", port + 1))
                except OSError:
                    continue
            return port
    raise RuntimeError("no two consecutive free ports")


@dataclass
class System:
    """URLs of the running system and an HTTP client."""

    mutator: str
    service: str
    calculators: list[str]
    process: ManagedProcess
    replacements: list[ManagedProcess] = field(default_factory=list)
    """Processes tests restarted in place of ones they killed; stopped at the end."""
    client: httpx.Client = field(default_factory=lambda: httpx.Client(timeout=15))

    @property
    def readers(self) -> list[str]:
        """Every GET endpoint: the Cassandra service and each calculator."""
        return [self.service, *self.calculators]

    def adjust(self, location: str, sku: str, count: int | str) -> dict[str, Any]:
        return self._post("adjustment", location, sku, count)

    def reserve(self, location: str, sku: str, count: int | str) -> dict[str, Any]:
        return self._post("reservation", location, sku, count)

    def _post(self, kind: str, location: str, sku: str, count: int | str) -> dict[str, Any]:
        response = self.client.post(
            f"{self.mutator}/inventory/{kind}",
            json={"locationId": location, "sku": sku, "count": count},
        )
        assert response.status_code == 200, response.text
        return response.json()

    def get(self, base: str, location: str, sku: str, **params: Any) -> httpx.Response:
        return self.client.get(f"{base}/inventory/locations/{location}/skus/{sku}", params=params)

    def count_at(self, base: str, location: str, sku: str) -> int | None:
        response = self.get(base, location, sku)
        return response.json()["count"] if response.status_code == 200 else None

    def disagreements(self, location: str, expected: dict[str, int]) -> dict[str, Any]:
        """``{"<reader> <sku>": actual}`` for every answer that differs from ``expected``."""
        wrong: dict[str, Any] = {}
        for base in self.readers:
            for sku, count in expected.items():
                actual = self.count_at(base, location, sku)
                if actual != count:
                    wrong[f"{base} {sku}"] = (actual, count)
        return wrong

    def wait_all_agree(
        self, location: str, expected: dict[str, int], timeout: float = 60.0
    ) -> None:
        """Wait until every reader answers every sku with its expected count."""
        deadline = time.monotonic() + timeout
        while True:
            wrong = self.disagreements(location, expected)
            if not wrong:
                return
            if time.monotonic() > deadline:
                sample = dict(list(wrong.items())[:6])
                raise AssertionError(
                    f"{len(wrong)} answers still differ after {timeout} s "
                    f"(reader sku: (actual, expected)): {sample}"
                )
            time.sleep(0.2)


@pytest.fixture(scope="session")
def system(tmp_path_factory: pytest.TempPathFactory) -> Iterator[System]:
    ensure_cassandra_distribution()
    home = tmp_path_factory.mktemp("local_stack_home")
    (home / distribution_dir().name).symlink_to(distribution_dir())
    env = {**os.environ, "LOCAL_STACK_HOME": str(home)}
    for external in ("KAFKA_BOOTSTRAP_SERVERS", "CASSANDRA_CONTACT_POINTS"):
        env.pop(external, None)  # the system under test is the embedded one
    mutator, service, calculator = free_port(), free_port(), _two_free_consecutive_ports()
    command = [
        sys.executable,
        "-m",
        "local_stack",
        "up",
        "--partitions",
        str(PARTITIONS),
        "--mutator-port",
        str(mutator),
        "--service-port",
        str(service),
        "--calculator-port",
        str(calculator),
        "--kafka-port",
        str(free_port()),
        "--cassandra-port",
        str(free_port()),
    ]
    process = ManagedProcess("make-up", command, env=env, log_dir=home / "logs")
    process.start()
    system = None
    try:
        process.wait_ready(lambda: READY_BANNER in process.log_path.read_text(), timeout=240)
        system = System(
            f"http://127.0.0.1:{mutator}",
            f"http://127.0.0.1:{service}",
            [f"http://127.0.0.1:{calculator}", f"http://127.0.0.1:{calculator + 1}"],
            process,
        )
        yield system
    finally:
        for replacement in system.replacements if system else []:
            replacement.stop()
        process.stop(grace=60)


@pytest.fixture(scope="session")
def log_dir(system: System) -> Path:
    """Where the system's processes write their logs."""
    return system.process.log_path.parent
