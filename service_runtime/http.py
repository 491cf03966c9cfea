"""HTTP conventions shared by the three FastAPI services: one JSON error shape, health
and metrics routes, and logging set-up (the server they run on: :mod:`service_runtime.server`).

Every error any service returns looks like::

    {"error": "invalid_request", "message": "count: must not be zero",
     "details": [{"field": "count", "problem": "must not be zero"}]}

``error`` is a stable machine-readable code, ``message`` a human sentence, ``details``
(optional) one entry per offending field.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterable
from typing import Annotated, Any, Literal

from fastapi import APIRouter, FastAPI, Path, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from shared_schemas.ids import ID_DESCRIPTION, ID_JSON_SCHEMA, id_problem
from shared_schemas.reservations import MUTATION_ID_PATTERN, mutation_id_problem

log = logging.getLogger(__name__)

LOG_FORMAT = "%(asctime)s %(levelname)-5s %(name)s: %(message)s"


def configure_logging(level: str = "INFO") -> None:
    """Plain one-line logs on stderr, the same format in every service."""
    logging.basicConfig(level=level.upper(), format=LOG_FORMAT, force=True)


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
MutationIdPath = Annotated[
    str,
    Path(
        description="The `mutationId` the mutator answered the validated reservation with: "
        "a UUID in lower-case canonical form.",
        examples=["9b2f8c1e-3d4a-4a7e-8f60-0c1d2e3f4a5b"],
        json_schema_extra={"pattern": MUTATION_ID_PATTERN},
    ),
]
"""A ``{mutationId}`` path parameter (checked by :func:`invalid_mutation_id_response`)."""


def key_path_parameters() -> list[dict[str, Any]]:
    """The OpenAPI declaration of ``{location}`` and ``{sku}``, for a hot-path handler that
    reads them from ``request.path_params`` (FastAPI's parameter machinery costs about a
    tenth of a plain GET's time): pass as ``openapi_extra={"parameters": ...}``. The same
    as what :data:`LocationPath` and :data:`SkuPath` produce."""
    parameters = []
    for name in ("location", "sku"):
        description = f"{name.capitalize()} id: {ID_DESCRIPTION}"
        schema = {**ID_JSON_SCHEMA, "description": description, "title": name.capitalize()}
        parameters.append(
            {
                "name": name,
                "in": "path",
                "required": True,
                "schema": schema,
                "description": description,
            }
        )
    return parameters


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


def invalid_mutation_id_response(mutation_id: str) -> JSONResponse | None:
    """422 for a ``mutationId`` path parameter that is not a mutation id, or None."""
    problem = mutation_id_problem(mutation_id)
    if problem is None:
        return None
    return error_response(
        422,
        "invalid_request",
        f"mutationId: {problem}",
        [{"field": "mutationId", "problem": problem}],
    )


def reservation_not_found(mutation_id: str, why: str) -> JSONResponse:
    """404 for a validated reservation this service knows no decision on; ``why`` says
    what that means here."""
    return error_response(404, "not_found", f"no decision on reservation {mutation_id}: {why}")


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
    headers = dict(exc.headers) if exc.headers else None
    return error_response(exc.status_code, error, str(exc.detail), headers=headers)


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
