"""The mutator's HTTP handlers: ``POST /inventory/adjustment`` and ``POST /inventory/reservation``.

A POST goes through the steps below, each a function of this module:

1. :func:`validate`: the Idempotency-Key's length (422), the media type (415), the body
   read by hand within the size limit (413, :func:`read_body_by_hand`), the body parsed
   and checked against its model (400, 422);
2. :func:`accept`: written to Kafka once per Idempotency-Key (:func:`write_once`,
   :func:`write_and_answer`), and answered: the 200 that names the event's position
   (:func:`accepted_body`), 409 for a reused key (:func:`key_reused`), or 503 saying
   whether the event may have been written (:func:`unavailable`).

:func:`serve_mutation` runs them, and counts and times every request. What the steps
share (settings, metrics, Idempotency-Key cache, producer) is the app's
:class:`~inventory_mutator.writer.EventWriter`, reached with :func:`event_writer`.

The hot path declares no parameters for FastAPI to solve (no ``Depends``, ``Body`` or
``Header``): each costs a dependency-solving pass per request, measurable next to the rest
of the request. The body and ``Idempotency-Key`` are read by hand instead, and declared in
``openapi_extra`` so ``/docs`` still shows them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
import uuid
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from pydantic import ValidationError
from starlette.requests import ClientDisconnect

from inventory_mutator.decisions import pending_answer
from inventory_mutator.idempotency import IdempotencyConflict
from inventory_mutator.mutations import (
    Adjustment,
    Mutation,
    MutationAccepted,
    Reservation,
    ValidatedReservation,
)
from inventory_mutator.producer import Delivered, ProduceFailed
from inventory_mutator.writer import EventWriter
from service_runtime.http import (
    error_doc,
    error_response,
    invalid_mutation_id_response,
    reservation_not_found,
    validation_error_response,
)
from shared_schemas.positions import Position
from shared_schemas.reservations import CONFIRMED, MUTATION_ID_PATTERN, ReservationAnswer
from shared_schemas.topics import INVENTORY_ADJUSTMENTS, INVENTORY_RESERVATIONS, TopicSpec

log = logging.getLogger(__name__)

MAX_IDEMPOTENCY_KEY_LENGTH = 200

# Read by hand on the hot path (a declared Header parameter costs a dependency-solving
# pass per request); declared here so /docs still shows it.
IDEMPOTENCY_KEY_PARAMETER: dict[str, Any] = {
    "name": "Idempotency-Key",
    "in": "header",
    "required": False,
    "description": "Optional: a retry with the same key within the window is answered "
    "with the first answer instead of being written again (per process).",
    "schema": {"type": "string", "maxLength": MAX_IDEMPOTENCY_KEY_LENGTH},
}

UNAVAILABLE_DOC = (
    "Kafka did not acknowledge the event (`kafka_unavailable`: unreachable, too slow, or "
    "the producer had to be replaced), or the mutator is shutting down (`shutting_down`). "
    "The message says whether the event **may have been written** (a timeout does not take "
    "it back) or was not: retry with the same `Idempotency-Key` to be safe against a "
    "duplicate within the key's window."
)

CLIENT_CLOSED = 499
"""``mutator_requests_total`` status of a request whose client disconnected before sending
its whole body (nginx's "client closed request"); no answer is sent."""


@dataclass(frozen=True, slots=True)
class MutationRoute:
    """One kind of mutation as the API serves it."""

    name: str
    path: str
    model: type[Adjustment] | type[Reservation]
    topic: TopicSpec
    summary: str
    example: dict[str, str]
    """The request body ``/docs`` shows: the original example's, count as a string."""


ADJUSTMENT = MutationRoute(
    "adjust",
    "/inventory/adjustment",
    Adjustment,
    INVENTORY_ADJUSTMENTS,
    "Adjust the on-hand quantity of a sku at a location",
    {"locationId": "STL", "sku": "123123", "count": "100"},
)
RESERVATION = MutationRoute(
    "reserve",
    "/inventory/reservation",
    Reservation,
    INVENTORY_RESERVATIONS,
    "Reserve units of a sku at a location",
    {"locationId": "STL", "sku": "123123", "count": "10"},
)
MUTATION_ROUTES = (ADJUSTMENT, RESERVATION)


def event_writer(request: Request) -> EventWriter:
    """The app's :class:`EventWriter` (``app.state.writer``), typed.

    A plain function, not a FastAPI ``Depends``: solving a dependency costs measurable
    time per request on the hot POST.
    """
    writer: EventWriter = request.app.state.writer
    return writer


# The leading form feed in the two docstrings below keeps them out of the OpenAPI
# document (FastAPI's rule), where each operation's summary already says what it does.


async def adjust(request: Request) -> Response:
    """\f``POST /inventory/adjustment``: an :class:`Adjustment` onto ``inventory_adjustments``."""
    return await serve_mutation(request, ADJUSTMENT)


async def reserve(request: Request) -> Response:
    """\f``POST /inventory/reservation``: a :class:`Reservation` onto ``inventory_reservations``."""
    return await serve_mutation(request, RESERVATION)


async def serve_mutation(request: Request, route: MutationRoute) -> Response:
    """Answer one POST of ``route``'s mutation; count and time every request."""
    writer = event_writer(request)
    metrics = writer.metrics.endpoints[route.path]
    started = time.perf_counter()
    try:
        checked = await validate(request, route.model, writer.settings.mutator_max_body_bytes)
        asked = (
            validation_asked(request, writer.settings.mutator_decision_wait_seconds)
            if route is RESERVATION and request.scope.get("query_string")
            else None
        )
        if isinstance(checked, Response):
            response = checked
        elif isinstance(asked, Response):
            response = asked
        elif asked is not None:
            response = await accept_validated(writer, *checked, asked)
        else:
            response = await accept(writer, route.topic, *checked)
    except ClientDisconnect:
        # The client went away before its body arrived: nothing was written and
        # nobody is left to answer. Its event, not a server failure.
        log.debug("client disconnected before sending its whole body on %s", route.path)
        metrics.count(CLIENT_CLOSED)
        return Response(status_code=CLIENT_CLOSED)
    except Exception:
        metrics.count(500)
        raise
    metrics.count(response.status_code)
    metrics.observe(time.perf_counter() - started)
    return response


async def validate(
    request: Request, model: type[Adjustment] | type[Reservation], max_body_bytes: int
) -> tuple[Mutation, str | None] | Response:
    """The mutation and its Idempotency-Key, or the 4xx answer that says what is wrong."""
    idempotency_key = request.headers.get("idempotency-key")
    refused = idempotency_key_refused(idempotency_key)
    if refused is None:
        refused = media_type_refused(request.headers.get("content-type"))
    if refused is not None:
        return refused
    raw = await read_body_by_hand(request, max_body_bytes)
    if isinstance(raw, Response):
        return raw
    mutation = parse_mutation(raw, model)
    if isinstance(mutation, Response):
        return mutation
    return mutation, idempotency_key


def idempotency_key_refused(idempotency_key: str | None) -> Response | None:
    """The 422 for an Idempotency-Key too long to keep, or None if it is fine (or absent)."""
    if idempotency_key is None or len(idempotency_key) <= MAX_IDEMPOTENCY_KEY_LENGTH:
        return None
    problem = f"must be at most {MAX_IDEMPOTENCY_KEY_LENGTH} characters"
    return header_refused(422, "invalid_request", "Idempotency-Key", problem)


def media_type_refused(content_type: str | None) -> Response | None:
    """The 415 for a ``content_type`` that is not JSON, or None if it is."""
    problem = media_type_problem(content_type)
    if problem is None:
        return None
    return header_refused(415, "unsupported_media_type", "Content-Type", problem)


def header_refused(status: int, error: str, header: str, problem: str) -> Response:
    """The error answer for one request header that breaks its rule, naming it."""
    return error_response(
        status, error, f"{header}: {problem}", [{"field": header, "problem": problem}]
    )


def media_type_problem(content_type: str | None) -> str | None:
    """None if ``content_type`` is JSON (``application/json``, ``application/*+json``),
    else what is wrong with it, in words for the client."""
    if content_type is None:
        return "missing; send application/json"
    if content_type == "application/json":
        return None  # the common case, before any parsing
    media = content_type.partition(";")[0].strip().lower()
    if media == "application/json" or (
        media.startswith("application/") and media.endswith("+json")
    ):
        return None
    return f"must be application/json (or application/*+json), not {media or 'empty'}"


async def read_body_by_hand(request: Request, limit: int) -> bytes | Response:
    """The request body, or the 413 for one over ``limit`` bytes; never reads much past it.

    By hand rather than as a declared ``Body`` parameter: FastAPI would parse it into
    Python objects and validate those through a dependency-solving pass per request;
    :func:`parse_mutation` validates the raw bytes in one step instead.
    """
    length = request.headers.get("content-length", "")
    if length.isdigit():
        if int(length) > limit:
            return error_response(
                413, "body_too_large", f"request body is {length} bytes; the limit is {limit}"
            )
        # The HTTP layer delivers exactly Content-Length bytes (or fails the request),
        # so a declared length within the limit can be read in one go.
        return await request.body()
    # No Content-Length (chunked): count what actually arrives.
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            return error_response(
                413, "body_too_large", f"request body exceeds the limit of {limit} bytes"
            )
    return bytes(body)


def parse_mutation(raw: bytes, model: type[Adjustment] | type[Reservation]) -> Mutation | Response:
    """``raw`` as a ``model``, or the 400 (not JSON) or 422 (a field breaks its rule).

    The errors are placed under ``body``, as FastAPI's own body validation places them,
    so the 422 names the fields the way every other 422 of the project does.
    """
    try:
        return model.model_validate_json(raw)
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
        for error in errors:
            error["loc"] = ("body", *error.get("loc", ()))
        return validation_error_response(RequestValidationError(errors))


async def accept(
    writer: EventWriter, spec: TopicSpec, mutation: Mutation, idempotency_key: str | None
) -> Response:
    """Write ``mutation`` to ``spec``'s topic and answer 200, or the 409/503 that says why not."""
    body = await write_or_refuse(writer, spec, mutation, idempotency_key)
    if isinstance(body, Response):
        return body
    return Response(body, media_type="application/json")


async def write_or_refuse(
    writer: EventWriter,
    spec: TopicSpec,
    mutation: Mutation,
    idempotency_key: str | None,
    validate: bool = False,
) -> bytes | Response:
    """The 200 body of writing ``mutation`` (:func:`write_once`), or the 409 (key reused)
    or 503 (not acknowledged) that says why it was not written."""
    try:
        return await write_once(writer, spec, mutation, idempotency_key, validate)
    except IdempotencyConflict as exc:
        return key_reused(exc)
    except ProduceFailed as exc:
        writer.metrics.produce_errors.labels(spec.name).inc()
        log.warning("produce to %s failed: %s", spec.name, exc)
        return unavailable(exc)


async def write_once(
    writer: EventWriter,
    spec: TopicSpec,
    mutation: Mutation,
    idempotency_key: str | None,
    validate: bool = False,
) -> bytes:
    """The 200 body of writing ``mutation``: written now, or, for an Idempotency-Key used
    before (per topic) for the same mutation, the first answer again.

    Raises :class:`IdempotencyConflict` for a key used before for another mutation.
    """
    if idempotency_key is None:
        return await write_and_answer(writer, spec, mutation, validate)
    return await writer.idempotency.run(
        f"{spec.name}:{idempotency_key}",
        fingerprint(spec, mutation, validate),
        lambda: write_and_answer(writer, spec, mutation, validate),
    )


def fingerprint(spec: TopicSpec, mutation: Mutation, validate: bool = False) -> str:
    """What a request with an Idempotency-Key says, to tell a retry from another request."""
    said: list[Any] = [spec.name, mutation.locationId, mutation.sku, mutation.count]
    if validate:
        said.append("validate")
    return hashlib.sha256(json.dumps(said).encode()).hexdigest()


async def write_and_answer(
    writer: EventWriter, spec: TopicSpec, mutation: Mutation, validate: bool = False
) -> bytes:
    """Write ``mutation`` as one event with a fresh mutation id; the 200 body once the
    broker acknowledged it."""
    mutation_id = str(uuid.uuid4())
    delivered = await writer.write(spec, mutation, mutation_id, validate)
    return accepted_body(delivered, mutation_id)


MAX_DECISION_WAIT_SECONDS = 30.0
"""The longest ``?wait=`` a validated reservation may ask for."""


def validation_asked(request: Request, default_wait: float) -> float | Response | None:
    """For ``POST /inventory/reservation``: None unless ``?validate=true``; then how long
    to wait for the decision (``?wait=``, else ``default_wait``); or the 422 for a bad
    ``validate`` or ``wait``."""
    query = request.query_params
    validate = query.get("validate")
    if validate is not None and validate.lower() not in ("true", "false"):
        return _query_refused("validate", "must be true or false")
    wait = default_wait
    text = query.get("wait")
    if text is not None:
        # Checked even without validate=true: a bad value is refused, never ignored.
        try:
            wait = float(text)
        except ValueError:
            wait = -1.0
        if not 0 <= wait <= MAX_DECISION_WAIT_SECONDS:  # NaN fails too
            return _query_refused(
                "wait", f"must be a number of seconds from 0 to {MAX_DECISION_WAIT_SECONDS:g}"
            )
    if validate is None or validate.lower() == "false":
        return None
    return wait


def _query_refused(name: str, problem: str) -> Response:
    return error_response(
        422, "invalid_request", f"{name}: {problem}", [{"field": name, "problem": problem}]
    )


async def accept_validated(
    writer: EventWriter, mutation: Mutation, idempotency_key: str | None, wait: float
) -> Response:
    """Write a validated reservation and answer with its decision: 200 CONFIRMED, 409
    FAILED, or 202 PENDING when it is not decided within ``wait`` seconds; or the 409/503
    that says why it was not written."""
    body = await write_or_refuse(
        writer, RESERVATION.topic, mutation, idempotency_key, validate=True
    )
    if isinstance(body, Response):
        return body
    accepted: dict[str, Any] = json.loads(body)
    mutation_id = accepted["mutationId"]
    decisions = writer.decisions
    decisions.accepted(mutation_id, mutation.locationId, mutation.sku, mutation.count)
    result = await decisions.wait(mutation_id, wait)
    answer = (
        pending_answer(mutation_id, mutation.locationId, mutation.sku, mutation.count)
        if result is None
        else result.answer()
    )
    answer.update(accepted)
    answer["url"] = f"/inventory/reservations/{mutation_id}"
    if result is None:
        status = 202
        answer["message"] = (
            f"Reservation accepted [{accepted['topic']}-{accepted['partition']}"
            f"@{accepted['offset']}], not decided within {wait:g} s: ask {answer['url']}"
        )
    elif result.status == CONFIRMED:
        status = 200
    else:
        status = 409
        answer["error"] = "insufficient_stock"
        answer["message"] = f"Reservation failed: {result.reason}"
    return Response(
        json.dumps(answer, separators=(",", ":")).encode(),
        status_code=status,
        media_type="application/json",
    )


async def reservation_status(request: Request) -> Response:
    """\fThe status of a validated reservation: decided, pending (written here, not decided
    yet), or 404."""
    mutation_id = request.path_params["mutationId"]
    invalid = invalid_mutation_id_response(mutation_id)
    if invalid is not None:
        return invalid
    answer = event_writer(request).decisions.status(mutation_id)
    if answer is None:
        return reservation_not_found(
            mutation_id,
            "unknown here (not accepted by this mutator since it started, and not among the "
            "decisions it remembers)",
        )
    return Response(
        json.dumps(answer, separators=(",", ":")).encode(), media_type="application/json"
    )


def accepted_body(delivered: Delivered, mutation_id: str) -> bytes:
    """The :class:`MutationAccepted` answer, as JSON bytes: where the event landed.

    Serialised directly: building the model only to dump it again costs more than
    writing the event's value.
    """
    topic, partition, offset = delivered.topic, delivered.partition, delivered.offset
    return json.dumps(
        {
            "message": f"Updated Inventory [{topic}-{partition}@{offset}]",
            "topic": topic,
            "partition": partition,
            "offset": offset,
            "position": str(Position(topic, partition, offset)),
            "mutationId": mutation_id,
        },
        separators=(",", ":"),
    ).encode()


def key_reused(exc: IdempotencyConflict) -> Response:
    """The 409 for an Idempotency-Key already used for another mutation.

    409, not 422: the body is valid; it conflicts with what the server holds (the key's
    first request), which no schema of the request can express.
    """
    return error_response(
        409,
        "idempotency_key_reused",
        str(exc),
        [{"field": "Idempotency-Key", "problem": str(exc)}],
    )


def unavailable(exc: ProduceFailed) -> Response:
    """The 503 for an event Kafka did not acknowledge: says whether it may have been written."""
    written = "may have been written" if exc.may_be_written else "was not written"
    if exc.error == "shutting_down":
        message = (
            f"The mutator is shutting down; the event {written}. Retry with the same "
            "Idempotency-Key (another instance, or this one once restarted)."
        )
    else:
        message = (
            f"Kafka did not acknowledge the event ({exc}); it {written}. "
            "Retry with the same Idempotency-Key."
        )
    return error_response(503, exc.error, message)


def add_mutation_routes(router: APIRouter, max_body_bytes: int) -> None:
    """Add the POST routes to ``router``, documented as they answer (the 413's text names
    ``max_body_bytes``).

    Pass the app's own router (``app.router``): an included router is matched through a
    layer of its own on every request, which costs the hot POST measurable time.
    """
    for route, endpoint in ((ADJUSTMENT, adjust), (RESERVATION, reserve)):
        responses = error_answers(max_body_bytes)
        parameters = [IDEMPOTENCY_KEY_PARAMETER]
        if route is RESERVATION:
            responses.update(VALIDATED_ANSWERS)
            parameters += VALIDATION_PARAMETERS
        router.add_api_route(
            route.path,
            endpoint,
            methods=["POST"],
            response_model=MutationAccepted,
            responses=responses,
            summary=route.summary,
            name=route.name,
            openapi_extra={
                "parameters": parameters,
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {
                            "schema": route.model.model_json_schema(),
                            "example": route.example,
                        }
                    },
                },
            },
        )


VALIDATION_PARAMETERS: list[dict[str, Any]] = [
    {
        "name": "validate",
        "in": "query",
        "required": False,
        "description": "`true`: a validated reservation. The calculator that owns the key "
        "decides it in stream order: confirmed (and counted) if `count` is at most the "
        "sellable units at that point, else failed (and not counted); a release (negative "
        "`count`) is always confirmed. The answer waits for the decision: 200 CONFIRMED, "
        "409 FAILED, or 202 PENDING with the URL to ask later.",
        "schema": {"type": "boolean", "default": False},
    },
    {
        "name": "wait",
        "in": "query",
        "required": False,
        "description": "With `validate=true`: seconds to wait for the decision before the "
        "202 (default MUTATOR_DECISION_WAIT_SECONDS).",
        "schema": {"type": "number", "minimum": 0, "maximum": MAX_DECISION_WAIT_SECONDS},
    },
]

VALIDATED_ANSWERS: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "Written (the event's position); with `validate=true`, also "
        "CONFIRMED: the `ValidatedReservation` answer",
        "content": {
            "application/json": {
                "schema": {
                    "anyOf": [
                        {"$ref": "#/components/schemas/MutationAccepted"},
                        {"$ref": "#/components/schemas/ValidatedReservation"},
                    ]
                }
            }
        },
    },
    202: {
        "model": ValidatedReservation,
        "description": "`validate=true`: written, not decided within `wait` (status "
        "PENDING); ask `url` (GET /inventory/reservations/{mutationId}) later",
    },
    409: {
        "content": {
            "application/json": {
                "schema": {
                    "anyOf": [
                        {"$ref": "#/components/schemas/ValidatedReservation"},
                        {"$ref": "#/components/schemas/ErrorBody"},
                    ]
                }
            }
        },
        "description": "`validate=true`: FAILED, not counted (`error`: "
        "`insufficient_stock`; `available`: the sellable units it was decided against); "
        "or, with `error` `idempotency_key_reused`, the Idempotency-Key was used before for "
        "another mutation and nothing was written",
    },
}


def add_reservation_status_route(router: APIRouter) -> None:
    """Add ``GET /inventory/reservations/{mutationId}`` (:func:`reservation_status`)."""
    router.add_api_route(
        "/inventory/reservations/{mutationId}",
        reservation_status,
        methods=["GET"],
        response_model=ReservationAnswer,
        summary="The status of a validated reservation",
        description="CONFIRMED or FAILED once decided; PENDING for one this mutator "
        "accepted and has not seen decided yet.",
        responses={
            404: error_doc(
                "Unknown here (`not_found`): not accepted by this mutator since it started, "
                "and not among the decisions it remembers (MUTATOR_RESULTS_MAX)"
            ),
            422: error_doc("`mutationId` is not a UUID (`invalid_request`)"),
        },
        openapi_extra={
            "parameters": [
                {
                    "name": "mutationId",
                    "in": "path",
                    "required": True,
                    "schema": {"type": "string", "pattern": MUTATION_ID_PATTERN},
                }
            ]
        },
    )


def error_answers(max_body_bytes: int) -> dict[int | str, dict[str, Any]]:
    """The OpenAPI ``responses`` of the error answers a mutation POST can give."""
    return {
        400: error_doc("The body is not JSON (`malformed_json`)."),
        413: error_doc(
            f"The body is larger than MUTATOR_MAX_BODY_BYTES ({max_body_bytes}) (`body_too_large`)."
        ),
        415: error_doc(
            "Content-Type is missing or not JSON (`unsupported_media_type`): send "
            "`application/json` (or `application/*+json`)."
        ),
        409: error_doc(
            "The Idempotency-Key was already used, within its window, for another mutation "
            "(`idempotency_key_reused`). Nothing was written."
        ),
        422: error_doc(
            "A field breaks its rule (`invalid_request`; `details` names every field and "
            "its rule: ids, count, Idempotency-Key). Nothing was written."
        ),
        503: error_doc(UNAVAILABLE_DOC),
    }
