"""Stopping and starting calculator instances for the failover buttons, when allowed.

Example::

    control = control_for(settings, client)
    await control.status()     # {"allowed": True, "mode": "local_stack", "services": [...]}
    await control.act("calculator-1", "stop", kill=False)   # (200, {...}) or (4xx, error)

Three cases:

* :class:`StackControl`: the console ``make up`` (``python -m local_stack up``) started.
  It asks local_stack's control API (:mod:`local_stack.control`), which holds a stopped
  instance down (its supervisor would otherwise start it again after 1 s) until it is
  started again.
* :class:`ProcessControl`: a console started by hand with ``CONSOLE_ALLOW_CONTROL=true``
  and no control API: it signals the calculator processes of this machine itself, found
  by their port (``/proc``), and starts a stopped one again with the same command,
  environment and directory. Nothing holds it down but the console: a supervisor that
  restarts it (``make up``'s) wins.
* :class:`NoControl`: anything else. The buttons are not shown; the endpoints answer 403.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

import httpx

from console.backends import fetch
from console.settings import ConsoleSettings

log = logging.getLogger(__name__)

ACTION_TIMEOUT_SECONDS = 40.0
"""Longest wait for a stop or start (a clean stop of a calculator takes a few seconds;
local_stack kills it after 15)."""

LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1"}


class Control(Protocol):
    """What the console can do to calculator instances."""

    allowed: bool
    reason: str
    mode: str | None

    async def status(self) -> dict[str, Any]:
        """``allowed``, ``mode``, ``reason`` and the controllable ``services`` (``name``,
        ``port``, ``state``: running / held / exited, ``pid``)."""
        ...

    async def act(self, name: str, action: str, kill: bool) -> tuple[int, dict[str, Any]]:
        """Stop (``kill``: SIGKILL) or start service ``name``: (status, JSON body)."""
        ...


def refused(status: int, error: str, message: str) -> tuple[int, dict[str, Any]]:
    """An error answer in the project's shape, as (status, body)."""
    return status, {"error": error, "message": message}


class NoControl:
    """Stopping and starting instances is not allowed here."""

    mode: str | None = None
    allowed: bool = False

    def __init__(self, reason: str) -> None:
        self.reason = reason

    async def status(self) -> dict[str, Any]:
        return {"allowed": False, "mode": None, "reason": self.reason, "services": []}

    async def act(self, name: str, action: str, kill: bool) -> tuple[int, dict[str, Any]]:
        return refused(403, "control_not_allowed", self.reason)


class StackControl:
    """Through local_stack's control API (the console ``make up`` started)."""

    mode: str | None = "local_stack"
    allowed: bool = True

    def __init__(self, client: httpx.AsyncClient, url: str, token: str, timeout: float) -> None:
        self.reason = (
            "started by `make up`: stop and start go through local_stack, which holds a "
            "stopped instance down until it is started again"
        )
        self._client = client
        self._url = url.rstrip("/")
        self._headers = {"Authorization": f"Bearer {token}"}
        self._timeout = timeout

    async def status(self) -> dict[str, Any]:
        outcome = await fetch(
            self._client, f"{self._url}/services", self._timeout, headers=self._headers
        )
        body: dict[str, Any] = {"allowed": True, "mode": self.mode, "reason": self.reason}
        if outcome.ok and isinstance(outcome.body, dict):
            return {**body, "services": outcome.body.get("services", []), "error": None}
        return {**body, "services": [], "error": f"local_stack control API: {outcome.error}"}

    async def act(self, name: str, action: str, kill: bool) -> tuple[int, dict[str, Any]]:
        params = {"signal": "KILL" if kill else "TERM"} if action == "stop" else None
        outcome = await fetch(
            self._client,
            f"{self._url}/services/{name}/{action}",
            ACTION_TIMEOUT_SECONDS,
            method="POST",
            params=params,
            headers=self._headers,
        )
        if outcome.status is None:
            return refused(502, "backend_unavailable", f"local_stack control API: {outcome.error}")
        body = outcome.body if isinstance(outcome.body, dict) else {"message": str(outcome.body)}
        return outcome.status, body


@dataclass
class _Stopped:
    """A calculator process this console stopped: enough to start it again."""

    argv: list[str]
    env: dict[str, str]
    cwd: Path
    since: float


class ProcessControl:
    """Signals the calculator processes of this machine directly (a console started by
    hand with ``CONSOLE_ALLOW_CONTROL=true``)."""

    mode: str | None = "processes"
    allowed: bool = True

    def __init__(self, calculator_urls: list[str], logs: Path) -> None:
        self.reason = (
            "CONSOLE_ALLOW_CONTROL: the console signals the calculator processes on this "
            "machine itself (a supervisor may start a stopped one again)"
        )
        self._ports = {
            _port_of(url): f"calculator-{_port_of(url)}"
            for url in calculator_urls
            if urlsplit(url).hostname in LOCAL_HOSTS
        }
        self._logs = logs
        self._stopped: dict[str, _Stopped] = {}
        self._started: dict[str, Any] = {}  # the processes started again, kept referenced

    async def status(self) -> dict[str, Any]:
        services = await asyncio.to_thread(self._scan)
        return {"allowed": True, "mode": self.mode, "reason": self.reason, "services": services}

    def _scan(self) -> list[dict[str, Any]]:
        from local_stack.system import calculator_process

        services = []
        for port, name in sorted(self._ports.items()):
            try:
                pid: int | None = calculator_process(port).pid
                state = "running"
            except LookupError:
                pid = None
                state = "held" if name in self._stopped else "exited"
            since = self._stopped[name].since if name in self._stopped else None
            services.append(
                {"name": name, "port": port, "pid": pid, "state": state, "since": since}
            )
        return services

    async def act(self, name: str, action: str, kill: bool) -> tuple[int, dict[str, Any]]:
        port = next((p for p, n in self._ports.items() if n == name), None)
        if port is None:
            known = ", ".join(self._ports.values()) or "none on this machine"
            return refused(404, "not_found", f"no calculator {name!r} to control ({known})")
        if action == "stop":
            return await asyncio.to_thread(self._stop, name, port, kill)
        return await asyncio.to_thread(self._start, name, port)

    def _stop(self, name: str, port: int, kill: bool) -> tuple[int, dict[str, Any]]:
        from local_stack.system import calculator_process
        from local_stack.testing import WaitTimeout, wait_until

        try:
            process = calculator_process(port)
        except LookupError:
            return refused(409, "conflict", f"no calculator process listens on port {port}")
        self._stopped[name] = _Stopped(process.argv, process.env, process.cwd, time.time())
        os.kill(process.pid, signal.SIGKILL if kill else signal.SIGTERM)
        try:
            wait_until(lambda: _gone(process.pid), timeout=ACTION_TIMEOUT_SECONDS - 5)
        except WaitTimeout:
            return refused(504, "not_stopped", f"{name} (pid {process.pid}) still runs")
        log.warning("%s (pid %d) %s", name, process.pid, "killed" if kill else "stopped")
        return 200, {"name": name, "port": port, "state": "held", "pid": None}

    def _start(self, name: str, port: int) -> tuple[int, dict[str, Any]]:
        from local_stack.process import ManagedProcess, port_in_use

        stopped = self._stopped.get(name)
        if stopped is None:
            return refused(409, "conflict", f"{name} was not stopped by this console")
        if port_in_use(port):
            return refused(409, "conflict", f"port {port} is taken: {name} runs already")
        process = ManagedProcess(
            name, stopped.argv, env=stopped.env, cwd=stopped.cwd, log_dir=self._logs
        )
        process.start()
        self._started[name] = process
        del self._stopped[name]
        log.warning("%s started again (pid %s), log %s", name, process.pid, process.log_path)
        return 200, {"name": name, "port": port, "state": "running", "pid": process.pid}


def _port_of(url: str) -> int:
    split = urlsplit(url)
    return split.port or (443 if split.scheme == "https" else 80)


def _gone(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] == "Z"


def control_for(settings: ConsoleSettings, client: httpx.AsyncClient) -> Control:
    """The control the settings allow."""
    if not settings.console_allow_control:
        return NoControl(
            "not allowed: the console was not started by `make up` (set "
            "CONSOLE_ALLOW_CONTROL=true to allow it for a system on this machine)"
        )
    if settings.console_control_url:
        return StackControl(
            client,
            settings.console_control_url,
            settings.console_control_token or "",
            settings.console_backend_timeout_seconds,
        )
    from local_stack.paths import logs_dir

    return ProcessControl(settings.console_calculator_urls, logs_dir())
