"""The calculator's REST API: interactive queries over the local store, forwarded to the owner.

Example::

    app = create_app(runtime)      # runtime: store, progress, routing table, metrics
    uvicorn.run(app, port=9094)

A GET for (location, sku) computes the key's partition with the shared partitioner and
looks the owner up in the routing table. Owned here: answer from the local store.
Owned elsewhere: forward once, with a pooled aiohttp client, to the owner's advertised URL
and return its answer unchanged. ``X-Served-By`` names the instance that read its store;
``X-Forwarded-By`` is set when another instance relayed the request. A request that
already was forwarded is never forwarded again, so routing disagreements cannot loop.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal
from urllib.parse import quote

import aiohttp
import yarl
from fastapi import FastAPI, Query, Request
from fastapi.responses import Response
from pydantic import BaseModel, Field

from sellable_calculator.dataflow import INPUT_TOPICS
from sellable_calculator.health import DataflowHealth
from sellable_calculator.metrics import CalculatorMetrics
from sellable_calculator.progress import Progress
from sellable_calculator.routing import InstanceInfo, RoutingTable
from sellable_calculator.settings import CalculatorSettings
from sellable_calculator.store import SellableStore
from shared_schemas.http import (
    LocationPath,
    SkuPath,
    error_doc,
    error_response,
    install_error_handlers,
    invalid_id_response,
    operations_router,
)
from shared_schemas.ids import END
from shared_schemas.partitioner import key_and_partition, partition_for
from shared_schemas.positions import Position

MAX_PARTITION_DIGITS = 9
MAX_OFFSET_DIGITS = 19
FORWARDED_BY = "X-Forwarded-By"
SERVED_BY = "X-Served-By"


@dataclass
class CalculatorRuntime:
    """What the API shares with the dataflow of the same process."""

    settings: CalculatorSettings
    store: SellableStore
    progress: Progress
    routing: RoutingTable
    metrics: CalculatorMetrics
    dataflow_running: Callable[[], bool] = lambda: True
    end_offsets_at_start: dict[tuple[str, int], int] = field(default_factory=dict)
    """Input end offsets seen at start; the instance is ready once it has applied them."""
    health: DataflowHealth = field(default_factory=DataflowHealth)
    """Whether the dataflow can read its input, and which partitions still replay."""
    routing_following: Callable[[], bool] = lambda: True
    """Whether the routing table is still kept current (:attr:`RoutingFollower.following`)."""

    def owns(self, key: bytes) -> bool:
        """Whether this instance owns the partition of ``key`` (in every input topic)."""
        return partition_for(key, self.settings.topic_partitions) in self.routing.me.partitions


class SellableInventory(BaseModel):
    """The sellable count of one sku at one location (the original example's JSON)."""

    locationId: str = Field(examples=["STL"])
    sku: str = Field(examples=["123123"])
    count: int = Field(description="Sellable: on hand minus reserved.", examples=[90])


class LocationInventory(BaseModel):
    """Every sku of one location."""

    locationId: str = Field(examples=["STL"])
    skus: list[SellableInventory]
    instances: list[str] = Field(description="Instances whose stores were read.")


class InstanceView(BaseModel):
    """One calculator instance of the routing table."""

    instanceId: str = Field(examples=["calculator-0"])
    url: str = Field(examples=["http://127.0.0.1:9094"])
    partitions: list[int] = Field(examples=[[0, 2, 4]])
    self: bool = Field(description="Whether this is the instance that answered.")


class Metadata(BaseModel):
    """The routing table."""

    partitionCount: int
    instances: list[InstanceView]
    unownedPartitions: list[int]


class KeyMetadata(BaseModel):
    """Where one key lives."""

    locationId: str
    sku: str
    partition: int
    owner: InstanceView | None


POSITION_PATTERN = (
    rf"^(?:{'|'.join(INPUT_TOPICS)})"
    rf":[0-9]{{1,{MAX_PARTITION_DIGITS}}}:[0-9]{{1,{MAX_OFFSET_DIGITS}}}{END}"
)
"""A position a GET takes: ``topic:partition:offset`` of an input topic, ASCII digits
(ending with :data:`shared_schemas.ids.END`, not ``$``)."""
_POSITION = re.compile(POSITION_PATTERN)
POSITION_PROBLEM = (
    f"must be <topic>:<partition>:<offset> with the topic {' or '.join(INPUT_TOPICS)}, "
    f"the partition at most {MAX_PARTITION_DIGITS} and the offset at most "
    f"{MAX_OFFSET_DIGITS} ASCII digits"
)
_SECONDS = re.compile(r"(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?")
"""A ``timeout``: a non-negative JSON number (``float()`` alone would also read ``inf``,
``1_0`` or surrounding spaces)."""


def get_query_parameters(max_wait: float) -> list[dict[str, Any]]:
    """The OpenAPI declaration of the inventory GET's query (read by hand on the hot path)."""
    return [
        {
            "name": "position",
            "in": "query",
            "required": False,
            "schema": {"type": "array", "items": {"type": "string", "pattern": POSITION_PATTERN}},
            "style": "form",
            "explode": True,
            "description": "Read-your-writes: a position the mutator returned "
            "(`topic:partition:offset`, the topic an input topic); the answer includes that "
            "mutation and everything before it in the same topic partition. Repeat the "
            "parameter to include writes to both topics (an adjustment and a reservation). "
            "A position in another partition than the key's is answered 409.",
            "example": ["inventory_adjustments:2:41"],
        },
        {
            "name": "timeout",
            "in": "query",
            "required": False,
            "schema": {"type": "number", "exclusiveMinimum": 0, "maximum": max_wait},
            "description": "Seconds to wait for `position` (default "
            "CALCULATOR_WAIT_TIMEOUT_SECONDS; at most CALCULATOR_MAX_WAIT_SECONDS).",
        },
    ]


class NotCaughtUp(BaseModel):
    """The 504 of a read-your-writes GET: the position was not applied within the wait."""

    error: str = Field(examples=["not_caught_up"])
    message: str = Field(examples=["calculator-0 has not applied ... within 5 s"])
    position: str = Field(description="The position waited for.")
    reached: str | None = Field(
        description="The last position of that topic partition the owner has applied, if any."
    )


class KeyCount(BaseModel):
    """How many keys the instances hold."""

    count: int
    instances: dict[str, int] = Field(description="Keys per instance consulted.")


def _json(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    # Plain json.dumps: the hot GET path skips FastAPI's response-model machinery.
    return Response(json.dumps(body), status, headers, media_type="application/json")


def _raw_path(request: Request) -> str:
    """The request's path exactly as it arrived, still percent-encoded.

    What a forwarded request must carry: the decoded path would be decoded once more by
    the instance it goes to (``a%2520b`` would become ``a b`` instead of ``a%20b``), and an
    HTTP client would resolve the dot segments or percent-encode it differently.
    """
    raw: bytes | None = request.scope.get("raw_path")
    if raw is None:
        return quote(request.url.path)
    try:
        return raw.decode("ascii")
    except UnicodeDecodeError:  # raw bytes beyond ASCII: encode them, keep every escape
        return quote(raw, safe="/%!$&'()*+,;=:@~")


def _view(info: InstanceInfo, me: InstanceInfo) -> InstanceView:
    return InstanceView(
        instanceId=info.instance_id,
        url=info.url,
        partitions=list(info.partitions),
        self=info.instance_id == me.instance_id,
    )


def create_app(runtime: CalculatorRuntime) -> FastAPI:
    """The calculator's FastAPI application, serving ``runtime``'s store."""
    settings = runtime.settings
    me = runtime.routing.me
    owned = frozenset(me.partitions)
    # Bound once: label lookups are measurable on a path this hot.
    local_seconds = runtime.metrics.get_seconds.labels("local")
    forwarded_seconds = runtime.metrics.get_seconds.labels("forwarded")

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # Pooled clients for forwarding and fan-out. aiohttp rather than httpx: httpx's
        # connection pool degrades to a few hundred requests per second at 32 concurrent
        # requests (encode/httpx#3215), aiohttp keeps up with the server.
        # Pooled connections idle for half the owner's keep-alive timeout are dropped
        # (assuming it runs with the same settings), so none is reused just as the owner
        # closes it: that would be a 503 blaming a healthy owner.
        keepalive = settings.http_keep_alive_timeout_seconds / 2
        # Read-your-writes waits hold their connection for up to the whole wait, so they
        # get a pool of their own, as large as the most waits relayed at once: they never
        # queue for a connection, and ordinary reads never queue behind them.
        ordinary = aiohttp.TCPConnector(limit=200, limit_per_host=100, keepalive_timeout=keepalive)
        waits = aiohttp.TCPConnector(
            limit=settings.calculator_max_forwarded_waits,
            limit_per_host=0,
            keepalive_timeout=keepalive,
        )
        async with (
            aiohttp.ClientSession(connector=ordinary) as client,
            aiohttp.ClientSession(connector=waits) as wait_client,
        ):
            app.state.client, app.state.wait_client = client, wait_client
            yield

    app = FastAPI(
        title="sellable_calculator",
        description="Sellable inventory from a Bytewax dataflow's local store, "
        "with requests for keys owned elsewhere forwarded to their owner.",
        lifespan=lifespan,
    )
    install_error_handlers(app)

    async def ready() -> dict[str, Any]:
        behind = {
            f"{topic}:{partition}": end - runtime.progress.reached(topic, partition)
            for (topic, partition), end in runtime.end_offsets_at_start.items()
            if runtime.progress.reached(topic, partition) < end
        }
        running = runtime.dataflow_running()
        input_problems = runtime.health.problems()
        replaying = runtime.health.replaying()
        routing = runtime.routing_following()
        return {
            "ready": running and routing and not behind and not input_problems and not replaying,
            "instance": me.instance_id,
            "dataflowRunning": running,
            "routingFollowing": routing,
            "behind": behind,
            "inputProblems": input_problems,
            "replaying": replaying,
        }

    async def forward(
        request: Request, owner: InstanceInfo, timeout: float, client: aiohttp.ClientSession
    ) -> Response:
        # Only the path and query go to the owner's advertised URL: never a host taken
        # from the request.
        query = request.scope["query_string"]
        url = owner.url + _raw_path(request) + (f"?{query.decode()}" if query else "")
        try:
            async with client.get(
                yarl.URL(url, encoded=True),
                headers={FORWARDED_BY: me.instance_id},
                timeout=aiohttp.ClientTimeout(total=timeout),
            ) as answer:
                content = await answer.read()
        except (aiohttp.ClientError, TimeoutError) as exc:
            return error_response(
                503,
                "owner_unavailable",
                f"{owner.instance_id} at {owner.url} owns this key but did not answer: "
                f"{type(exc).__name__}",
                headers={FORWARDED_BY: me.instance_id},
            )
        headers = {FORWARDED_BY: me.instance_id}
        if SERVED_BY in answer.headers:
            headers[SERVED_BY] = answer.headers[SERVED_BY]
        return Response(
            content, answer.status, headers, media_type=answer.headers.get("Content-Type")
        )

    @app.get(
        "/inventory/locations/{location}/skus/{sku}",
        response_model=SellableInventory,
        summary="Sellable inventory of one sku at one location",
        responses={
            404: error_doc("No adjustment for this key yet"),
            409: error_doc(
                "A `position` in another partition than the key's (`position_elsewhere`): "
                "which partition a key lives in depends on the deployment's partition count"
            ),
            422: error_doc("An id breaks the id rule, or a bad `position` or `timeout`"),
            503: error_doc(
                "The owning instance is unknown (`owner_unknown`), unreachable "
                "(`owner_unavailable`) or does not own the key after all (`not_owner`), or "
                "too many read-your-writes waits are being relayed already "
                "(`too_many_waits`, with `Retry-After`)"
            ),
            504: {
                "model": NotCaughtUp,
                "description": "The owner did not apply `position` within the wait "
                "(`not_caught_up`)",
            },
        },
        # The query parameters are read by hand (the hot path skips FastAPI's parameter
        # machinery); they are declared here so /docs still shows them.
        openapi_extra={"parameters": get_query_parameters(settings.calculator_max_wait_seconds)},
    )
    async def get_sellable(location: LocationPath, sku: SkuPath, request: Request) -> Response:
        started = time.perf_counter()
        invalid = invalid_id_response(location, sku)
        if invalid is not None:
            return invalid
        key, partition = key_and_partition(location, sku, settings.topic_partitions)
        position: list[str] = []
        timeout: float | None = None
        if request.scope["query_string"]:
            query = request.query_params
            position = query.getlist("position")
            if "timeout" in query:
                text = query["timeout"]
                if _SECONDS.fullmatch(text):
                    timeout = float(text)
                if timeout is None or not 0 < timeout <= settings.calculator_max_wait_seconds:
                    problem = (
                        "must be a number of seconds greater than 0 and at most "
                        f"{settings.calculator_max_wait_seconds:g}"
                    )
                    return error_response(
                        422,
                        "invalid_request",
                        f"timeout: {problem}",
                        [{"field": "timeout", "problem": problem}],
                    )
        wait = min(
            timeout or settings.calculator_wait_timeout_seconds,
            settings.calculator_max_wait_seconds,
        )
        targets: list[Position] = []
        for text in position:
            if not _POSITION.match(text):
                return error_response(
                    422,
                    "invalid_request",
                    f"position: {POSITION_PROBLEM}, not {text!r}",
                    [{"field": "position", "problem": POSITION_PROBLEM}],
                )
            topic, partition_text, offset_text = text.rsplit(":", 2)
            target = Position(topic, int(partition_text), int(offset_text))
            if target.partition != partition:
                # 409, not 422: the position is well formed; which partition a key lives in
                # depends on the deployment (TOPIC_PARTITIONS), not on the request.
                problem = (
                    f"{location}/{sku} lives in partition {partition}, "
                    f"the position is in partition {target.partition}"
                )
                return error_response(
                    409,
                    "position_elsewhere",
                    f"position: {problem}",
                    [{"field": "position", "problem": problem}],
                )
            targets.append(target)

        if partition not in owned:
            if FORWARDED_BY in request.headers:
                return error_response(
                    503,
                    "not_owner",
                    f"{me.instance_id} does not own partition {partition} "
                    f"(forwarded by {request.headers[FORWARDED_BY]}); routing tables disagree",
                )
            owner = runtime.routing.owner(partition)
            if owner is None:
                return error_response(
                    503,
                    "owner_unknown",
                    f"no calculator instance has advertised partition {partition}",
                )
            if targets:
                response = await forward_wait(request, owner, wait)
            else:
                response = await forward(
                    request,
                    owner,
                    settings.calculator_forward_timeout_seconds,
                    request.app.state.client,
                )
            forwarded_seconds.observe(time.perf_counter() - started)
            return response

        deadline = time.monotonic() + wait
        for target in targets:
            reached = await runtime.progress.wait_for(
                target.topic, target.partition, target.offset, deadline - time.monotonic()
            )
            if not reached:
                applied = runtime.progress.reached(target.topic, target.partition)
                return _json(
                    {
                        "error": "not_caught_up",
                        "message": f"{me.instance_id} has not applied {target} within {wait:g} s",
                        "position": str(target),
                        "reached": str(Position(target.topic, target.partition, applied - 1))
                        if applied
                        else None,
                    },
                    504,
                    {SERVED_BY: me.instance_id},
                )
        value = runtime.store.get(key)
        local_seconds.observe(time.perf_counter() - started)
        if value is None:
            return error_response(
                404,
                "not_found",
                f"no sellable inventory for location {location!r}, sku {sku!r}",
                headers={SERVED_BY: me.instance_id},
            )
        return _json(
            {"locationId": location, "sku": sku, "count": value.count},
            headers={SERVED_BY: me.instance_id},
        )

    forwarded_waits = 0  # read-your-writes waits being relayed to owners right now
    runtime.metrics.forwarded_waits.set_function(lambda: forwarded_waits)
    waits_refused = runtime.metrics.forwarded_waits_refused

    async def forward_wait(request: Request, owner: InstanceInfo, wait: float) -> Response:
        """Relay a read-your-writes GET, unless ``CALCULATOR_MAX_FORWARDED_WAITS`` are
        already being relayed: then 503 ``too_many_waits`` with ``Retry-After`` at once,
        rather than queueing for a connection and answering as if the owner had failed.

        The budget is the wait plus the ordinary forwarding timeout, so an owner that
        answers 504 at the end of the wait has its 504 passed through.
        """
        nonlocal forwarded_waits
        limit = settings.calculator_max_forwarded_waits
        if forwarded_waits >= limit:
            waits_refused.inc()
            return error_response(
                503,
                "too_many_waits",
                f"{me.instance_id} is already relaying {limit} read-your-writes waits; "
                f"retry shortly, or ask {owner.instance_id} at {owner.url} directly",
                headers={"Retry-After": "1", FORWARDED_BY: me.instance_id},
            )
        forwarded_waits += 1
        try:
            budget = settings.calculator_forward_timeout_seconds + wait
            return await forward(request, owner, budget, request.app.state.wait_client)
        finally:
            forwarded_waits -= 1

    async def fan_out(request: Request) -> list[tuple[InstanceInfo, Any]]:
        """GET this request's path with ``?scope=local`` from every other instance.

        Raises :class:`InstanceUnavailable` for the first that fails: a partial answer
        would look complete to the client.
        """
        client: aiohttp.ClientSession = request.app.state.client
        others = [i for i in runtime.routing.instances() if i.instance_id != me.instance_id]
        path = _raw_path(request)
        timeout = aiohttp.ClientTimeout(total=settings.calculator_forward_timeout_seconds)

        async def one(info: InstanceInfo) -> tuple[InstanceInfo, Any]:
            try:
                async with client.get(
                    yarl.URL(f"{info.url}{path}?scope=local", encoded=True),
                    headers={FORWARDED_BY: me.instance_id},
                    timeout=timeout,
                    raise_for_status=True,
                ) as answer:
                    return info, await answer.json()
            except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
                raise InstanceUnavailable(info, exc) from exc

        return list(await asyncio.gather(*(one(i) for i in others)))

    @app.get(
        "/inventory/locations/{location}/skus",
        response_model=LocationInventory,
        summary="Every sku of a location, from every instance",
        responses={
            422: error_doc("The location breaks the id rule, or a bad scope"),
            503: error_doc("Another instance did not answer (`instance_unavailable`)"),
        },
    )
    async def list_location(
        location: LocationPath,
        request: Request,
        scope: Annotated[
            Literal["all", "local"], Query(description="`local`: this store only.")
        ] = "all",
    ) -> Response:
        invalid = invalid_id_response(location)
        if invalid is not None:
            return invalid
        local = [
            {"locationId": location, "sku": sku, "count": value.count}
            for sku, value in await asyncio.to_thread(
                lambda: list(runtime.store.location(location, runtime.owns))
            )
        ]
        skus, consulted = local, [me.instance_id]
        if scope == "all":
            try:
                for info, body in await fan_out(request):
                    skus.extend(body["skus"])
                    consulted.append(info.instance_id)
            except InstanceUnavailable as exc:
                return error_response(503, "instance_unavailable", str(exc))
        skus.sort(key=lambda item: item["sku"])
        return _json({"locationId": location, "skus": skus, "instances": consulted})

    @app.get(
        "/inventory/count",
        response_model=KeyCount,
        summary="How many keys the instances hold",
        responses={
            422: error_doc("A bad scope"),
            503: error_doc("Another instance did not answer (`instance_unavailable`)"),
        },
    )
    async def count(
        request: Request,
        scope: Annotated[
            Literal["all", "local"], Query(description="`local`: this store only.")
        ] = "all",
    ) -> Response:
        counts = {me.instance_id: await asyncio.to_thread(runtime.store.count, runtime.owns)}
        if scope == "all":
            try:
                for info, body in await fan_out(request):
                    counts[info.instance_id] = body["count"]
            except InstanceUnavailable as exc:
                return error_response(503, "instance_unavailable", str(exc))
        return _json({"count": sum(counts.values()), "instances": counts})

    @app.get("/metadata", response_model=Metadata, summary="The routing table")
    async def metadata() -> Metadata:
        return Metadata(
            partitionCount=settings.topic_partitions,
            instances=[_view(i, me) for i in runtime.routing.instances()],
            unownedPartitions=[
                p for p in range(settings.topic_partitions) if runtime.routing.owner(p) is None
            ],
        )

    @app.get(
        "/metadata/locations/{location}/skus/{sku}",
        response_model=KeyMetadata,
        summary="Which partition and instance own one key",
        responses={422: error_doc("An id breaks the id rule")},
    )
    async def key_metadata(location: LocationPath, sku: SkuPath) -> KeyMetadata | Response:
        invalid = invalid_id_response(location, sku)
        if invalid is not None:
            return invalid
        _, partition = key_and_partition(location, sku, settings.topic_partitions)
        owner = runtime.routing.owner(partition)
        return KeyMetadata(
            locationId=location,
            sku=sku,
            partition=partition,
            owner=None if owner is None else _view(owner, me),
        )

    # Last: routes are tried in order, and the inventory GET is the hot one.
    app.include_router(operations_router(ready, runtime.metrics.registry))
    return app


class InstanceUnavailable(Exception):
    """An instance did not answer a fan-out request."""

    def __init__(self, info: InstanceInfo, exc: Exception) -> None:
        super().__init__(f"{info.instance_id} at {info.url} did not answer: {type(exc).__name__}")
