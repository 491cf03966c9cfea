"""The whole system as ``make up`` starts it, on free ports, for tests and ``make compare``.

Example::

    with started_system(Path(tmp)) as system:
        httpx.get(system.calculators[0] + "/metadata")

It runs ``python -m local_stack up`` as a child process with ``LOCAL_STACK_HOME`` set to
``home`` (the Cassandra download is shared with the project's own), waits for the ready
banner and stops it with SIGTERM on exit. Environment variables that would point the
system at external servers are removed: what starts here is the embedded system.
"""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from local_stack.__main__ import READY_BANNER
from local_stack.cassandra import distribution_dir, ensure_cassandra_distribution
from local_stack.process import ManagedProcess, free_port


@dataclass(frozen=True)
class RunningSystem:
    """Base URLs of a started system and the ``up`` process that runs it."""

    mutator: str
    service: str
    calculators: list[str]
    process: ManagedProcess


def consecutive_free_ports(count: int) -> int:
    """The first of ``count`` consecutive ports that can all be bound right now."""
    for _ in range(100):
        first = free_port()
        if first + count > 65536:
            continue
        probes = [socket.socket() for _ in range(count - 1)]
        try:
            for offset, probe in enumerate(probes, start=1):
                probe.bind(("127.0.0.1", first + offset))
        except OSError:
            continue
        finally:
            for probe in probes:
                probe.close()
        return first
    raise RuntimeError(f"no {count} consecutive free ports")


@contextmanager
def started_system(
    home: Path, partitions: int = 6, calculators: int = 2, timeout: float = 240
) -> Iterator[RunningSystem]:
    """Start the system with its state under ``home``; stop it on exit."""
    ensure_cassandra_distribution()
    link = home / distribution_dir().name
    if not link.exists():
        link.symlink_to(distribution_dir())
    env = {**os.environ, "LOCAL_STACK_HOME": str(home)}
    for external in ("KAFKA_BOOTSTRAP_SERVERS", "CASSANDRA_CONTACT_POINTS", "SCHEMA_REGISTRY_URL"):
        env.pop(external, None)
    mutator, service = free_port(), free_port()
    calculator = consecutive_free_ports(calculators)
    command = [
        sys.executable,
        "-m",
        "local_stack",
        "up",
        "--partitions",
        str(partitions),
        "--calculators",
        str(calculators),
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
    try:
        process.wait_ready(lambda: READY_BANNER in process.log_path.read_text(), timeout)
        yield RunningSystem(
            f"http://127.0.0.1:{mutator}",
            f"http://127.0.0.1:{service}",
            [f"http://127.0.0.1:{calculator + i}" for i in range(calculators)],
            process,
        )
    finally:
        process.stop(grace=60)
