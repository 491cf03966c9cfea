"""kill -9 of a calculator and a restart on the same disk, against the real broker.

Each restart restores from its local store plus the changelog and resumes both inputs
from there, while writes made while the instance was down (reservations on every key,
one more adjustment on every other key) wait in the topics: they must all show up after
the restart, exactly once, in the store and in ``sellable_inventory``. (A reservation
replayed before the adjustment it follows once left a key at its pre-crash value.)
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from confluent_kafka import Consumer, TopicPartition

from local_stack.testing import wait_until
from sellable_calculator.tests.support import (
    PARTITIONS,
    Calculator,
    Mutations,
    lone_calculator,
    unique_location,
)
from shared_schemas import encode_key, partition_for, value_serde
from shared_schemas.schemas import SELLABLE_INVENTORY as SELLABLE_SCHEMA
from shared_schemas.topics import INVENTORY_ADJUSTMENTS, INVENTORY_RESERVATIONS, SELLABLE_INVENTORY

TRIALS = 3
KEYS = 18
"""Three keys per partition on average: every partition replays both topics."""


@pytest.fixture
def calculator(kafka_bootstrap: str, mutations: Mutations, tmp_path: Path) -> Iterator[Calculator]:
    """One instance, alone in its group: it owns every partition."""
    instance = lone_calculator(kafka_bootstrap, tmp_path, "recovery")
    instance.start()
    yield instance
    if instance.process is not None:
        instance.process.stop()


def _published(bootstrap: str, keys: set[bytes]) -> dict[bytes, int]:
    """The latest ``sellable_inventory`` count of each of ``keys`` (the topic as a table)."""
    serde = value_serde(SELLABLE_SCHEMA, SELLABLE_INVENTORY.name)
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": "unused"})
    partitions = {partition_for(key, PARTITIONS) for key in keys}
    consumer.assign([TopicPartition(SELLABLE_INVENTORY.name, p, 0) for p in partitions])
    latest: dict[bytes, int] = {}
    try:
        # Read until the topic goes quiet (the embedded broker's end offsets lag, so
        # "read up to the high watermark" can stop short of the newest records).
        while (message := consumer.poll(2)) is not None:
            if message.error() is None and message.key() in keys:
                latest[message.key()] = serde.deserialize(message.value())["count"]
    finally:
        consumer.close()
    return latest


def _restarted_log(calculator: Calculator) -> str:
    assert calculator.process is not None
    return f"\n--- {calculator.process.log_path}:\n{calculator.process.log_tail(30)}"


def test_writes_made_while_killed_all_count_after_a_replay_in_any_order(
    calculator: Calculator, mutations: Mutations, kafka_bootstrap: str
) -> None:
    location = unique_location("REPLAY")
    skus = [f"sku-{n}" for n in range(KEYS)]
    expected = dict.fromkeys(skus, 0)
    for trial in range(TRIALS):
        for sku in skus:
            mutations.send(INVENTORY_ADJUSTMENTS.name, location, sku, 100)
            expected[sku] += 100
        mutations.flush()
        wait_until(lambda: all(calculator.count_of(location, s) == expected[s] for s in skus))
        assert calculator.process is not None
        calculator.process.kill()
        for n, sku in enumerate(skus):  # while down: the key's reservations, and more stock
            mutations.send(INVENTORY_RESERVATIONS.name, location, sku, 7)
            expected[sku] -= 7
            if n % 2:
                mutations.send(INVENTORY_ADJUSTMENTS.name, location, sku, 1)
                expected[sku] += 1
        mutations.flush()
        calculator.start()
        try:
            wait_until(
                lambda: all(calculator.count_of(location, s) == expected[s] for s in skus),
                timeout=60,
            )
        except AssertionError:
            wrong = {s: calculator.count_of(location, s) for s in skus}
            wrong = {s: (v, expected[s]) for s, v in wrong.items() if v != expected[s]}
            raise AssertionError(
                f"trial {trial}: (actual, expected) {wrong}{_restarted_log(calculator)}"
            ) from None
        wait_until(lambda: httpx.get(calculator.url + "/health/ready").status_code == 200)
    keys = {encode_key(location, sku): sku for sku in skus}
    published = _published(kafka_bootstrap, set(keys))
    assert {keys[k]: v for k, v in published.items()} == expected
