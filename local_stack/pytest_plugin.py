"""Session-scoped pytest fixtures for the embedded broker and Cassandra.

Registered from the project's root ``conftest.py``. Each server starts on a free port
the first time a test asks for it, once per test run, and stops when the run ends.
``KAFKA_BOOTSTRAP_SERVERS`` / ``CASSANDRA_CONTACT_POINTS`` point the tests at external
servers instead.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from local_stack.broker import EmbeddedBroker, external_kafka
from local_stack.cassandra import (
    PROTOCOL_VERSION,
    CassandraEndpoint,
    EmbeddedCassandra,
    external_cassandra,
)
from local_stack.paths import state_dir
from local_stack.process import free_port


@pytest.fixture(scope="session")
def kafka_bootstrap() -> Iterator[str]:
    """Bootstrap servers of a real broker for this test run."""
    external = external_kafka()
    if external:
        yield external
        return
    with EmbeddedBroker(port=free_port(), log_dir=state_dir() / "test-logs") as broker:
        yield broker.bootstrap_servers


@pytest.fixture(scope="session")
def cassandra_endpoint(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[CassandraEndpoint]:
    """A real Cassandra for this test run."""
    external = external_cassandra()
    if external:
        version = os.environ.get("CASSANDRA_PROTOCOL_VERSION")
        yield CassandraEndpoint(external[0], external[1], int(version) if version else None)
        return
    port = free_port()
    with EmbeddedCassandra(
        port=port,
        # pytest's temporary directories, which it prunes itself: a data dir per run
        # under .local/ would pile up, one per random port.
        data_dir=tmp_path_factory.mktemp("cassandra"),
        fresh=True,
        log_dir=state_dir() / "test-logs",
    ) as cassandra:
        yield CassandraEndpoint(cassandra.contact_points, cassandra.port, PROTOCOL_VERSION)
