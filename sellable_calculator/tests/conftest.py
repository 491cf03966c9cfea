"""Fixtures for the calculator tests: real instances as processes against the real broker.

The classes and helpers they are built from are in :mod:`sellable_calculator.tests.support`.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
from confluent_kafka.admin import AdminClient

from local_stack.process import free_port
from sellable_calculator.tests.support import (
    PARTITIONS,
    Calculator,
    Mutations,
    calculator_env,
    wait_for_assignment,
)
from shared_schemas.topics import ensure_topics


@pytest.fixture(scope="module")
def mutations(kafka_bootstrap: str) -> Iterator[Mutations]:
    ensure_topics(AdminClient({"bootstrap.servers": kafka_bootstrap}), PARTITIONS)
    writer = Mutations(kafka_bootstrap)
    yield writer
    writer.close()


@pytest.fixture(scope="module")
def calculators(
    kafka_bootstrap: str, mutations: Mutations, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[list[Calculator]]:
    """Two instances of a calculator group of their own, as the default deployment runs
    them; the group has split the partitions between them when the tests start."""
    state = tmp_path_factory.mktemp("calculators")
    run = uuid.uuid4().hex[:6]
    instances = []
    for index in range(2):
        port = free_port()
        env = calculator_env(
            kafka_bootstrap,
            state,
            f"group-{run}",
            f"calc-{run}-{index}",
            port,
            CALCULATOR_FORWARD_TIMEOUT_SECONDS="1.0",
        )
        instances.append(Calculator(index, port, env, state / "logs"))
    for calculator in instances:
        calculator.start()
    wait_for_assignment(instances)
    yield instances
    for calculator in instances:
        if calculator.process is not None:
            calculator.process.stop()
