"""The calculator's REST API: interactive queries over the local store, forwarded to the owner.

Example::

    app = create_app(runtime)      # runtime: store, progress, routing table, metrics
    uvicorn.run(app, port=9094)

A GET for (location, sku) computes the key's partition with the shared partitioner and
looks the owner up in the routing table. Owned here: answer from the local store.
Owned elsewhere: forward once to the owner's advertised URL and return its answer
unchanged. The handlers are in :mod:`sellable_calculator.routes`, forwarding in
:mod:`sellable_calculator.forwarding`, read-your-writes waits in
:mod:`sellable_calculator.read_your_writes`; this module puts them together.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from sellable_calculator.forwarding import open_forwarding
from sellable_calculator.routes import add_sellable_route, router
from sellable_calculator.runtime import CalculatorRuntime
from service_runtime.http import install_error_handlers, operations_router


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Keep forwarding's pooled clients open for as long as ``app`` serves."""
    runtime: CalculatorRuntime = app.state.runtime
    async with open_forwarding(runtime.settings) as forwarding:
        app.state.forwarding = forwarding
        runtime.metrics.forwarded_waits.set_function(lambda: forwarding.waits)
        yield


def create_app(runtime: CalculatorRuntime) -> FastAPI:
    """The calculator's FastAPI application, serving ``runtime``'s store."""
    app = FastAPI(
        title="sellable_calculator",
        description="Sellable inventory from a Bytewax dataflow's local store, "
        "with requests for keys owned elsewhere forwarded to their owner.",
        lifespan=lifespan,
    )
    app.state.runtime = runtime
    install_error_handlers(app)
    # Inventory routes first, the operations routes last: routes are tried in order, and
    # the inventory GET is the hot one.
    add_sellable_route(app.router, runtime.settings.calculator_max_wait_seconds)
    app.include_router(router)
    app.include_router(operations_router(runtime.readiness, runtime.metrics.registry))
    return app
