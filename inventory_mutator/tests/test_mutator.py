"""The mutator against the real embedded broker: what lands, what is refused, what fails."""

from __future__ import annotations

import asyncio
import os
import re
import socket
import sys
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from confluent_kafka import Consumer, TopicPartition
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from pydantic import ValidationError

from inventory_mutator.app import Adjustment, Reservation, create_app
from inventory_mutator.producer import AsyncProducer, Delivered
from inventory_mutator.settings import MutatorSettings
from local_stack.process import ManagedProcess, free_port
from local_stack.testing import ODD_VALID_IDS, REFUSED_IDS
from shared_schemas import decode_key, encode_key, partition_for, value_serde
from shared_schemas.schemas import INVENTORY_MUTATION
from shared_schemas.topics import INVENTORY_ADJUSTMENTS, INVENTORY_RESERVATIONS

PARTITIONS = 6
TOPICS = (INVENTORY_ADJUSTMENTS.name, INVENTORY_RESERVATIONS.name)


@pytest.fixture(scope="module")
def client(kafka_bootstrap: str) -> Iterator[TestClient]:
    settings = MutatorSettings(kafka_bootstrap_servers=kafka_bootstrap, topic_partitions=PARTITIONS)
    with TestClient(create_app(settings)) as test_client:
        yield test_client


def _read(bootstrap: str, topic: str, partition: int, offset: int) -> tuple[bytes, dict]:
    consumer = Consumer(
        {"bootstrap.servers": bootstrap, "group.id": "mutator-tests", "enable.auto.commit": False}
    )
    consumer.assign([TopicPartition(topic, partition, offset)])
    try:
        message = consumer.poll(10)
    finally:
        consumer.close()
    assert message is not None and message.error() is None
    assert message.offset() == offset
    return message.key(), value_serde(INVENTORY_MUTATION, topic).deserialize(message.value())


def _end_offsets(bootstrap: str) -> dict[tuple[str, int], int]:
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": "mutator-tests"})
    try:
        return {
            (t, p): consumer.get_watermark_offsets(TopicPartition(t, p), timeout=10)[1]
            for t in TOPICS
            for p in range(PARTITIONS)
        }
    finally:
        consumer.close()


@pytest.mark.parametrize(
    ("path", "topic", "count", "sent"),
    [
        ("/inventory/adjustment", INVENTORY_ADJUSTMENTS.name, 100, "100"),  # the original's string
        ("/inventory/adjustment", INVENTORY_ADJUSTMENTS.name, -3, -3),  # shrinkage
        ("/inventory/reservation", INVENTORY_RESERVATIONS.name, 10, 10),
    ],
)
def test_record_lands_on_the_key_partition_with_the_avro_content(
    client: TestClient, kafka_bootstrap: str, path: str, topic: str, count: int, sent: object
) -> None:
    location, sku = f"STL-{uuid.uuid4().hex[:6]}", "123123"
    before = int(time.time() * 1000)
    response = client.post(path, json={"locationId": location, "sku": sku, "count": sent})
    assert response.status_code == 200, response.text
    body = response.json()
    key = encode_key(location, sku)
    assert body["topic"] == topic
    assert body["partition"] == partition_for(key, PARTITIONS)
    assert body["position"] == f"{topic}:{body['partition']}:{body['offset']}"
    assert body["message"] == f"Updated Inventory [{topic}-{body['partition']}@{body['offset']}]"
    record_key, value = _read(kafka_bootstrap, topic, body["partition"], body["offset"])
    assert decode_key(record_key) == decode_key(key)
    assert value["count"] == count
    assert value["mutation_id"] == body["mutationId"]
    assert before <= value["event_time"] <= int(time.time() * 1000)


def test_location_is_accepted_as_an_alias(client: TestClient, kafka_bootstrap: str) -> None:
    response = client.post(
        "/inventory/adjustment", json={"location": "KC", "sku": "42", "count": 1}
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["topic"] == INVENTORY_ADJUSTMENTS.name
    key, value = _read(kafka_bootstrap, body["topic"], body["partition"], body["offset"])
    assert key == encode_key("KC", "42")  # the alias's value is the record's location
    assert value["count"] == 1
    assert value["mutation_id"] == body["mutationId"]


@pytest.mark.parametrize("sku", ODD_VALID_IDS)
def test_odd_ids_are_written_as_sent(client: TestClient, kafka_bootstrap: str, sku: str) -> None:
    """Nothing trimmed or normalised: the key holds exactly the id sent."""
    location = f"in {uuid.uuid4().hex[:6]} %"
    response = client.post(
        "/inventory/adjustment", json={"locationId": location, "sku": sku, "count": "7"}
    )
    assert response.status_code == 200, response.text
    body = response.json()
    key, value = _read(kafka_bootstrap, body["topic"], body["partition"], body["offset"])
    assert key == encode_key(location, sku)
    assert value["count"] == 7


BAD_INPUT = [
    ({"sku": "1", "count": 1}, "locationId", "Field required"),
    ({"locationId": "", "sku": "1", "count": 1}, "locationId", "must not be empty"),
    ({"locationId": 7, "sku": "1", "count": 1}, "locationId", "must be a string"),
    ({"locationId": "STL", "sku": "1", "count": 0}, "count", "must not be zero"),
    ({"locationId": "STL", "sku": "1", "count": 1.5}, "count", "whole number"),
    ({"locationId": "STL", "sku": "1", "count": "ten"}, "count", "whole number"),
    ({"locationId": "STL", "sku": "1", "count": True}, "count", "boolean"),
    ({"locationId": "STL", "sku": "1", "count": 2**31}, "count", "between"),
    ({"locationId": "STL", "sku": "1"}, "count", "Field required"),
    # Ids the GETs could not read back, or that look like another id: refused, not trimmed.
    *(
        ({"locationId": "STL", "sku": sku, "count": 1}, "sku", rule)
        for sku, rule in REFUSED_IDS
        if not isinstance(sku, str) or len(sku) < 1_000  # longer ones exceed the body limit
    ),
    ({"locationId": "STL", "sku": "x" * 1_000, "count": 1}, "sku", "at most 256"),
    ({"locationId": "  P  ", "sku": "1", "count": 1}, "locationId", "whitespace"),
    ({"location": "a/b", "sku": "1", "count": 1}, "location", "'/'"),  # as sent
    # Counts: a JSON integer, or a string of ASCII digits with an optional sign; nothing else.
    ({"locationId": "STL", "sku": "1", "count": "\u0663"}, "count", "ASCII digits"),  # Arabic 3
    ({"locationId": "STL", "sku": "1", "count": "\uff11\uff12"}, "count", "ASCII digits"),  # 12
    ({"locationId": "STL", "sku": "1", "count": "\u00b2"}, "count", "ASCII digits"),  # superscript
    ({"locationId": "STL", "sku": "1", "count": "9" * 5_000}, "count", "between"),
    ({"locationId": "STL", "sku": "1", "count": "-" + "9" * 11}, "count", "between"),
    ({"locationId": "STL", "sku": "1", "count": " 1"}, "count", "ASCII digits"),
    ({"locationId": "STL", "sku": "1", "count": "1\n"}, "count", "ASCII digits"),
    ({"locationId": "STL", "sku": "1", "count": "1.0"}, "count", "ASCII digits"),
    ({"locationId": "STL", "sku": "1", "count": "1e3"}, "count", "ASCII digits"),
    ({"locationId": "STL", "sku": "1", "count": "0x10"}, "count", "ASCII digits"),
    ({"locationId": "STL", "sku": "1", "count": "+-1"}, "count", "ASCII digits"),
    ({"locationId": "STL", "sku": "1", "count": ""}, "count", "ASCII digits"),
    ({"locationId": "STL", "sku": "1", "count": 100.5}, "count", "not a fraction"),
    ({"locationId": "STL", "sku": "1", "count": 2.0**31}, "count", "between"),
    ({"locationId": "STL", "sku": "1", "count": 0.0}, "count", "must not be zero"),
    ({"locationId": "STL", "sku": "1", "count": "-0"}, "count", "must not be zero"),
    ({"locationId": "STL", "sku": "1", "count": None}, "count", "whole number"),
]


@pytest.mark.parametrize(("body", "field", "problem"), BAD_INPUT)
def test_bad_adjustments_are_422_naming_the_field_and_write_nothing(
    client: TestClient, kafka_bootstrap: str, body: dict, field: str, problem: str
) -> None:
    before = _end_offsets(kafka_bootstrap)
    response = client.post("/inventory/adjustment", json=body)
    assert response.status_code == 422, response.text
    error = response.json()
    assert error["error"] == "invalid_request"
    assert any(d["field"] == field and problem in d["problem"] for d in error["details"]), error
    assert _end_offsets(kafka_bootstrap) == before


@pytest.mark.parametrize("count", [0, "0", "-0"])
def test_reservations_must_not_be_zero(
    client: TestClient, kafka_bootstrap: str, count: object
) -> None:
    before = _end_offsets(kafka_bootstrap)
    response = client.post(
        "/inventory/reservation", json={"locationId": "STL", "sku": "1", "count": count}
    )
    assert response.status_code == 422
    assert response.json()["details"][0] == {"field": "count", "problem": "must not be zero"}
    assert _end_offsets(kafka_bootstrap) == before


def test_a_negative_reservation_is_a_release(client: TestClient, kafka_bootstrap: str) -> None:
    response = client.post(
        "/inventory/reservation", json={"locationId": "STL", "sku": "1", "count": "-5"}
    )
    assert response.status_code == 200, response.text
    accepted = response.json()
    _, value = _read(kafka_bootstrap, accepted["topic"], accepted["partition"], accepted["offset"])
    assert (value["count"], value["validate"]) == (-5, False)


def test_malformed_json_oversized_body_and_wrong_shape(
    client: TestClient, kafka_bootstrap: str
) -> None:
    before = _end_offsets(kafka_bootstrap)
    headers = {"content-type": "application/json"}
    malformed = client.post("/inventory/adjustment", content=b'{"locationId": ', headers=headers)
    assert (malformed.status_code, malformed.json()["error"]) == (400, "malformed_json")
    empty = client.post("/inventory/adjustment", content=b"", headers=headers)
    assert empty.status_code == 400
    huge = {"locationId": "STL", "sku": "1", "count": 1, "padding": "x" * 20_000}
    too_big = client.post("/inventory/adjustment", json=huge)
    assert (too_big.status_code, too_big.json()["error"]) == (413, "body_too_large")
    chunked = client.post(
        "/inventory/adjustment", content=iter([b"{" + b" " * 20_000 + b"}"]), headers=headers
    )
    assert chunked.status_code == 413
    not_an_object = client.post("/inventory/adjustment", json=[1, 2])
    assert not_an_object.status_code == 422
    assert _end_offsets(kafka_bootstrap) == before


def test_a_json_number_too_long_to_read_is_422(client: TestClient, kafka_bootstrap: str) -> None:
    before = _end_offsets(kafka_bootstrap)
    response = client.post(
        "/inventory/adjustment",
        content=b'{"locationId": "STL", "sku": "1", "count": ' + b"9" * 5_000 + b"}",
        headers={"Content-Type": "application/json"},
    )
    assert response.status_code == 422, response.text
    assert response.json()["error"] == "invalid_request"
    assert _end_offsets(kafka_bootstrap) == before


GOOD_BODY = b'{"locationId": "STL", "sku": "1", "count": 1}'


@pytest.mark.parametrize(
    "content_type",
    [
        None,
        "text/plain",
        "application/x-www-form-urlencoded",
        "multipart/form-data; boundary=x",
        "application/xml",
        "text/json",
        "application/jsonp",
        "",
    ],
)
def test_a_body_that_is_not_declared_json_is_415_and_writes_nothing(
    client: TestClient, kafka_bootstrap: str, content_type: str | None
) -> None:
    before = _end_offsets(kafka_bootstrap)
    headers = {} if content_type is None else {"Content-Type": content_type}
    for path in ("/inventory/adjustment", "/inventory/reservation"):
        response = client.post(path, content=GOOD_BODY, headers=headers)
        assert response.status_code == 415, response.text
        error = response.json()
        assert error["error"] == "unsupported_media_type"
        assert error["details"][0]["field"] == "Content-Type"
        assert "application/json" in error["message"]
    assert _end_offsets(kafka_bootstrap) == before


@pytest.mark.parametrize(
    "content_type",
    [
        "application/json",
        "application/json; charset=utf-8",
        "Application/JSON",
        "application/vnd.x+json",
    ],
)
def test_json_media_types_are_accepted(client: TestClient, content_type: str) -> None:
    response = client.post(
        "/inventory/adjustment", content=GOOD_BODY, headers={"Content-Type": content_type}
    )
    assert response.status_code == 200, response.text


def test_idempotency_key_retry_writes_once(client: TestClient, kafka_bootstrap: str) -> None:
    body = {"locationId": f"IDEM-{uuid.uuid4().hex[:6]}", "sku": "1", "count": 5}
    headers = {"Idempotency-Key": uuid.uuid4().hex}
    before = _end_offsets(kafka_bootstrap)
    with ThreadPoolExecutor(4) as pool:  # concurrent retries wait for the first outcome
        answers = list(
            pool.map(
                lambda _: client.post("/inventory/adjustment", json=body, headers=headers), range(4)
            )
        )
    answers.append(client.post("/inventory/adjustment", json=body, headers=headers))
    assert {a.status_code for a in answers} == {200}
    assert len({a.json()["offset"] for a in answers}) == 1
    after = _end_offsets(kafka_bootstrap)
    assert sum(after.values()) - sum(before.values()) == 1
    reused = client.post("/inventory/adjustment", json={**body, "count": 6}, headers=headers)
    assert (reused.status_code, reused.json()["error"]) == (409, "idempotency_key_reused")
    other_endpoint = client.post("/inventory/reservation", json=body, headers=headers)
    assert other_endpoint.status_code == 200  # keys are per endpoint


def test_overlong_idempotency_key_is_422_and_writes_nothing(
    client: TestClient, kafka_bootstrap: str
) -> None:
    before = _end_offsets(kafka_bootstrap)
    response = client.post(
        "/inventory/adjustment",
        json={"locationId": "STL", "sku": "1", "count": 1},
        headers={"Idempotency-Key": "k" * 201},
    )
    assert response.status_code == 422
    assert response.json()["error"] == "invalid_request"
    assert response.json()["details"][0]["field"] == "Idempotency-Key"
    assert _end_offsets(kafka_bootstrap) == before


def test_openapi_documents_the_body_and_the_idempotency_header(client: TestClient) -> None:
    document = client.get("/openapi.json").json()
    operation = document["paths"]["/inventory/adjustment"]["post"]
    assert [p["name"] for p in operation["parameters"]] == ["Idempotency-Key"]
    body = operation["requestBody"]["content"]["application/json"]
    assert body["example"] == {"locationId": "STL", "sku": "123123", "count": "100"}
    answer = operation["responses"]["200"]["content"]["application/json"]["schema"]
    assert answer == {"$ref": "#/components/schemas/MutationAccepted"}
    accepted = document["components"]["schemas"]["MutationAccepted"]
    fields = {name: rule["type"] for name, rule in accepted["properties"].items()}
    assert fields == {
        "message": "string",
        "topic": "string",
        "partition": "integer",
        "offset": "integer",
        "position": "string",
        "mutationId": "string",
    }
    assert set(accepted["required"]) == set(fields)


def _count_accepted(schema: dict, value: object) -> bool:
    """Whether ``value`` fits the published count schema (integer range, or string pattern)."""
    integer, string = schema["anyOf"]
    if isinstance(value, bool):
        return False
    if isinstance(value, float) and value.is_integer():  # JSON Schema: 100.0 is an integer
        value = int(value)
    if isinstance(value, int):
        return (
            integer["minimum"] <= value <= integer["maximum"] and value != integer["not"]["const"]
        )
    # search, as a JSON Schema tool does: the pattern anchors itself at both ends.
    return isinstance(value, str) and re.search(string["pattern"], value) is not None


@pytest.mark.parametrize(
    ("path", "model"), [("adjustment", "Adjustment"), ("reservation", "Reservation")]
)
def test_openapi_states_the_id_and_count_rules_and_the_error_answers(
    client: TestClient, path: str, model: str
) -> None:
    """/docs must be the truth: what the schema admits is exactly what the mutator accepts."""
    document = client.get("/openapi.json").json()
    operation = document["paths"][f"/inventory/{path}"]["post"]
    schema = operation["requestBody"]["content"]["application/json"]["schema"]
    assert set(schema["required"]) == {"locationId", "sku", "count"}
    for field in ("locationId", "sku"):
        rule = schema["properties"][field]
        assert (rule["type"], rule["minLength"], rule["maxLength"]) == ("string", 1, 256)
        for sku in ODD_VALID_IDS:
            assert re.fullmatch(rule["pattern"], sku), sku
        for sku, _ in REFUSED_IDS:
            if isinstance(sku, str) and len(sku) <= 256:
                assert not re.fullmatch(rule["pattern"], sku), sku
    count = schema["properties"]["count"]
    model_class = Adjustment if model == "Adjustment" else Reservation
    samples: list[object] = [
        *range(-12, 13),
        *(s + d for s in (-(2**31), 2**31 - 1) for d in (-1, 0, 1)),
        *(str(n) for n in range(-12, 13)),
        "+7",
        "007",
        "-007",
        "+0",
        "-0",
        "2147483647",
        "2147483648",
        "-2147483648",
        "-2147483649",
        "0002147483647",
        "99999999999",
        "\u0663",
        " 1",
        "1.0",
        "1\n",
        1.5,
        100.0,
        -3.0,
        0.0,
        2.0**31,
        True,
        None,
    ]
    for value in samples:
        try:
            model_class.model_validate({"locationId": "L", "sku": "S", "count": value})
            accepted = True
        except ValidationError:
            accepted = False
        assert _count_accepted(count, value) == accepted, value
    for status in ("400", "413", "415", "422", "503"):
        answer = operation["responses"][status]["content"]["application/json"]["schema"]
        assert answer == {"$ref": "#/components/schemas/ErrorBody"}, status
    error_body = document["components"]["schemas"]["ErrorBody"]
    assert set(error_body["required"]) == {"error", "message"}


def test_broker_down_is_503_within_the_timeout() -> None:
    settings = MutatorSettings(
        kafka_bootstrap_servers=f"127.0.0.1:{free_port()}",  # nothing listens there
        mutator_delivery_timeout_seconds=1.0,
        mutator_ensure_topics=False,
    )
    with TestClient(create_app(settings)) as down:
        started = time.monotonic()
        response = down.post(
            "/inventory/adjustment", json={"locationId": "STL", "sku": "1", "count": 1}
        )
        elapsed = time.monotonic() - started
        assert response.status_code == 503
        assert response.json()["error"] == "kafka_unavailable"
        assert "Idempotency-Key" in response.json()["message"]
        assert elapsed < 4
        assert down.get("/health/ready").status_code == 503
        assert down.get("/health/live").status_code == 200
        metrics = down.get("/metrics").text
        assert 'mutator_produce_errors_total{topic="inventory_adjustments"} 1.0' in metrics


def _samples(client: TestClient) -> dict[tuple[str, frozenset], float]:
    """The app's metrics now: sample value by (name, labels)."""
    families = text_string_to_metric_families(client.get("/metrics").text)
    return {(s.name, frozenset(s.labels.items())): s.value for f in families for s in f.samples}


def test_metrics_count_requests_by_endpoint_and_status(client: TestClient) -> None:
    endpoint = ("endpoint", "/inventory/reservation")
    refused = ("mutator_requests_total", frozenset({endpoint, ("status", "422")}))
    timed = ("mutator_request_seconds_count", frozenset({endpoint}))
    before = _samples(client)
    client.post("/inventory/reservation", json={"locationId": "STL", "sku": "1", "count": 0})
    after = _samples(client)
    assert after[refused] == before.get(refused, 0.0) + 1
    assert after[timed] == before[timed] + 1
    assert client.get("/health/ready").json()["ready"] is True


def _mutator_process(kafka_bootstrap: str, log_dir: object) -> tuple[ManagedProcess, int]:
    """The mutator as its own process (not started yet), and its port."""
    port = free_port()
    env = {
        **os.environ,
        "KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap,
        "MUTATOR_PORT": str(port),
        "TOPIC_PARTITIONS": str(PARTITIONS),
    }
    process = ManagedProcess(
        "mutator",
        [sys.executable, "-m", "inventory_mutator"],
        env=env,
        log_dir=log_dir,  # type: ignore[arg-type]
    )
    return process, port


def test_process_serves_the_original_command_and_stops_on_sigterm(
    kafka_bootstrap: str, tmp_path: object
) -> None:
    process, port = _mutator_process(kafka_bootstrap, tmp_path)
    url = f"http://127.0.0.1:{port}"
    with process:
        process.start()
        process.wait_ready(lambda: httpx.get(url + "/health/ready").status_code == 200, 30)
        # The original example's command, byte for byte: count as a JSON string.
        response = httpx.post(
            url + "/inventory/adjustment",
            content=b'{"locationId":"STL","sku":"123123", "count": "100"}',
            headers={"Content-Type": "application/json"},
        )
        assert response.status_code == 200
        assert response.json()["message"].startswith("Updated Inventory [inventory_adjustments-")
        assert process.stop() == 0
    log = process.log_path.read_text()
    assert f"listening on http://127.0.0.1:{port}" in log
    assert "inventory_mutator stopped" in log


def test_a_client_that_disconnects_mid_body_is_no_server_error(
    kafka_bootstrap: str, tmp_path: object
) -> None:
    """A client event: no ERROR, no traceback, not a 500 in the metrics, nothing written."""
    process, port = _mutator_process(kafka_bootstrap, tmp_path)
    url = f"http://127.0.0.1:{port}"
    with process:
        process.start()
        process.wait_ready(lambda: httpx.get(url + "/health/ready").status_code == 200, 30)
        before = _end_offsets(kafka_bootstrap)
        for _ in range(3):
            with socket.create_connection(("127.0.0.1", port), timeout=5) as connection:
                connection.sendall(
                    b"POST /inventory/adjustment HTTP/1.1\r\nHost: test\r\n"
                    b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n"
                    b'{"locationId": "ST'
                )
                time.sleep(0.2)  # the request is in the handler, waiting for the rest
        metrics = ""
        deadline = time.monotonic() + 10
        while "499" not in metrics and time.monotonic() < deadline:
            metrics = httpx.get(url + "/metrics").text
            time.sleep(0.1)
        assert 'endpoint="/inventory/adjustment",status="499"} 3.0' in metrics
        assert 'status="500"' not in metrics
        assert _end_offsets(kafka_bootstrap) == before
        ok = httpx.post(
            url + "/inventory/adjustment", json={"locationId": "S", "sku": "1", "count": 1}
        )
        assert ok.status_code == 200  # and the server carries on
        assert process.stop() == 0
    log = process.log_path.read_text()
    assert "ERROR" not in log and "Traceback" not in log, log


def test_concurrent_produces_are_each_acknowledged_once(kafka_bootstrap: str) -> None:
    """Hundreds of records in flight at once: every one gets its own position, none hangs."""

    async def produce_many() -> list[Delivered]:
        producer = AsyncProducer({"bootstrap.servers": kafka_bootstrap})
        try:
            return await asyncio.gather(
                *(
                    producer.produce(INVENTORY_ADJUSTMENTS.name, b"k", b"v", n % PARTITIONS, 10.0)
                    for n in range(300)
                )
            )
        finally:
            await producer.aclose(5.0)

    delivered = asyncio.run(produce_many())
    assert len({(d.partition, d.offset) for d in delivered}) == 300
    assert {d.partition for d in delivered} == set(range(PARTITIONS))
