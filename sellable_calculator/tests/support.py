"""Helpers for the calculator tests: instances as processes, a mutation writer, keys;
and :class:`PartitionSums` driven batch by batch with its updates stored as the sink does.

Imported by the test modules and by ``conftest.py`` (which holds only the fixtures).
"""

from __future__ import annotations

import os
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from confluent_kafka import Producer

from local_stack.process import ManagedProcess, free_port
from local_stack.testing import wait_until
from sellable_calculator.changelog import INPUT_TOPICS, PartitionState
from sellable_calculator.dataflow import MutationBatch, PartitionSums, PartitionUpdate
from sellable_calculator.store import SellableStore
from shared_schemas import encode_key, partition_for, value_serde
from shared_schemas.positions import Position
from shared_schemas.schemas import INVENTORY_MUTATION
from shared_schemas.topics import INVENTORY_ADJUSTMENTS, INVENTORY_RESERVATIONS

PARTITIONS = 6


class Mutations:
    """Writes adjustments and reservations the way the mutator does (same serde, key, partition)."""

    def __init__(self, bootstrap: str) -> None:
        self._producer = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True})
        self._serdes = {
            topic: value_serde(INVENTORY_MUTATION, topic)
            for topic in (INVENTORY_ADJUSTMENTS.name, INVENTORY_RESERVATIONS.name)
        }

    def send(self, topic: str, location: str, sku: str, count: int) -> None:
        """Queue one mutation; :meth:`flush` sends it."""
        key = encode_key(location, sku)
        value = self._serdes[topic].serialize(
            {"mutation_id": str(uuid.uuid4()), "count": count, "event_time": int(time.time() * 1e3)}
        )
        while True:
            try:
                self._producer.produce(topic, value, key, partition=partition_for(key, PARTITIONS))
                return
            except BufferError:
                self._producer.poll(0.05)

    def adjust(self, location: str, sku: str, count: int) -> Position:
        """Write one adjustment and return its position once the broker acknowledged it."""
        return self._send_and_wait(INVENTORY_ADJUSTMENTS.name, location, sku, count)

    def reserve(self, location: str, sku: str, count: int) -> Position:
        """Write one reservation and return its position once the broker acknowledged it."""
        return self._send_and_wait(INVENTORY_RESERVATIONS.name, location, sku, count)

    def raw(self, topic: str, key: bytes | None, value: bytes | None, partition: int) -> None:
        """Write arbitrary bytes (for bad-record tests)."""
        self._producer.produce(topic, value, key, partition=partition)
        assert self._producer.flush(10) == 0

    def flush(self) -> None:
        """Wait until everything queued is acknowledged."""
        assert self._producer.flush(60) == 0

    def close(self) -> None:
        """Flush and drop the producer (its librdkafka handle goes with it)."""
        self.flush()
        del self._producer

    def _send_and_wait(self, topic: str, location: str, sku: str, count: int) -> Position:
        key = encode_key(location, sku)
        delivered: list[Position] = []
        value = self._serdes[topic].serialize(
            {"mutation_id": str(uuid.uuid4()), "count": count, "event_time": int(time.time() * 1e3)}
        )
        self._producer.produce(
            topic,
            value,
            key,
            partition=partition_for(key, PARTITIONS),
            on_delivery=lambda err, msg: (
                delivered.append(Position(msg.topic(), msg.partition(), msg.offset()))
                if err is None
                else None
            ),
        )
        self.flush()
        assert delivered, "not delivered"
        return delivered[0]


@dataclass
class Calculator:
    """One calculator instance running as its own process."""

    index: int
    port: int
    env: dict[str, str]
    log_dir: Path
    process: ManagedProcess | None = None
    client: httpx.Client = field(default_factory=lambda: httpx.Client(timeout=10))

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        """Start the process and wait until its API answers."""
        self.process = ManagedProcess(
            f"calculator-{self.index}",
            [sys.executable, "-m", "sellable_calculator"],
            env=self.env,
            log_dir=self.log_dir,
        )
        self.process.start()
        self.process.wait_ready(self._live, timeout=60)

    def _live(self) -> bool:
        try:
            return self.client.get(self.url + "/health/live").status_code == 200
        except httpx.HTTPError:
            return False

    def get(self, path: str, **params: Any) -> httpx.Response:
        return self.client.get(self.url + path, params=params)

    def sellable(self, location: str, sku: str, **params: Any) -> httpx.Response:
        return self.get(f"/inventory/locations/{location}/skus/{sku}", **params)

    def count_of(self, location: str, sku: str) -> int | None:
        response = self.sellable(location, sku)
        return response.json()["count"] if response.status_code == 200 else None

    @property
    def instance_id(self) -> str:
        return self.env["CALCULATOR_INSTANCE_ID"]

    def partitions(self) -> list[int]:
        """The partitions this instance owns and serves (active), by its own routing table."""
        metadata = self.get("/metadata").json()
        return sorted(
            p["partition"]
            for p in metadata["partitions"]
            if p["owner"] == self.instance_id and p["state"] == "active"
        )

    def ready(self) -> bool:
        try:
            return self.get("/health/ready").status_code == 200
        except httpx.HTTPError:
            return False

    def metric(self, name: str, **labels: str) -> float:
        """Sum of the samples of ``name`` whose labels include ``labels``."""
        total = 0.0
        for line in self.get("/metrics").text.splitlines():
            if not line.startswith(name + "{") and not line.startswith(name + " "):
                continue
            if all(f'{k}="{v}"' in line for k, v in labels.items()):
                total += float(line.rsplit(" ", 1)[1])
        return total


def calculator_env(
    bootstrap: str, state: Path, group: str, name: str, port: int, **extra: str
) -> dict[str, str]:
    """The environment of one instance of calculator group ``group`` (its own, so that
    instances of other tests' groups on the same broker never join it), listening on
    ``port``, its state under ``state``, its instance id ``name``."""
    return {
        **os.environ,
        "KAFKA_BOOTSTRAP_SERVERS": bootstrap,
        "TOPIC_PARTITIONS": str(PARTITIONS),
        "CALCULATOR_PORT": str(port),
        "CALCULATOR_GROUP_ID": group,
        "CALCULATOR_INSTANCE_ID": name,
        "CALCULATOR_STATE_DIR": str(state),
        **extra,
    }


def lone_calculator(bootstrap: str, state: Path, name: str, **extra: str) -> Calculator:
    """One calculator (not started) in a group of its own, so owning every partition of
    ``bootstrap``'s topics, its state and logs under ``state``, with an instance id
    starting ``name``."""
    port = free_port()
    run = uuid.uuid4().hex[:6]
    env = calculator_env(bootstrap, state, f"group-{name}-{run}", f"{name}-{run}", port, **extra)
    return Calculator(0, port, env, state / "logs")


def wait_for_assignment(calculators: list[Calculator], timeout: float = 60) -> None:
    """Wait until every partition is active on one of ``calculators``, each sees the same
    owners, and every one of them is ready."""

    def settled() -> bool:
        views = []
        for calculator in calculators:
            try:
                views.append(
                    [
                        (p["owner"], p["state"])
                        for p in calculator.get("/metadata").json()["partitions"]
                    ]
                )
            except (httpx.HTTPError, ValueError, KeyError):
                return False
        ids = {c.instance_id for c in calculators}
        return (
            all(view == views[0] for view in views)
            and all(owner in ids and state == "active" for owner, state in views[0])
            and all(c.ready() for c in calculators)
        )

    wait_until(settled, timeout=timeout)


def unique_location(prefix: str = "LOC") -> str:
    """A location no other test writes to."""
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def sku_owned_by(calculator: Calculator, location: str, start: int = 0) -> str:
    """A sku whose key lives in a partition ``calculator`` owns now."""
    owned = set(calculator.partitions())
    for n in range(start, start + 1_000):
        if partition_for(encode_key(location, str(n)), PARTITIONS) in owned:
            return str(n)
    raise AssertionError(f"no sku found in partitions {sorted(owned)}")


def apply_batch(
    logic: PartitionSums, store: SellableStore, *batches: MutationBatch
) -> list[PartitionUpdate]:
    """One ``on_batch`` call, its updates applied to ``store`` as the sink applies them."""
    updates, retain = logic.on_batch(list(batches))
    assert retain is False  # RETAIN: the per-partition state lives on
    updates = list(updates)
    for update in updates:
        store.apply(
            update.changes,
            {(INPUT_TOPICS[k], update.partition): o for k, o in update.next_offsets.items()},
        )
    return updates


def sums_of(partition: int, state: PartitionState | None = None) -> PartitionSums:
    """The sums of ``partition``, starting from ``state`` (empty by default)."""
    return PartitionSums({partition: state or PartitionState({})})
