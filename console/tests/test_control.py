"""Stopping and starting calculators without local_stack: a console started by hand with
CONSOLE_ALLOW_CONTROL signals the processes itself (with a stand-in calculator here)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path

from console.control import NoControl, ProcessControl
from local_stack.process import free_port, port_in_use
from local_stack.testing import wait_until

# Listens on --port like a calculator, and has "sellable_calculator" in its command line,
# which is how the console finds a calculator process (local_stack.system.calculator_process).
STAND_IN = """
import socket, sys, time
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", int(sys.argv[3]))); s.listen()
time.sleep(120)
"""


def test_a_calculator_process_is_stopped_and_started_again_with_its_command(
    tmp_path: Path,
) -> None:
    port = free_port()
    command = [sys.executable, "-c", STAND_IN, "sellable_calculator", "--port", str(port)]
    first = subprocess.Popen(command, start_new_session=True)
    control = ProcessControl([f"http://127.0.0.1:{port}", "http://10.0.0.1:9094"], tmp_path)
    name = f"calculator-{port}"
    started = None
    try:
        wait_until(lambda: port_in_use(port), timeout=10)

        async def scenario() -> None:
            nonlocal started
            (listed,) = (await control.status())["services"]  # the remote one is not ours
            assert (listed["name"], listed["state"], listed["pid"]) == (name, "running", first.pid)
            status, body = await control.act(name, "stop", kill=False)
            assert status == 200 and body["state"] == "held", body
            assert first.wait(5) == -signal.SIGTERM
            (listed,) = (await control.status())["services"]
            assert listed["state"] == "held"
            status, body = await control.act(name, "start", kill=False)
            assert status == 200 and body["pid"] != first.pid, body
            started = body["pid"]
            again, _ = await control.act(name, "start", kill=False)
            assert again == 409
            unknown, _ = await control.act("calculator-1", "stop", kill=True)
            assert unknown == 404

        asyncio.run(scenario())
        wait_until(lambda: port_in_use(port), timeout=10)
    finally:
        first.kill()
        first.wait()
        if started is not None:
            os.killpg(started, signal.SIGKILL)


def test_without_leave_every_action_is_refused() -> None:
    control = NoControl("not allowed here")
    status, body = asyncio.run(control.act("calculator-0", "stop", kill=True))
    assert status == 403 and body == {"error": "control_not_allowed", "message": "not allowed here"}
