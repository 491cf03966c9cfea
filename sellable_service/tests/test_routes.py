"""The service's routes without Cassandra: their order and the query parameters they take.

No lifespan runs here (the client is not entered), so nothing connects: a request that
gets past parameter checking meets "Cassandra unavailable", which is all these tests need
to tell a refused parameter from an accepted one.
"""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient
from starlette.routing import BaseRoute

from sellable_service.app import create_app
from sellable_service.settings import ServiceSettings


@pytest.fixture(scope="module")
def client() -> TestClient:
    return TestClient(create_app(ServiceSettings()))


def _paths_in_match_order(routes: list[BaseRoute]) -> list[str]:
    # FastAPI keeps an included router as one entry holding the router's own routes.
    paths: list[str] = []
    for route in routes:
        included = getattr(route, "original_router", None)
        paths += (
            _paths_in_match_order(included.routes) if included else [getattr(route, "path", "")]
        )
    return paths


def test_inventory_routes_come_first_and_operations_routes_once() -> None:
    paths = _paths_in_match_order(create_app(ServiceSettings()).routes)
    operations = ["/health/live", "/health/ready", "/metrics"]
    for path in operations:
        assert paths.count(path) == 1, paths
    # Routes are matched in order and the single-key GET is the hot one.
    assert paths.index("/inventory/locations/{location}/skus/{sku}") < min(
        paths.index(p) for p in operations
    )


@pytest.mark.parametrize(
    "query", ["position=garbage", "position=sellable_inventory:0:1", "timeout=1", "x"]
)
def test_single_key_get_refuses_any_query_parameter(client: TestClient, query: str) -> None:
    response = client.get(f"/inventory/locations/STL/skus/1?{query}")
    assert response.status_code == 422
    body = response.json()
    assert body["error"] == "invalid_request"
    name = query.split("=")[0]
    assert body["details"] == [{"field": name, "problem": "unknown query parameter"}]


def test_listing_refuses_unknown_parameters_and_keeps_its_own(client: TestClient) -> None:
    refused = client.get("/inventory/locations/STL/skus?limit=5&position=x&zzz=1")
    assert refused.status_code == 422
    assert [d["field"] for d in refused.json()["details"]] == ["position", "zzz"]
    accepted = client.get("/inventory/locations/STL/skus?limit=5&after=a")
    assert (accepted.status_code, accepted.json()["error"]) == (503, "cassandra_unavailable")
    # A query string that names no parameter at all ("?" or "?&") is no unknown parameter.
    for bare in ("", "?", "?&"):
        assert client.get(f"/inventory/locations/STL/skus/1{bare}").status_code == 503
