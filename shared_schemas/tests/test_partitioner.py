"""The partitioner agrees with Kafka's Java client and with librdkafka's placement."""

from __future__ import annotations

import uuid

import pytest
from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient

from shared_schemas.partitioner import key_and_partition, murmur2, partition_for
from shared_schemas.serde import encode_key
from shared_schemas.topics import TopicSpec, ensure_topics


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        # Kafka's UtilsTest.testMurmur2 (clients/src/test/java/.../utils/UtilsTest.java).
        (b"21", -973932308),
        (b"foobar", -790332482),
        (b"a-little-bit-long-string", -985981536),
        (b"a-little-bit-longer-string", -1486304829),
        (b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8", -58897971),
        (b"abc", 479470107),
    ],
)
def test_murmur2_matches_java_utils(data: bytes, expected: int) -> None:
    assert murmur2(data) == expected


def test_partition_for_rejects_non_positive_counts() -> None:
    with pytest.raises(ValueError, match="must be positive"):
        partition_for(b"k", 0)


@pytest.mark.parametrize("partitions", [6, 7])
def test_partition_for_matches_librdkafka_placement(kafka_bootstrap: str, partitions: int) -> None:
    """Let librdkafka place 1,000 keys itself and check we name the same partition for each."""
    topic = TopicSpec(f"partitioner-check-{uuid.uuid4().hex[:8]}", "test topic")
    ensure_topics(AdminClient({"bootstrap.servers": kafka_bootstrap}), partitions, [topic])
    producer = Producer({"bootstrap.servers": kafka_bootstrap, "partitioner": "murmur2_random"})
    placed: dict[bytes, int] = {}

    def on_delivery(err: object, msg: object) -> None:
        assert err is None, err
        placed[msg.key()] = msg.partition()  # type: ignore[attr-defined]

    keys = [encode_key(f"LOC{i % 37}", f"sku-{i}") for i in range(1_000)]
    for key in keys:
        producer.produce(topic.name, key=key, value=b"", on_delivery=on_delivery)
        producer.poll(0)
    assert producer.flush(30) == 0
    assert len(placed) == len(keys)
    assert len(set(placed.values())) == partitions  # the keys really spread over every partition
    mismatched = [k for k in keys if placed[k] != partition_for(k, partitions)]
    assert mismatched == []


def test_key_and_partition_agrees_with_encode_key_and_partition_for() -> None:
    for location, sku in [("STL", "123123"), ("NYC", "9"), ("Zürich", "ß-1"), ("STL", "123123")]:
        key, partition = key_and_partition(location, sku, 6)
        assert key == encode_key(location, sku)
        assert partition == partition_for(key, 6)
    assert key_and_partition("STL", "123123", 12)[1] == partition_for(
        encode_key("STL", "123123"), 12
    )
