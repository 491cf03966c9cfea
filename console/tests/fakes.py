"""A fake system behind an httpx transport: two calculators (one of them down), the
Cassandra service and the mutator, answering the way the real ones do."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote

import httpx

CALC_A = "http://127.0.0.1:9094"
CALC_B = "http://127.0.0.1:9095"
SERVICE = "http://127.0.0.1:9093"
MUTATOR = "http://127.0.0.1:9091"

METRICS_A = """# TYPE calculator_records_total counter
calculator_records_total{topic="inventory_adjustments"} %d
calculator_records_total{topic="inventory_reservations"} 5.0
calculator_lag_records{topic="inventory_adjustments",partition="0"} 3.0
calculator_lag_records{topic="inventory_reservations",partition="0"} 1.0
"""


@dataclass
class FakeSystem:
    """What the fakes answer; change the fields to change the answers."""

    counts: dict[tuple[str, str], int] = field(default_factory=dict)
    service_counts: dict[tuple[str, str], int] = field(default_factory=dict)
    down: set[str] = field(default_factory=lambda: {CALC_B})
    hanging: set[str] = field(default_factory=set)
    records: int = 10
    service_reads: int = 0
    service_catches_up_after: int = 0
    """The service answers the old value for this many reads after a write."""
    posted: list[tuple[str, Any]] = field(default_factory=list)

    def metadata(self) -> dict[str, Any]:
        me = {
            "instanceId": "calculator-9094",
            "url": CALC_A,
            "partitions": [0, 1, 2, 3, 4, 5],
            "restoring": [5],
            "generation": 2,
            "standby": [],
            "self": True,
        }
        return {
            "partitionCount": 6,
            "instances": [me],
            "partitions": [
                {
                    "partition": p,
                    "owner": "calculator-9094",
                    "state": "restoring" if p == 5 else "active",
                    "standbys": [],
                }
                for p in range(6)
            ],
            "unownedPartitions": [],
        }

    async def handle(self, request: httpx.Request) -> httpx.Response:
        base = f"{request.url.scheme}://{request.url.host}:{request.url.port}"
        if base in self.hanging:
            await asyncio.sleep(30)
        if base in self.down:
            raise httpx.ConnectError("[Errno 111] Connection refused", request=request)
        path = request.url.raw_path.decode().split("?")[0]
        parts = [unquote(p) for p in path.strip("/").split("/")]
        if path == "/metadata":
            return httpx.Response(200, json=self.metadata())
        if path == "/metrics":
            if base == CALC_A:
                return httpx.Response(200, text=METRICS_A % self.records)
            if base == SERVICE:
                return httpx.Response(
                    200, text='service_lag_records{topic="sellable_inventory",partition="2"} 7\n'
                )
            return httpx.Response(200, text="")
        if path == "/health/ready":
            return httpx.Response(200, json={"status": "ready", "ready": True})
        if parts[:2] == ["inventory", "locations"] and len(parts) == 5:
            key = (parts[2], parts[4])
            if base == SERVICE:
                self.service_reads += 1
                if self.service_catches_up_after > 0:
                    self.service_catches_up_after -= 1
                    counts = self.service_counts
                else:
                    counts = self.counts
            else:
                counts = self.counts
            if key not in counts:
                return httpx.Response(404, json={"error": "not_found", "message": "no such key"})
            headers = {"X-Served-By": "calculator-9094"} if base != SERVICE else {}
            return httpx.Response(
                200,
                json={"locationId": key[0], "sku": key[1], "count": counts[key]},
                headers=headers,
            )
        if base == MUTATOR and request.method == "POST":
            body = json.loads(request.content)
            self.posted.append((path, body))
            if body.get("count") == 0:
                return httpx.Response(
                    422,
                    json={
                        "error": "invalid_request",
                        "message": "count: must not be zero",
                        "details": [{"field": "count", "problem": "must not be zero"}],
                    },
                )
            key = (body["locationId"], body["sku"])
            self.service_counts[key] = self.counts.get(key, 0)
            sign = 1 if path.endswith("adjustment") else -1
            self.counts[key] = self.counts.get(key, 0) + sign * int(body["count"])
            return httpx.Response(
                200,
                json={
                    "message": "Updated Inventory [inventory_adjustments-0@0]",
                    "position": "inventory_adjustments:0:0",
                    "mutationId": "1526ef8b-0000-4000-8000-000000000000",
                },
            )
        return httpx.Response(404, json={"error": "not_found", "message": path})

    def transport(self) -> httpx.MockTransport:
        return httpx.MockTransport(self.handle)
