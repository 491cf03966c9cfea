"""The read model's REST API: the same GET as the calculator, answered from Cassandra.

Example::

    settings = ServiceSettings()
    serve(create_app(settings), "127.0.0.1", 9093, "info", settings)

The lifespan connects to Cassandra (in the background, retrying, so the service starts
even while Cassandra is down and answers 503 meanwhile) and starts the writer that
consumes ``sellable_inventory`` into it; both stop with the app. ``/health/ready`` is
200 only while Cassandra is up and the writer is making progress (see
:meth:`SellableWriter.health`).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import FastAPI, Query, Request
from fastapi.responses import Response
from prometheus_client import CollectorRegistry
from pydantic import BaseModel, Field

from sellable_service.metrics import ServiceMetrics
from sellable_service.settings import ServiceSettings
from sellable_service.store import CassandraUnavailable, SellableTable
from sellable_service.writer import SellableWriter, WriterHealth
from service_runtime.http import (
    LocationPath,
    error_doc,
    error_response,
    install_error_handlers,
    invalid_id_response,
    key_path_parameters,
    operations_router,
    unknown_query_parameters,
)
from shared_schemas.ids import MAX_ID_LENGTH
from shared_schemas.responses import SellableInventory

LISTING_PARAMETERS = frozenset({"limit", "after"})
"""The only query parameters of the location listing; any other is answered 422."""


class LocationPage(BaseModel):
    """One page of a location's skus, in sku order."""

    locationId: str
    skus: list[SellableInventory]
    next: str | None = Field(
        description="Pass as `after` to get the next page; null on the last page."
    )


def _json(body: Any, status: int = 200) -> Response:
    return Response(json.dumps(body), status, media_type="application/json")


def _unavailable(exc: CassandraUnavailable) -> Response:
    return error_response(503, "cassandra_unavailable", f"Cassandra is unavailable: {exc}")


@dataclass(frozen=True)
class WriterElsewhere:
    """How an API-only app learns about a writer in another process."""

    facts: Callable[[], dict[str, Any]]
    """The writer's readiness facts (:func:`readiness_facts`' shape)."""
    registry: CollectorRegistry
    """The registry ``/metrics`` shows."""


def readiness_facts(cassandra: bool, health: WriterHealth) -> dict[str, Any]:
    """``/health/ready``'s facts: ready means the read model is moving, Cassandra up *and*
    the writer consuming and writing. A writer retrying, unassigned, stalled or dead is
    not ready even if GETs still answer, because those answers are going stale."""
    return {
        "ready": cassandra and health.ready,
        "cassandra": cassandra,
        "consumerAssigned": health.assigned,
        "writer": health.state,
    }


def create_app(
    settings: ServiceSettings,
    metrics: ServiceMetrics | None = None,
    writer_elsewhere: WriterElsewhere | None = None,
) -> FastAPI:
    """The service's FastAPI application; Cassandra and the writer live with its lifespan.

    With ``writer_elsewhere`` (an API worker of :mod:`sellable_service.workers`) the
    writer runs in another process: readiness asks for its facts, and ``/metrics``
    shows the registry given (every process's figures added up).
    """
    metrics = metrics or ServiceMetrics()
    table = SellableTable(settings)
    writer = None if writer_elsewhere else SellableWriter(settings, table, metrics)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        table.start()
        if writer is not None:
            writer.start()
        yield
        if writer is not None:
            writer.stop()
        table.close()

    app = FastAPI(
        title="sellable_service",
        description="Sellable inventory from the Cassandra read model fed by the "
        "sellable_inventory topic.",
        lifespan=lifespan,
    )
    app.state.table, app.state.writer, app.state.metrics = table, writer, metrics
    install_error_handlers(app)

    async def ready() -> dict[str, Any]:
        if writer is not None:
            return readiness_facts(table.available, writer.health())
        assert writer_elsewhere is not None
        cassandra = table.available
        facts = writer_elsewhere.facts()
        return facts | {
            "ready": cassandra and facts["ready"],
            "cassandra": cassandra and facts.get("cassandra", False),
            "apiProcess": os.getpid(),
        }

    get_seconds = metrics.get_seconds

    @app.get(
        "/inventory/locations/{location}/skus/{sku}",
        response_model=SellableInventory,
        summary="Sellable inventory of one sku at one location",
        responses={
            404: error_doc("Unknown key"),
            422: error_doc("An id breaks the id rule, or a query parameter was given"),
            503: error_doc("Cassandra down"),
        },
        # Read by hand: the hot path skips FastAPI's parameter machinery.
        openapi_extra={"parameters": key_path_parameters()},
    )
    async def get_sellable(request: Request) -> Response:
        location, sku = request.path_params["location"], request.path_params["sku"]
        # No query parameters at all: `?position=` (the calculator's read-your-writes)
        # must not look as if it had been honoured.
        if request.scope["query_string"] and (names := request.query_params.keys()):
            return unknown_query_parameters(names)
        invalid = invalid_id_response(location, sku)
        if invalid is not None:
            return invalid  # before Cassandra: it fails on keys over its size limit
        started = time.perf_counter()
        try:
            count = await table.sellable_count(location, sku)
        except CassandraUnavailable as exc:
            return _unavailable(exc)
        finally:
            get_seconds.observe(time.perf_counter() - started)
        if count is None:
            return error_response(
                404, "not_found", f"no sellable inventory for location {location!r}, sku {sku!r}"
            )
        return _json({"locationId": location, "sku": sku, "count": count})

    @app.get(
        "/inventory/locations/{location}/skus",
        response_model=LocationPage,
        summary="The skus of a location, a page at a time",
        responses={
            422: error_doc(
                "The location breaks the id rule, a bad limit or after, or an unknown "
                "query parameter"
            ),
            503: error_doc("Cassandra down"),
        },
    )
    async def list_location(
        location: LocationPath,
        request: Request,
        limit: Annotated[int, Query(ge=1, le=1000, description="Skus per page.")] = 100,
        after: Annotated[
            str,
            Query(max_length=MAX_ID_LENGTH, description="The `next` value of the previous page."),
        ] = "",
    ) -> Response:
        unknown = request.query_params.keys() - LISTING_PARAMETERS
        if unknown:
            return unknown_query_parameters(unknown)
        invalid = invalid_id_response(location)
        if invalid is not None:
            return invalid
        try:
            page = await table.location(location, limit, after)
        except CassandraUnavailable as exc:
            return _unavailable(exc)
        return _json(
            {
                "locationId": location,
                "skus": [
                    {"locationId": location, "sku": r.sku, "count": r.count} for r in page.rows
                ],
                "next": page.next,
            }
        )

    # Last: routes are tried in order, and the inventory GET is the hot one.
    registry = writer_elsewhere.registry if writer_elsewhere else metrics.registry
    app.include_router(operations_router(ready, registry))
    return app
