"""The shared HTTP conventions: error shape, health and metrics routes."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry, Counter
from pydantic import BaseModel, field_validator

from service_runtime.http import install_error_handlers, operations_router


class Body(BaseModel):
    count: int

    @field_validator("count")
    @classmethod
    def not_zero(cls, value: int) -> int:
        if value == 0:
            raise ValueError("must not be zero")
        return value


def _client(ready: bool | Exception = True) -> TestClient:
    app = FastAPI()
    install_error_handlers(app)
    registry = CollectorRegistry()
    Counter("things", "things seen", registry=registry).inc(3)

    async def check() -> dict[str, Any]:
        if isinstance(ready, Exception):
            raise ready
        return {"ready": ready, "broker": "up"}

    app.include_router(operations_router(check, registry))

    @app.post("/things")
    async def post(body: Body) -> dict[str, int]:
        return {"count": body.count}

    @app.get("/boom")
    async def boom() -> None:
        raise RuntimeError("secret internals")

    return TestClient(app, raise_server_exceptions=False)


def test_validation_error_names_field_and_problem() -> None:
    response = _client().post("/things", json={"count": 0})
    assert response.status_code == 422
    assert response.json() == {
        "error": "invalid_request",
        "message": "count: must not be zero",
        "details": [{"field": "count", "problem": "must not be zero"}],
    }


def test_malformed_json_is_400() -> None:
    response = _client().post(
        "/things", content=b'{"count": ', headers={"content-type": "application/json"}
    )
    assert response.status_code == 400
    assert response.json()["error"] == "malformed_json"


def test_unknown_route_and_unexpected_error_are_json() -> None:
    client = _client()
    assert client.get("/nope").json()["error"] == "not_found"
    response = client.get("/boom")
    assert response.status_code == 500
    assert "secret internals" not in response.text
    assert response.json()["error"] == "internal_error"


def test_health_and_metrics() -> None:
    assert _client().get("/health/live").json() == {"status": "live"}
    ready = _client().get("/health/ready")
    assert (ready.status_code, ready.json()) == (
        200,
        {"status": "ready", "ready": True, "broker": "up"},
    )
    assert _client(False).get("/health/ready").status_code == 503
    failing = _client(ConnectionError("broker down")).get("/health/ready")
    assert failing.status_code == 503
    assert failing.json()["message"] == "ConnectionError: broker down"
    assert "things_total 3.0" in _client().get("/metrics").text
