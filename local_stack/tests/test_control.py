"""The control API the console's failover buttons use, with real processes."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import httpx
import pytest

from local_stack.control import ControlServer, ServiceHandle
from local_stack.process import ManagedProcess, free_port, port_in_use

# A child that listens on a port, as a service does (start refuses a taken port).
LISTENER = """
import socket, sys, time
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", int(sys.argv[1]))); s.listen()
time.sleep(120)
"""


@pytest.mark.parametrize("supervise", [True, False])
def test_a_stopped_service_stays_down_until_started_again(tmp_path: Path, supervise: bool) -> None:
    port = free_port()
    process = ManagedProcess(
        "calculator-0", [sys.executable, "-c", LISTENER, str(port)], log_dir=tmp_path
    )
    changes: list[bool] = []
    handle = ServiceHandle(
        "calculator-0", process, port, supervise, on_change=lambda: changes.append(handle.held)
    )
    handle.start()
    token = "s3cret"
    auth = {"Authorization": f"Bearer {token}"}
    try:
        with ControlServer({"calculator-0": handle}, token) as control:
            base = control.url
            assert httpx.get(f"{base}/services").status_code == 401
            (listed,) = httpx.get(f"{base}/services", headers=auth).json()["services"]
            assert listed["state"] == "running" and listed["port"] == port
            first = listed["pid"]

            stopped = httpx.post(
                f"{base}/services/calculator-0/stop?signal=KILL", headers=auth, timeout=30
            )
            assert stopped.status_code == 200, stopped.text
            assert stopped.json()["state"] == "held" and stopped.json()["exitStatus"] == -9
            time.sleep(1.5)  # longer than the supervisor's first backoff (1 s)
            assert not process.is_running()
            (listed,) = httpx.get(f"{base}/services", headers=auth).json()["services"]
            assert listed["state"] == "held" and listed["pid"] is None

            started = httpx.post(f"{base}/services/calculator-0/start", headers=auth, timeout=30)
            assert started.status_code == 200, started.text
            assert started.json()["state"] == "running" and started.json()["pid"] != first
            again = httpx.post(f"{base}/services/calculator-0/start", headers=auth)
            assert again.status_code == 409 and "is running" in again.json()["message"]

            unknown = httpx.post(f"{base}/services/sellable_service/stop", headers=auth)
            assert unknown.status_code == 404 and unknown.json()["error"] == "not_found"
            bad = httpx.post(f"{base}/services/calculator-0/stop?signal=HUP", headers=auth)
            assert bad.status_code == 422
            assert changes == [True, False]
    finally:
        handle.stop()
    assert not process.is_running()


def test_a_service_whose_port_is_taken_is_not_started(tmp_path: Path) -> None:
    port = free_port()
    squatter = ManagedProcess(
        "squatter", [sys.executable, "-c", LISTENER, str(port)], log_dir=tmp_path
    )
    squatter.start()
    process = ManagedProcess("calculator-1", [sys.executable, "-c", "pass"], log_dir=tmp_path)
    handle = ServiceHandle("calculator-1", process, port, supervise=False)
    with squatter, ControlServer({"calculator-1": handle}, "t") as control:
        squatter.wait_ready(lambda: port_in_use(port), timeout=10)
        answer = httpx.post(
            f"{control.url}/services/calculator-1/start", headers={"Authorization": "Bearer t"}
        )
    assert answer.status_code == 409 and "taken" in answer.json()["message"]
