"""The live console: one page, the JSON API behind it, and a server-sent event stream.

Example::

    app = create_app(ConsoleSettings())
    uvicorn.run(app, port=9090)       # then open http://localhost:9090/

Routes (every error in the project's JSON shape):

* ``GET /`` the page (``static/index.html``, ``console.js``, ``console.css``: no build
  step, nothing fetched from elsewhere).
* ``GET /api/stream`` server-sent events: a ``state`` event (the whole
  :meth:`~console.state.Collector.snapshot`) every ``CONSOLE_INTERVAL_SECONDS``; the
  backends are asked only while a stream is open.
* ``GET /api/state`` the same snapshot once.
* ``POST /api/adjustment``, ``POST /api/reservation[?validate=true&wait=S]`` relayed to
  the mutator as they are; its answer comes back as it is (status and body), or 502
  ``backend_unavailable``. The key is watched from then on, and a write that counts is
  chased on every side.
* ``POST /api/watch``, ``POST /api/unwatch`` with ``{"locationId", "sku"}``.
* ``GET /api/control``; ``POST /api/control/{name}/stop[?signal=KILL]``,
  ``POST /api/control/{name}/start``: 403 ``control_not_allowed`` unless the console
  was started by ``make up`` or with ``CONSOLE_ALLOW_CONTROL`` (:mod:`console.control`).
* ``GET /api/compare`` the ``make compare`` runs found; ``GET /compare/latest`` and
  ``GET /compare/{run}/report.html`` their reports.
* ``GET /health/live``, ``/health/ready``, ``/metrics`` as on every service.

Every POST wants ``Content-Type: application/json``: a page on another site cannot send
that without the browser asking first (CORS), and the console allows no other origin.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from pathlib import Path
from typing import Any

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from prometheus_client import CollectorRegistry, Counter, Gauge
from starlette.responses import StreamingResponse

from console.backends import describe_error, fetch
from console.control import control_for
from console.settings import ConsoleSettings
from console.state import Collector
from service_runtime.http import error_response, install_error_handlers, operations_router
from service_runtime.server import on_stop_signals
from shared_schemas.ids import id_problem

STATIC = Path(__file__).parent / "static"
MAX_BODY_BYTES = 16_384
RUN_NAME = re.compile(r"^compare-[0-9A-Za-z_-]+$")


class ConsoleMetrics:
    """What the console counts."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.streams = Gauge(
            "console_streams", "Event streams open (browsers watching)", registry=self.registry
        )
        self.writes = Counter(
            "console_writes",
            "Writes relayed to the mutator, by kind and the mutator's status",
            ["kind", "status"],
            registry=self.registry,
        )
        self.actions = Counter(
            "console_control_actions",
            "Stop and start requests, by action and status",
            ["action", "status"],
            registry=self.registry,
        )


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    collector: Collector = app.state.collector
    stopping: asyncio.Event = app.state.stopping
    loop = asyncio.get_running_loop()
    undo = on_stop_signals(lambda: loop.call_soon_threadsafe(stopping.set))
    task = asyncio.create_task(collector.run())
    try:
        yield
    finally:
        undo()
        stopping.set()
        task.cancel()
        await collector.aclose()
        await app.state.client.aclose()


def create_app(
    settings: ConsoleSettings, transport: httpx.AsyncBaseTransport | None = None
) -> FastAPI:
    """The console's app; ``transport`` replaces the network (tests)."""
    client = httpx.AsyncClient(
        transport=transport,
        limits=httpx.Limits(max_connections=64, max_keepalive_connections=32),
        timeout=settings.console_backend_timeout_seconds,
    )
    control = control_for(settings, client)
    collector = Collector(settings, client, control)
    metrics = ConsoleMetrics()
    app = FastAPI(
        title="console",
        description="The live console: post mutations, watch both query sides converge, "
        "see who owns which partition, stop and start calculators.",
        lifespan=_lifespan,
    )
    app.state.client = client
    app.state.collector = collector
    app.state.settings = settings
    app.state.stopping = asyncio.Event()
    install_error_handlers(app)

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/api/state", summary="The state the page shows, once")
    async def state() -> JSONResponse:
        if collector.subscribers == 0:
            await collector.gather_once()
        return JSONResponse(collector.snapshot())

    @app.get("/api/stream", summary="The state, pushed as server-sent events")
    async def stream(request: Request) -> StreamingResponse:
        stopping: asyncio.Event = app.state.stopping

        async def events() -> AsyncIterator[str]:
            metrics.streams.inc()
            try:
                async with collector.subscribed():
                    yield "retry: 1000\n\n"
                    while not stopping.is_set():
                        yield f"event: state\ndata: {json.dumps(collector.snapshot())}\n\n"
                        with suppress(TimeoutError):
                            await asyncio.wait_for(
                                stopping.wait(), settings.console_interval_seconds
                            )
            finally:
                metrics.streams.dec()

        return StreamingResponse(
            events(),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    async def relay(request: Request, kind: str) -> Response:
        refused = _json_only(request)
        if refused is not None:
            return refused
        raw = await request.body()
        if len(raw) > MAX_BODY_BYTES:
            return error_response(413, "body_too_large", f"at most {MAX_BODY_BYTES} bytes")
        query = request.url.query
        url = f"{settings.console_mutator_url.rstrip('/')}/inventory/{kind}"
        outcome = await fetch(
            client,
            url + (f"?{query}" if query else ""),
            # A validated reservation may wait up to 30 s for its decision.
            35.0,
            method="POST",
            content=raw,
            headers={"Content-Type": "application/json"},
        )
        metrics.writes.labels(kind, str(outcome.status or "none")).inc()
        if outcome.status is None:
            return error_response(
                502,
                "backend_unavailable",
                f"inventory_mutator at {settings.console_mutator_url}: {outcome.error}",
            )
        try:
            sent = json.loads(raw)
        except ValueError:
            sent = None
        if isinstance(sent, dict) and outcome.status in (200, 202, 409):
            location, sku = sent.get("locationId"), sent.get("sku")
            if isinstance(location, str) and isinstance(sku, str):
                collector.watch(location, sku)
                validate = "validate=true" in query.lower()
                write = collector.record_write(
                    kind, location, sku, sent.get("count"), validate, outcome.status, outcome.body
                )
                headers = {"X-Console-Write": str(write.id)}
                return _passed_through(outcome.status, outcome.body, headers)
        return _passed_through(outcome.status, outcome.body)

    @app.post("/api/adjustment", summary="Relay an adjustment to the mutator")
    async def adjustment(request: Request) -> Response:
        return await relay(request, "adjustment")

    @app.post("/api/reservation", summary="Relay a reservation to the mutator")
    async def reservation(request: Request) -> Response:
        return await relay(request, "reservation")

    async def key_of(request: Request) -> tuple[str, str] | Response:
        refused = _json_only(request)
        if refused is not None:
            return refused
        try:
            body = json.loads(await request.body())
        except ValueError:
            return error_response(400, "malformed_json", "The request body is not valid JSON.")
        if not isinstance(body, dict):
            body = {}
        details = []
        for field in ("locationId", "sku"):
            problem = id_problem(body.get(field))
            if problem is not None:
                details.append({"field": field, "problem": problem})
        if details:
            message = "; ".join(f"{d['field']}: {d['problem']}" for d in details)
            return error_response(422, "invalid_request", message, details)
        return str(body["locationId"]), str(body["sku"])

    @app.post("/api/watch", summary="Watch a key on every side")
    async def watch(request: Request) -> Response:
        key = await key_of(request)
        if isinstance(key, Response):
            return key
        collector.watch(*key)
        return JSONResponse({"watched": [[k.location, k.sku] for k in collector.watched]})

    @app.post("/api/unwatch", summary="Stop watching a key")
    async def unwatch(request: Request) -> Response:
        key = await key_of(request)
        if isinstance(key, Response):
            return key
        if not collector.unwatch(*key):
            return error_response(404, "not_found", "that key is not watched")
        return JSONResponse({"watched": [[k.location, k.sku] for k in collector.watched]})

    @app.get("/api/control", summary="Whether calculators may be stopped here, and their state")
    async def control_state() -> JSONResponse:
        return JSONResponse(await control.status())

    @app.post("/api/control/{name}/{action}", summary="Stop or start a calculator instance")
    async def act(name: str, action: str, request: Request) -> Response:
        if action not in ("stop", "start"):
            return error_response(404, "not_found", f"no action {action!r}: stop or start")
        if not control.allowed:
            metrics.actions.labels(action, "403").inc()
            return error_response(403, "control_not_allowed", control.reason)
        refused = _json_only(request)
        if refused is not None:
            return refused
        signal_name = request.query_params.get("signal", "TERM").upper()
        if signal_name not in ("TERM", "KILL"):
            problem = "TERM or KILL"
            return error_response(
                422,
                "invalid_request",
                f"signal: {problem}",
                [{"field": "signal", "problem": problem}],
            )
        status, body = await collector.act(name, action, kill=signal_name == "KILL")
        metrics.actions.labels(action, str(status)).inc()
        return JSONResponse(body, status_code=status)

    results = settings.console_results_dir

    def runs() -> list[Path]:
        if not results.is_dir():
            return []
        found = [
            p.parent
            for p in results.glob("*/report.html")
            if RUN_NAME.match(p.parent.name) is not None
        ]
        return sorted(found, key=lambda p: p.name, reverse=True)

    @app.get("/api/compare", summary="The `make compare` reports found")
    async def compare_runs() -> JSONResponse:
        found = await asyncio.to_thread(runs)
        return JSONResponse(
            {
                "directory": str(results.resolve()),
                "runs": [{"name": r.name, "url": f"/compare/{r.name}/report.html"} for r in found],
            }
        )

    @app.get("/compare/latest", summary="The newest `make compare` report")
    async def latest_compare() -> Response:
        found = await asyncio.to_thread(runs)
        if not found:
            return error_response(
                404,
                "not_found",
                f"no make compare report in {results.resolve()} yet: run `make compare`",
            )
        return RedirectResponse(f"/compare/{found[0].name}/report.html", status_code=307)

    @app.get("/compare/{run}/report.html", summary="One `make compare` report")
    async def compare_report(run: str) -> Response:
        path = results / run / "report.html"
        if RUN_NAME.match(run) is None or not path.is_file():
            return error_response(404, "not_found", f"no report {run!r}")
        return FileResponse(path, media_type="text/html")

    async def readiness() -> dict[str, Any]:
        return {"watching": collector.subscribers, "control": control.mode}

    app.include_router(operations_router(readiness, metrics.registry))
    return app


def _json_only(request: Request) -> Response | None:
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type != "application/json":
        return error_response(
            415,
            "unsupported_media_type",
            "Content-Type must be application/json",
            [{"field": "Content-Type", "problem": "must be application/json"}],
        )
    return None


def _passed_through(status: int, body: Any, headers: dict[str, str] | None = None) -> Response:
    if isinstance(body, dict | list):
        return JSONResponse(body, status_code=status, headers=headers)
    return error_response(
        502 if status < 400 else status,
        "backend_error",
        describe_error(status, body),
        headers=headers,
    )
