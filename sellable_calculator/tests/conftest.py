"""Fixtures for the calculator tests: real instances as processes against the real broker.

The classes and helpers they are built from are in :mod:`sellable_calculator.tests.support`.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest
from confluent_kafka.admin import AdminClient

from local_stack.process import free_port
from local_stack.testing import wait_until
from sellable_calculator.tests.support import PARTITIONS, Calculator, Mutations
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
    """Two instances (partitions split by index), as the default deployment runs them."""
    state = tmp_path_factory.mktemp("calculators")
    run = uuid.uuid4().hex[:6]
    instances = []
    for index in range(2):
        port = free_port()
        env = {
            **os.environ,
            "KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap,
            "TOPIC_PARTITIONS": str(PARTITIONS),
            "CALCULATOR_PORT": str(port),
            "CALCULATOR_INSTANCE_COUNT": "2",
            "CALCULATOR_INSTANCE_INDEX": str(index),
            # Unique ids: earlier test modules advertised instances on the same topic.
            "CALCULATOR_INSTANCE_ID": f"calc-{run}-{index}",
            "CALCULATOR_STATE_DIR": str(state),
            "CALCULATOR_EPOCH_SECONDS": "0.5",
            "CALCULATOR_FORWARD_TIMEOUT_SECONDS": "1.0",
        }
        instances.append(Calculator(index, port, env, state / "logs"))
    for calculator in instances:
        calculator.start()
    # Both must know each other before the tests route between them.
    for calculator in instances:
        wait_until(lambda c=calculator: len(c.get("/metadata").json()["instances"]) >= 2)
    yield instances
    for calculator in instances:
        if calculator.process is not None:
            calculator.process.stop()
