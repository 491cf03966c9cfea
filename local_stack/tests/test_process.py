"""ManagedProcess and the CLI's start/stop behaviour."""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from local_stack.__main__ import Stack
from local_stack.broker import broker_answers
from local_stack.process import (
    ManagedProcess,
    PrerequisiteError,
    ProcessFailed,
    free_port,
    port_in_use,
    require_free_port,
)
from local_stack.system import calculator_process
from local_stack.testing import wait_until
from local_stack.tests._util import children, command_name, gone


def _python(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def test_early_exit_reports_the_log_tail(tmp_path: Path) -> None:
    process = ManagedProcess(
        "crashy",
        _python("print('cannot open the frobnicator'); raise SystemExit(3)"),
        log_dir=tmp_path,
    )
    process.start()
    with pytest.raises(ProcessFailed, match=r"(?s)status 3.*cannot open the frobnicator"):
        process.wait_ready(lambda: False, timeout=10)


def test_not_ready_in_time_is_an_error(tmp_path: Path) -> None:
    with ManagedProcess("sleepy", _python("import time; time.sleep(30)"), log_dir=tmp_path) as p:
        p.start()
        with pytest.raises(ProcessFailed, match=r"not ready within 0\.3 s"):
            p.wait_ready(lambda: False, timeout=0.3)
    assert not p.is_running()


def test_stop_sends_sigterm_first(tmp_path: Path) -> None:
    code = (
        "import signal, sys, time\n"
        "def bye(*_):\n"
        "    print('got SIGTERM', flush=True)\n"
        "    sys.exit(0)\n"
        "signal.signal(signal.SIGTERM, bye)\n"
        "print('u' + 'p', flush=True)\n"  # concatenated: the log's header quotes the code
        "time.sleep(30)\n"
    )
    process = ManagedProcess("polite", _python(code), log_dir=tmp_path)
    process.start()
    process.wait_ready(lambda: "\nup" in process.log_tail(), timeout=10)
    assert process.stop(grace=5) == 0
    assert "got SIGTERM" in process.log_tail()


def test_stop_kills_a_child_that_ignores_sigterm_and_its_grandchildren(tmp_path: Path) -> None:
    code = (
        "import signal, subprocess, sys, time\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "child = subprocess.Popen([sys.executable, '-c', "
        "'import signal,time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)'])\n"
        "print('grand' + 'child', child.pid, flush=True)\n"
        "time.sleep(60)\n"
    )
    process = ManagedProcess("stubborn", _python(code), log_dir=tmp_path)
    process.start()
    process.wait_ready(lambda: "\ngrandchild " in process.log_tail(), timeout=10)
    grandchild = int(process.log_tail().split("\ngrandchild ")[1].split()[0])
    started = time.monotonic()
    assert process.stop(grace=0.5) == -signal.SIGKILL
    assert time.monotonic() - started < 5
    wait_until(lambda: gone(grandchild), timeout=5)


def test_port_helpers() -> None:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        assert port_in_use(port)
        with pytest.raises(PrerequisiteError, match=f"port {port} is taken"):
            require_free_port(port, "something")
    assert not port_in_use(free_port())


@pytest.mark.timeout(60)
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_cli_broker_stops_cleanly_on_a_signal(tmp_path: Path, sig: signal.Signals) -> None:
    port = free_port()
    env = {**os.environ, "LOCAL_STACK_HOME": str(tmp_path)}
    env.pop("KAFKA_BOOTSTRAP_SERVERS", None)
    cli = subprocess.Popen(
        [sys.executable, "-m", "local_stack", "broker", "--port", str(port)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines: list[str] = []
    try:
        assert cli.stdout is not None
        for line in cli.stdout:  # the CLI says when it is ready, and only then waits
            lines.append(line)
            if "broker ready on" in line:
                break
        assert f"broker ready on 127.0.0.1:{port}" in lines[-1], "".join(lines)
        assert str(tmp_path / "logs" / "broker.log") in lines[-1]
        assert broker_answers(f"127.0.0.1:{port}")
        tansu = [pid for pid in children(cli.pid) if command_name(pid) == "tansu"]
        assert len(tansu) == 1, "the CLI should have started exactly one tansu"
        cli.send_signal(sig)
        rest, _ = cli.communicate(timeout=30)
        output = "".join(lines) + rest
    finally:
        if cli.poll() is None:
            cli.kill()
    assert cli.returncode == 0, output
    assert "stopping broker" in output
    assert "Traceback" not in output
    assert gone(tansu[0])
    assert not port_in_use(port)


def test_cli_says_one_line_when_the_port_is_taken(tmp_path: Path) -> None:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        env = {**os.environ, "LOCAL_STACK_HOME": str(tmp_path)}
        env.pop("KAFKA_BOOTSTRAP_SERVERS", None)
        result = subprocess.run(
            [sys.executable, "-m", "local_stack", "broker", "--port", str(port)],
            env=env,
            capture_output=True,
            text=True,
            timeout=30,
        )
    assert result.returncode == 2
    assert (
        result.stderr.strip()
        == f"error: port {port} is taken: cannot start the embedded broker there"
    )
    assert "Traceback" not in result.stdout + result.stderr


def test_the_stack_stops_in_reverse_order_and_past_a_failing_stop(
    caplog: pytest.LogCaptureFixture,
) -> None:
    stopped: list[str] = []

    def stuck() -> None:
        stopped.append("cassandra")
        raise RuntimeError("still running")

    with caplog.at_level(logging.INFO, logger="local_stack"), Stack() as stack:
        stack.on_stop("broker", lambda: stopped.append("broker"))
        stack.on_stop("cassandra", stuck)
        stack.on_stop("calculator-0", lambda: stopped.append("calculator-0"))
        assert stopped == []
    assert stopped == ["calculator-0", "cassandra", "broker"]
    assert "stopping cassandra failed: still running" in caplog.text
    assert "stopping broker" in caplog.text


def test_a_calculator_process_is_found_by_its_port_option_or_its_environment() -> None:
    script = "import time; time.sleep(30)"
    by_option = subprocess.Popen(
        [sys.executable, "-c", script, "sellable_calculator", "--port", "59871"]
    )
    by_env = subprocess.Popen(
        [sys.executable, "-c", script, "sellable_calculator"],
        env={**os.environ, "CALCULATOR_PORT": "59872"},
    )
    try:
        assert calculator_process(59871).pid == by_option.pid
        assert calculator_process(59872).pid == by_env.pid
        with pytest.raises(LookupError):
            calculator_process(59873)
    finally:
        for process in (by_option, by_env):
            process.kill()
            process.wait()
