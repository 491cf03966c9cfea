"""The whole system, started exactly as ``make up`` starts it, once per test run.

``local_stack.system.started_system`` runs ``python -m local_stack up`` as a child
process on free ports, with its state in a temporary ``LOCAL_STACK_HOME``, and stops it
with SIGTERM at the end. Tests talk to it over HTTP only.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from integration_tests.support import PARTITIONS, System
from local_stack.system import started_system


@pytest.fixture(scope="session")
def system(tmp_path_factory: pytest.TempPathFactory) -> Iterator[System]:
    home = tmp_path_factory.mktemp("local_stack_home")
    # Read-your-writes waits capped at 5 s (the default wait; make up allows 30): the
    # contract test's fuzzer asks for waits up to the declared maximum, and a 30 s wait
    # per generated case would make the gate slow and its response-time check flaky.
    settings = {"CALCULATOR_MAX_WAIT_SECONDS": "5"}
    with started_system(home, partitions=PARTITIONS, settings=settings) as running:
        system = System(
            running.mutator,
            running.service,
            running.calculators,
            running.process,
            running.services,
        )
        try:
            yield system
        finally:
            for replacement in system.replacements:
                replacement.stop()


@pytest.fixture(scope="session")
def log_dir(system: System) -> Path:
    """Where the system's processes write their logs."""
    return system.process.log_path.parent
