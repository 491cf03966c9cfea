"""Forwarding: a GET for a key another instance owns is answered by that owner, and a GET
for every instance's keys fans out to all of them.

A forwarded GET goes once, with a pooled client (:mod:`sellable_calculator.owner_client`),
to the owner's advertised URL,
and its answer comes back unchanged. ``X-Served-By`` names the instance that read its
store; ``X-Forwarded-By`` is set when another instance relayed the request. A request
that already was forwarded is never forwarded again, so routing disagreements cannot
loop. Only the path and query go to an instance's advertised URL: never a host taken
from the request.

Example (in a handler)::

    owner = find_owner(request, runtime, partition)     # or the 503 to answer
    answer = await ask_owner(request, owner, asked)
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from sellable_calculator.owner_client import OwnerAnswer, OwnerClient
from sellable_calculator.read_your_writes import ReadYourWrites
from sellable_calculator.routing import InstanceInfo
from sellable_calculator.runtime import CalculatorRuntime, runtime_of
from sellable_calculator.settings import CalculatorSettings
from service_runtime.http import error_response

FORWARDED_BY = "X-Forwarded-By"
SERVED_BY = "X-Served-By"
ANSWERED_BY = "X-Answered-By"
"""On a reservation's status relayed from another service (the mutator)."""
REPLICA = "X-Replica"
"""``standby`` on an answer a standby replica gave while the key's owner could not."""


@dataclass
class Forwarding:
    """The pooled clients one app forwards with, and the waits it is relaying right now."""

    client: OwnerClient
    """Ordinary forwarded reads and fan-out."""
    wait_client: OwnerClient
    """Relayed read-your-writes waits (a pool of their own: :func:`open_forwarding`)."""
    waits: int = 0
    """Read-your-writes waits being relayed to owners right now."""
    silent_until: dict[str, float] = field(default_factory=dict)
    """Instance id -> until when (monotonic) it is taken as unreachable: a forward to it
    failed just now. GETs a standby may answer skip it meanwhile, rather than each
    waiting out the forward timeout on a frozen owner."""

    def silent(self, instance_id: str) -> bool:
        """Whether a forward to ``instance_id`` failed less than :data:`SILENT_SECONDS` ago."""
        until = self.silent_until.get(instance_id)
        return until is not None and time.monotonic() < until


@asynccontextmanager
async def open_forwarding(settings: CalculatorSettings) -> AsyncIterator[Forwarding]:
    """The pooled clients for forwarding and fan-out, closed on leaving."""
    # Pooled connections idle for half the owner's keep-alive timeout are dropped
    # (assuming it runs with the same settings), so none is reused just as the owner
    # closes it: that would be a 503 blaming a healthy owner.
    idle_timeout = settings.http_keep_alive_timeout_seconds / 2
    # Read-your-writes waits hold their connection for up to the whole wait, so they
    # get a pool of their own, as large as the most waits relayed at once: they never
    # queue for a connection, and ordinary reads never queue behind them.
    client = OwnerClient(max_per_owner=100, idle_timeout=idle_timeout)
    wait_client = OwnerClient(settings.calculator_max_forwarded_waits, idle_timeout)
    try:
        yield Forwarding(client, wait_client)
    finally:
        await client.close()
        await wait_client.close()


def forwarding_of(request: Request) -> Forwarding:
    """The forwarding clients of the app serving ``request`` (opened by its lifespan)."""
    forwarding: Forwarding = request.app.state.forwarding
    return forwarding


def request_target(request: Request, query: bytes | None = None) -> bytes:
    """The request's path and query (or ``query`` instead) exactly as they arrived, still
    percent-encoded.

    What a forwarded request must carry: the decoded path would be decoded once more by
    the instance it goes to (``a%2520b`` would become ``a b`` instead of ``a%20b``), and an
    HTTP client would resolve the dot segments or percent-encode it differently.
    """
    scope = request.scope
    path: bytes = scope.get("raw_path") or quote(scope["path"]).encode()
    if query is None:
        query = scope["query_string"]
    return path + b"?" + query if query else path


MOVING_RETRY_AFTER = {"Retry-After": "1"}
"""A partition that is moving has an owner again within seconds: ask again in one."""


def find_owner(
    request: Request, runtime: CalculatorRuntime, partition: int
) -> InstanceInfo | JSONResponse:
    """The instance to forward a GET for ``partition`` to, this instance not serving it;
    or the 503 (with ``Retry-After``) to answer while the partition moves: this instance
    still restores it, no instance has claimed it, or the request was forwarded here
    already (routing tables disagree for a moment: forwarding again could loop)."""
    me = runtime.routing.me
    if FORWARDED_BY in request.headers:
        return error_response(
            503,
            "not_owner",
            f"{me.instance_id} does not serve partition {partition} (forwarded by "
            f"{request.headers[FORWARDED_BY]}); the partition is moving",
            headers=MOVING_RETRY_AFTER,
        )
    owner = runtime.routing.owner(partition)
    if owner is None:
        return error_response(
            503,
            "owner_unknown",
            f"no calculator instance owns partition {partition} right now",
            headers=MOVING_RETRY_AFTER,
        )
    if owner.instance_id == me.instance_id:
        return error_response(
            503,
            "partition_restoring",
            f"{me.instance_id} is restoring partition {partition}",
            headers=MOVING_RETRY_AFTER,
        )
    return owner


def moved_away(runtime: CalculatorRuntime, partition: int) -> JSONResponse:
    """The 503 of a read-your-writes GET whose partition moved to another instance while
    it waited here: asked again, it goes to the new owner."""
    return error_response(
        503,
        "partition_moved",
        f"partition {partition} moved away from {runtime.routing.me.instance_id} while the "
        "request waited; ask again",
        headers=MOVING_RETRY_AFTER,
    )


SILENT_SECONDS = 1.0
"""How long an instance a forward failed to reach is skipped by GETs a standby may
answer (the next GET after that tries it again)."""


async def ask_owner(request: Request, owner: InstanceInfo, asked: ReadYourWrites) -> Response:
    """``owner``'s answer to this GET: relayed as a wait (:func:`forward_wait`) when it
    names positions, else forwarded with the ordinary pool and timeout. An owner that
    failed to answer within the last :data:`SILENT_SECONDS` is not asked when a standby
    may answer instead: the 503 it would give comes at once."""
    if asked.standby_allowed and forwarding_of(request).silent(owner.instance_id):
        return _owner_unavailable(owner, runtime_of(request).routing.me, "no answer just now")
    if asked.positions:
        return await forward_wait(request, owner, asked.wait)
    timeout = runtime_of(request).settings.calculator_forward_timeout_seconds
    return await forward(request, owner, timeout, forwarding_of(request).client)


async def forward(
    request: Request, owner: InstanceInfo, timeout: float, client: OwnerClient
) -> Response:
    """``owner``'s answer to this request's path and query, passed through as it came
    (status, body, content type, ``X-Served-By``); 503 ``owner_unavailable`` when the
    owner does not answer within ``timeout``."""
    me = runtime_of(request).routing.me
    try:
        answer = await client.get(owner.url, request_target(request), me.instance_id, timeout)
    except (OSError, TimeoutError, ValueError) as exc:  # ValueError: a URL that is not http
        silent_until = forwarding_of(request).silent_until
        silent_until[owner.instance_id] = time.monotonic() + SILENT_SECONDS
        return _owner_unavailable(owner, me, type(exc).__name__)
    return _relayed(answer, me)


def _owner_unavailable(owner: InstanceInfo, me: InstanceInfo, why: str) -> JSONResponse:
    return error_response(
        503,
        "owner_unavailable",
        f"{owner.instance_id} at {owner.url} owns this key but did not answer: {why}",
        # A dead owner's partitions are reassigned within the group's session timeout.
        headers={FORWARDED_BY: me.instance_id, **MOVING_RETRY_AFTER},
    )


def _relayed(answer: OwnerAnswer, me: InstanceInfo) -> Response:
    """Another instance's answer, passed through with the headers that say who gave it."""
    headers = {FORWARDED_BY: me.instance_id}
    for name in (SERVED_BY, *FRESHNESS_HEADERS):
        value = answer.headers.get(name.lower())
        if value is not None:
            headers[name] = value
    return Response(answer.body, answer.status, headers, answer.headers.get("content-type"))


STANDBY_LAG = "X-Standby-Lag"
"""Changelog records of the key's partition the standby had not applied when it answered."""
STALE_REASON = "X-Stale-Reason"
"""Why the owner did not answer: the code of the 503 it would have been."""
REFLECTS = "X-Reflects"
"""The last position of each input topic the standby's value of the key includes."""
BEHIND = "X-Behind"
"""On an owner's answer while it catches up after taking the partition over: input
records written before the takeover it has not applied yet."""
FRESHNESS_HEADERS = (REPLICA, STANDBY_LAG, STALE_REASON, REFLECTS, BEHIND)


async def ask_standby(request: Request, partition: int) -> Response | None:
    """The answer of another instance that keeps ``partition`` as a warm standby (the
    least behind as advertised), if one gives a standby answer (200 or 404 marked
    ``X-Replica: standby``); None otherwise."""
    runtime = runtime_of(request)
    me = runtime.routing.me
    timeout = runtime.settings.calculator_forward_timeout_seconds
    client = forwarding_of(request).client
    for holder in runtime.routing.standby_holders(partition)[:1]:
        try:
            answer = await client.get(holder.url, request_target(request), me.instance_id, timeout)
        except (OSError, TimeoutError, ValueError):
            return None
        if answer.status in (200, 404) and answer.headers.get("x-replica") == "standby":
            return _relayed(answer, me)
    return None


async def forward_wait(request: Request, owner: InstanceInfo, wait: float) -> Response:
    """Relay a read-your-writes GET, unless ``CALCULATOR_MAX_FORWARDED_WAITS`` are
    already being relayed: then 503 ``too_many_waits`` with ``Retry-After`` at once,
    rather than queueing for a connection and answering as if the owner had failed.

    The budget is the wait plus the ordinary forwarding timeout, so an owner that
    answers 504 at the end of the wait has its 504 passed through.
    """
    runtime, forwarding = runtime_of(request), forwarding_of(request)
    settings = runtime.settings
    limit = settings.calculator_max_forwarded_waits
    if forwarding.waits >= limit:
        runtime.metrics.forwarded_waits_refused.inc()
        return error_response(
            503,
            "too_many_waits",
            f"{runtime.routing.me.instance_id} is already relaying {limit} read-your-writes "
            f"waits; retry shortly, or ask {owner.instance_id} at {owner.url} directly",
            headers={"Retry-After": "1", FORWARDED_BY: runtime.routing.me.instance_id},
        )
    forwarding.waits += 1
    try:
        budget = settings.calculator_forward_timeout_seconds + wait
        return await forward(request, owner, budget, forwarding.wait_client)
    finally:
        forwarding.waits -= 1


class InstanceUnavailable(Exception):
    """An instance did not answer a fan-out request."""

    def __init__(self, info: InstanceInfo, exc: Exception) -> None:
        super().__init__(f"{info.instance_id} at {info.url} did not answer: {type(exc).__name__}")


async def fan_out(request: Request) -> list[tuple[InstanceInfo, Any]] | JSONResponse:
    """Every other instance's JSON answer to this request's path with ``?scope=local``,
    or 503 ``instance_unavailable`` naming the first that failed: a partial answer would
    look complete to the client."""
    runtime = runtime_of(request)
    me = runtime.routing.me
    others = [i for i in runtime.routing.owning_instances() if i.instance_id != me.instance_id]
    target = request_target(request, b"scope=local")
    timeout = runtime.settings.calculator_forward_timeout_seconds
    client = forwarding_of(request).client
    try:
        return list(
            await asyncio.gather(
                *(_local_answer(client, info, target, timeout, me.instance_id) for info in others)
            )
        )
    except InstanceUnavailable as exc:
        return error_response(503, "instance_unavailable", str(exc))


async def _local_answer(
    client: OwnerClient, info: InstanceInfo, target: bytes, timeout: float, forwarded_by: str
) -> tuple[InstanceInfo, Any]:
    """``info``'s JSON answer to ``target``; raises :class:`InstanceUnavailable`."""
    try:
        answer = await client.get(info.url, target, forwarded_by, timeout)
        if answer.status != 200:
            raise ValueError(f"status {answer.status}")
        return info, json.loads(answer.body)
    except (OSError, TimeoutError, ValueError) as exc:
        raise InstanceUnavailable(info, exc) from exc
