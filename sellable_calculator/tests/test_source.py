"""The input source against the real broker: it resumes exactly where its state says."""

from __future__ import annotations

import threading
import time
import uuid

from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient

from sellable_calculator.changelog import ADJUSTMENT, PartitionState
from sellable_calculator.dataflow import Generation, MutationSource
from sellable_calculator.health import DataflowHealth
from sellable_calculator.metrics import CalculatorMetrics
from sellable_calculator.settings import CalculatorSettings
from shared_schemas import key_and_partition, value_serde
from shared_schemas.schemas import INVENTORY_MUTATION
from shared_schemas.topics import INVENTORY_ADJUSTMENTS, ensure_topics

PARTITIONS = 6
PARTITION = 4


def _produce(bootstrap: str, location: str, skus: list[str]) -> list[int]:
    """Adjustments for ``skus`` (all in PARTITION); returns their offsets."""
    serde = value_serde(INVENTORY_MUTATION, INVENTORY_ADJUSTMENTS.name)
    producer = Producer({"bootstrap.servers": bootstrap})
    offsets: list[int] = []
    for sku in skus:
        key, _ = key_and_partition(location, sku, PARTITIONS)
        value = serde.serialize({"mutation_id": sku, "count": 1, "event_time": 0})
        producer.produce(
            INVENTORY_ADJUSTMENTS.name,
            value,
            key,
            partition=PARTITION,
            on_delivery=lambda err, msg: offsets.append(msg.offset()),
        )
    assert producer.flush(10) == 0
    return offsets


def test_a_resume_offset_past_the_end_waits_for_it_without_jumping(
    kafka_bootstrap: str,
) -> None:
    """A restarted partition reads on from exactly its state's offset: no skip, no recount.

    (The embedded broker answers an offset past the end with an empty fetch; a broker
    that answers "offset out of range" takes the retry path, which seeks back to the
    same offset.)
    """
    ensure_topics(AdminClient({"bootstrap.servers": kafka_bootstrap}), PARTITIONS)
    settings = CalculatorSettings(
        kafka_bootstrap_servers=kafka_bootstrap,
        topic_partitions=PARTITIONS,
    )
    location = f"RANGE-{uuid.uuid4().hex[:6]}"
    skus = [
        sku
        for sku in map(str, range(500))
        if key_and_partition(location, sku, PARTITIONS)[1] == PARTITION
    ][:7]
    # The exact end, from a delivery report (the embedded broker's watermarks can lag).
    end = _produce(kafka_bootstrap, location, skus[:1])[0] + 1
    # The state says three records past the end were already counted.
    resume = end + 3
    restored = {PARTITION: PartitionState({}, {ADJUSTMENT: resume})}
    generation = Generation((PARTITION,), restored, threading.Event(), 1)
    source = MutationSource(settings, generation, CalculatorMetrics(), DataflowHealth())
    part = source.build_part("mutations", f"{ADJUSTMENT}:{PARTITION}", None)
    try:
        for _ in range(10):  # nothing to read yet, and no jump to another offset
            assert [m for _, b in part.next_batch() for m in b.mutations] == []
            time.sleep(0.1)
        assert _produce(kafka_bootstrap, location, skus[1:]) == list(range(end, end + 6))
        offsets: list[int] = []
        deadline = time.monotonic() + 20
        while len(offsets) < 3 and time.monotonic() < deadline:
            for _, batch in part.next_batch():
                offsets += [offset for _, _, _, offset in batch.mutations]
            time.sleep(0.05)
    finally:
        part.close()
    assert offsets == [end + 3, end + 4, end + 5]
