"""The command side's REST API: adjustments and reservations become Avro events on Kafka.

Example::

    app = create_app(MutatorSettings())
    uvicorn.run(app, port=9091)

    curl -H "Content-Type: application/json" -X POST \\
      -d '{"locationId":"STL","sku":"123123", "count": "100"}' \\
      http://localhost:9091/inventory/adjustment

Each accepted request is exactly one record: key = ``encode_key(location, sku)``, the
partition the shared partitioner assigns that key, value = an ``InventoryMutation`` with
a fresh mutation id and the event time. The answer (200) comes only after the broker
acknowledged the record, and names its position; a GET on a calculator can pass that
position back for a read-your-writes answer. Otherwise the answer is a 503 that says
whether the event may have been written or was not. A Kafka producer that can write no
more (fatal, fenced, wedged) is replaced by a fresh one, and ``/health/ready`` is true
only while the producer in use is known to work (see ``producer.py``).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import signal
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from types import FrameType
from typing import Any

from confluent_kafka import Producer
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from prometheus_client import CollectorRegistry, Counter, Histogram
from pydantic import (
    ValidationError,
)
from starlette.requests import ClientDisconnect

from inventory_mutator.idempotency import IdempotencyCache, IdempotencyConflict
from inventory_mutator.mutations import Adjustment, MutationAccepted, Reservation
from inventory_mutator.producer import AsyncProducer, Delivered, ProduceFailed, ProducerStatus
from inventory_mutator.settings import MutatorSettings
from shared_schemas.http import (
    error_doc,
    error_response,
    install_error_handlers,
    operations_router,
    validation_error_response,
)
from shared_schemas.partitioner import key_and_partition
from shared_schemas.positions import Position
from shared_schemas.schemas import INVENTORY_MUTATION
from shared_schemas.serde import ValueSerde, value_serde
from shared_schemas.topics import (
    INVENTORY_ADJUSTMENTS,
    INVENTORY_RESERVATIONS,
    TopicMismatchError,
    TopicSpec,
    ensure_topics_when_available,
)

log = logging.getLogger(__name__)

MUTATION_TOPICS = (INVENTORY_ADJUSTMENTS, INVENTORY_RESERVATIONS)

KAFKA_CHECK_TIMEOUT_SECONDS = 2.5
"""Longest wait for the broker's metadata answer in the broker check."""
READINESS_TIMEOUT_SECONDS = 3.0
"""Longest wait of ``/health/ready`` for the broker check (which goes on in the background)."""


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


CLIENT_CLOSED = "499"
"""``mutator_requests_total`` status of a request whose client disconnected before sending
its whole body (nginx's "client closed request"); no answer is sent."""


def _media_type_problem(content_type: str | None) -> str | None:
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


class TopicsMissing(RuntimeError):
    """The mutator's topics are not on the broker (and it may not create them)."""


def _on_stop_signals(callback: Callable[[], None]) -> Callable[[], None]:
    """Also call ``callback`` on SIGTERM/SIGINT, before the handler installed now; return the undo.

    Why: uvicorn's graceful shutdown waits for every request in flight before it runs the
    lifespan's shutdown half, so a request waiting on a frozen broker would hold the
    process up; the producer has to hear of the signal itself to bound those requests.
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


def create_app(settings: MutatorSettings) -> FastAPI:
    """The mutator's FastAPI application; the producer opens and closes with its lifespan."""
    registry = CollectorRegistry()
    requests = Counter(
        "mutator_requests",
        "Requests by endpoint and status",
        ["endpoint", "status"],
        registry=registry,
    )
    latency = Histogram(
        "mutator_request_seconds",
        "Request latency",
        ["endpoint"],
        registry=registry,
        buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
    )
    produce_errors = Counter(
        "mutator_produce_errors",
        "Records Kafka did not acknowledge",
        ["topic"],
        registry=registry,
    )
    replacements = Counter(
        "mutator_producer_replacements",
        "Kafka producers replaced by a fresh one (a new idempotence session) because they "
        "could write no more",
        registry=registry,
    )
    missing_topics: list[str] = []
    """The mutator's topics the last broker check did not find (for readiness)."""

    def check_broker(producer: Producer) -> bool:
        """The producer's broker check (blocking, in a thread): can the topics take records?

        One metadata round trip through the producer's own handle. Topics that are gone
        (the embedded broker keeps them in memory: a restart loses them) are created again
        when ``MUTATOR_ENSURE_TOPICS`` allows, and True says the broker had to be repaired.
        """
        metadata = producer.list_topics(timeout=KAFKA_CHECK_TIMEOUT_SECONDS)
        missing = [spec.name for spec in MUTATION_TOPICS if spec.name not in metadata.topics]
        missing_topics[:] = missing
        if not missing:
            wrong = [
                f"{spec.name} has {len(metadata.topics[spec.name].partitions)} partitions"
                for spec in MUTATION_TOPICS
                if len(metadata.topics[spec.name].partitions) != settings.topic_partitions
            ]
            if wrong:
                raise TopicMismatchError(
                    f"{'; '.join(wrong)}, expected {settings.topic_partitions} (TOPIC_PARTITIONS)"
                )
            return False
        if not settings.mutator_ensure_topics:
            raise TopicsMissing(f"topics missing on the broker: {', '.join(missing)}")
        log.warning("topics missing on the broker (was it restarted?): creating %s", missing)
        ensure_topics_when_available(
            settings.kafka_bootstrap_servers,
            settings.topic_partitions,
            settings.topic_replication_factor,
            wait_seconds=0,
        )
        missing_topics.clear()
        return True

    serdes: dict[str, ValueSerde] = {}
    idempotency: IdempotencyCache[bytes] = IdempotencyCache(
        settings.mutator_idempotency_window_seconds, settings.mutator_idempotency_max_keys
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if settings.mutator_ensure_topics:
            try:
                await asyncio.to_thread(
                    ensure_topics_when_available,
                    settings.kafka_bootstrap_servers,
                    settings.topic_partitions,
                    settings.topic_replication_factor,
                    wait_seconds=5,
                )
            except Exception as exc:  # start anyway: requests answer 503 until Kafka is back
                log.warning("could not ensure topics at start-up: %s", exc)
        for spec in (INVENTORY_ADJUSTMENTS, INVENTORY_RESERVATIONS):
            serdes[spec.name] = value_serde(
                INVENTORY_MUTATION, spec.name, settings.schema_registry_url
            )
        timeout_ms = int(settings.mutator_delivery_timeout_seconds * 1000)
        producer = AsyncProducer(
            {
                "bootstrap.servers": settings.kafka_bootstrap_servers,
                # librdkafka gives up when we do, so a dead broker does not leave
                # records queued for minutes behind a request that already got its 503.
                "message.timeout.ms": timeout_ms,
                "socket.connection.setup.timeout.ms": min(timeout_ms, 5000),
                # A broker that lost its topics must not get them back by auto-creation
                # with its default partition count: that breaks co-partitioning. The
                # broker check recreates them with the right one instead.
                "allow.auto.create.topics": False,
            },
            check_broker,
            on_replaced=lambda reason: replacements.inc(),
        )
        app.state.producer = producer
        loop = asyncio.get_running_loop()
        shutdown_timeout = settings.mutator_shutdown_timeout_seconds
        undo_signals = _on_stop_signals(
            lambda: loop.call_soon_threadsafe(producer.begin_close, shutdown_timeout)
        )
        try:
            yield
        finally:
            undo_signals()
            await producer.aclose(shutdown_timeout)

    app = FastAPI(
        title="inventory_mutator",
        description="The command side: adjustments and reservations become Avro events "
        "on Kafka, keyed and partitioned by (location, sku).",
        lifespan=lifespan,
    )
    install_error_handlers(app)

    async def read_body(request: Request) -> bytes | Response:
        limit = settings.mutator_max_body_bytes
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

    async def ready() -> dict[str, Any]:
        """Ready when the producer in use is known to work and the broker check passes now."""
        producer: AsyncProducer = app.state.producer
        status: ProducerStatus = await producer.readiness(READINESS_TIMEOUT_SECONDS)
        facts: dict[str, Any] = {
            "ready": status.ready,
            "kafka": settings.kafka_bootstrap_servers,
            "missingTopics": list(missing_topics),
            "producerSession": status.session,
        }
        if status.problem is not None:
            facts["problem"] = status.problem
        return facts

    async def write(spec: TopicSpec, mutation: Adjustment | Reservation) -> bytes:
        """Produce one mutation, wait for the broker's acknowledgement, return the answer."""
        key, partition = key_and_partition(
            mutation.locationId, mutation.sku, settings.topic_partitions
        )
        mutation_id = str(uuid.uuid4())
        value = serdes[spec.name].serialize(
            {
                "mutation_id": mutation_id,
                "count": mutation.count,
                "event_time": int(time.time() * 1000),
            }
        )
        producer: AsyncProducer = app.state.producer
        delivered: Delivered = await producer.produce(
            spec.name,
            key,
            value,
            partition,
            settings.mutator_delivery_timeout_seconds,
        )
        topic, partition, offset = delivered.topic, delivered.partition, delivered.offset
        # The MutationAccepted shape, serialised directly: building the model only to
        # dump it again costs more than the rest of this function.
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

    async def accept(
        spec: TopicSpec,
        mutation: Adjustment | Reservation,
        idempotency_key: str | None,
    ) -> Response:
        try:
            if idempotency_key is None:
                body = await write(spec, mutation)
            else:
                fingerprint = hashlib.sha256(
                    json.dumps(
                        [spec.name, mutation.locationId, mutation.sku, mutation.count]
                    ).encode()
                ).hexdigest()
                body = await idempotency.run(
                    f"{spec.name}:{idempotency_key}", fingerprint, lambda: write(spec, mutation)
                )
        except IdempotencyConflict as exc:
            # 409, not 422: the body is valid; it conflicts with what the server holds
            # (the key's first request), which no schema of the request can express.
            return error_response(
                409,
                "idempotency_key_reused",
                str(exc),
                [{"field": "Idempotency-Key", "problem": str(exc)}],
            )
        except ProduceFailed as exc:
            produce_errors.labels(spec.name).inc()
            log.warning("produce to %s failed: %s", spec.name, exc)
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
        return Response(body, media_type="application/json")

    async def validate(
        request: Request, model: type[Adjustment] | type[Reservation]
    ) -> tuple[Adjustment | Reservation, str | None] | Response:
        """The mutation and its Idempotency-Key, or the 4xx answer that says what is wrong."""
        idempotency_key = request.headers.get("idempotency-key")
        if idempotency_key is not None and len(idempotency_key) > MAX_IDEMPOTENCY_KEY_LENGTH:
            problem = f"must be at most {MAX_IDEMPOTENCY_KEY_LENGTH} characters"
            return error_response(
                422,
                "invalid_request",
                f"Idempotency-Key: {problem}",
                [{"field": "Idempotency-Key", "problem": problem}],
            )
        unsupported = _media_type_problem(request.headers.get("content-type"))
        if unsupported is not None:
            return error_response(
                415,
                "unsupported_media_type",
                f"Content-Type: {unsupported}",
                [{"field": "Content-Type", "problem": unsupported}],
            )
        raw = await read_body(request)
        if isinstance(raw, Response):
            return raw
        try:
            return model.model_validate_json(raw), idempotency_key
        except ValidationError as exc:
            errors = exc.errors(include_url=False)
            for error in errors:
                error["loc"] = ("body", *error.get("loc", ()))
            return validation_error_response(RequestValidationError(errors))

    def handler(
        model: type[Adjustment] | type[Reservation], spec: TopicSpec, path: str
    ) -> Callable[[Request], Awaitable[Response]]:
        """The endpoint for one kind of mutation; counts and times every request."""
        observe = latency.labels(path).observe
        # Bound once: looking a labelled child up costs a lock and a dict per call.
        counted = {status: requests.labels(path, str(status)) for status in (200, 503)}

        async def endpoint(request: Request) -> Response:
            started = time.perf_counter()
            try:
                checked = await validate(request, model)
                if isinstance(checked, Response):
                    response = checked
                else:
                    response = await accept(spec, *checked)
            except ClientDisconnect:
                # The client went away before its body arrived: nothing was written and
                # nobody is left to answer. Its event, not a server failure.
                log.debug("client disconnected before sending its whole body on %s", path)
                requests.labels(path, CLIENT_CLOSED).inc()
                return Response(status_code=int(CLIENT_CLOSED))
            except Exception:
                requests.labels(path, "500").inc()
                raise
            status = response.status_code
            (counted.get(status) or requests.labels(path, str(status))).inc()
            observe(time.perf_counter() - started)
            return response

        return endpoint

    responses: dict[int | str, dict[str, Any]] = {
        400: error_doc("The body is not JSON (`malformed_json`)."),
        413: error_doc(
            f"The body is larger than MUTATOR_MAX_BODY_BYTES "
            f"({settings.mutator_max_body_bytes}) (`body_too_large`)."
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

    for name, path, model, spec, summary, example in (
        (
            "adjust",
            "/inventory/adjustment",
            Adjustment,
            INVENTORY_ADJUSTMENTS,
            "Adjust the on-hand quantity of a sku at a location",
            {"locationId": "STL", "sku": "123123", "count": "100"},
        ),
        (
            "reserve",
            "/inventory/reservation",
            Reservation,
            INVENTORY_RESERVATIONS,
            "Reserve units of a sku at a location",
            {"locationId": "STL", "sku": "123123", "count": "10"},
        ),
    ):
        app.post(
            path,
            response_model=MutationAccepted,
            responses=responses,
            summary=summary,
            name=name,
            openapi_extra={
                "parameters": [IDEMPOTENCY_KEY_PARAMETER],
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {
                            "schema": model.model_json_schema(),
                            "example": example,
                        }
                    },
                },
            },
        )(handler(model, spec, path))

    # After the mutation routes: routing tries routes in order, and these are the hot ones.
    app.include_router(operations_router(ready, registry))
    return app
