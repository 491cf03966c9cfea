"""Child processes that start, report readiness and stop cleanly, with their logs in files.

Example::

    from local_stack.process import ManagedProcess

    with ManagedProcess("web", ["python", "-m", "http.server", "8000"]) as web:
        web.wait_ready(lambda: port_in_use(8000), timeout=10)
        ...   # stopped (SIGTERM, then SIGKILL after a grace period) on exit

Each child runs in its own process group, so stopping it stops whatever it started too
(the JVM of Cassandra, uvicorn workers…).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType

from local_stack.paths import logs_dir
from local_stack.testing import WaitTimeout, wait_until

log = logging.getLogger(__name__)


class PrerequisiteError(RuntimeError):
    """Something the local stack needs is missing or in the way; the message is one line."""


class ProcessFailed(RuntimeError):
    """A child exited or did not become ready; the message ends with its log's tail."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now (for tests and benchmarks)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def port_in_use(port: int, host: str = "127.0.0.1") -> bool:
    """Whether something accepts connections on ``host:port``."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, port)) == 0


def require_free_port(port: int, what: str, host: str = "127.0.0.1") -> None:
    """Raise :class:`PrerequisiteError` if ``port`` is taken."""
    if port_in_use(port, host):
        raise PrerequisiteError(f"port {port} is taken: cannot start {what} there")


class ManagedProcess:
    """One child process with a log file, a readiness wait and a clean stop."""

    def __init__(
        self,
        name: str,
        command: Sequence[str],
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
        log_dir: Path | None = None,
    ) -> None:
        self.name = name
        self.command = list(command)
        self.env = dict(env) if env is not None else None
        self.cwd = cwd
        self.log_path = (log_dir or logs_dir()) / f"{name}.log"
        self._popen: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        """The child's pid while it has one."""
        return None if self._popen is None else self._popen.pid

    def is_running(self) -> bool:
        """Whether the child has been started and not exited."""
        return self._popen is not None and self._popen.poll() is None

    def start(self) -> None:
        """Start the child, appending its output to :attr:`log_path`."""
        if self.is_running():
            raise RuntimeError(f"{self.name} is already running")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log_file:
            log_file.write(f"--- starting {self.name}: {' '.join(self.command)}\n".encode())
            log_file.flush()
            self._popen = subprocess.Popen(
                self.command,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                env=self.env,
                cwd=self.cwd,
                start_new_session=True,  # own process group: stop() reaches grandchildren
            )
        log.debug("started %s (pid %d), log %s", self.name, self._popen.pid, self.log_path)

    def log_tail(self, lines: int = 20) -> str:
        """The last ``lines`` lines of the log."""
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def wait_ready(
        self, check: Callable[[], object], timeout: float, interval: float = 0.1
    ) -> None:
        """Poll ``check`` until it returns something truthy.

        Raises :class:`ProcessFailed` with the log's tail if the child exits first or the
        timeout passes. Exceptions from ``check`` count as "not yet".
        """

        def ready_or_exited() -> str | None:
            # Whether it runs first: a child that died is not waited for to the timeout.
            if not self.is_running():
                return "exited"
            return "ready" if check() else None  # raising: not ready yet (connection refused…)

        try:
            outcome = wait_until(ready_or_exited, timeout, interval)
        except WaitTimeout:
            raise ProcessFailed(
                f"{self.name} not ready within {timeout:g} s; "
                f"{self.log_path} ends with:\n{self.log_tail()}"
            ) from None
        if outcome == "exited":
            code = None if self._popen is None else self._popen.returncode
            raise ProcessFailed(
                f"{self.name} exited (status {code}) before it was ready; "
                f"{self.log_path} ends with:\n{self.log_tail()}"
            )

    def _signal_group(self, sig: signal.Signals) -> None:
        assert self._popen is not None
        with contextlib.suppress(ProcessLookupError):  # already gone
            os.killpg(self._popen.pid, sig)

    def stop(self, grace: float = 15.0) -> int | None:
        """SIGTERM the child's group, SIGKILL it after ``grace`` seconds; return the status."""
        if self._popen is None:
            return None
        if self._popen.poll() is None:
            self._signal_group(signal.SIGTERM)
            try:
                self._popen.wait(grace)
            except subprocess.TimeoutExpired:
                log.warning("%s did not stop within %g s: killing it", self.name, grace)
                self._signal_group(signal.SIGKILL)
                self._popen.wait()
        # Anything left in the group (a grandchild that ignored SIGTERM) goes too.
        self._signal_group(signal.SIGKILL)
        return self._popen.returncode

    def kill(self) -> None:
        """SIGKILL the whole group at once (crash tests), and reap the child."""
        if self._popen is not None:
            self._signal_group(signal.SIGKILL)
            self._popen.wait()

    def wait(self, timeout: float | None = None) -> int:
        """Wait for the child to exit; return its status."""
        assert self._popen is not None
        return self._popen.wait(timeout)

    def __enter__(self) -> ManagedProcess:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
