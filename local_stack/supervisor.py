"""Restarts a service process of ``make up`` that dies, as compose's restart policy would.

Example::

    process = ManagedProcess("calculator-0", [sys.executable, "-m", "sellable_calculator"])
    supervised = Supervised(process, on_restart=lambda pid: print("now", pid))
    supervised.start()        # starts the process, and starts it again whenever it exits
    ...
    supervised.stop()         # stops it for good (SIGTERM, then SIGKILL)

A process that exits without being asked to (a crash, ``kill -9``, exit status 1 after
losing its broker for good) is started again after a backoff: 1 s, doubling up to 30 s
while it keeps dying, back to 1 s once it has run for a minute. Each restart is logged
(and, through the process's own log file, shown on the console) and counted. A process
that is frozen (SIGSTOP) is not dead: the services' readiness says so, and nothing here
kills it.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable

from local_stack.process import ManagedProcess
from service_runtime.retry import Backoff, RetryStopped, retrying

log = logging.getLogger(__name__)

RESTART_BACKOFF = Backoff(first=1.0, cap=30.0)
"""Waits before starting a process again, after each death in a row."""
HEALTHY_RUN_SECONDS = 60.0
"""A process that ran this long before dying starts the backoff over."""


class ProcessExited(Exception):
    """A supervised process exited without being asked to."""


class Supervised:
    """``process``, started again with backoff whenever it exits unasked, until :meth:`stop`.

    ``on_restart`` gets the new pid after each restart (``make up`` rewrites its list of
    service processes with it).
    """

    def __init__(
        self,
        process: ManagedProcess,
        on_restart: Callable[[int], None] | None = None,
        backoff: Backoff = RESTART_BACKOFF,
    ) -> None:
        self.process = process
        self.restarts = 0
        self._on_restart = on_restart
        self._backoff = backoff
        self._stopping = threading.Event()
        self._ran = False
        self._lock = threading.Lock()  # a restart and a stop never interleave
        self._thread = threading.Thread(
            target=self._watch, name=f"supervise-{process.name}", daemon=True
        )

    def start(self) -> None:
        """Start the process and watch it."""
        self.process.start()
        self._thread.start()

    def stop(self, kill: bool = False) -> int | None:
        """Stop the process for good (SIGTERM, or SIGKILL at once with ``kill``); return
        its exit status."""
        self._stopping.set()
        with self._lock:
            if kill:
                self.process.kill()
                status: int | None = None if self.process.pid is None else self.process.wait()
            else:
                status = self.process.stop()
        self._thread.join(timeout=10)
        return status

    def _watch(self) -> None:
        restart = retrying(
            self.process.name,
            self._backoff,
            retry_on=ProcessExited,
            stop=self._stopping,
            fresh_after=HEALTHY_RUN_SECONDS,
            logger=log,
            level=logging.ERROR,
        )
        with contextlib.suppress(RetryStopped):  # stopped while waiting to start it again
            restart(self._run)

    def _run(self) -> None:
        """Wait for the process to exit (starting it again first, after the first time);
        :class:`ProcessExited` unless that was :meth:`stop`."""
        if self._ran:
            self._start_again()
        self._ran = True
        status = self.process.wait()
        if not self._stopping.is_set():
            raise ProcessExited(f"pid {self.process.pid} exited with status {status}")

    def _start_again(self) -> None:
        with self._lock:
            if self._stopping.is_set():
                raise RetryStopped("stopped")
            self.process.start()
            self.restarts += 1
        pid = self.process.pid
        assert pid is not None
        log.warning("%s started again (pid %d, restart %d)", self.process.name, pid, self.restarts)
        if self._on_restart is not None:
            self._on_restart(pid)
