"""The read model's routes: one key's sellable count, a location's skus and the decision on
a validated reservation, from Cassandra.

Example::

    app = FastAPI()
    app.state.table = SellableTable(settings)   # what the handlers read from
    add_inventory_routes(app)

The handlers are plain module-level functions; the table and the metrics come from
``request.app.state`` (:func:`table_of`, :func:`metrics_of`), set by
:func:`sellable_service.app.create_app`.
"""

from __future__ import annotations

import json
import time
from typing import Annotated, Any

from fastapi import FastAPI, Query, Request
from fastapi.responses import Response
from pydantic import BaseModel, Field

from sellable_service.metrics import ServiceMetrics
from sellable_service.store import CassandraUnavailable, SellableTable
from service_runtime.http import (
    LocationPath,
    MutationIdPath,
    error_doc,
    error_response,
    invalid_id_response,
    invalid_mutation_id_response,
    key_path_parameters,
    reservation_not_found,
    unknown_query_parameters,
)
from shared_schemas.ids import MAX_ID_LENGTH
from shared_schemas.reservations import ReservationAnswer
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


def table_of(request: Request) -> SellableTable:
    """The Cassandra table of the app serving ``request``."""
    table: SellableTable = request.app.state.table
    return table


def metrics_of(request: Request) -> ServiceMetrics:
    """The metrics of the app serving ``request``."""
    metrics: ServiceMetrics = request.app.state.metrics
    return metrics


def _json(body: Any, status: int = 200) -> Response:
    return Response(json.dumps(body), status, media_type="application/json")


RETRY_AFTER = {"Retry-After": "1"}
"""On every 503: the driver reconnects every second."""


def _unavailable(exc: CassandraUnavailable) -> Response:
    return error_response(
        503, "cassandra_unavailable", f"Cassandra is unavailable: {exc}", headers=RETRY_AFTER
    )


async def get_sellable(request: Request) -> Response:
    """One key's sellable count, as the writer last wrote it."""
    location, sku = request.path_params["location"], request.path_params["sku"]
    # No query parameters at all: `?position=` (the calculator's read-your-writes) must
    # not look as if it had been honoured.
    if request.scope["query_string"] and (names := request.query_params.keys()):
        return unknown_query_parameters(names)
    invalid = invalid_id_response(location, sku)
    if invalid is not None:
        return invalid  # before Cassandra: it fails on keys over its size limit
    started = time.perf_counter()
    try:
        count = await table_of(request).sellable_count(location, sku)
    except CassandraUnavailable as exc:
        return _unavailable(exc)
    finally:
        metrics_of(request).get_seconds.observe(time.perf_counter() - started)
    if count is None:
        return error_response(
            404, "not_found", f"no sellable inventory for location {location!r}, sku {sku!r}"
        )
    return _json({"locationId": location, "sku": sku, "count": count})


async def list_location(
    location: LocationPath,
    request: Request,
    limit: Annotated[int, Query(ge=1, le=1000, description="Skus per page.")] = 100,
    after: Annotated[
        str, Query(max_length=MAX_ID_LENGTH, description="The `next` value of the previous page.")
    ] = "",
) -> Response:
    """The skus of a location, a page at a time, in sku order."""
    unknown = request.query_params.keys() - LISTING_PARAMETERS
    if unknown:
        return unknown_query_parameters(unknown)
    invalid = invalid_id_response(location)
    if invalid is not None:
        return invalid
    try:
        page = await table_of(request).location(location, limit, after)
    except CassandraUnavailable as exc:
        return _unavailable(exc)
    skus = [{"locationId": location, "sku": r.sku, "count": r.count} for r in page.rows]
    return _json({"locationId": location, "skus": skus, "next": page.next})


async def get_reservation(mutationId: MutationIdPath, request: Request) -> Response:
    """The decision on one validated reservation, as the writer stored it from
    ``reservation_results``; 404 until there is one (unknown, not validated, or not
    decided yet: this service cannot tell these apart)."""
    if request.scope["query_string"] and (names := request.query_params.keys()):
        return unknown_query_parameters(names)
    invalid = invalid_mutation_id_response(mutationId)
    if invalid is not None:
        return invalid
    try:
        result = await table_of(request).reservation_result(mutationId)
    except CassandraUnavailable as exc:
        return _unavailable(exc)
    if result is None:
        return reservation_not_found(
            mutationId,
            "none stored (unknown, or not decided yet: the mutator that "
            "accepted it answers PENDING)",
        )
    return _json(result.answer())


def add_inventory_routes(app: FastAPI) -> None:
    """Add the inventory GETs to ``app``'s own router (not an included one: FastAPI
    matches an included router's routes through a wrapper, on every request)."""
    app.router.get(
        "/inventory/locations/{location}/skus/{sku}",
        response_model=SellableInventory,
        summary="Sellable inventory of one sku at one location",
        description="\f",  # the docstring is for readers of the code, not of /docs
        responses={
            404: error_doc("Unknown key"),
            422: error_doc("An id breaks the id rule, or a query parameter was given"),
            503: error_doc("Cassandra down"),
        },
        # Read by hand: the hot path skips FastAPI's parameter machinery.
        openapi_extra={"parameters": key_path_parameters()},
    )(get_sellable)
    app.router.get(
        "/inventory/locations/{location}/skus",
        response_model=LocationPage,
        summary="The skus of a location, a page at a time",
        description="\f",
        responses={
            422: error_doc(
                "The location breaks the id rule, a bad limit or after, or an unknown "
                "query parameter"
            ),
            503: error_doc("Cassandra down"),
        },
    )(list_location)
    app.router.get(
        "/inventory/reservations/{mutationId}",
        response_model=ReservationAnswer,
        summary="The decision on a validated reservation",
        description="\f",
        responses={
            404: error_doc(
                "No decision stored for this id: unknown, not a validated reservation, or "
                "not decided yet (`not_found`)"
            ),
            422: error_doc(
                "The id is not a UUID in lower-case canonical form, or a query parameter was given"
            ),
            503: {
                **error_doc("Cassandra down (`cassandra_unavailable`), with `Retry-After`"),
                "headers": {
                    "Retry-After": {
                        "description": "Seconds to wait before asking again.",
                        "schema": {"type": "integer"},
                    }
                },
            },
        },
    )(get_reservation)
