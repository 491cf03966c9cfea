"""Serves sellable inventory from the calculator's stores: one key's count, a location's
skus, how many keys there are, and the routing table that says which instance owns what.

The GET of one key is an interactive query, as in Kafka Streams' ``MusicPlaysRestService``:
find the owner of the key; not this instance, forward to it; else read the local store.
It is the hot path and skips FastAPI where that costs (the query read by hand, the JSON
written directly). The GETs over many keys read this store and ask every other instance
for theirs. A handler's docstring is its operation's description in the OpenAPI
document (FastAPI publishes it), so it speaks to clients.

Example::

    add_sellable_route(app.router, settings.calculator_max_wait_seconds)
    app.include_router(router)
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, Request
from fastapi.responses import Response
from pydantic import BaseModel, Field

from sellable_calculator.changelog import INPUT_TOPICS
from sellable_calculator.forwarding import (
    ANSWERED_BY,
    BEHIND,
    FORWARDED_BY,
    REFLECTS,
    REPLICA,
    SERVED_BY,
    STALE_REASON,
    STANDBY_LAG,
    ask_owner,
    ask_standby,
    fan_out,
    find_owner,
    forwarding_of,
    moved_away,
)
from sellable_calculator.read_your_writes import (
    first_not_applied,
    get_query_parameters,
    read_your_writes_query,
)
from sellable_calculator.routing import InstanceInfo, RoutingTable
from sellable_calculator.runtime import CalculatorRuntime, runtime_of
from sellable_calculator.store import Sellable
from service_runtime.http import (
    LocationPath,
    MutationIdPath,
    SkuPath,
    error_doc,
    error_response,
    invalid_id_response,
    invalid_mutation_id_response,
    key_path_parameters,
    reservation_not_found,
)
from shared_schemas.partitioner import key_and_partition
from shared_schemas.positions import Position
from shared_schemas.reservations import ReservationAnswer
from shared_schemas.responses import SellableInventory


class LocationInventory(BaseModel):
    """Every sku of one location."""

    locationId: str = Field(examples=["STL"])
    skus: list[SellableInventory]
    instances: list[str] = Field(description="Instances whose stores were read.")


class InstanceView(BaseModel):
    """One calculator instance of the routing table."""

    instanceId: str = Field(examples=["calculator-9094"])
    url: str = Field(examples=["http://127.0.0.1:9094"])
    partitions: list[int] = Field(
        examples=[[0, 1, 2]],
        description="The partitions it owns: assigned to it, and no newer assignment elsewhere.",
    )
    restoring: list[int] = Field(
        examples=[[]], description="Owned partitions whose state it is still restoring."
    )
    generation: int = Field(description="When it got its assignment (epoch ms).")
    standby: list[int] = Field(
        examples=[[3, 4, 5]], description="Partitions it keeps warm as a standby replica."
    )
    self: bool = Field(description="Whether this is the instance that answered.")


class StandbyHolder(BaseModel):
    """One standby replica of a partition."""

    instanceId: str
    lag: int = Field(
        description="Changelog records it had not applied: now for the instance that "
        "answered, as last advertised (every few seconds at most) for the others."
    )


class PartitionView(BaseModel):
    """Who owns one partition, and in what state."""

    partition: int
    owner: str | None = Field(description="Instance id; null while nobody owns it.")
    state: Literal["active", "restoring", "unowned"]
    standbys: list[StandbyHolder] = Field(
        description="Instances that keep it warm and answer for it while the owner cannot."
    )


class Metadata(BaseModel):
    """The routing table."""

    partitionCount: int
    instances: list[InstanceView] = Field(
        description="Every instance that owns a partition, and this one."
    )
    partitions: list[PartitionView]
    unownedPartitions: list[int]


class KeyMetadata(BaseModel):
    """Where one key lives."""

    locationId: str
    sku: str
    partition: int
    state: Literal["active", "restoring", "unowned"]
    owner: InstanceView | None


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


Scope = Annotated[Literal["all", "local"], Query(description="`local`: this store only.")]
"""Whether a GET over many keys asks every instance (``all``) or this store only."""


def _json(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    # Plain json.dumps: the hot GET path skips FastAPI's response-model machinery.
    return Response(json.dumps(body), status, headers, media_type="application/json")


def _view(info: InstanceInfo, routing: RoutingTable) -> InstanceView:
    owned = routing.owned_by(info.instance_id)
    return InstanceView(
        instanceId=info.instance_id,
        url=info.url,
        partitions=owned,
        restoring=[p for p in owned if info.is_restoring(p)],
        generation=info.generation,
        standby=list(info.standby),
        self=info.instance_id == routing.me.instance_id,
    )


def _standbys(runtime: CalculatorRuntime, partition: int) -> list[StandbyHolder]:
    """The standby replicas of ``partition``: this instance's live lag, the others' as
    advertised."""
    routing = runtime.routing
    holders = [
        StandbyHolder(instanceId=info.instance_id, lag=dict(info.standby_lag).get(partition, 0))
        for info in routing.standby_holders(partition)
    ]
    mine = {} if runtime.standby is None else runtime.standby.lags()
    if partition in mine:
        holders.insert(0, StandbyHolder(instanceId=routing.me.instance_id, lag=mine[partition]))
    return holders


def _state(owner: InstanceInfo | None, partition: int) -> Literal["active", "restoring", "unowned"]:
    if owner is None:
        return "unowned"
    return "restoring" if owner.is_restoring(partition) else "active"


def _header(description: str) -> dict[str, Any]:
    return {"description": description, "schema": {"type": "string"}}


def add_sellable_route(app_router: APIRouter, max_wait: float) -> None:
    """Add the GET of one key's sellable count (:func:`get_sellable`) to ``app_router``,
    its ``timeout`` documented with the instance's ``max_wait`` as maximum.

    To the app's own router (``app.router``), not through ``include_router``: FastAPI
    (0.165) matches a request to an included router's route through a wrapper, some 90
    Python calls more per request, on the hottest path.
    """
    app_router.get(
        "/inventory/locations/{location}/skus/{sku}",
        response_model=SellableInventory,
        summary="Sellable inventory of one sku at one location",
        responses={
            200: {
                "description": "The key's sellable count: the owner's, or, while the owner "
                "is unavailable and neither `fresh=true` nor `position` was given, a standby "
                "replica's (a value that was true a moment ago), marked by these headers",
                "headers": {
                    REPLICA: _header("`standby`: a standby replica answered, not the owner"),
                    STALE_REASON: _header(
                        "Why not the owner: `owner_unavailable`, `owner_unknown` or "
                        "`partition_restoring`"
                    ),
                    STANDBY_LAG: _header(
                        "Changelog records of the key's partition the standby had not applied"
                    ),
                    REFLECTS: _header(
                        "The last position of each input topic the value includes, "
                        "comma-separated `topic:partition:offset`"
                    ),
                    SERVED_BY: _header("The instance whose store answered"),
                    BEHIND: _header(
                        "On the owner's answer right after it took the partition over: input "
                        "records written before then it has not applied yet (catching up)"
                    ),
                },
            },
            404: error_doc(
                "No adjustment for this key yet (from a standby replica: none it had seen; "
                "the same headers as a standby's 200)"
            ),
            409: error_doc(
                "A `position` in another partition than the key's (`position_elsewhere`): "
                "which partition a key lives in depends on the deployment's partition count"
            ),
            422: error_doc("An id breaks the id rule, or a bad `position` or `timeout`"),
            503: error_doc(
                "The key's partition is moving and no standby replica could answer (or "
                "`fresh=true`, or `position`), with `Retry-After`: no instance owns it "
                "(`owner_unknown`), its owner is unreachable (`owner_unavailable`), still "
                "restores it (`partition_restoring`), no longer owns it (`not_owner`), or "
                "it moved while a read-your-writes GET waited (`partition_moved`); or "
                "too many read-your-writes waits are being relayed already "
                "(`too_many_waits`, with `Retry-After`)"
            ),
            504: {
                "model": NotCaughtUp,
                "description": "The owner did not apply `position` within the wait "
                "(`not_caught_up`)",
            },
        },
        # The path and query parameters are read by hand (the hot path skips FastAPI's
        # parameter machinery); they are declared here so /docs still shows them.
        openapi_extra={"parameters": key_path_parameters() + get_query_parameters(max_wait)},
    )(get_sellable)


async def get_sellable(request: Request) -> Response:
    """One key's sellable count, from the store of the instance that owns the key: this
    one, or the owner it forwards the request to. With `position`, answered once that
    store has applied it."""
    started = time.perf_counter()
    location, sku = request.path_params["location"], request.path_params["sku"]
    invalid = invalid_id_response(location, sku)
    if invalid is not None:
        return invalid
    runtime = runtime_of(request)
    key, partition = key_and_partition(location, sku, runtime.settings.topic_partitions)
    asked = read_your_writes_query(request, runtime.settings, location, sku, partition)
    if isinstance(asked, Response):
        return asked
    if partition not in runtime.owned:  # not mine: the owner answers
        owner = find_owner(request, runtime, partition)
        unavailable: Response
        if isinstance(owner, Response):
            unavailable = owner
        else:
            answer = await ask_owner(request, owner, asked)
            if answer.status_code != 503 or not asked.standby_allowed:
                runtime.metrics.forwarded_get_seconds.observe(time.perf_counter() - started)
                return answer
            unavailable = answer
        if not asked.standby_allowed:
            return unavailable
        return await standby_answer(request, runtime, (location, sku, key, partition), unavailable)
    # Mine: read the local store, once it has applied what the client wrote.
    missed = await first_not_applied(runtime.progress, asked) if asked.positions else None
    if missed is not None:
        if partition not in runtime.owned:  # it moved away while the request waited
            return moved_away(runtime, partition)
        return not_caught_up(runtime, missed, asked.wait)
    value = runtime.store.get(key)
    runtime.metrics.local_get_seconds.observe(time.perf_counter() - started)
    if partition in runtime.catching_up and (behind := runtime.behind(partition)):
        # Just assigned, and still applying what was written while nobody ran it.
        return sellable_answer(runtime.routing.me, location, sku, value, {BEHIND: str(behind)})
    return sellable_answer(runtime.routing.me, location, sku, value)


def _error_code(answer: Response) -> str:
    """The ``error`` of a JSON error answer (``owner_unavailable`` if it has none)."""
    try:
        code = json.loads(bytes(answer.body)).get("error")
    except (ValueError, AttributeError):
        code = None
    return code if isinstance(code, str) else "owner_unavailable"


def _why_not_owner(runtime: CalculatorRuntime, partition: int) -> str:
    """Why a request another instance relayed here (to a standby, or to what its table
    said was the owner) is not answered by the owner, as this instance's table sees it."""
    owner = runtime.routing.owner(partition)
    if owner is None:
        return "owner_unknown"
    return "partition_restoring" if owner.is_restoring(partition) else "owner_unavailable"


async def standby_answer(
    request: Request,
    runtime: CalculatorRuntime,
    key_of: tuple[str, str, bytes, int],
    unavailable: Response,
) -> Response:
    """The answer of a standby replica of the key's partition (this instance, or the
    least-behind other one), marked stale; ``unavailable`` (the owner's 503) when no
    standby can answer."""
    partition = key_of[3]
    reason = _error_code(unavailable)
    if reason == "not_owner":
        reason = _why_not_owner(runtime, partition)
    view = None if runtime.standby is None else runtime.standby.view(partition)
    if view is not None:
        runtime.metrics.stale_answers.labels(reason).inc()
        return _stale_answer(runtime, key_of, view.lag, reason)
    if FORWARDED_BY in request.headers:
        return unavailable  # relayed once already: never again
    answer = await ask_standby(request, partition)
    return unavailable if answer is None else answer


def _stale_answer(
    runtime: CalculatorRuntime, key_of: tuple[str, str, bytes, int], lag: int, reason: str
) -> Response:
    """This instance's standby value of a key, with the headers that say what it is."""
    location, sku, key, partition = key_of
    state = runtime.store.state(key)
    reflects = []
    if state is not None:
        for topic, position in zip(
            INPUT_TOPICS, (state.adjustments_position, state.reservations_position), strict=True
        ):
            if position > 0:
                reflects.append(str(Position(topic, partition, position - 1)))
    headers = {
        SERVED_BY: runtime.routing.me.instance_id,
        REPLICA: "standby",
        STANDBY_LAG: str(lag),
        STALE_REASON: reason,
        REFLECTS: ",".join(reflects),
    }
    if state is None or not state.exists:
        return error_response(
            404,
            "not_found",
            f"no sellable inventory for location {location!r}, sku {sku!r} on the standby "
            f"replica {runtime.routing.me.instance_id}",
            headers=headers,
        )
    return _json(
        {"locationId": location, "sku": sku, "count": state.on_hand - state.reserved}, 200, headers
    )


def sellable_answer(
    me: InstanceInfo,
    location: str,
    sku: str,
    value: Sellable | None,
    headers: dict[str, str] | None = None,
) -> Response:
    """200 with the count this store holds for the key, or 404 when it holds none (with
    ``headers`` besides ``X-Served-By``)."""
    headers = {SERVED_BY: me.instance_id, **(headers or {})}
    if value is None:
        return error_response(
            404,
            "not_found",
            f"no sellable inventory for location {location!r}, sku {sku!r}",
            headers=headers,
        )
    return _json({"locationId": location, "sku": sku, "count": value.count}, headers=headers)


def not_caught_up(runtime: CalculatorRuntime, position: Position, wait: float) -> Response:
    """504: this store had not applied ``position`` within ``wait`` seconds."""
    me = runtime.routing.me
    applied = runtime.progress.reached(position.topic, position.partition)
    reached = Position(position.topic, position.partition, applied - 1) if applied else None
    return _json(
        {
            "error": "not_caught_up",
            "message": f"{me.instance_id} has not applied {position} within {wait:g} s",
            "position": str(position),
            "reached": None if reached is None else str(reached),
        },
        504,
        {SERVED_BY: me.instance_id},
    )


router = APIRouter()
"""Every route but :func:`add_sellable_route`'s: those over many keys, and the routing table."""
INSTANCE_UNAVAILABLE = error_doc("Another instance did not answer (`instance_unavailable`)")
"""The 503 of a GET that asks every instance (:func:`fan_out`)."""


def _fan_out_answers(bad_request: str) -> dict[int | str, dict[str, Any]]:
    """The documented errors of a GET that asks every instance."""
    return {422: error_doc(bad_request), 503: INSTANCE_UNAVAILABLE}


@router.get(
    "/inventory/locations/{location}/skus",
    response_model=LocationInventory,
    summary="Every sku of a location, from every instance",
    responses=_fan_out_answers("The location breaks the id rule, or a bad scope"),
)
async def list_location(location: LocationPath, request: Request, scope: Scope = "all") -> Response:
    """Every sku of the location with its sellable count: from this instance's store
    and, unless `scope` is `local`, from every other instance's."""
    invalid = invalid_id_response(location)
    if invalid is not None:
        return invalid
    runtime = runtime_of(request)
    # A scan over RocksDB: off the event loop, so that it does not hold up other requests.
    local = await asyncio.to_thread(lambda: list(runtime.store.location(location, runtime.owns)))
    skus = [{"locationId": location, "sku": sku, "count": value.count} for sku, value in local]
    consulted = [runtime.routing.me.instance_id]
    if scope == "all":
        answers = await fan_out(request)
        if isinstance(answers, Response):
            return answers
        for info, body in answers:
            skus.extend(body["skus"])
            consulted.append(info.instance_id)
    skus.sort(key=lambda item: str(item["sku"]))
    return _json({"locationId": location, "skus": skus, "instances": consulted})


@router.get(
    "/inventory/count",
    response_model=KeyCount,
    summary="How many keys the instances hold",
    responses=_fan_out_answers("A bad scope"),
)
async def count(request: Request, scope: Scope = "all") -> Response:
    """How many keys this instance's store holds and, unless `scope` is `local`, every
    other instance's: per instance and in total."""
    runtime = runtime_of(request)
    counts = {
        runtime.routing.me.instance_id: await asyncio.to_thread(runtime.store.count, runtime.owns)
    }
    if scope == "all":
        answers = await fan_out(request)
        if isinstance(answers, Response):
            return answers
        for info, body in answers:
            counts[info.instance_id] = body["count"]
    return _json({"count": sum(counts.values()), "instances": counts})


@router.get(
    "/inventory/reservations/{mutationId}",
    response_model=ReservationAnswer,
    summary="The decision on a validated reservation",
    responses={
        200: {
            "description": "The decision; or PENDING, as the mutator that accepted the "
            "reservation answers while nobody has decided it (marked by the header)",
            "headers": {
                ANSWERED_BY: _header(
                    "`inventory_mutator`: this instance knew no decision and relayed the "
                    "mutator's answer"
                )
            },
        },
        404: error_doc(
            "No decision on this mutation id is known here, and the mutator does not know "
            "it either, or did not answer (`not_found`)"
        ),
        422: error_doc("`mutationId` is not a UUID (`invalid_request`)"),
    },
)
async def reservation(mutationId: MutationIdPath, request: Request) -> Response:
    """The decision on the validated reservation `mutationId`: CONFIRMED or FAILED, the
    units it asked for and the sellable units it was decided against. Every instance
    answers every id: each one indexes every decision published to `reservation_results`.
    One nobody has decided yet (its key's owner is down or moving) is known only to the
    mutator that accepted it: its PENDING is relayed."""
    invalid = invalid_mutation_id_response(mutationId)
    if invalid is not None:
        return invalid
    runtime = runtime_of(request)
    result = runtime.store.reservation(mutationId)
    if result is not None:
        return _json(result.answer())
    # Not decided, as far as this instance knows: only the mutator that wrote it knows
    # a reservation nobody has decided yet (PENDING). Asked once, briefly.
    mutator = runtime.settings.calculator_mutator_url
    if mutator:
        try:
            answer = await forwarding_of(request).client.get(
                mutator,
                f"/inventory/reservations/{mutationId}".encode(),
                runtime.routing.me.instance_id,
                runtime.settings.calculator_forward_timeout_seconds,
            )
        except (OSError, TimeoutError):
            answer = None
        if answer is not None and answer.status == 200:
            return Response(
                answer.body,
                media_type="application/json",
                headers={ANSWERED_BY: "inventory_mutator"},
            )
    return reservation_not_found(
        mutationId, "unknown, or not decided yet and unknown to the mutator (or it did not answer)"
    )


@router.get("/metadata", response_model=Metadata, summary="The routing table")
async def metadata(request: Request) -> Metadata:
    """Every instance that owns partitions (and this one); each partition's owner, its
    state (`restoring` while its new owner restores it) and its standby replicas with
    their lag; and the partitions nobody owns."""
    runtime = runtime_of(request)
    routing, partitions = runtime.routing, runtime.settings.topic_partitions
    owners = {p: routing.owner(p) for p in range(partitions)}
    standbys = {p: _standbys(runtime, p) for p in range(partitions)}
    listed = {i.instance_id: i for i in routing.owning_instances()}
    listed.setdefault(routing.me.instance_id, routing.me)
    return Metadata(
        partitionCount=partitions,
        instances=[_view(i, routing) for _, i in sorted(listed.items())],
        partitions=[
            PartitionView(
                partition=p,
                owner=None if owner is None else owner.instance_id,
                state=_state(owner, p),
                standbys=standbys[p],
            )
            for p, owner in owners.items()
        ],
        unownedPartitions=[p for p, owner in owners.items() if owner is None],
    )


@router.get(
    "/metadata/locations/{location}/skus/{sku}",
    response_model=KeyMetadata,
    summary="Which partition and instance own one key",
    responses={422: error_doc("An id breaks the id rule")},
)
async def key_metadata(
    location: LocationPath, sku: SkuPath, request: Request
) -> KeyMetadata | Response:
    """The key's partition, the instance that owns it (`null` while nobody does) and the
    partition's state there."""
    invalid = invalid_id_response(location, sku)
    if invalid is not None:
        return invalid
    runtime = runtime_of(request)
    _, partition = key_and_partition(location, sku, runtime.settings.topic_partitions)
    owner = runtime.routing.owner(partition)
    return KeyMetadata(
        locationId=location,
        sku=sku,
        partition=partition,
        state=_state(owner, partition),
        owner=None if owner is None else _view(owner, runtime.routing),
    )
