"""Validated reservations on the mutator, against the real broker: the answer waits for
the decision on ``reservation_results``, 202 when it does not come in time, and
``GET /inventory/reservations/{id}`` says where a reservation stands.

A small stand-in plays the calculator here (it confirms up to 5 units, fails more); the
real decision is tested in the calculator's tests and end to end in
``integration_tests/test_reservations.py``.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator

import pytest
from confluent_kafka import Consumer, Producer, TopicPartition
from fastapi.testclient import TestClient

from inventory_mutator.app import create_app
from inventory_mutator.settings import MutatorSettings
from shared_schemas import decode_key, value_serde
from shared_schemas.reservations import ReservationResult, decide
from shared_schemas.schemas import INVENTORY_MUTATION, RESERVATION_RESULT
from shared_schemas.topics import INVENTORY_RESERVATIONS, RESERVATION_RESULTS

PARTITIONS = 6
STAND_IN_STOCK = 5


@pytest.fixture(scope="module")
def client(kafka_bootstrap: str) -> Iterator[TestClient]:
    settings = MutatorSettings(kafka_bootstrap_servers=kafka_bootstrap, topic_partitions=PARTITIONS)
    with TestClient(create_app(settings)) as test_client:
        yield test_client


@pytest.fixture
def decider(kafka_bootstrap: str, client: TestClient) -> Iterator[set[str]]:
    """Decides every validated reservation written from now on as if 5 units were
    sellable, except those of the skus added to the set it yields (never decided)."""
    ignored: set[str] = set()
    stop = threading.Event()
    consumer = Consumer({"bootstrap.servers": kafka_bootstrap, "group.id": "stand-in"})
    # From the end offsets as they are now, so nothing the test writes is missed.
    consumer.assign(
        [
            TopicPartition(INVENTORY_RESERVATIONS.name, p, end)
            for p in range(PARTITIONS)
            for _, end in [
                consumer.get_watermark_offsets(
                    TopicPartition(INVENTORY_RESERVATIONS.name, p), timeout=10
                )
            ]
        ]
    )
    producer = Producer({"bootstrap.servers": kafka_bootstrap})
    mutations = value_serde(INVENTORY_MUTATION, INVENTORY_RESERVATIONS.name)
    results = value_serde(RESERVATION_RESULT, RESERVATION_RESULTS.name)

    def run() -> None:
        while not stop.is_set():
            message = consumer.poll(0.05)
            if message is None or message.error():
                continue
            value = mutations.deserialize(message.value())
            key = decode_key(message.key())
            if not value["validate"] or key.sku in ignored:
                continue
            decision = decide(value["count"], STAND_IN_STOCK, 0, True)
            result = ReservationResult(
                value["mutation_id"],
                key.location,
                key.sku,
                value["count"],
                *decision,
                message.offset(),
                value["event_time"],
            )
            producer.produce(
                RESERVATION_RESULTS.name,
                results.serialize(result.record()),
                message.key(),
                partition=message.partition(),
            )
            producer.flush(5)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    yield ignored
    stop.set()
    thread.join(5)
    consumer.close()


def _reserve(client: TestClient, count: int, query: str = "validate=true", **headers: str):
    body = {"locationId": "VAL", "sku": uuid.uuid4().hex[:8], "count": count}
    return client.post(f"/inventory/reservation?{query}", json=body, headers=headers)


def test_confirmed_and_failed_answers_carry_the_decision(
    client: TestClient, decider: set[str]
) -> None:
    confirmed = _reserve(client, 3)
    assert confirmed.status_code == 200, confirmed.text
    body = confirmed.json()
    assert (body["status"], body["available"], body["count"]) == ("CONFIRMED", 5, 3)
    assert body["topic"] == INVENTORY_RESERVATIONS.name and body["position"]
    assert body["url"] == f"/inventory/reservations/{body['mutationId']}"

    failed = _reserve(client, 6)
    assert failed.status_code == 409, failed.text
    body = failed.json()
    assert (body["status"], body["available"], body["error"]) == ("FAILED", 5, "insufficient_stock")
    assert "6 unit(s) asked for, 5 sellable" in body["message"]
    status = client.get(body["url"])
    assert status.status_code == 200
    assert status.json() == {
        "mutationId": body["mutationId"],
        "status": "FAILED",
        "locationId": "VAL",
        "sku": body["sku"],
        "count": 6,
        "available": 5,
        "reason": "6 unit(s) asked for, 5 sellable",
    }


def test_undecided_in_time_is_202_pending_and_the_mutator_says_pending(
    client: TestClient, decider: set[str]
) -> None:
    decider.add("undecided")  # the stand-in leaves this sku's reservations undecided
    body = {"locationId": "VAL", "sku": "undecided", "count": 1}
    response = client.post("/inventory/reservation?validate=true&wait=0.3", json=body)
    assert response.status_code == 202, response.text
    answer = response.json()
    assert (answer["status"], answer["available"]) == ("PENDING", None)
    assert answer["url"] == f"/inventory/reservations/{answer['mutationId']}"
    assert "not decided within 0.3 s" in answer["message"]
    status = client.get(answer["url"])
    assert status.status_code == 200
    assert status.json() == {
        "mutationId": answer["mutationId"],
        "status": "PENDING",
        "locationId": "VAL",
        "sku": "undecided",
        "count": 1,
        "available": None,
        "reason": "",
    }


def test_unvalidated_reservations_and_releases_keep_the_plain_answer(client: TestClient) -> None:
    for query in ("", "validate=false", "wait=3", "validate=FALSE&wait=0"):
        response = _reserve(client, -2, query)
        assert response.status_code == 200, response.text
        assert "status" not in response.json() and response.json()["mutationId"]


@pytest.mark.parametrize(
    ("query", "field"),
    [
        ("validate=yes", "validate"),
        ("validate=true&wait=-1", "wait"),
        ("validate=true&wait=31", "wait"),
        ("validate=true&wait=soon", "wait"),
        ("validate=true&wait=nan", "wait"),
        ("wait=31", "wait"),
        ("validate=false&wait=x", "wait"),
    ],
)
def test_bad_validate_or_wait_is_422_and_nothing_is_written(
    client: TestClient, query: str, field: str
) -> None:
    response = _reserve(client, 1, query)
    assert response.status_code == 422, response.text
    assert [detail["field"] for detail in response.json()["details"]] == [field]


def test_status_of_unknown_and_malformed_ids(client: TestClient) -> None:
    unknown = client.get(f"/inventory/reservations/{uuid.uuid4()}")
    assert (unknown.status_code, unknown.json()["error"]) == (404, "not_found")
    for bad in ("not-a-uuid", str(uuid.uuid4()).upper(), "1" * 300):
        response = client.get(f"/inventory/reservations/{bad}")
        assert (response.status_code, response.json()["error"]) == (422, "invalid_request")


def test_idempotency_key_returns_the_same_reservation_and_its_decision(
    client: TestClient, decider: set[str]
) -> None:
    key = str(uuid.uuid4())
    body = {"locationId": "VAL", "sku": "idem", "count": 2}
    first = client.post(
        "/inventory/reservation?validate=true", json=body, headers={"Idempotency-Key": key}
    )
    again = client.post(
        "/inventory/reservation?validate=true", json=body, headers={"Idempotency-Key": key}
    )
    assert first.status_code == again.status_code == 200
    assert first.json() == again.json()
    # The same key for the unvalidated request is another request: refused.
    other = client.post("/inventory/reservation", json=body, headers={"Idempotency-Key": key})
    assert (other.status_code, other.json()["error"]) == (409, "idempotency_key_reused")
