"""Command line of the local stack.

    python -m local_stack fetch                  # download / check the embedded servers
    python -m local_stack broker [--port 9092]   # just the broker
    python -m local_stack cassandra [--port 9042]
    python -m local_stack infra                  # broker + Cassandra + topics
    python -m local_stack up [--calculators 2] [--partitions 6]   # the whole system
                                                 # and the live console (:9090)

Everything runs in the foreground; SIGINT (Ctrl-C) or SIGTERM stops what was started,
in reverse order, and leaves no process behind. A missing prerequisite or a taken port
is one ``error: …`` line and exit status 2.

``up`` starts the live console (:mod:`console`) last, and a control API on a free
loopback port that only the console gets the token of (:mod:`local_stack.control`): its
buttons stop and start the calculators through it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import secrets
import shutil
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from types import FrameType

import httpx

from local_stack.broker import EmbeddedBroker, external_kafka, tansu_binary
from local_stack.cassandra import (
    PROTOCOL_VERSION,
    EmbeddedCassandra,
    ensure_cassandra_distribution,
    external_cassandra,
    java_binary,
)
from local_stack.control import ControlServer, ServiceHandle
from local_stack.paths import logs_dir, run_dir, services_file, state_dir
from local_stack.process import (
    ManagedProcess,
    PrerequisiteError,
    ProcessFailed,
    require_free_port,
)

log = logging.getLogger("local_stack")

READY_BANNER = "The system is up:"
"""Printed once every process is ready (the integration tests wait for it)."""

MUTATOR_PORT = 9091
SERVICE_PORT = 9093
FIRST_CALCULATOR_PORT = 9094
CONSOLE_PORT = 9090


class Stack(contextlib.ExitStack):
    """What one command started, stopped in reverse order when the ``with`` block ends."""

    def __init__(self) -> None:
        super().__init__()
        self.env: dict[str, str] = {}
        """Settings every service gets: where Kafka and Cassandra are."""
        self.services: dict[str, dict[str, object]] = {}
        """Each service process started, as :func:`local_stack.paths.services_file` lists it."""
        self.supervise = True
        """Start a service process again when it dies (``up --no-supervise``: not)."""
        self.services_lock = threading.Lock()

    def on_stop(self, name: str, stop: Callable[[], object]) -> None:
        """Call ``stop`` at the end, logged; if it fails, the rest are still stopped."""
        self.callback(_stop_logged, name, stop)


def _stop_logged(name: str, stop: Callable[[], object]) -> None:
    log.info("stopping %s", name)
    try:
        stop()
    except Exception as exc:  # keep stopping the rest; the exit status stays the command's
        log.error("stopping %s failed: %s", name, exc)


def _start_broker(stack: Stack, port: int) -> None:
    external = external_kafka()
    if external:
        log.info("using the external Kafka at %s (KAFKA_BOOTSTRAP_SERVERS)", external)
        stack.env["KAFKA_BOOTSTRAP_SERVERS"] = external
        return
    broker = EmbeddedBroker(port=port)
    broker.start()
    stack.on_stop("broker", broker.stop)
    stack.env["KAFKA_BOOTSTRAP_SERVERS"] = broker.bootstrap_servers
    log.info("broker ready on %s (log %s)", broker.bootstrap_servers, broker.process.log_path)


def _start_cassandra(stack: Stack, port: int, fresh: bool) -> None:
    external = external_cassandra()
    if external:
        points, cql_port = external
        log.info("using the external Cassandra at %s:%d", ",".join(points), cql_port)
        stack.env.update(CASSANDRA_CONTACT_POINTS=",".join(points), CASSANDRA_PORT=str(cql_port))
        return
    cassandra = EmbeddedCassandra(port=port, fresh=fresh)
    log.info("starting Cassandra on 127.0.0.1:%d (takes a few seconds)…", port)
    cassandra.start()
    stack.on_stop("cassandra", cassandra.stop)
    stack.env.update(
        CASSANDRA_CONTACT_POINTS="127.0.0.1",
        CASSANDRA_PORT=str(port),
        CASSANDRA_PROTOCOL_VERSION=str(PROTOCOL_VERSION),
    )
    assert cassandra.process is not None
    log.info("Cassandra ready on 127.0.0.1:%d (log %s)", port, cassandra.process.log_path)


def _ensure_topics(stack: Stack, partitions: int) -> None:
    from confluent_kafka.admin import AdminClient

    from shared_schemas.topics import ensure_topics

    admin = AdminClient({"bootstrap.servers": stack.env["KAFKA_BOOTSTRAP_SERVERS"]})
    created = ensure_topics(admin, partitions)
    log.info(
        "topics ready (%d partitions)%s",
        partitions,
        f"; created {', '.join(created)}" if created else "",
    )


class _Follower(threading.Thread):
    """Prints a child's log file to the console, each line prefixed with its name."""

    def __init__(self, name: str, path: Path, width: int) -> None:
        super().__init__(name=f"follow-{name}", daemon=True)
        self.prefix = f"{name:<{width}} | "
        self.path = path
        self.stopped = threading.Event()
        self.start_at = path.stat().st_size if path.exists() else 0

    def run(self) -> None:
        while not self.path.exists() and not self.stopped.wait(0.1):
            pass
        with self.path.open("r", errors="replace") as stream:
            stream.seek(self.start_at)
            while not self.stopped.is_set():
                line = stream.readline()
                if line:
                    sys.stdout.write(self.prefix + line)
                    sys.stdout.flush()
                else:
                    self.stopped.wait(0.1)


def _start_service(
    stack: Stack,
    name: str,
    module: str,
    env: dict[str, str],
    port: int,
    width: int,
    secret_env: dict[str, str] | None = None,
) -> ServiceHandle:
    """Start ``module`` as service ``name``, listening on ``port``, and wait until it is
    live. ``secret_env`` is given to it but not written to the services file."""
    require_free_port(port, name)
    process = ManagedProcess(
        name,
        [sys.executable, "-m", module],
        env={**os.environ, **stack.env, **env, **(secret_env or {})},
    )
    follower = _Follower(name, process.log_path, width)
    handle = ServiceHandle(
        name,
        process,
        port,
        supervise=stack.supervise,
        on_start=lambda pid: _restarted(stack, name, pid),
        on_change=lambda: _changed(stack, name, handle),
    )
    handle.start()
    follower.start()

    def stop() -> None:
        handle.stop()
        follower.stopped.set()

    stack.on_stop(name, stop)
    stack.services[name] = {
        "pid": process.pid,
        "argv": process.command,
        # What it gets on top of this process's environment (not the whole environment:
        # the file is on disk).
        "env": {**stack.env, **env},
        "cwd": os.getcwd(),
    }
    url = f"http://127.0.0.1:{port}/health/live"
    process.wait_ready(lambda: httpx.get(url, timeout=1).status_code == 200, timeout=90)
    return handle


def _publish_services(stack: Stack) -> None:
    """Write :func:`services_file` (whole or not at all), and remove it first on stop."""
    _write_services(stack)
    stack.callback(services_file().unlink, missing_ok=True)


def _write_services(stack: Stack) -> None:
    path = services_file()
    partial = path.with_name(path.name + ".partial")
    partial.parent.mkdir(parents=True, exist_ok=True)
    with stack.services_lock:
        partial.write_text(json.dumps(stack.services, indent=1))
        partial.replace(path)


def _restarted(stack: Stack, name: str, pid: int) -> None:
    """Note a service's new process in :func:`services_file` (once it has been written)."""
    service = stack.services[name]
    service["pid"] = pid
    service["restarts"] = int(str(service.get("restarts", 0))) + 1
    if services_file().exists():
        _write_services(stack)


def _changed(stack: Stack, name: str, handle: ServiceHandle) -> None:
    """Note in :func:`services_file` that a service was stopped or started on request
    (``held``: kept down until started again through the control API)."""
    service = stack.services[name]
    service["held"] = handle.held
    if not handle.held and handle.process.pid is not None:
        service["pid"] = handle.process.pid
    if services_file().exists():
        _write_services(stack)


def _tour(
    mutator_port: int, service_port: int, calculator_ports: list[int], console_port: int | None
) -> str:
    calculator_docs = ", ".join(f"http://localhost:{p}/docs" for p in calculator_ports)
    gets = " ".join(str(p) for p in [service_port, *calculator_ports])
    post = f"http://localhost:{mutator_port}/inventory"
    console = (
        ""
        if console_port is None
        else f"  live console          http://localhost:{console_port}/"
        "   (post, watch both sides converge, stop a calculator)\n"
    )
    return f"""
{READY_BANNER}
{console}  inventory_mutator     http://localhost:{mutator_port}/docs
  sellable_service      http://localhost:{service_port}/docs   (Cassandra read model)
  sellable_calculator   {calculator_docs}

Try it:
  curl -H "Content-Type: application/json" -X POST \\
    -d '{{"locationId":"STL","sku":"123123", "count": "100"}}' {post}/adjustment
  curl -H "Content-Type: application/json" -X POST \\
    -d '{{"locationId":"STL","sku":"123123", "count": "10"}}' {post}/reservation
  for port in {gets}; do
    curl -s http://localhost:$port/inventory/locations/STL/skus/123123; echo
  done

One more calculator (it joins the group and takes its share; Ctrl-C hands it back):
  .venv/bin/python -m sellable_calculator --port {max(calculator_ports) + 1}

Logs: {logs_dir()}   Ctrl-C stops everything.
"""


def _wait_for_signal() -> None:
    received: list[int] = []

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        if not received:
            log.info("%s received: shutting down", signal.Signals(signum).name)
        received.append(signum)

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    # Not threading.Event.wait: setting an Event from a signal handler can deadlock
    # against the main thread's own wait when two signals arrive close together.
    while not received:
        signal.pause()


def _fresh_state() -> None:
    # The embedded broker keeps topics in memory only: state derived from an earlier
    # run's topics (calculator stores, the Cassandra read model)
    # would refer to offsets that no longer exist, so an embedded run starts empty.
    for path in (state_dir() / "calculator", run_dir()):
        shutil.rmtree(path, ignore_errors=True)


def cmd_fetch(args: argparse.Namespace, stack: Stack) -> None:
    """Download and check everything the embedded stack needs."""
    log.info("broker: %s", tansu_binary())
    log.info("java: %s", java_binary())
    log.info("cassandra: %s", ensure_cassandra_distribution())


def cmd_broker(args: argparse.Namespace, stack: Stack) -> None:
    """Only the broker."""
    _start_broker(stack, args.port or 9092)
    _wait_for_signal()


def cmd_cassandra(args: argparse.Namespace, stack: Stack) -> None:
    """Only Cassandra."""
    _start_cassandra(stack, args.port or 9042, fresh=False)
    _wait_for_signal()


def cmd_infra(args: argparse.Namespace, stack: Stack) -> None:
    """Broker, Cassandra and the topics."""
    _start_broker(stack, 9092)
    _start_cassandra(stack, 9042, fresh=not external_kafka())
    _ensure_topics(stack, args.partitions)
    _wait_for_signal()


def cmd_up(args: argparse.Namespace, stack: Stack) -> None:
    """The whole system on the embedded defaults."""
    if args.calculators < 1:
        raise PrerequisiteError("need at least one calculator")
    calculator_ports = [args.calculator_port + i for i in range(args.calculators)]
    ports = [args.mutator_port, args.service_port, *calculator_ports]
    if not args.no_console:
        ports.append(args.console_port)
    for port in ports:
        require_free_port(port, "the system")
    stack.supervise = not args.no_supervise
    if not external_kafka():
        _fresh_state()
    _start_broker(stack, args.kafka_port)
    _start_cassandra(stack, args.cassandra_port, fresh=not external_kafka())
    _ensure_topics(stack, args.partitions)
    stack.env["TOPIC_PARTITIONS"] = str(args.partitions)
    width = len("inventory_mutator")
    calculators: dict[str, ServiceHandle] = {}
    for index, port in enumerate(calculator_ports):
        name = f"calculator-{index}"
        calculators[name] = _start_service(
            stack,
            name,
            "sellable_calculator",
            {
                # Nothing but the port: the instances find each other in the calculator
                # group, which assigns the partitions.
                "CALCULATOR_PORT": str(port),
                # The state belongs with this run's topics: under the stack's own home.
                "CALCULATOR_STATE_DIR": str(state_dir() / "calculator"),
                # Asked about validated reservations nobody has decided yet (PENDING).
                "CALCULATOR_MUTATOR_URL": f"http://127.0.0.1:{args.mutator_port}",
            },
            port,
            width,
        )
    _start_service(
        stack,
        "sellable_service",
        "sellable_service",
        {"SERVICE_PORT": str(args.service_port)},
        args.service_port,
        width,
    )
    _start_service(
        stack,
        "inventory_mutator",
        "inventory_mutator",
        {"MUTATOR_PORT": str(args.mutator_port)},
        args.mutator_port,
        width,
    )
    if not args.no_console:
        _start_console(stack, args, calculators, width)
    _publish_services(stack)
    console_port = None if args.no_console else args.console_port
    print(_tour(args.mutator_port, args.service_port, calculator_ports, console_port), flush=True)
    _wait_for_signal()


def _start_console(
    stack: Stack, args: argparse.Namespace, calculators: dict[str, ServiceHandle], width: int
) -> None:
    """The live console, allowed to stop and start the calculators through a control API
    that only it knows the token of (:mod:`local_stack.control`)."""
    token = secrets.token_urlsafe(24)
    control = ControlServer(calculators, token)
    control.start()
    stack.on_stop("control API", control.stop)
    log.info("control API for the console on %s", control.url)
    base = "http://127.0.0.1"
    _start_service(
        stack,
        "console",
        "console",
        {
            "CONSOLE_PORT": str(args.console_port),
            "CONSOLE_MUTATOR_URL": f"{base}:{args.mutator_port}",
            "CONSOLE_SERVICE_URL": f"{base}:{args.service_port}",
            "CONSOLE_CALCULATOR_URLS": ",".join(
                f"{base}:{handle.port}" for handle in calculators.values()
            ),
            "CONSOLE_ALLOW_CONTROL": "true",
            "CONSOLE_CONTROL_URL": control.url,
        },
        args.console_port,
        width,
        secret_env={"CONSOLE_CONTROL_TOKEN": token},
    )


def _interrupt(signum: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    """Parse the command, run it, stop what it started; return the exit status."""
    parser = argparse.ArgumentParser(prog="python -m local_stack", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    for name, function in [
        ("fetch", cmd_fetch),
        ("broker", cmd_broker),
        ("cassandra", cmd_cassandra),
        ("infra", cmd_infra),
        ("up", cmd_up),
    ]:
        sub = commands.add_parser(name, help=(function.__doc__ or "").strip())
        sub.set_defaults(function=function)
        if name in ("broker", "cassandra"):
            sub.add_argument("--port", type=int, help="port to listen on")
        if name in ("infra", "up"):
            sub.add_argument("--partitions", type=int, default=6, help="topic partitions")
        if name == "up":
            sub.add_argument("--calculators", type=int, default=2, help="calculator instances")
            sub.add_argument("--mutator-port", type=int, default=MUTATOR_PORT)
            sub.add_argument("--service-port", type=int, default=SERVICE_PORT)
            sub.add_argument(
                "--calculator-port",
                type=int,
                default=FIRST_CALCULATOR_PORT,
                help="port of calculator 0; instance i listens on this + i",
            )
            sub.add_argument("--kafka-port", type=int, default=9092, help="embedded broker")
            sub.add_argument(
                "--no-supervise",
                action="store_true",
                help="do not start a service process again when it dies (tests that "
                "kill and restart processes themselves)",
            )
            sub.add_argument("--cassandra-port", type=int, default=9042, help="embedded Cassandra")
            sub.add_argument(
                "--console-port", type=int, default=CONSOLE_PORT, help="the live web console"
            )
            sub.add_argument(
                "--no-console", action="store_true", help="do not start the live web console"
            )
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S"
    )
    # Until the command waits for its signal, SIGTERM interrupts the start-up like Ctrl-C.
    signal.signal(signal.SIGTERM, _interrupt)
    with Stack() as stack:
        try:
            args.function(args, stack)
            return 0
        except PrerequisiteError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        except ProcessFailed as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            log.info("interrupted")
            return 130


if __name__ == "__main__":
    sys.exit(main())
