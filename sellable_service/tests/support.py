"""What the service's tests share: a publisher that writes sellable values the way the
calculator does, and topics of a test's own."""

from __future__ import annotations

import time
import uuid

from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient

from shared_schemas import encode_key, partition_for, value_serde
from shared_schemas.reservations import ReservationResult
from shared_schemas.schemas import RESERVATION_RESULT, SELLABLE_INVENTORY
from shared_schemas.topics import RESERVATION_RESULTS, TopicSpec, ensure_topics

PARTITIONS = 6


class Publisher:
    """Writes sellable values, and reservation results to :func:`results_topic_for` the
    topic, the way the calculator does (same key, partition, serde)."""

    def __init__(self, bootstrap: str, topic: str) -> None:
        self.topic = topic
        self.results_topic = results_topic_for(topic)
        self._producer = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True})
        self._serde = value_serde(SELLABLE_INVENTORY, topic)
        self._results_serde = value_serde(RESERVATION_RESULT, self.results_topic)

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

    def send_result(self, result: ReservationResult) -> None:
        """Publish ``result`` to the results topic, in its key's partition."""
        key = encode_key(result.location, result.sku)
        value = self._results_serde.serialize(result.record())
        self._producer.produce(
            self.results_topic, value, key, partition=partition_for(key, PARTITIONS)
        )

    def raw(
        self, key: bytes | None, value: bytes | None, partition: int = 0, topic: str | None = None
    ) -> None:
        self._producer.produce(topic or self.topic, value, key, partition=partition)

    def flush(self) -> None:
        assert self._producer.flush(30) == 0

    def close(self) -> None:
        self.flush()
        del self._producer


def results_topic_for(topic: str) -> str:
    """The reservation results topic that goes with the test topic ``topic``."""
    return f"{topic}-results"


def new_topic(bootstrap: str) -> str:
    """A fresh compacted topic of :data:`PARTITIONS` partitions, and its results topic
    (:func:`results_topic_for`, configured as ``reservation_results``); the first's name."""
    spec = TopicSpec(f"sellable-test-{uuid.uuid4().hex[:8]}", "test", {"cleanup.policy": "compact"})
    results = TopicSpec(results_topic_for(spec.name), "test", RESERVATION_RESULTS.config)
    ensure_topics(AdminClient({"bootstrap.servers": bootstrap}), PARTITIONS, [spec, results])
    return spec.name
