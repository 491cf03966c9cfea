"""What the service's tests share: a publisher that writes sellable values the way the
calculator does, and a topic of a test's own."""

from __future__ import annotations

import time
import uuid

from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient

from shared_schemas import encode_key, partition_for, value_serde
from shared_schemas.schemas import SELLABLE_INVENTORY
from shared_schemas.topics import TopicSpec, ensure_topics

PARTITIONS = 6


class Publisher:
    """Writes sellable values the way the calculator does (same key, partition, serde)."""

    def __init__(self, bootstrap: str, topic: str) -> None:
        self.topic = topic
        self._producer = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True})
        self._serde = value_serde(SELLABLE_INVENTORY, topic)

    def send(self, location: str, sku: str, count: int, on_hand: int | None = None) -> None:
        key = encode_key(location, sku)
        value = self._serde.serialize(
            {
                "count": count,
                "on_hand": count if on_hand is None else on_hand,
                "reserved": 0 if on_hand is None else on_hand - count,
                "updated_at": int(time.time() * 1000),
            }
        )
        self._producer.produce(self.topic, value, key, partition=partition_for(key, PARTITIONS))

    def raw(self, key: bytes | None, value: bytes | None, partition: int = 0) -> None:
        self._producer.produce(self.topic, value, key, partition=partition)

    def flush(self) -> None:
        assert self._producer.flush(30) == 0

    def close(self) -> None:
        self.flush()
        del self._producer


def new_topic(bootstrap: str) -> str:
    """A fresh compacted topic of :data:`PARTITIONS` partitions; its name."""
    spec = TopicSpec(f"sellable-test-{uuid.uuid4().hex[:8]}", "test", {"cleanup.policy": "compact"})
    ensure_topics(AdminClient({"bootstrap.servers": bootstrap}), PARTITIONS, [spec])
    return spec.name
