"""The whole system, started exactly as ``make up`` starts it, once per test run.

``local_stack.system.started_system`` runs ``python -m local_stack up`` as a child
process on free ports, with its state in a temporary ``LOCAL_STACK_HOME``, and stops it
with SIGTERM at the end. Tests talk to it over HTTP only.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from local_stack.process import ManagedProcess
from local_stack.system import started_system

PARTITIONS = 6


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
    home = tmp_path_factory.mktemp("local_stack_home")
    # Read-your-writes waits capped at 5 s (the default wait; make up allows 30): the
    # contract test's fuzzer asks for waits up to the declared maximum, and a 30 s wait
    # per generated case would make the gate slow and its response-time check flaky.
    settings = {"CALCULATOR_MAX_WAIT_SECONDS": "5"}
    with started_system(home, partitions=PARTITIONS, settings=settings) as running:
        system = System(running.mutator, running.service, running.calculators, running.process)
        try:
            yield system
        finally:
            for replacement in system.replacements:
                replacement.stop()


@pytest.fixture(scope="session")
def log_dir(system: System) -> Path:
    """Where the system's processes write their logs."""
    return system.process.log_path.parent
