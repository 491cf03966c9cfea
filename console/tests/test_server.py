"""The console as a real server: its event stream, and a clean stop with a stream open."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx

from console.app import create_app
from console.settings import ConsoleSettings
from console.tests.fakes import CALC_A, CALC_B, MUTATOR, SERVICE, FakeSystem
from local_stack.process import free_port
from local_stack.testing import wait_until
from service_runtime.server import server_config, start_in_thread

PROJECT = Path(__file__).resolve().parents[2]


def test_the_stream_pushes_the_state_again_and_again() -> None:
    fake = FakeSystem(counts={("STL", "x"): 3}, down={CALC_B})
    settings = ConsoleSettings(
        console_calculator_urls=[CALC_A, CALC_B],
        console_service_url=SERVICE,
        console_mutator_url=MUTATOR,
        console_interval_seconds=0.05,
    )
    port = free_port()
    app = create_app(settings, transport=fake.transport())
    server, thread = start_in_thread(server_config(app, "127.0.0.1", port, "warning", settings))
    try:
        base = f"http://127.0.0.1:{port}"
        httpx.post(f"{base}/api/watch", json={"locationId": "STL", "sku": "x"})
        states = []
        with httpx.stream("GET", f"{base}/api/stream", timeout=10) as stream:
            assert stream.headers["content-type"].startswith("text/event-stream")
            for line in stream.iter_lines():
                if line.startswith("data: "):
                    states.append(json.loads(line.removeprefix("data: ")))
                if len(states) == 3:
                    break
        assert len({s["now"] for s in states}) == 3
        last = states[-1]
        assert last["keys"][0]["cells"][CALC_A]["count"] == 3
        assert last["keys"][0]["cells"][CALC_B]["error"] == "unreachable: connection refused"
        assert last["watching"] == 1
    finally:
        server.should_exit = True
        thread.join(10)


def test_sigterm_ends_the_open_streams_and_exits_0(tmp_path: Path) -> None:
    port = free_port()
    unused = free_port()
    env = {
        **os.environ,
        "CONSOLE_PORT": str(port),
        # Nothing listens there: every cell an error, which is fine for this test.
        "CONSOLE_CALCULATOR_URLS": f"http://127.0.0.1:{unused}",
        "CONSOLE_SERVICE_URL": f"http://127.0.0.1:{unused}",
        "CONSOLE_MUTATOR_URL": f"http://127.0.0.1:{unused}",
    }
    log = (tmp_path / "console.log").open("wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "console"], cwd=PROJECT, env=env, stdout=log, stderr=log
    )
    try:
        base = f"http://127.0.0.1:{port}"
        wait_until(lambda: httpx.get(f"{base}/health/live").status_code == 200, timeout=30)
        with httpx.stream("GET", f"{base}/api/stream", timeout=10) as stream:
            lines = stream.iter_lines()
            while not next(lines).startswith("data: "):
                pass
            process.send_signal(signal.SIGTERM)
            assert process.wait(timeout=15) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    text = (tmp_path / "console.log").read_text()
    assert f"console listening on http://127.0.0.1:{port}" in text
    assert "console stopped" in text
