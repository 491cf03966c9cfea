"""The service's routes without Cassandra: their order, the query parameters they take,
and the reservation GET's answers (from a table in memory).

No lifespan runs here (the client is not entered), so nothing connects: a request that
gets past parameter checking meets "Cassandra unavailable", which is all these tests need
to tell a refused parameter from an accepted one.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable
from urllib.parse import quote

import pytest
from cassandra import OperationTimedOut, ReadTimeout, Unavailable
from fastapi.testclient import TestClient
from starlette.routing import BaseRoute

from sellable_service.app import create_app
from sellable_service.settings import ServiceSettings
from sellable_service.store import CassandraUnavailable, SellableTable
from shared_schemas.reservations import (
    FAILED,
    MUTATION_ID_PATTERN,
    ReservationAnswer,
    ReservationResult,
)


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
    assert paths.count("/inventory/reservations/{mutationId}") == 1


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


class _Results:
    """A table holding reservation results in memory, or one that Cassandra is away from."""

    def __init__(self, results: list[ReservationResult], down: bool = False) -> None:
        self._results = {r.mutation_id: r for r in results}
        self._down = down

    async def reservation_result(self, mutation_id: str) -> ReservationResult | None:
        if self._down:
            raise CassandraUnavailable("not connected to Cassandra yet")
        return self._results.get(mutation_id)


A = "9b2f8c1e-3d4a-4a7e-8f60-0c1d2e3f4a5b"
FAILED_A = ReservationResult(
    A, "STL", "123123", 20, FAILED, 7, "20 unit(s) asked for, 7 sellable", 41, 1_000
)


def _with_table(table: _Results) -> TestClient:
    app = create_app(ServiceSettings())
    app.state.table = table  # what the handlers read from; no lifespan runs
    return TestClient(app)


def test_a_stored_result_is_answered_and_an_unknown_id_is_404() -> None:
    client = _with_table(_Results([FAILED_A]))
    found = client.get(f"/inventory/reservations/{A}")
    assert found.status_code == 200
    assert found.json() == {
        "mutationId": A,
        "status": "FAILED",
        "locationId": "STL",
        "sku": "123123",
        "count": 20,
        "available": 7,
        "reason": "20 unit(s) asked for, 7 sellable",
    }
    ReservationAnswer.model_validate(found.json())
    unknown = client.get(f"/inventory/reservations/{uuid.uuid4()}")
    assert (unknown.status_code, unknown.json()["error"]) == (404, "not_found")


@pytest.mark.parametrize(
    "bad", ["nope", A.upper(), A.replace("-", ""), f"{{{A}}}", f"urn:uuid:{A}", A + "0", " " + A]
)
def test_an_id_that_is_no_canonical_uuid_is_422_before_cassandra(bad: str) -> None:
    client = _with_table(_Results([], down=True))
    response = client.get(f"/inventory/reservations/{quote(bad, safe='')}")
    assert response.status_code == 422, response.text
    body = response.json()
    assert body["error"] == "invalid_request"
    assert [d["field"] for d in body["details"]] == ["mutationId"]
    assert re.match(MUTATION_ID_PATTERN, bad) is None  # the document says so too


def test_reservation_get_refuses_query_parameters_and_is_503_with_retry_after_when_down(
    client: TestClient,
) -> None:
    refused = client.get(f"/inventory/reservations/{A}?position=x")
    assert (refused.status_code, refused.json()["details"][0]["field"]) == (422, "position")
    down = client.get(f"/inventory/reservations/{A}")
    assert (down.status_code, down.json()["error"]) == (503, "cassandra_unavailable")
    assert down.headers["Retry-After"] == "1"


def test_the_reservation_get_is_documented_with_its_answers(client: TestClient) -> None:
    operation = client.get("/openapi.json").json()["paths"]["/inventory/reservations/{mutationId}"]
    get = operation["get"]
    ok = get["responses"]["200"]["content"]["application/json"]["schema"]
    assert ok == {"$ref": "#/components/schemas/ReservationAnswer"}
    assert {"404", "422", "503"} <= get["responses"].keys()
    assert "Retry-After" in get["responses"]["503"]["headers"]
    [parameter] = get["parameters"]
    assert (parameter["name"], parameter["schema"]["pattern"]) == (
        "mutationId",
        MUTATION_ID_PATTERN,
    )
    assert re.match(MUTATION_ID_PATTERN, A)


class _Refused:
    """A driver response that fails with ``error``."""

    def __init__(self, error: Exception) -> None:
        self._error = error

    def add_callbacks(self, callback: object, errback: Callable[[Exception], None]) -> None:
        errback(self._error)


class _RefusingSession:
    """A session whose every request fails with ``error``, as the driver reports it."""

    def __init__(self, error: Exception) -> None:
        self._error = error

    def execute_async(self, statement: object, parameters: object) -> _Refused:
        return _Refused(self._error)


@pytest.mark.parametrize(
    "error",
    [
        ReadTimeout("timed out", consistency=1, required_responses=1, received_responses=0),
        Unavailable("no replica", consistency=1, required_replicas=1, alive_replicas=0),
        OperationTimedOut("client side"),
    ],
)
@pytest.mark.parametrize(
    "path",
    [
        f"/inventory/reservations/{A}",
        "/inventory/locations/STL/skus/1",
        "/inventory/locations/STL/skus",
    ],
)
def test_a_read_cassandra_cannot_answer_now_is_503_not_500(error: Exception, path: str) -> None:
    app = create_app(ServiceSettings())
    table: SellableTable = app.state.table
    table._session = _RefusingSession(error)  # type: ignore[assignment]
    table._select_result = table._select_count = table._select_location = object()  # type: ignore[assignment]
    response = TestClient(app).get(path)
    assert (response.status_code, response.json()["error"]) == (503, "cassandra_unavailable")
    assert response.headers["Retry-After"] == "1"
