"""The broker and Cassandra a benchmark runs against: external if configured, else embedded.

Example::

    with ExitStack() as stack:
        bootstrap = kafka(stack)
        endpoint = cassandra(stack)   # CassandraEndpoint
        service = sellable_service(stack, bootstrap, endpoint, port=9093)

``KAFKA_BOOTSTRAP_SERVERS`` / ``CASSANDRA_CONTACT_POINTS`` (with ``CASSANDRA_PORT`` and
``CASSANDRA_PROTOCOL_VERSION``) point a benchmark at real servers; otherwise fresh
embedded ones start on free ports and stop when ``stack`` closes.
"""

from __future__ import annotations

import os
import sys
import tempfile
from contextlib import ExitStack
from pathlib import Path

from cassandra.cluster import EXEC_PROFILE_DEFAULT, Cluster, ExecutionProfile, Session
from cassandra.policies import RoundRobinPolicy

from local_stack.broker import EmbeddedBroker, external_kafka
from local_stack.cassandra import (
    PROTOCOL_VERSION,
    CassandraEndpoint,
    CommitlogSync,
    EmbeddedCassandra,
    external_cassandra,
)
from local_stack.process import ManagedProcess, free_port


def kafka(stack: ExitStack) -> str:
    """Bootstrap servers to benchmark against."""
    external = external_kafka()
    if external:
        return external
    return stack.enter_context(EmbeddedBroker(port=free_port())).bootstrap_servers


def cassandra(stack: ExitStack, commitlog_sync: CommitlogSync = "batch") -> CassandraEndpoint:
    """A Cassandra to benchmark against; ``commitlog_sync`` applies to an embedded one."""
    external = external_cassandra()
    if external:
        version = os.environ.get("CASSANDRA_PROTOCOL_VERSION")
        return CassandraEndpoint(external[0], external[1], int(version) if version else None)
    data = Path(stack.enter_context(tempfile.TemporaryDirectory()))
    server = stack.enter_context(
        EmbeddedCassandra(
            port=free_port(),
            data_dir=data / "cassandra",
            fresh=True,
            commitlog_sync=commitlog_sync,
        )
    )
    return CassandraEndpoint(server.contact_points, server.port, PROTOCOL_VERSION)


def cassandra_session(stack: ExitStack, endpoint: CassandraEndpoint) -> Session:
    """A driver session on ``endpoint`` (round-robin, one host at a time is plenty here);
    it shuts down when ``stack`` closes."""
    profile = ExecutionProfile(load_balancing_policy=RoundRobinPolicy())
    version = endpoint.protocol_version
    extra = {"protocol_version": version} if version else {}
    cluster = Cluster(
        endpoint.contact_points,
        port=endpoint.port,
        execution_profiles={EXEC_PROFILE_DEFAULT: profile},
        **extra,
    )
    stack.callback(cluster.shutdown)
    return cluster.connect()


def sellable_service(
    stack: ExitStack, bootstrap: str, endpoint: CassandraEndpoint, port: int, **env: str
) -> ManagedProcess:
    """Start the sellable service on ``port`` against ``bootstrap`` and ``endpoint``.

    ``env`` adds or overrides settings (keyspace, consumer group, …); the process stops
    when ``stack`` closes.
    """
    cassandra_env = {
        "CASSANDRA_CONTACT_POINTS": ",".join(endpoint.contact_points),
        "CASSANDRA_PORT": str(endpoint.port),
    }
    if endpoint.protocol_version:
        cassandra_env["CASSANDRA_PROTOCOL_VERSION"] = str(endpoint.protocol_version)
    return python_module(
        stack,
        "service",
        "sellable_service",
        KAFKA_BOOTSTRAP_SERVERS=bootstrap,
        SERVICE_PORT=str(port),
        **cassandra_env,
        **env,
    )


def python_module(stack: ExitStack, name: str, module: str, **env: str) -> ManagedProcess:
    """Start ``python -m module`` with ``env`` on top of this environment (warnings-only
    logs unless ``LOG_LEVEL`` is given); it stops when ``stack`` closes."""
    process = stack.enter_context(
        ManagedProcess(
            name,
            [sys.executable, "-m", module],
            env={**os.environ, "LOG_LEVEL": "WARNING", **env},
        )
    )
    process.start()
    return process
