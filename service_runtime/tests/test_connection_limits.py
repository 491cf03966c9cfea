"""Idle and slow connections are closed: every server, as a real process, over raw sockets.

Each server runs with short limits (keep-alive 0.5 s, request head 1 s, body 1 s). A
connection that sends nothing (before or after a request), one that sends its request
head a byte at a time (each byte sooner than the keep-alive timeout, which every byte
restarts), and one that declares a 100-byte body and sends 2 bytes must all be closed
within a few seconds. Left to uvicorn alone, only the idle connection after a response
was closed, after its own 5 s; the others stayed open for good, or as long as the
application waited for the body.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import socket
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from local_stack.process import ManagedProcess, free_port
from shared_schemas import encode_key, partition_for

PARTITIONS = 6
LIMITS = {
    "HTTP_KEEP_ALIVE_TIMEOUT_SECONDS": "0.5",
    "HTTP_HEADER_TIMEOUT_SECONDS": "1",
    "HTTP_BODY_TIMEOUT_SECONDS": "1",
    "HTTP_MAX_HEAD_BYTES": "32768",
}
CLOSED_WITHIN = 3.0
"""Generous for limits of 1 s on a busy machine, and well below uvicorn's own 5 s."""


def _start(name: str, module: str, port: int, env: dict[str, str], logs: Path) -> ManagedProcess:
    process = ManagedProcess(
        name, [sys.executable, "-m", module], env={**os.environ, **LIMITS, **env}, log_dir=logs
    )
    process.start()
    url = f"http://127.0.0.1:{port}/health/live"
    process.wait_ready(lambda: httpx.get(url, timeout=1).status_code == 200, timeout=60)
    return process


@pytest.fixture(scope="module")
def servers(
    kafka_bootstrap: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, tuple[int, str]]]:
    """``{name: (port, path of a POST route or of a GET)}`` for the three kinds of server."""
    state = tmp_path_factory.mktemp("limits")
    kafka = {"KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap, "TOPIC_PARTITIONS": str(PARTITIONS)}
    ports = {name: free_port() for name in ("mutator", "calculator", "service")}
    specs = {
        "mutator": ("inventory_mutator", {"MUTATOR_PORT": str(ports["mutator"])}),
        "calculator": (
            "sellable_calculator",
            {
                "CALCULATOR_PORT": str(ports["calculator"]),
                # A group of its own: it owns every partition.
                "CALCULATOR_GROUP_ID": f"limits-{uuid.uuid4().hex[:6]}",
                "CALCULATOR_INSTANCE_ID": f"limits-{uuid.uuid4().hex[:6]}",
                "CALCULATOR_STATE_DIR": str(state),
            },
        ),
        "service": (
            "sellable_service",
            {
                "SERVICE_PORT": str(ports["service"]),
                # Nothing listens there: the service starts anyway, which is all we need.
                "CASSANDRA_PORT": str(free_port()),
                "SERVICE_CONSUMER_GROUP": f"limits-{uuid.uuid4().hex[:6]}",
            },
        ),
    }
    processes = []
    try:
        for name, (module, env) in specs.items():
            processes.append(_start(name, module, ports[name], {**kafka, **env}, state / "logs"))
        yield {
            "mutator": (ports["mutator"], "/inventory/adjustment"),
            "calculator": (ports["calculator"], "/inventory/locations/L/skus/S"),
            "service": (ports["service"], "/inventory/locations/L/skus/S"),
        }
    finally:
        for process in processes:
            process.stop()


def _closed(sock: socket.socket, wait: float) -> bool:
    """Whether the server closed ``sock`` within ``wait`` seconds (answers are drained)."""
    deadline = time.monotonic() + wait
    while (left := deadline - time.monotonic()) > 0:
        readable, _, _ = select.select([sock], [], [], left)
        if readable:
            try:
                if not sock.recv(65536):
                    return True
            except ConnectionError:
                return True
    return False


def _seconds_until_closed(port: int, act: Callable[[socket.socket], None]) -> float | None:
    """Connect, do ``act``, and time how long until the server closes (None: not within
    :data:`CLOSED_WITHIN`)."""
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        try:
            act(sock)
        except ConnectionError:
            return time.monotonic() - started
        left = CLOSED_WITHIN - (time.monotonic() - started)
        return time.monotonic() - started if _closed(sock, max(left, 0)) else None


def _idle(sock: socket.socket) -> None:
    pass


def _idle_after_a_response(sock: socket.socket) -> None:
    sock.sendall(b"GET /health/live HTTP/1.1\r\nHost: x\r\n\r\n")
    answer = b""
    while not answer.endswith(b'"live"}'):
        answer += sock.recv(65536)
        assert answer, "closed before answering"


def _slow_head(sock: socket.socket) -> None:
    # One byte every 0.2 s: each restarts uvicorn's keep-alive timer, so only a
    # deadline for the whole head can end this.
    for byte in b"GET /health/live HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 100:
        sock.sendall(bytes([byte]))
        if _closed(sock, 0.2):
            return


def _short_body(path: str) -> Callable[[socket.socket], None]:
    def act(sock: socket.socket) -> None:
        sock.sendall(
            f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            'Content-Length: 100\r\n\r\n{"'.encode()
        )

    return act


@pytest.mark.parametrize("server", ["mutator", "calculator", "service"])
def test_idle_slow_and_short_connections_are_closed(
    servers: dict[str, tuple[int, str]], server: str
) -> None:
    port, path = servers[server]
    scenarios = {
        "idle": _idle,
        "idle after a response": _idle_after_a_response,
        "slow head": _slow_head,
        "short body": _short_body(path),
    }
    with ThreadPoolExecutor(len(scenarios)) as pool:
        futures = {
            name: pool.submit(_seconds_until_closed, port, act) for name, act in scenarios.items()
        }
        closed_after = {name: future.result() for name, future in futures.items()}
    still_open = [name for name, seconds in closed_after.items() if seconds is None]
    assert not still_open, f"{server}: still open after {CLOSED_WITHIN} s: {closed_after}"
    # Not closed before its limit either (0.5 s idle, 1 s for the head and the body).
    assert closed_after["idle"] >= 0.4, closed_after  # type: ignore[operator]
    assert closed_after["idle after a response"] >= 0.4, closed_after  # type: ignore[operator]
    assert closed_after["slow head"] >= 0.9, closed_after  # type: ignore[operator]


def test_a_request_being_answered_has_no_deadline(servers: dict[str, tuple[int, str]]) -> None:
    """A read-your-writes wait longer than every limit still gets its answer (504 here)."""
    port, _ = servers["calculator"]
    partition = partition_for(encode_key("L", "S"), PARTITIONS)
    with httpx.Client(timeout=10) as client:
        response = client.get(
            f"http://127.0.0.1:{port}/inventory/locations/L/skus/S",
            params={"position": f"inventory_adjustments:{partition}:999999999", "timeout": "2"},
        )
        assert response.status_code == 504
        # The same connection, idle for less than the keep-alive timeout, still serves.
        assert client.get(f"http://127.0.0.1:{port}/health/live").status_code == 200


def _answer_then_closed(port: int, request: bytes) -> tuple[int, dict[str, str]]:
    """Send ``request``; the status and JSON body of the answer, once the server closed."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        with contextlib.suppress(ConnectionError):  # it may close while we still send
            sock.sendall(request)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    assert b"content-type: application/json" in head.lower(), answer[:300]
    return int(head.split()[1]), json.loads(body)


@pytest.mark.parametrize("server", ["mutator", "calculator", "service"])
def test_oversized_and_malformed_requests_get_the_json_error_and_a_close(
    servers: dict[str, tuple[int, str]], server: str
) -> None:
    port, path = servers[server]
    oversized = f"GET {path} HTTP/1.1\r\nHost: x\r\nX-Big: {'a' * 40_000}\r\n\r\n"
    status, body = _answer_then_closed(port, oversized.encode())
    assert status == 431 and body["error"] == "head_too_large", body
    assert "32768" in body["message"]
    status, body = _answer_then_closed(port, b"GET / HTTP/1.1\r\nHost x\r\n\r\n")
    assert status == 400 and body["error"] == "malformed_request", body
    # Under the limit, a long path is the application's to judge: the id rule's 422.
    long_id = "%C3%A9" * 3_000
    with httpx.Client(timeout=10) as client:
        response = client.get(f"http://127.0.0.1:{port}/inventory/locations/{long_id}/skus/S")
    expected = 404 if server == "mutator" else 422  # the mutator has no such GET
    assert response.status_code == expected, response.text[:200]
    assert "error" in response.json()
