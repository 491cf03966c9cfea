"""Validated reservations end to end: the real mutator, calculators, broker, service and
Cassandra. Reservations that cannot oversell, decided once, whatever happens."""

from __future__ import annotations

import random
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
from confluent_kafka import Consumer, TopicPartition

from integration_tests.support import PARTITIONS, System
from local_stack.testing import wait_until
from shared_schemas import encode_key, partition_for, value_serde
from shared_schemas.reservations import ReservationResult
from shared_schemas.schemas import RESERVATION_RESULT, SELLABLE_INVENTORY
from shared_schemas.topics import RESERVATION_RESULTS
from shared_schemas.topics import SELLABLE_INVENTORY as SELLABLE_TOPIC


def _location(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def _reserve(
    client: httpx.Client, mutator: str, location: str, sku: str, count: int, wait: float = 10
) -> httpx.Response:
    return client.post(
        f"{mutator}/inventory/reservation",
        params={"validate": "true", "wait": str(wait)},
        json={"locationId": location, "sku": sku, "count": count},
    )


def _bootstrap(system: System) -> str:
    return system.services["inventory_mutator"].env["KAFKA_BOOTSTRAP_SERVERS"]


def _records(bootstrap: str, topic: str, keys: Iterable[bytes]) -> list[tuple[bytes, bytes]]:
    """Every (key, value) of ``keys`` in ``topic``, in each partition's order."""
    wanted = set(keys)
    partitions = {partition_for(key, PARTITIONS) for key in wanted}
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": "reservation-tests",
            "enable.partition.eof": True,
        }
    )
    found: list[tuple[bytes, bytes]] = []
    try:
        ends = {
            p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1]
            for p in partitions
        }
        consumer.assign([TopicPartition(topic, p, 0) for p in partitions if ends[p] > 0])
        done: set[int] = {p for p in partitions if ends[p] == 0}
        deadline = time.monotonic() + 30
        while done != partitions and time.monotonic() < deadline:
            for message in consumer.consume(1000, 0.5):
                if message.error() is not None:
                    continue
                if message.key() in wanted:
                    found.append((message.key(), message.value()))
                if message.offset() + 1 >= ends[message.partition()]:
                    done.add(message.partition())
        assert done == partitions, f"could not read {topic} to its end"
    finally:
        consumer.close()
    return found


def _results(bootstrap: str, keys: Iterable[bytes]) -> list[ReservationResult]:
    serde = value_serde(RESERVATION_RESULT, RESERVATION_RESULTS.name)
    return [
        ReservationResult.from_record(serde.deserialize(value))
        for _, value in _records(bootstrap, RESERVATION_RESULTS.name, keys)
    ]


def _sellable_records(bootstrap: str, keys: Iterable[bytes]) -> list[dict[str, Any]]:
    serde = value_serde(SELLABLE_INVENTORY, SELLABLE_TOPIC.name)
    return [serde.deserialize(value) for _, value in _records(bootstrap, SELLABLE_TOPIC.name, keys)]


def _status_everywhere(system: System, mutation_id: str) -> dict[str, Any]:
    """The answer of every service to GET /inventory/reservations/{mutation_id}, once
    each has it (the service and the other calculators index the results a moment later)."""
    answers: dict[str, Any] = {}

    def all_answer() -> bool:
        for base in (system.mutator, *system.readers):
            response = system.client.get(f"{base}/inventory/reservations/{mutation_id}")
            if response.status_code != 200:
                return False
            answers[base] = response.json()
        return True

    wait_until(all_answer, timeout=30)
    return answers


def test_100_concurrent_validated_reservations_of_10_units_confirm_exactly_10(
    system: System,
) -> None:
    location, sku = _location("LAST"), "hot"
    system.adjust(location, sku, 10)
    system.wait_all_agree(location, {sku: 10}, timeout=60)

    with ThreadPoolExecutor(32) as pool:
        answers = list(
            pool.map(
                lambda _: _reserve(system.client, system.mutator, location, sku, 1), range(100)
            )
        )
    statuses = Counter((a.status_code, a.json().get("status")) for a in answers)
    assert statuses == {(200, "CONFIRMED"): 10, (409, "FAILED"): 90}, statuses
    for answer in answers:
        body = answer.json()
        assert body["mutationId"] and body["available"] >= 0
        assert (body["available"] >= 1) == (body["status"] == "CONFIRMED")
    system.wait_all_agree(location, {sku: 0}, timeout=60)

    # Every side answers every decision the same; and no record ever went below zero.
    for answer in random.Random(1).sample(answers, 5):
        body = answer.json()
        seen = _status_everywhere(system, body["mutationId"])
        assert {a["status"] for a in seen.values()} == {body["status"]}, seen
    key = encode_key(location, sku)
    bootstrap = _bootstrap(system)
    results = _results(bootstrap, [key])
    assert len({r.mutation_id for r in results}) == 100
    assert Counter(r.status for r in {r.mutation_id: r for r in results}.values()) == {
        "CONFIRMED": 10,
        "FAILED": 90,
    }
    assert all(r.available >= 0 for r in results)
    sellable = _sellable_records(bootstrap, [key])
    assert sellable and all(record["count"] >= 0 for record in sellable)
    assert sellable[-1]["count"] == 0


def test_mixed_writes_end_where_the_decisions_say(system: System) -> None:
    """Validated and plain reservations, releases and adjustments, concurrently on many
    keys: the end value is the sequential model of the writes, with each validated
    reservation counted as its published decision says."""
    location = _location("MIX")
    skus = [f"sku-{i}" for i in range(8)]
    rng = random.Random(7)
    plan: list[tuple[str, str, int]] = [("adjustment", sku, 20) for sku in skus]
    for _ in range(240):
        sku, kind = rng.choice(skus), rng.choice(["adjustment", "plain", "validated", "validated"])
        count = {"adjustment": rng.choice([1, 3, -1]), "plain": rng.choice([1, 2, -1])}.get(
            kind, rng.randint(1, 6)
        )
        plan.append((kind, sku, count))
    answers: list[tuple[str, str, int, httpx.Response]] = []
    lock = threading.Lock()

    def send(item: tuple[str, str, int]) -> None:
        kind, sku, count = item
        if kind == "validated":
            response = _reserve(system.client, system.mutator, location, sku, count)
        else:
            path = "adjustment" if kind == "adjustment" else "reservation"
            response = system.client.post(
                f"{system.mutator}/inventory/{path}",
                json={"locationId": location, "sku": sku, "count": count},
            )
        with lock:
            answers.append((kind, sku, count, response))

    for sku in skus:  # the keys exist before the race starts
        send(("adjustment", sku, 20))
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(send, plan[len(skus) :]))

    decided = {
        r.mutation_id: r
        for r in _results(_bootstrap(system), [encode_key(location, s) for s in skus])
    }
    expected = dict.fromkeys(skus, 0)
    for kind, sku, count, response in answers:
        body = response.json()
        if kind == "validated":
            assert response.status_code in (200, 409), response.text
            result = decided[body["mutationId"]]
            assert result.status == body["status"]  # the answer is the published decision
            assert (result.status == "CONFIRMED") == (count <= result.available)
            if result.status == "CONFIRMED":
                expected[sku] -= count
        else:
            assert response.status_code == 200, response.text
            expected[sku] += count if kind == "adjustment" else -count
    system.wait_all_agree(location, expected, timeout=60)


def _owner(system: System, location: str, sku: str) -> str:
    response = system.client.get(
        f"{system.calculators[0]}/metadata/locations/{location}/skus/{sku}"
    )
    return response.json()["owner"]["url"]


def test_killing_the_owner_mid_burst_never_oversells_or_recounts(
    system: System, log_dir: Path
) -> None:
    location, stock = _location("KILL"), 30
    # A key owned by calculator-0 (calculator-1 is the one test_system kills).
    sku = next(
        s
        for s in (f"sku-{i}" for i in range(100))
        if _owner(system, location, s) == system.calculators[0]
    )
    system.adjust(location, sku, stock)
    system.wait_all_agree(location, {sku: stock}, timeout=60)

    answers: list[httpx.Response] = []
    lock = threading.Lock()

    def send(_: int) -> None:
        response = _reserve(system.client, system.mutator, location, sku, 1, wait=2)
        with lock:
            answers.append(response)

    victim = system.services["calculator-0"]
    survivor = system.calculators[1]
    pending_seen: list[str] = []

    def ask_survivor_about_202s() -> None:
        # While the owner is down, a 202's reservation is decided by nobody: the
        # surviving calculator relays the mutator's PENDING (or, once decided, the decision).
        with lock:
            waiting = [a.json()["mutationId"] for a in answers if a.status_code == 202]
        for mutation_id in waiting[-3:]:
            status = system.client.get(f"{survivor}/inventory/reservations/{mutation_id}")
            assert status.status_code == 200, status.text
            if status.json()["status"] == "PENDING":
                assert status.headers["x-answered-by"] == "inventory_mutator"
                pending_seen.append(mutation_id)

    with ThreadPoolExecutor(8) as pool:
        burst = [pool.submit(send, i) for i in range(60)]
        wait_until(lambda: len(answers) >= 8, timeout=30)
        victim.kill()
        while not all(future.done() for future in burst):
            ask_survivor_about_202s()
            time.sleep(0.2)
        for future in burst:
            future.result()
    restarted = victim.restarted("calculator-0-restarted", log_dir)
    system.replacements.append(restarted)
    restarted.wait_ready(
        lambda: httpx.get(system.calculators[0] + "/health/ready").status_code == 200,
        timeout=90,
    )

    by_status = Counter(a.status_code for a in answers)
    assert set(by_status) <= {200, 202, 409}, by_status
    assert pending_seen, "a calculator answered PENDING (relayed from the mutator) meanwhile"
    # Every answer keeps its word; every 202 is decided in the end.
    final: dict[str, str] = {}
    for answer in answers:
        body = answer.json()
        decided = _status_everywhere(system, body["mutationId"])[system.mutator]["status"]
        if answer.status_code == 200:
            assert decided == "CONFIRMED"
        elif answer.status_code == 409:
            assert decided == "FAILED"
        final[body["mutationId"]] = decided
    confirmed = sum(1 for status in final.values() if status == "CONFIRMED")
    assert confirmed <= stock
    # 60 asked for 1 unit each out of 30: exactly 30 confirmed, counted exactly once.
    assert confirmed == stock, Counter(final.values())
    system.wait_all_agree(location, {sku: stock - confirmed}, timeout=90)
    results = _results(_bootstrap(system), [encode_key(location, sku)])
    for result in results:  # duplicates after the replay say the same
        assert final[result.mutation_id] == result.status


def test_unknown_and_malformed_reservation_ids_and_bad_values(system: System) -> None:
    unknown = str(uuid.uuid4())
    for base in (system.mutator, *system.readers):
        response = system.client.get(f"{base}/inventory/reservations/{unknown}")
        assert (response.status_code, response.json()["error"]) == (404, "not_found"), base
        response = system.client.get(f"{base}/inventory/reservations/not-a-uuid")
        assert response.status_code == 422, base
        assert response.json()["details"][0]["field"] == "mutationId", base
    for params, field in (
        ({"validate": "maybe"}, "validate"),
        ({"validate": "true", "wait": "-1"}, "wait"),
    ):
        response = system.client.post(
            f"{system.mutator}/inventory/reservation",
            params=params,
            json={"locationId": "BAD", "sku": "x", "count": 1},
        )
        assert response.status_code == 422, response.text
        assert response.json()["details"][0]["field"] == field
    zero = system.client.post(
        f"{system.mutator}/inventory/reservation",
        params={"validate": "true"},
        json={"locationId": "BAD", "sku": "x", "count": 0},
    )
    assert (zero.status_code, zero.json()["details"][0]["field"]) == (422, "count")
