"""Stop and start ``make up``'s calculators on request: what the console's failover
buttons use.

Example::

    handle = ServiceHandle("calculator-0", process, port=9094, supervise=True)
    handle.start()
    with ControlServer({"calculator-0": handle}, token="s3cret") as control:
        control.url          # http://127.0.0.1:<free port>
        # GET  /services                              every controllable service's state
        # POST /services/calculator-0/stop            SIGTERM: a clean leave; held down
        # POST /services/calculator-0/stop?signal=KILL   kill -9: a crash; held down
        # POST /services/calculator-0/start           started again, supervised again
        # (each with "Authorization: Bearer s3cret")

A service stopped through here stays down, supervised or not, until it is started
through here again: ``make up``'s supervisor restarts a process that dies by itself, not
one it was asked to hold. The server listens on 127.0.0.1 only and wants the token
``up`` generated (it hands it to the console it starts, and to nobody else). Answers are
JSON; errors have the project's shape (``{"error": ..., "message": ...}``).
"""

from __future__ import annotations

import contextlib
import hmac
import json
import logging
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from local_stack.process import ManagedProcess, port_in_use
from local_stack.supervisor import Supervised

log = logging.getLogger(__name__)


class ControlConflict(Exception):
    """The service cannot do that now (start one that runs, or whose port is taken)."""


class ServiceHandle:
    """One service process of ``up``: started, stopped at the end, and held down or
    started again on request (:class:`ControlServer`).

    ``supervise``: started again whenever it dies by itself (:class:`Supervised`).
    ``on_start`` gets the new pid whenever the supervisor starts it again after a death;
    ``on_change`` is called after every stop or start on request.
    """

    def __init__(
        self,
        name: str,
        process: ManagedProcess,
        port: int,
        supervise: bool,
        on_start: Callable[[int], None] | None = None,
        on_change: Callable[[], None] | None = None,
    ) -> None:
        self.name = name
        self.process = process
        self.port = port
        self.supervise = supervise
        self.held = False
        """Stopped on request, and kept down until started on request."""
        self.changed_at = time.time()
        self._on_start = on_start
        self._on_change = on_change
        self._supervised: Supervised | None = None
        self._lock = threading.Lock()  # one stop or start at a time

    def start(self) -> None:
        """Start the process (and supervise it, if asked to)."""
        if self.supervise:
            self._supervised = Supervised(self.process, self._on_start)
            self._supervised.start()
        else:
            self.process.start()

    def stop(self, kill: bool = False) -> int | None:
        """Stop the process (SIGTERM, or SIGKILL with ``kill``); return its exit status."""
        with self._lock:
            return self._stop(kill)

    def _stop(self, kill: bool) -> int | None:
        supervised, self._supervised = self._supervised, None
        if supervised is not None:
            return supervised.stop(kill=kill)
        if not kill or self.process.pid is None:
            return self.process.stop()
        self.process.kill()
        return self.process.wait()

    def hold(self, kill: bool = False) -> dict[str, Any]:
        """Stop it and keep it down (the supervisor does not start it again)."""
        with self._lock:
            pid = self.process.pid
            was_running = self.process.is_running()
            self.held = True
            started = time.monotonic()
            status = self._stop(kill)
            self.changed_at = time.time()
            log.warning(
                "%s %s on request (pid %s, exit status %s, %.1f s); held down until started",
                self.name,
                "killed (SIGKILL)" if kill else "stopped (SIGTERM)",
                pid,
                status,
                time.monotonic() - started,
            )
        if self._on_change is not None:
            self._on_change()
        return {**self.status(), "wasRunning": was_running, "exitStatus": status}

    def resume(self) -> dict[str, Any]:
        """Start it again after :meth:`hold` (or after it died unsupervised)."""
        with self._lock:
            if self.process.is_running():
                raise ControlConflict(f"{self.name} is running (pid {self.process.pid})")
            if port_in_use(self.port):
                raise ControlConflict(
                    f"port {self.port} is taken (by a process local_stack did not start): "
                    f"cannot start {self.name} there"
                )
            self.start()
            self.held = False
            self.changed_at = time.time()
            pid = self.process.pid
            log.warning("%s started on request (pid %s)", self.name, pid)
        if self._on_change is not None:
            self._on_change()
        return self.status()

    def status(self) -> dict[str, Any]:
        """``name``, ``port``, ``pid``, ``state`` (``running``, ``held``: stopped on request,
        ``exited``: died and not started again), ``supervised`` and ``since`` (epoch s)."""
        running = self.process.is_running()
        state = "running" if running else "held" if self.held else "exited"
        return {
            "name": self.name,
            "port": self.port,
            "pid": self.process.pid if running else None,
            "state": state,
            "supervised": self.supervise,
            "since": self.changed_at,
        }


class ControlServer:
    """The HTTP API over ``handles`` on 127.0.0.1 (a free port unless ``port``), in a
    daemon thread; a context manager (or :meth:`start` / :meth:`stop`)."""

    def __init__(self, handles: dict[str, ServiceHandle], token: str, port: int = 0) -> None:
        self.handles = handles
        self.token = token
        self._server = ThreadingHTTPServer(("127.0.0.1", port), _handler_for(self))
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="local-stack-control", daemon=True
        )

    @property
    def url(self) -> str:
        """Base URL of the API."""
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def start(self) -> None:
        """Serve in the background."""
        self._thread.start()

    def stop(self) -> None:
        """Stop serving and close the socket."""
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> ControlServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def answer(self, method: str, target: str, authorization: str | None) -> tuple[int, Any]:
        """(status, JSON body) for one request: the API without the HTTP plumbing."""
        if not hmac.compare_digest(authorization or "", f"Bearer {self.token}"):
            return 401, _error("unauthorized", "wrong or missing Authorization: Bearer <token>")
        split = urlsplit(target)
        parts = [unquote(p) for p in split.path.strip("/").split("/")]
        query = parse_qs(split.query)
        if parts == ["services"]:
            if method != "GET":
                return 405, _error("method_not_allowed", "GET /services")
            return 200, {"services": [h.status() for h in self.handles.values()]}
        if len(parts) != 3 or parts[0] != "services" or parts[2] not in ("stop", "start"):
            return 404, _error("not_found", f"no such resource: {split.path}")
        if method != "POST":
            return 405, _error("method_not_allowed", f"POST {split.path}")
        handle = self.handles.get(parts[1])
        if handle is None:
            known = ", ".join(self.handles) or "none"
            return 404, _error("not_found", f"no service {parts[1]!r} to control ({known})")
        try:
            if parts[2] == "start":
                return 200, handle.resume()
            signal = (query.get("signal") or ["TERM"])[-1].upper()
            if signal not in ("TERM", "KILL"):
                return 422, _error("invalid_request", "signal: TERM or KILL", field="signal")
            return 200, handle.hold(kill=signal == "KILL")
        except ControlConflict as exc:
            return 409, _error("conflict", str(exc))


def _error(error: str, message: str, field: str | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"error": error, "message": message}
    if field is not None:
        body["details"] = [{"field": field, "problem": message.split(": ", 1)[-1]}]
    return body


def _handler_for(control: ControlServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def _serve(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            if length:
                self.rfile.read(min(length, 65_536))
            try:
                status, body = control.answer(
                    self.command, self.path, self.headers.get("Authorization")
                )
            except Exception as exc:  # the log has it; the client gets the error shape
                log.exception("control request %s %s failed", self.command, self.path)
                status, body = 500, _error("internal_error", f"{type(exc).__name__}: {exc}")
            payload = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            with contextlib.suppress(OSError):  # the client went away
                self.wfile.write(payload)

        do_GET = do_POST = _serve

        def log_message(self, format: str, *args: Any) -> None:
            log.debug("control: " + format, *args)

    return Handler
