"""The console's HTTP API against fake backends (the page in a browser, against the real
system: integration_tests/test_console.py)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from console.app import create_app
from console.settings import ConsoleSettings
from console.tests.fakes import CALC_A, CALC_B, MUTATOR, SERVICE, FakeSystem


@pytest.fixture
def fake() -> FakeSystem:
    return FakeSystem(down={CALC_B})


def _client(fake: FakeSystem, tmp_path: Path, **overrides: Any) -> TestClient:
    settings = ConsoleSettings(
        console_calculator_urls=[CALC_A, CALC_B],
        console_service_url=SERVICE,
        console_mutator_url=MUTATOR,
        console_results_dir=tmp_path / "results",
        **overrides,
    )
    return TestClient(create_app(settings, transport=fake.transport()))


@pytest.fixture
def client(fake: FakeSystem, tmp_path: Path) -> Iterator[TestClient]:
    with _client(fake, tmp_path) as client:
        yield client


def test_the_page_and_its_files_are_served(client: TestClient) -> None:
    page = client.get("/")
    assert page.status_code == 200 and "/static/console.js" in page.text
    assert "http" not in page.text.split("<body>")[1].replace("http-equiv", "")  # nothing remote
    assert client.get("/static/console.js").status_code == 200
    assert client.get("/static/console.css").status_code == 200
    assert client.get("/health/ready").json()["ready"] is True
    assert "console_streams" in client.get("/metrics").text


def test_a_write_is_relayed_as_it_is_and_its_key_watched(
    client: TestClient, fake: FakeSystem
) -> None:
    body = {"locationId": "STL", "sku": "a b", "count": 100}
    answer = client.post("/api/adjustment", json=body)
    assert answer.status_code == 200 and answer.json()["position"]
    assert fake.posted == [("/inventory/adjustment", body)]
    state = client.get("/api/state").json()
    assert [(k["locationId"], k["sku"]) for k in state["keys"]] == [("STL", "a b")]
    assert state["writes"][0]["status"] == 200


def test_a_refused_write_comes_back_with_the_field_named(client: TestClient) -> None:
    answer = client.post(
        "/api/reservation?validate=true", json={"locationId": "STL", "sku": "x", "count": 0}
    )
    assert answer.status_code == 422
    assert answer.json()["details"] == [{"field": "count", "problem": "must not be zero"}]


def test_an_unreachable_mutator_is_a_502_in_the_error_shape(
    client: TestClient, fake: FakeSystem
) -> None:
    fake.down.add(MUTATOR)
    answer = client.post("/api/adjustment", json={"locationId": "STL", "sku": "x", "count": 1})
    assert answer.status_code == 502
    assert answer.json()["error"] == "backend_unavailable"
    assert "connection refused" in answer.json()["message"]


def test_posts_want_json(client: TestClient) -> None:
    # What a form on another site could send without the browser asking first.
    answer = client.post(
        "/api/adjustment",
        content=b"locationId=STL",
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    assert answer.status_code == 415 and answer.json()["error"] == "unsupported_media_type"


def test_watching_checks_the_ids(client: TestClient) -> None:
    answer = client.post("/api/watch", json={"locationId": "a/b", "sku": ""})
    assert answer.status_code == 422
    assert [d["field"] for d in answer.json()["details"]] == ["locationId", "sku"]
    assert client.post("/api/watch", json={"locationId": "L", "sku": "S"}).status_code == 200
    assert client.post("/api/unwatch", json={"locationId": "L", "sku": "S"}).status_code == 200
    assert client.post("/api/unwatch", json={"locationId": "L", "sku": "S"}).status_code == 404


def test_stopping_an_instance_is_refused_unless_allowed(client: TestClient) -> None:
    answer = client.post("/api/control/calculator-1/stop", json={})
    assert answer.status_code == 403
    assert answer.json()["error"] == "control_not_allowed"
    assert "make up" in answer.json()["message"]
    state = client.get("/api/control").json()
    assert state["allowed"] is False and state["services"] == []


def test_stopping_through_local_stack_when_allowed(fake: FakeSystem, tmp_path: Path) -> None:
    calls: list[tuple[str, str, str | None]] = []
    control_url = "http://127.0.0.1:7000"

    async def control(request: httpx.Request) -> httpx.Response:
        if str(request.url).startswith(control_url):
            calls.append((request.method, request.url.path, request.headers.get("authorization")))
            if request.url.path == "/services":
                return httpx.Response(
                    200, json={"services": [{"name": "calculator-1", "port": 9095}]}
                )
            return httpx.Response(200, json={"name": "calculator-1", "state": "held"})
        return await fake.handle(request)

    settings = ConsoleSettings(
        console_calculator_urls=[CALC_A, CALC_B],
        console_service_url=SERVICE,
        console_mutator_url=MUTATOR,
        console_allow_control=True,
        console_control_url=control_url,
        console_control_token="t0k",
    )
    app = create_app(settings, transport=httpx.MockTransport(control))
    with TestClient(app) as client:
        assert client.post("/api/control/calculator-1/stop?signal=KILL", json={}).json() == {
            "name": "calculator-1",
            "state": "held",
        }
        assert client.post("/api/control/calculator-1/stop?signal=HUP", json={}).status_code == 422
        events = client.get("/api/state").json()["events"]
    assert ("POST", "/services/calculator-1/stop", "Bearer t0k") in calls
    assert any("kill -9 calculator-1: done" in e["text"] for e in events)


def test_the_latest_compare_report_is_linked(client: TestClient, tmp_path: Path) -> None:
    assert client.get("/compare/latest").status_code == 404
    for name in ("compare-20261126-100000", "compare-20261126-120000"):
        (tmp_path / "results" / name).mkdir(parents=True)
        (tmp_path / "results" / name / "report.html").write_text(f"<h1>{name}</h1>")
    runs = client.get("/api/compare").json()["runs"]
    assert [r["name"] for r in runs] == ["compare-20261126-120000", "compare-20261126-100000"]
    latest = client.get("/compare/latest")
    assert latest.status_code == 200 and "120000" in latest.text
    assert client.get("/compare/..%2F..%2Fetc/report.html").status_code == 404
