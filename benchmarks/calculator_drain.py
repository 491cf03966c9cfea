"""How fast one calculator instance (one Bytewax worker) drains a pre-filled topic.

    .venv/bin/python -m benchmarks.calculator_drain [--records 500000] [--keys 5000]

Fills ``inventory_adjustments`` and ``inventory_reservations`` (3:1) on a fresh embedded
broker (or ``KAFKA_BOOTSTRAP_SERVERS``), then measures, in the same run:

* **baseline**: a raw confluent-kafka consumer reading the same partitions, no decoding;
* **calculator**: ``python -m sellable_calculator`` owning every partition, from its
  first consumed record to its last (process start-up excluded), read off its metrics.

Prints records/s for both and the ratio. The issue's target: >= 100k mutations/s.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import uuid
from contextlib import ExitStack

import httpx
from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient

from benchmarks import infra
from local_stack.process import ManagedProcess, free_port
from shared_schemas import encode_key, partition_for, value_serde
from shared_schemas.schemas import INVENTORY_MUTATION
from shared_schemas.topics import (
    INVENTORY_ADJUSTMENTS,
    INVENTORY_RESERVATIONS,
    changelog_topic,
    ensure_topics,
)

PARTITIONS = 6
INPUTS = (INVENTORY_ADJUSTMENTS.name, INVENTORY_RESERVATIONS.name)


def fill(bootstrap: str, records: int, keys: int) -> None:
    """Produce ``records`` mutations over ``keys`` keys, three adjustments per reservation."""
    producer = Producer(
        {
            "bootstrap.servers": bootstrap,
            "linger.ms": 20,
            "batch.num.messages": 10_000,
            "queue.buffering.max.messages": 1_000_000,
        }
    )
    serdes = [value_serde(INVENTORY_MUTATION, topic) for topic in INPUTS]
    key_bytes = [encode_key(f"LOC{i % 50}", f"sku-{i}") for i in range(keys)]
    partitions = [partition_for(k, PARTITIONS) for k in key_bytes]
    now = int(time.time() * 1000)
    started = time.perf_counter()
    for i in range(records):
        kind = 1 if i % 4 == 3 else 0
        k = i % keys
        value = serdes[kind].serialize(
            {"mutation_id": str(uuid.uuid4()), "count": 1 + i % 5, "event_time": now}
        )
        while True:
            try:
                producer.produce(INPUTS[kind], value, key_bytes[k], partition=partitions[k])
                break
            except BufferError:
                producer.poll(0.01)
        if i % 20_000 == 0:
            producer.poll(0)
            print(f"\r  filling: {i:,}/{records:,}", end="", flush=True)
    producer.flush(120)
    print(f"\r  filled {records:,} records in {time.perf_counter() - started:.1f} s")


def raw_consume(bootstrap: str, records: int) -> float:
    """Records/s of a bare consumer over the same partitions (the baseline)."""
    consumer = Consumer(
        {"bootstrap.servers": bootstrap, "group.id": "bench-raw", "enable.auto.commit": False}
    )
    consumer.assign([TopicPartition(t, p, 0) for t in INPUTS for p in range(PARTITIONS)])
    seen, started = 0, time.perf_counter()
    while seen < records:
        seen += sum(1 for m in consumer.consume(10_000, 1.0) if m.error() is None)
    elapsed = time.perf_counter() - started
    consumer.close()
    return records / elapsed


def _records_done(client: httpx.Client, url: str) -> int:
    text = client.get(url + "/metrics").text
    return int(
        sum(
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith("calculator_records_total")
        )
    )


def calculator_drain(bootstrap: str, records: int, state_dir: str) -> float:
    """Records/s of one calculator instance with one worker, first to last record."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    group = f"bench-drain-{uuid.uuid4().hex[:6]}"
    # Its changelog exists before it starts, as its input and output topics do: the
    # first records produced to a topic created a moment before wait for its metadata.
    ensure_topics(
        AdminClient({"bootstrap.servers": bootstrap}), PARTITIONS, [changelog_topic(group)]
    )
    env = {
        **os.environ,
        "KAFKA_BOOTSTRAP_SERVERS": bootstrap,
        "TOPIC_PARTITIONS": str(PARTITIONS),
        "CALCULATOR_PORT": str(port),
        "CALCULATOR_GROUP_ID": group,
        "CALCULATOR_INSTANCE_ID": f"bench-{uuid.uuid4().hex[:6]}",
        "CALCULATOR_STATE_DIR": state_dir,
        "CALCULATOR_WORKERS": "1",
    }
    calculator = ManagedProcess(
        "calculator", [sys.executable, "-m", "sellable_calculator"], env=env
    )
    with calculator, httpx.Client(timeout=5) as client:
        calculator.start()
        calculator.wait_ready(lambda: client.get(url + "/health/live").status_code == 200, 60)
        first_at, first_count = None, 0
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            done = _records_done(client, url)
            now = time.perf_counter()
            if first_at is None and done > 0:
                first_at, first_count = now, done
            if done >= records:
                break
            print(f"\r  calculator: {done:,}/{records:,}", end="", flush=True)
            time.sleep(0.02)
        else:
            raise TimeoutError("the calculator did not drain the topics in 10 minutes")
        print()
        assert first_at is not None
        return (records - first_count) / max(now - first_at, 1e-9)


def main() -> None:
    """Fill, measure both, print the comparison."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=500_000)
    parser.add_argument("--keys", type=int, default=5_000)
    args = parser.parse_args()
    with ExitStack() as stack:
        bootstrap = infra.kafka(stack)
        ensure_topics(AdminClient({"bootstrap.servers": bootstrap}), PARTITIONS)
        fill(bootstrap, args.records, args.keys)
        baseline = raw_consume(bootstrap, args.records)
        state_dir = stack.enter_context(tempfile.TemporaryDirectory())
        calculator = calculator_drain(bootstrap, args.records, state_dir)
    print(f"\n{'':28}{'records/s':>12}")
    print(f"{'raw confluent-kafka consume':28}{baseline:>12,.0f}")
    print(f"{'calculator (1 worker)':28}{calculator:>12,.0f}")
    print(f"ratio calculator/raw: {calculator / baseline:.2f}   target: >= 100,000 records/s")


if __name__ == "__main__":
    main()
