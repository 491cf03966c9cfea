"""The read model's REST API: the same GETs as the calculator, answered from Cassandra.

Example::

    settings = ServiceSettings()
    serve(create_app(settings), "127.0.0.1", 9093, "info", settings)

The lifespan connects to Cassandra (in the background, retrying, so the service starts
even while Cassandra is down and answers 503 meanwhile) and starts the writer that
consumes ``sellable_inventory`` and ``reservation_results`` into it; both stop with the
app. ``/health/ready`` is
200 only while Cassandra is up and the writer is making progress (see
:meth:`SellableWriter.health`).
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI
from prometheus_client import CollectorRegistry

from sellable_service.metrics import ServiceMetrics
from sellable_service.routes import add_inventory_routes
from sellable_service.settings import ServiceSettings
from sellable_service.store import SellableTable
from sellable_service.writer import SellableWriter, WriterHealth
from service_runtime.http import install_error_handlers, operations_router


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
        description="Sellable inventory, and the decisions on validated reservations, "
        "from the Cassandra read model fed by the sellable_inventory and "
        "reservation_results topics.",
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

    add_inventory_routes(app)
    # Last: routes are tried in order, and the inventory GET is the hot one.
    registry = writer_elsewhere.registry if writer_elsewhere else metrics.registry
    app.include_router(operations_router(ready, registry))
    return app
