"""Helpers for the end-to-end tests: the running system as the tests talk to it."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import httpx

from local_stack.process import ManagedProcess
from local_stack.system import ServiceProcess

PARTITIONS = 6


@dataclass
class System:
    """URLs of the running system and an HTTP client."""

    mutator: str
    service: str
    calculators: list[str]
    process: ManagedProcess
    """``python -m local_stack up``, which runs all of them."""
    services: dict[str, ServiceProcess]
    """The service processes as started, by name (``calculator-1``…)."""
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
