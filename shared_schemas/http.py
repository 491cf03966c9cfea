"""HTTP conventions shared by the three FastAPI services: one JSON error shape, health
and metrics routes, logging set-up, and the uvicorn server they run on (with limits on
slow and idle connections).

Every error any service returns looks like::

    {"error": "invalid_request", "message": "count: must not be zero",
     "details": [{"field": "count", "problem": "must not be zero"}]}

``error`` is a stable machine-readable code, ``message`` a human sentence, ``details``
(optional) one entry per offending field.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
import threading
from collections.abc import Awaitable, Callable, Iterable, Iterator
from typing import Annotated, Any, Literal

import uvicorn
from fastapi import APIRouter, FastAPI, Path, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from shared_schemas.ids import ID_DESCRIPTION, ID_JSON_SCHEMA, id_problem
from shared_schemas.settings import HttpServerSettings

log = logging.getLogger(__name__)

LOG_FORMAT = "%(asctime)s %(levelname)-5s %(name)s: %(message)s"


def configure_logging(level: str = "INFO") -> None:
    """Plain one-line logs on stderr, the same format in every service."""
    logging.basicConfig(level=level.upper(), format=LOG_FORMAT, force=True)
    # One line per forwarded or fanned-out request would drown everything else.
    logging.getLogger("httpx").setLevel(logging.WARNING)


class ErrorDetail(BaseModel):
    """One offending field of a request."""

    field: str = Field(examples=["count"])
    problem: str = Field(examples=["must not be zero"])


class ErrorBody(BaseModel):
    """The body of every error answer (4xx and 5xx) of every service."""

    error: str = Field(description="Stable machine-readable code.", examples=["invalid_request"])
    message: str = Field(description="A sentence for humans.", examples=["count: must not be zero"])
    details: list[ErrorDetail] | None = Field(
        None, description="One entry per offending field, when fields are at fault."
    )


def error_doc(description: str) -> dict[str, Any]:
    """An OpenAPI ``responses`` entry for an error answered with :func:`error_response`."""
    return {"model": ErrorBody, "description": description}


def error_response(
    status: int,
    error: str,
    message: str,
    details: list[dict[str, Any]] | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    """The project's JSON error body with the given status."""
    body: dict[str, Any] = {"error": error, "message": message}
    if details:
        body["details"] = details
    return JSONResponse(body, status_code=status, headers=headers)


LocationPath = Annotated[
    str, Path(description=f"Location id: {ID_DESCRIPTION}", json_schema_extra=ID_JSON_SCHEMA)
]
"""A ``{location}`` path parameter, documented with the id rule (checked by
:func:`invalid_id_response`, which words the rule for the client)."""
SkuPath = Annotated[
    str, Path(description=f"Sku id: {ID_DESCRIPTION}", json_schema_extra=ID_JSON_SCHEMA)
]
"""A ``{sku}`` path parameter, documented with the id rule."""


def invalid_id_response(location: str, sku: str | None = None) -> JSONResponse | None:
    """422 naming each path id that breaks the id rule (:mod:`shared_schemas.ids`), or None.

    Every GET checks its ids before using them: an id the mutator would refuse can have
    no inventory, and some (a key over Cassandra's size limit) would make the store fail.
    """
    location_problem = id_problem(location)
    sku_problem = None if sku is None else id_problem(sku)
    if location_problem is None and sku_problem is None:
        return None
    details = [
        {"field": field, "problem": problem}
        for field, problem in (("location", location_problem), ("sku", sku_problem))
        if problem is not None
    ]
    message = "; ".join(f"{d['field']}: {d['problem']}" for d in details)
    return error_response(422, "invalid_request", message, details)


def _field_name(location: tuple[Any, ...] | list[Any]) -> str:
    # ("body", "count") -> "count"; ("query", "limit") -> "limit"; nested -> "a.b".
    parts = [str(p) for p in location if p not in ("body", "query", "path", "header")]
    return ".".join(parts) or "body"


def _validation_details(exc: RequestValidationError) -> list[dict[str, Any]]:
    details = []
    for error in exc.errors():
        problem = str(error.get("msg", "invalid"))
        # pydantic prefixes custom ValueError messages with "Value error, ".
        problem = problem.removeprefix("Value error, ")
        details.append({"field": _field_name(error.get("loc", ())), "problem": problem})
    return details


def validation_error_response(exc: RequestValidationError) -> JSONResponse:
    """400 for a body that is not JSON, else 422 naming every offending field."""
    invalid = [e for e in exc.errors() if e.get("type") == "json_invalid"]
    if any("number out of range" in str(e.get("msg")) for e in invalid):
        # Valid JSON, but a number too long for the parser (thousands of digits): the
        # client's value is at fault, not its syntax.
        problem = "holds a number too long to be read"
        return error_response(
            422, "invalid_request", f"body: {problem}", [{"field": "body", "problem": problem}]
        )
    if invalid:
        return error_response(400, "malformed_json", "The request body is not valid JSON.")
    details = _validation_details(exc)
    message = "; ".join(f"{d['field']}: {d['problem']}" for d in details)
    return error_response(422, "invalid_request", message, details)


def unknown_query_parameters(names: Iterable[str]) -> JSONResponse:
    """422 naming query parameters a route does not take.

    FastAPI ignores parameters it was not told about; a client that sends one (a typo,
    or ``position`` to a service that cannot wait for positions) would otherwise get an
    answer that silently did not do what it asked.
    """
    problem = "unknown query parameter"
    details = [{"field": name, "problem": problem} for name in sorted(set(names))]
    message = "; ".join(f"{d['field']}: {problem}" for d in details)
    return error_response(422, "invalid_request", message, details)


async def _on_validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    return validation_error_response(exc)


async def _on_http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    codes = {404: "not_found", 405: "method_not_allowed", 413: "body_too_large"}
    error = codes.get(exc.status_code, "http_error")
    return error_response(exc.status_code, error, str(exc.detail), headers=exc.headers)


async def _on_unexpected_error(request: Request, exc: Exception) -> JSONResponse:
    # Never a stack trace to the client; the log has it.
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    return error_response(500, "internal_error", f"{type(exc).__name__}: unexpected failure")


def install_error_handlers(app: FastAPI) -> None:
    """Make every error of ``app`` use :func:`error_response`'s shape, and say so in its
    OpenAPI document (:func:`_document_errors`)."""
    app.add_exception_handler(RequestValidationError, _on_validation_error)
    app.add_exception_handler(StarletteHTTPException, _on_http_error)
    app.add_exception_handler(Exception, _on_unexpected_error)
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = _document_errors(generate())
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


_ERROR_BODY_REF = {"$ref": "#/components/schemas/ErrorBody"}
_INTERNAL_ERROR_DOC = "An unexpected failure (`internal_error`); the log has the details."


def _document_errors(document: dict[str, Any]) -> dict[str, Any]:
    """``document`` with the error answers the handlers above really give.

    FastAPI documents its own validation error (``{"detail": [...]}``) as every
    operation's 422; :func:`validation_error_response` answers with :class:`ErrorBody`
    instead. And any operation can answer 500 (:func:`_on_unexpected_error`).
    """
    schemas = document.setdefault("components", {}).setdefault("schemas", {})
    for operations in document.get("paths", {}).values():
        for operation in operations.values():
            responses = operation.setdefault("responses", {})
            for answer in responses.values():
                media = answer.get("content", {}).get("application/json", {})
                if media.get("schema") == {"$ref": "#/components/schemas/HTTPValidationError"}:
                    media["schema"] = dict(_ERROR_BODY_REF)
                    if answer.get("description") == "Validation Error":
                        answer["description"] = (
                            "A parameter breaks its rule (`invalid_request`; `details` names "
                            "each one)."
                        )
            responses.setdefault(
                "500",
                {
                    "description": _INTERNAL_ERROR_DOC,
                    "content": {"application/json": {"schema": dict(_ERROR_BODY_REF)}},
                },
            )
    for unused in ("HTTPValidationError", "ValidationError"):
        schemas.pop(unused, None)
    if "ErrorBody" not in schemas:  # an app none of whose routes declared an error
        schemas["ErrorBody"] = ErrorBody.model_json_schema(ref_template=_REF_TEMPLATE)
        schemas.update(schemas["ErrorBody"].pop("$defs", {}))
    return document


_REF_TEMPLATE = "#/components/schemas/{model}"


GC_GEN0_THRESHOLD = 20_000
"""Allocations between young-generation collections while serving (CPython's default: 700)."""


def tune_gc_for_serving() -> None:
    """Make the garbage collector cheap for a request-serving process; call once started.

    A request allocates a few hundred container objects that die with it, so with
    CPython's defaults the collector runs every couple of requests, and every tenth
    run walks the older generations: the whole FastAPI/pydantic object graph built at
    start-up. Measured in the mutator at c32: about 7 % of its time. So: collect once,
    freeze what exists now (start-up objects are never collected again, and no longer
    walked), and collect the young generation every 20,000 allocations instead of 700.
    Reference cycles are still collected; memory stays flat under load.
    """
    gc.collect()
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(GC_GEN0_THRESHOLD, older, oldest)


_HEAD = object()
"""Phase marker: the bytes of a request head are arriving (no request parsed yet)."""


class _ReadDeadlines:
    """Closes connections whose client is too slow to send a request; mix into uvicorn's
    HTTP protocol classes (h11 and httptools alike: it only uses what both share).

    uvicorn bounds only the idle time after a response (``timeout_keep_alive``, and every
    byte received restarts it), so by itself it keeps a connection open forever that
    never sends a request, sends its head a byte at a time, or declares a body it never
    finishes. ASGI middleware cannot help: it runs once the head is complete. So:

    * a new connection gets uvicorn's keep-alive timer straight away, as if a response
      had just been sent (uvicorn stops it on the first byte, as usual);
    * the first byte of a request head starts ``header_timeout``; more bytes do not
      restart it; the head being complete stops it;
    * a request whose body is still arriving once its head is complete gets
      ``body_timeout``; the body being complete stops it.

    Expiry closes the connection (an application still reading that body sees the
    client disconnect). A request the application is working on has no deadline here.
    On the hot path (a request whose head and body arrive together) it arms nothing:
    about 0.4 µs per read on the development machine, against some 200 µs per request.
    """

    header_timeout: float
    body_timeout: float
    _deadline: asyncio.TimerHandle | None = None
    _phase: object | None = None
    """What the armed deadline covers: ``_HEAD``, the request cycle whose body is arriving,
    or None when nothing is armed."""

    # Attributes of uvicorn's protocol classes this relies on.
    cycle: Any
    loop: asyncio.AbstractEventLoop
    transport: asyncio.Transport
    timeout_keep_alive: float
    timeout_keep_alive_task: asyncio.TimerHandle | None
    timeout_keep_alive_handler: Callable[[], None]

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)  # type: ignore[misc]
        self.timeout_keep_alive_task = self.loop.call_later(
            self.timeout_keep_alive, self.timeout_keep_alive_handler
        )

    def data_received(self, data: bytes) -> None:
        super().data_received(data)  # type: ignore[misc]
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete:  # its head is complete
            if cycle.more_body:
                if self._phase is not cycle:
                    self._arm(self.body_timeout, cycle)
            elif self._phase is not None:
                self._disarm()
        elif self._phase is not _HEAD:
            self._arm(self.header_timeout, _HEAD)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)  # type: ignore[misc]

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
            limit = self.header_timeout if phase is _HEAD else self.body_timeout
            log.debug("closing a connection: %s not complete within %g s", what, limit)
            self.transport.close()


def with_read_deadlines(
    protocol_class: type[asyncio.Protocol], header_timeout: float, body_timeout: float
) -> type[asyncio.Protocol]:
    """``protocol_class`` (one of uvicorn's HTTP protocols) with :class:`_ReadDeadlines`."""
    return type(
        f"ReadDeadlines{protocol_class.__name__}",
        (_ReadDeadlines, protocol_class),
        {"header_timeout": header_timeout, "body_timeout": body_timeout},
    )


def server_config(
    app: FastAPI, host: str, port: int, log_level: str, limits: HttpServerSettings
) -> uvicorn.Config:
    """The uvicorn configuration every service runs with: one worker, the process's own
    logging, no access log, and the connection limits of ``limits``."""
    # The protocol uvicorn would pick itself ("auto": httptools if installed, else h11).
    from uvicorn.protocols.http.auto import AutoHTTPProtocol

    return uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level.lower(),
        log_config=None,  # keep the process-wide format from configure_logging
        access_log=False,
        timeout_keep_alive=limits.http_keep_alive_timeout_seconds,  # type: ignore[arg-type]
        http=with_read_deadlines(
            AutoHTTPProtocol, limits.http_header_timeout_seconds, limits.http_body_timeout_seconds
        ),
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


def serve(app: FastAPI, host: str, port: int, log_level: str, limits: HttpServerSettings) -> None:
    """Run ``app`` with one uvicorn worker until SIGTERM/SIGINT, in the calling thread.

    The lifespan's shutdown half (flush producers, close sessions) runs before this
    returns; logs go through the process's logging set-up. The garbage collector is
    tuned for serving first (:func:`tune_gc_for_serving`). Connections are bounded as
    ``limits`` says (:func:`server_config`).
    """
    config = server_config(app, host, port, log_level, limits)
    tune_gc_for_serving()
    _Server(config).run()


ReadinessCheck = Callable[[], Awaitable[dict[str, Any]]]
"""Returns the readiness facts; raises (any exception) or sets ``ready: False`` when not ready."""


class Liveness(BaseModel):
    """The answer of ``/health/live``."""

    status: Literal["live"]


class Readiness(BaseModel):
    """The answer of ``/health/ready``: ``status`` and ``ready``, then the service's own
    facts (what it checked, and what is wrong when it is not ready)."""

    model_config = ConfigDict(extra="allow")

    status: Literal["ready", "not_ready"]
    ready: bool
    error: str | None = Field(
        None, description="`not_ready` when the check itself failed; `message` says how."
    )
    message: str | None = None


def operations_router(ready: ReadinessCheck, registry: CollectorRegistry) -> APIRouter:
    """``GET /health/live``, ``GET /health/ready`` and ``GET /metrics`` for one service."""
    router = APIRouter(tags=["operations"])

    @router.get("/health/live", response_model=Liveness, summary="The process is up")
    async def live() -> dict[str, str]:
        return {"status": "live"}

    @router.get(
        "/health/ready",
        response_model=Readiness,
        summary="The service can do its job",
        responses={503: {"model": Readiness, "description": "Not ready; the facts say why."}},
    )
    async def readiness() -> JSONResponse:
        try:
            facts = await ready()
        except Exception as exc:
            # Both shapes at once: a readiness answer and the usual error body.
            return JSONResponse(
                {
                    "status": "not_ready",
                    "ready": False,
                    "error": "not_ready",
                    "message": f"{type(exc).__name__}: {exc}",
                },
                status_code=503,
            )
        if not facts.get("ready", True):
            return JSONResponse({"status": "not_ready", **facts}, status_code=503)
        return JSONResponse({"status": "ready", "ready": True, **facts})

    @router.get(
        "/metrics",
        summary="Prometheus metrics",
        response_class=Response,
        responses={
            200: {
                "description": "The Prometheus text exposition format.",
                "content": {CONTENT_TYPE_LATEST.split(";")[0]: {"schema": {"type": "string"}}},
            }
        },
    )
    async def metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return router
