"""Sink throughput: how fast the service drains a pre-filled ``sellable_inventory`` into Cassandra.

    .venv/bin/python -m benchmarks.service_sink [--records 200000] [--skus-per-location 100]
        [--commitlog-sync batch|periodic|both]

Fills a fresh topic with distinct keys (so every record is one row to write), runs the
service's writer (``SellableWriter``: its consumer and its Cassandra writes, in this
process so that the records themselves can be timed), and measures rows per second from
the start of the consume call that returned its first records to the end of its last
write. A raw confluent-kafka consume of the same topic, timed the same way, runs first
in the same run as the baseline. The issue's target: >= 20,000 records/s.

``--commitlog-sync`` picks how the embedded Cassandra syncs its commit log: ``batch``
(what it runs: a write is acknowledged once synced, so it survives kill -9),
``periodic`` (every 10 s, the package's default, which loses acknowledged writes on a
kill -9) or ``both``: the same topic drained into a fresh Cassandra in each mode, one
after the other, to show what durability costs. An external Cassandra is measured as
it is configured.
"""

from __future__ import annotations

import argparse
import sys
import time
import uuid
from contextlib import ExitStack
from typing import Any, cast, get_args

from confluent_kafka import Consumer, Message, Producer, TopicPartition
from confluent_kafka.admin import AdminClient

from benchmarks import infra
from local_stack.cassandra import CommitlogSync, external_cassandra
from sellable_service.metrics import ServiceMetrics
from sellable_service.settings import ServiceSettings
from sellable_service.store import SellableTable
from sellable_service.writer import SellableWriter, Upsert
from shared_schemas import encode_key, partition_for, value_serde
from shared_schemas.schemas import SELLABLE_INVENTORY
from shared_schemas.topics import TopicSpec, ensure_topics

PARTITIONS = 6


class _TimedConsumer:
    """A consumer that notes when the ``consume`` call that returned the first records
    began (everything else is the real consumer's)."""

    def __init__(self, consumer: Consumer) -> None:
        self._consumer = consumer
        self.first_started: float | None = None

    def consume(self, num_messages: int, timeout: float) -> list[Message]:
        started = time.perf_counter()
        messages = self._consumer.consume(num_messages, timeout)
        if messages and self.first_started is None:
            self.first_started = started
        return messages

    def __getattr__(self, name: str) -> Any:
        return getattr(self._consumer, name)


class _TimedWriter(SellableWriter):
    """The service's writer, timed by its records: from the start of the consume call
    that returned the first of them to the end of the write of the last."""

    consumer: _TimedConsumer | None = None
    last_written: float = 0.0
    rows: int = 0

    def _consumer(self) -> Consumer:
        self.consumer = _TimedConsumer(super()._consumer())
        return cast(Consumer, self.consumer)

    def write(self, upserts: list[Upsert]) -> None:
        super().write(upserts)
        self.last_written, self.rows = time.perf_counter(), self.rows + len(upserts)

    @property
    def first_consumed(self) -> float:
        assert self.consumer is not None and self.consumer.first_started is not None
        return self.consumer.first_started


def _drain(bootstrap: str, topic: str, records: int, commitlog_sync: CommitlogSync) -> float:
    """Rows/s the service's writer (its consumer and Cassandra writes, in this process)
    drains ``topic`` into a fresh Cassandra (and keyspace) with, from the moment its first
    batch is consumed to the end of its last write."""
    with ExitStack() as stack:
        endpoint = infra.cassandra(stack, commitlog_sync)
        settings = ServiceSettings(
            kafka_bootstrap_servers=bootstrap,
            cassandra_contact_points=",".join(endpoint.contact_points),
            cassandra_port=endpoint.port,
            cassandra_protocol_version=endpoint.protocol_version,
            cassandra_keyspace=f"bench_{uuid.uuid4().hex[:8]}",
            service_topic=topic,
            service_consumer_group=f"bench-{topic}-{commitlog_sync}",
            topic_partitions=PARTITIONS,
        )
        table = SellableTable(settings)
        table.start()
        stack.callback(table.close)
        if not table.wait_connected(60):
            sys.exit("error: Cassandra did not accept a session within 60 s")
        writer = _TimedWriter(settings, table, ServiceMetrics())
        writer.start()
        stack.callback(writer.stop)
        deadline = time.monotonic() + 600
        while writer.rows < records:
            if time.monotonic() > deadline:
                sys.exit("error: the writer did not drain the topic within 10 minutes")
            print(f"\r  written {writer.rows:,}/{records:,}", end="", flush=True)
            time.sleep(0.2)
        print(f"\r  written {writer.rows:,}/{records:,}")
        return records / (writer.last_written - writer.first_consumed)


def main() -> None:
    """Fill, measure the baseline and the sink, print the comparison."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=200_000)
    parser.add_argument("--skus-per-location", type=int, default=100)
    parser.add_argument(
        "--commitlog-sync",
        choices=[*get_args(CommitlogSync), "both"],
        default="batch",
        help="commit-log sync of the embedded Cassandra (default: batch, what it runs)",
    )
    args = parser.parse_args()
    # "both": the old setting first, then what runs now (before, after).
    modes: list[CommitlogSync] = (
        ["periodic", "batch"] if args.commitlog_sync == "both" else [args.commitlog_sync]
    )
    if external_cassandra():
        modes = modes[:1]  # its own configuration decides; one measurement
    topic = TopicSpec(
        f"sink-bench-{uuid.uuid4().hex[:6]}", "benchmark", {"cleanup.policy": "compact"}
    )
    with ExitStack() as stack:
        bootstrap = infra.kafka(stack)
        ensure_topics(AdminClient({"bootstrap.servers": bootstrap}), PARTITIONS, [topic])

        producer = Producer(
            {
                "bootstrap.servers": bootstrap,
                "linger.ms": 20,
                "queue.buffering.max.messages": 1_000_000,
            }
        )
        serde = value_serde(SELLABLE_INVENTORY, topic.name)
        started = time.perf_counter()
        for i in range(args.records):
            key = encode_key(f"LOC{i // args.skus_per_location}", f"sku-{i}")
            value = serde.serialize({"count": i, "on_hand": i, "reserved": 0, "updated_at": i})
            while True:
                try:
                    producer.produce(
                        topic.name, value, key, partition=partition_for(key, PARTITIONS)
                    )
                    break
                except BufferError:
                    producer.poll(0.01)
        producer.flush(120)
        print(f"filled {args.records:,} records in {time.perf_counter() - started:.1f} s")

        consumer = Consumer(
            {"bootstrap.servers": bootstrap, "group.id": "raw", "enable.auto.commit": False}
        )
        consumer.assign([TopicPartition(topic.name, p, 0) for p in range(PARTITIONS)])
        # Batches and timing as the writer's (5,000 records, 50 ms): from the start of the
        # consume call that returned the first records (not from connecting) to the end.
        seen, started = 0, None
        while seen < args.records:
            call_started = time.perf_counter()
            batch = [m for m in consumer.consume(5_000, 0.05) if m.error() is None]
            if batch and started is None:
                started = call_started
            seen += len(batch)
        assert started is not None
        baseline = args.records / (time.perf_counter() - started)
        consumer.close()

        # One Cassandra at a time: each mode gets the machine to itself.
        sinks = {mode: _drain(bootstrap, topic.name, args.records, mode) for mode in modes}
    print(f"{'':44}{'records/s':>12}")
    print(f"{'raw confluent-kafka consume':44}{baseline:>12,.0f}")
    for mode, sink in sinks.items():
        label = "service: consume + write Cassandra" + (
            "" if external_cassandra() else f" ({mode})"
        )
        print(f"{label:44}{sink:>12,.0f}   ratio sink/raw {sink / baseline:.2f}")
    print("target: >= 20,000 records/s")


if __name__ == "__main__":
    main()
