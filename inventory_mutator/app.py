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

Where to read on: ``mutations.py`` (what a client sends, and the rules), ``routes.py``
(the handlers, step by step), ``writer.py`` (the event written to Kafka, and readiness),
``metrics.py`` and ``producer.py``.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from inventory_mutator.metrics import MutatorMetrics

# Re-exported: the models were defined here, and callers (the tests) import them from here.
from inventory_mutator.mutations import Adjustment, Reservation
from inventory_mutator.routes import (
    MUTATION_ROUTES,
    add_mutation_routes,
    add_reservation_status_route,
)
from inventory_mutator.settings import MutatorSettings
from inventory_mutator.writer import EventWriter
from service_runtime.http import install_error_handlers, operations_router
from service_runtime.server import on_stop_signals

__all__ = ["Adjustment", "Reservation", "create_app"]


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    """The app's life: the event writer opens (topics, serdes, producer) before the first
    request, and its producer closes after the last one, or from SIGTERM/SIGINT on."""
    writer: EventWriter = app.state.writer
    producer = await writer.open()
    writer.decisions.follow(writer.settings)
    loop = asyncio.get_running_loop()
    shutdown_timeout = writer.settings.mutator_shutdown_timeout_seconds
    undo_signals = on_stop_signals(
        lambda: loop.call_soon_threadsafe(producer.begin_close, shutdown_timeout)
    )
    try:
        yield
    finally:
        undo_signals()
        await producer.aclose(shutdown_timeout)
        await asyncio.to_thread(writer.decisions.stop)


def create_app(settings: MutatorSettings) -> FastAPI:
    """The mutator's FastAPI application; the producer opens and closes with its lifespan."""
    metrics = MutatorMetrics(route.path for route in MUTATION_ROUTES)
    writer = EventWriter(settings, metrics)
    app = FastAPI(
        title="inventory_mutator",
        description="The command side: adjustments and reservations become Avro events "
        "on Kafka, keyed and partitioned by (location, sku).",
        lifespan=_lifespan,
    )
    app.state.writer = writer  # what the handlers share: see routes.event_writer
    install_error_handlers(app)
    add_mutation_routes(app.router, settings.mutator_max_body_bytes)
    add_reservation_status_route(app.router)
    # After the mutation routes: routing tries routes in order, and these are the hot ones.
    app.include_router(operations_router(writer.readiness, metrics.registry))
    return app
