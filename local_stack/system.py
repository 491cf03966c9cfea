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

import json
import os
import signal
import socket
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from local_stack.__main__ import READY_BANNER
from local_stack.cassandra import distribution_dir, ensure_cassandra_distribution
from local_stack.paths import services_file
from local_stack.process import ManagedProcess, free_port
from local_stack.testing import WaitTimeout, wait_until
from sellable_calculator.settings import CalculatorSettings

DEFAULT_CALCULATOR_PORT: int = CalculatorSettings.model_fields["calculator_port"].default


@dataclass(frozen=True)
class RunningSystem:
    """Base URLs of a started system, the ``up`` process that runs it and the service
    processes that process started, by name (``calculator-0``…, ``sellable_service``,
    ``inventory_mutator``, ``console``): to kill one and start it again."""

    mutator: str
    service: str
    calculators: list[str]
    process: ManagedProcess
    services: dict[str, ServiceProcess]
    console: str | None = None
    """The live console's base URL (None when started without it)."""


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
    home: Path,
    partitions: int = 6,
    calculators: int = 2,
    timeout: float = 240,
    settings: dict[str, str] | None = None,
    supervise: bool = False,
    console: bool = True,
) -> Iterator[RunningSystem]:
    """Start the system with its state under ``home``; stop it on exit.

    ``settings`` are environment variables every service gets on top of this process's.
    ``supervise``: service processes that die are started again, as ``make up`` does
    (off by default: the tests and the chaos trials kill and restart processes
    themselves; :attr:`RunningSystem.services` then lists the first pids only).
    ``console``: start the live console too (idle until a browser watches it), allowed
    to stop and start the calculators as under ``make up``.
    """
    ensure_cassandra_distribution()
    link = home / distribution_dir().name
    if not link.exists():
        link.symlink_to(distribution_dir())
    env = {**os.environ, **(settings or {}), "LOCAL_STACK_HOME": str(home)}
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
    if not supervise:
        command.append("--no-supervise")
    console_port = free_port() if console else None
    if console_port is None:
        command.append("--no-console")
    else:
        command += ["--console-port", str(console_port)]
    process = ManagedProcess("make-up", command, env=env, log_dir=home / "logs")
    process.start()
    try:
        process.wait_ready(lambda: READY_BANNER in process.log_path.read_text(), timeout)
        yield RunningSystem(
            f"http://127.0.0.1:{mutator}",
            f"http://127.0.0.1:{service}",
            [f"http://127.0.0.1:{calculator + i}" for i in range(calculators)],
            process,
            _started_services(home, env),
            None if console_port is None else f"http://127.0.0.1:{console_port}",
        )
    finally:
        process.stop(grace=60)


@dataclass(frozen=True)
class ServiceProcess:
    """A running service process as the operating system sees it: enough to start it again."""

    pid: int
    argv: list[str]
    env: dict[str, str]
    cwd: Path

    def kill(self, timeout: float = 10.0) -> None:
        """kill -9, and wait until the process is gone (or a zombie nobody reaps)."""
        os.kill(self.pid, signal.SIGKILL)
        try:
            wait_until(lambda: _gone(self.pid), timeout)
        except WaitTimeout:
            raise TimeoutError(f"process {self.pid} still runs {timeout} s after SIGKILL") from None

    def restarted(self, name: str, log_dir: Path) -> ManagedProcess:
        """Start the same command with the same environment and directory (not waited for)."""
        process = ManagedProcess(name, self.argv, env=self.env, cwd=self.cwd, log_dir=log_dir)
        process.start()
        return process


def _started_services(home: Path, env: dict[str, str]) -> dict[str, ServiceProcess]:
    """The service processes ``up`` reported in its services file; ``env`` is its own."""
    listed = json.loads(services_file(home).read_text())
    return {
        name: ServiceProcess(
            service["pid"], service["argv"], {**env, **service["env"]}, Path(service["cwd"])
        )
        for name, service in listed.items()
    }


def calculator_process(port: int) -> ServiceProcess:
    """The calculator process that listens on ``port`` (``--port``, or else
    ``CALCULATOR_PORT``), found by scanning
    Linux's ``/proc``: for a system started elsewhere (:func:`started_system` has them in
    :attr:`RunningSystem.services`)."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().split(b"\0")
            if b"sellable_calculator" not in cmdline:
                continue
            environ = dict(
                item.split("=", 1)
                for item in (proc / "environ").read_bytes().decode().split("\0")
                if "=" in item
            )
            argv = [part.decode() for part in cmdline if part]
            # The last of --port N / --port=N wins over CALCULATOR_PORT, as argparse has it.
            given = environ.get("CALCULATOR_PORT", str(DEFAULT_CALCULATOR_PORT))
            for i, arg in enumerate(argv):
                if arg == "--port" and i + 1 < len(argv):
                    given = argv[i + 1]
                elif arg.startswith("--port="):
                    given = arg.partition("=")[2]
            if given == str(port) and not _gone(int(proc.name)):
                return ServiceProcess(int(proc.name), argv, environ, (proc / "cwd").resolve())
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
    raise LookupError(f"no calculator process listens on port {port}")


def _gone(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"
    except FileNotFoundError:
        return True
