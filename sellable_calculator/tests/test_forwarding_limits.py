"""Relayed read-your-writes waits cannot starve ordinary forwarded reads (two real instances).

Each forwarded wait holds a pooled connection to the owner for its whole wait. When waits
and ordinary reads shared one pool of 100 connections per owner, 100 pending waits made
every other forwarded read wait for a connection until it gave up, answering 503
``owner_unavailable`` and blaming a healthy owner; waits queued the same way answered 503
instead of the owner's 504.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp
from multidict import CIMultiDict

from sellable_calculator.settings import CalculatorSettings
from sellable_calculator.tests.support import (
    PARTITIONS,
    Calculator,
    Mutations,
    sku_owned_by,
    unique_location,
)
from shared_schemas import encode_key, partition_for

WAITS = CalculatorSettings().calculator_max_forwarded_waits
"""The default limit: the conftest instances run with it."""


async def _scenario(via: str, path: str, position: str) -> dict[str, object]:
    wait = {"position": position, "timeout": "3"}
    async with aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0), timeout=aiohttp.ClientTimeout(total=15)
    ) as client:

        async def get(
            params: dict[str, str] | None = None,
        ) -> tuple[int, Any, CIMultiDict[str], float]:
            started = time.monotonic()
            async with client.get(via + path, params=params) as answer:
                body = await answer.json()
                return answer.status, body, answer.headers.copy(), time.monotonic() - started

        waits = [asyncio.create_task(get(wait)) for _ in range(WAITS)]
        await asyncio.sleep(1.0)  # every wait is pending at the owner by now
        ordinary = await asyncio.gather(*(get() for _ in range(10)))
        one_too_many = await get(wait)
        return {
            "ordinary": ordinary,
            "one_too_many": one_too_many,
            "waits": await asyncio.gather(*waits),
        }


def test_pending_waits_do_not_starve_ordinary_forwarded_reads(
    calculators: list[Calculator], mutations: Mutations
) -> None:
    forwarder, owner = calculators
    location = unique_location("WAITS")
    sku = sku_owned_by(owner, location)
    applied = mutations.adjust(location, sku, 7)
    assert owner.sellable(location, sku, position=str(applied)).json()["count"] == 7
    partition = partition_for(encode_key(location, sku), PARTITIONS)
    future = f"inventory_adjustments:{partition}:{applied.offset + 1_000_000}"

    outcome = asyncio.run(
        _scenario(forwarder.url, f"/inventory/locations/{location}/skus/{sku}", future)
    )

    # Ordinary reads through the same instance are answered by the owner, promptly.
    for status, body, headers, seconds in outcome["ordinary"]:  # type: ignore[attr-defined]
        assert (status, body.get("count")) == (200, 7), body
        assert headers["X-Served-By"] == owner.env["CALCULATOR_INSTANCE_ID"]
        assert seconds < 1.0
    # A wait beyond the limit is refused at once, saying so, without blaming the owner.
    status, body, headers, seconds = outcome["one_too_many"]  # type: ignore[misc]
    assert (status, body["error"]) == (503, "too_many_waits"), body
    assert headers["Retry-After"] == "1"
    assert seconds < 1.0
    assert forwarder.metric("calculator_forwarded_waits_refused_total") == 1
    # Every wait gets the owner's own 504 at the end of its wait.
    for status, body, headers, _ in outcome["waits"]:  # type: ignore[attr-defined]
        assert (status, body["error"]) == (504, "not_caught_up"), body
        assert headers["X-Served-By"] == owner.env["CALCULATOR_INSTANCE_ID"]
