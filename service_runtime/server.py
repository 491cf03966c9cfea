"""The HTTP server every service runs on: uvicorn with httptools and uvloop, slow and
idle clients bounded, a clean exit on SIGTERM/SIGINT; one process, or several workers.

Example::

    config = server_config(create_app(settings), "127.0.0.1", 9091, "info", settings)
    serve(config)                        # one process, until SIGTERM/SIGINT
    serve_workers(factory_config, 2)     # or: N worker processes sharing the port

``http`` and ``loop`` are set explicitly: uvicorn's "auto" would fall back to its
pure-Python h11 parser and asyncio's loop without a word when httptools or uvloop are
missing, at about half the throughput. Here a missing package fails at start.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from types import FrameType
from typing import Any, TypeVar

import uvicorn
from pydantic import ValidationError
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from service_runtime.http import configure_logging
from service_runtime.settings import HttpServerSettings, unknown_settings

log = logging.getLogger(__name__)

HTTP_IMPLEMENTATION = "httptools"
"""The HTTP parser every server runs (uvicorn's ``--http``); named in logs and benchmarks."""
EVENT_LOOP = "uvloop"
"""The event loop every server runs (uvicorn's ``--loop``)."""

GC_GEN0_THRESHOLD = 20_000
"""Allocations between young-generation collections while serving (CPython's default: 700)."""


def on_stop_signals(callback: Callable[[], object]) -> Callable[[], None]:
    """Also call ``callback`` on SIGTERM/SIGINT, before the handler installed now; return the undo.

    Why: uvicorn's graceful shutdown waits for every request in flight before it runs the
    lifespan's shutdown half, so a request that waits on something (the mutator's on a
    frozen broker, the console's never-ending event streams) would hold the process up:
    what it waits on has to hear of the signal itself.
    Only in the main thread (where uvicorn installs its handlers; a test client runs the
    app elsewhere), and only in front of a Python handler that is already there.
    """
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    installed: dict[int, Any] = {}
    for sig in (signal.SIGTERM, signal.SIGINT):
        previous = signal.getsignal(sig)
        if not callable(previous):
            continue

        def chained(signum: int, frame: FrameType | None, previous: Any = previous) -> None:
            callback()
            previous(signum, frame)

        signal.signal(sig, chained)
        installed[sig] = (chained, previous)

    def undo() -> None:
        for sig, (chained, previous) in installed.items():
            if signal.getsignal(sig) is chained:
                signal.signal(sig, previous)

    return undo


def tune_gc_for_serving() -> None:
    """Make the garbage collector cheap for a request-serving process; call once started.

    A request allocates a few hundred container objects that die with it, so with
    CPython's defaults the collector runs every couple of requests, and every tenth
    run walks the older generations: the whole FastAPI/pydantic object graph built at
    start-up. So: collect once, freeze what exists now (start-up objects are never
    collected again, and no longer walked), and collect the young generation every
    20,000 allocations instead of 700. Reference cycles are still collected; memory
    stays flat under load. (The README's performance section has the measurement.)
    """
    gc.collect()
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(GC_GEN0_THRESHOLD, older, oldest)


class ServerConfig(uvicorn.Config):
    """uvicorn's configuration plus the request-head and body deadlines and the largest
    request head :class:`BoundedHttpToolsProtocol` accepts (picklable, so that worker
    processes get it too)."""

    def __init__(
        self,
        app: Any,
        *,
        header_timeout: float,
        body_timeout: float,
        max_head_bytes: int,
        **kwargs: Any,
    ) -> None:
        super().__init__(app, **kwargs)
        self.header_timeout = header_timeout
        self.body_timeout = body_timeout
        self.max_head_bytes = max_head_bytes


MAX_TARGET_BYTES = 65_535
"""The longest request target httptools can parse."""

_HEAD = object()
"""Phase marker: the bytes of a request head are arriving (no request parsed yet)."""


class BoundedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, closing connections whose client is too slow to
    send a request or whose request head is too large, and answering malformed
    requests with the project's JSON error body.

    uvicorn bounds only the idle time after a response (``timeout_keep_alive``, and every
    byte received restarts it), so by itself it keeps a connection open forever that
    never sends a request, sends its head a byte at a time, or declares a body it never
    finishes; and httptools buffers a request head of any size. ASGI middleware cannot
    help: it runs once the head is complete. So:

    * a new connection gets uvicorn's keep-alive timer straight away, as if a response
      had just been sent (uvicorn stops it on the first byte, as usual);
    * the first byte of a request head starts ``header_timeout``; more bytes do not
      restart it; the head being complete stops it;
    * a request head over ``max_head_bytes`` is answered 431 and the connection closed;
    * a request whose body is still arriving once its head is complete gets
      ``body_timeout``; the body being complete stops it.

    Expiry closes the connection (an application still reading that body sees the
    client disconnect). A request the application is working on has no deadline here.
    On the hot path (a request whose head and body arrive together) it arms nothing.
    """

    config: ServerConfig
    _deadline: asyncio.TimerHandle | None = None
    _phase: object | None = None
    """What the armed deadline covers: ``_HEAD``, the request cycle whose body is arriving,
    or None when nothing is armed."""
    _head_bytes = 0
    """Bytes received of the request head now arriving."""

    # uvicorn narrows the argument to a Transport, as this does; asyncio says BaseTransport.
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.timeout_keep_alive_task = self.loop.call_later(
            self.timeout_keep_alive, self.timeout_keep_alive_handler
        )

    def data_received(self, data: bytes) -> None:
        cycle = self.cycle
        if cycle is None or cycle.response_complete:  # a request head is arriving
            self._head_bytes += len(data)
            if self._head_bytes > self.config.max_head_bytes:
                self._refuse(431, "head_too_large", self._head_too_large_message())
                return
        super().data_received(data)
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete:  # its head is complete
            self._head_bytes = 0
            if cycle.more_body:
                if self._phase is not cycle:
                    self._arm(self.config.body_timeout, cycle)
            elif self._phase is not None:
                self._disarm()
        elif self._phase is not _HEAD:
            self._arm(self.config.header_timeout, _HEAD)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def send_400_response(self, msg: str) -> None:
        """A request httptools cannot parse: the JSON error body, then close.

        httptools cannot split a request target over 65,535 bytes (its URL parser counts
        in 16 bits): that is the client's long URL, not broken HTTP, so it gets 414.
        """
        url: bytes = getattr(self, "url", b"")
        if len(url) > MAX_TARGET_BYTES:
            message = (
                f"The request target (path and query) is {len(url)} bytes; at most "
                f"{MAX_TARGET_BYTES} are read."
            )
            self._refuse(414, "uri_too_long", message)
            return
        self._refuse(400, "malformed_request", f"{msg} It is not valid HTTP/1.1.")

    def _head_too_large_message(self) -> str:
        return (
            f"The request line and headers are over {self.config.max_head_bytes} bytes "
            "(HTTP_MAX_HEAD_BYTES)."
        )

    def _refuse(self, status: int, error: str, message: str) -> None:
        body = json.dumps({"error": error, "message": message}).encode()
        reason = {
            400: b"Bad Request",
            414: b"URI Too Long",
            431: b"Request Header Fields Too Large",
        }[status]
        self.transport.write(
            b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\n"
            b"content-length: %d\r\nconnection: close\r\n\r\n%s" % (status, reason, len(body), body)
        )
        self._disarm()
        self.transport.close()

    def _arm(self, timeout: float, phase: object) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
        self._phase = phase
        self._deadline = self.loop.call_later(timeout, self._expire, phase)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        self._phase = None

    def _expire(self, phase: object) -> None:
        self._deadline = self._phase = None
        if not self.transport.is_closing():
            what = "request head" if phase is _HEAD else "request body"
            limit = self.config.header_timeout if phase is _HEAD else self.config.body_timeout
            log.debug("closing a connection: %s not complete within %g s", what, limit)
            self.transport.close()


def server_config(
    app: Any,
    host: str,
    port: int,
    log_level: str,
    limits: HttpServerSettings,
    **options: Any,
) -> ServerConfig:
    """The uvicorn configuration every service runs with: httptools and uvloop, the
    process's own logging, no access log, and the connection limits of ``limits``.

    ``app`` is an application, or an import string (with ``factory=True`` in ``options``
    for a factory) when worker processes must build their own.
    """
    return ServerConfig(
        app,
        host=host,
        port=port,
        http=BoundedHttpToolsProtocol,
        loop=EVENT_LOOP,
        log_level=log_level.lower(),
        log_config=None,  # keep the process-wide format from configure_logging
        access_log=False,
        timeout_keep_alive=limits.http_keep_alive_timeout_seconds,
        header_timeout=limits.http_header_timeout_seconds,
        body_timeout=limits.http_body_timeout_seconds,
        max_head_bytes=limits.http_max_head_bytes,
        **options,
    )


class _Server(uvicorn.Server):
    """uvicorn's server, minus re-raising the signal after a graceful shutdown.

    uvicorn ends the process "killed by SIGTERM" once it has shut down cleanly; a
    service that flushed and closed everything should exit 0 and say so in its log.
    """

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in _STOP_SIGNALS}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def serve(config: ServerConfig) -> None:
    """Serve ``config``'s app in one process until SIGTERM/SIGINT, in the calling thread.

    The lifespan's shutdown half (flush producers, close sessions) runs before this
    returns; the garbage collector is tuned for serving first (:func:`tune_gc_for_serving`).
    """
    tune_gc_for_serving()
    _Server(config).run()


def start_in_thread(
    config: ServerConfig, name: str = "api"
) -> tuple[uvicorn.Server, threading.Thread]:
    """Start serving ``config``'s app in a daemon thread; return once it listens.

    For a process whose main thread has other work (the calculator's dataflow). Raises
    OSError if the server stopped before listening (the port is taken, say).
    """
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name=name, daemon=True)
    thread.start()
    while not server.started:
        if not thread.is_alive():
            raise OSError(
                f"the REST API could not listen on {config.host}:{config.port} (port taken?)"
            )
        time.sleep(0.02)
    return server, thread


def serve_workers(config: ServerConfig, workers: int) -> None:
    """Serve with ``workers`` processes sharing one listening socket, until SIGTERM/SIGINT.

    ``config.app`` must be an import string (worker processes are spawned, and build
    their own app). uvicorn's supervisor restarts a worker that dies, and stops every
    worker on a signal before this returns.
    """
    from uvicorn.supervisors import Multiprocess

    config.workers = workers
    socket = config.bind_socket()
    try:
        Multiprocess(config, sockets=[socket]).run()
    finally:
        socket.close()


Settings = TypeVar("Settings", bound=HttpServerSettings)


def load_settings(settings_class: type[Settings], **overrides: Any) -> Settings | None:
    """The service's settings from the environment (``overrides`` win), with logging set
    up at their level and a warning for each variable that looks like a misspelt
    setting; None (after saying why on stderr) when they are invalid."""
    try:
        settings = settings_class(**overrides)
    except ValidationError as exc:
        print(f"error: invalid settings: {exc}", file=sys.stderr)
        return None
    configure_logging(settings.log_level)
    for warning in unknown_settings(settings_class):
        logging.getLogger(settings_class.__module__.split(".")[0]).warning("%s", warning)
    return settings


def run_service(
    settings: Settings,
    create_app: Callable[[Settings], Any],
    address: Callable[[Settings], tuple[str, int]],
    describe: Callable[[Settings], str],
) -> int:
    """The body of a service's ``__main__`` once its settings are loaded
    (:func:`load_settings`): build the app, serve it until SIGTERM/SIGINT, return 0.

    ``address`` picks the host and port out of the settings; ``describe`` says what the
    service is connected to, for the start-up log line.
    """
    name = type(settings).__module__.split(".")[0]
    host, port = address(settings)
    service_log = logging.getLogger(name)
    service_log.info(
        "%s listening on http://%s:%d (%s, %s); %s",
        name,
        host,
        port,
        HTTP_IMPLEMENTATION,
        EVENT_LOOP,
        describe(settings),
    )
    serve(server_config(create_app(settings), host, port, settings.log_level, settings))
    service_log.info("%s stopped", name)
    return 0
