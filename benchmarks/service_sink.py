"""Sink throughput: how fast the service drains a pre-filled ``sellable_inventory`` into Cassandra.

    .venv/bin/python -m benchmarks.service_sink [--records 200000] [--skus-per-location 100]
        [--commitlog-sync batch|periodic|both]

Fills a fresh topic with distinct keys (so every record is one row to write), starts
the service, and measures rows written per second from its first row written to its
last, by the rows' own write timestamps in Cassandra. A raw confluent-kafka consume of
the same topic runs first, in the same run, as the baseline.
The issue's target: >= 20,000 records/s.

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
from typing import get_args

import httpx
from cassandra.query import SimpleStatement
from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient

from benchmarks import infra
from local_stack.cassandra import CommitlogSync, external_cassandra
from local_stack.process import free_port
from shared_schemas import encode_key, partition_for, value_serde
from shared_schemas.schemas import SELLABLE_INVENTORY
from shared_schemas.topics import TopicSpec, ensure_topics

PARTITIONS = 6


def _metric(client: httpx.Client, url: str, name: str) -> float:
    for line in client.get(url + "/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return 0.0


def _drain(bootstrap: str, topic: str, records: int, commitlog_sync: CommitlogSync) -> float:
    """Rows/s the service writes while draining ``topic`` into a fresh Cassandra (and
    keyspace), from its first row written to its last.

    The interval comes from the rows themselves (Cassandra's write timestamps), not from
    polling the service's metrics: a small topic is written before the first poll.
    """
    keyspace = f"bench_{uuid.uuid4().hex[:8]}"
    with ExitStack() as stack:
        endpoint = infra.cassandra(stack, commitlog_sync)
        port = free_port()
        service = infra.sellable_service(
            stack,
            bootstrap,
            endpoint,
            port,
            SERVICE_TOPIC=topic,
            SERVICE_CONSUMER_GROUP=f"bench-{topic}-{commitlog_sync}",
            CASSANDRA_KEYSPACE=keyspace,
        )
        url = f"http://127.0.0.1:{port}"
        with httpx.Client(timeout=5) as client:
            service.wait_ready(lambda: client.get(url + "/health/live").status_code == 200, 60)
            deadline = time.monotonic() + 600
            while (written := _metric(client, url, "service_rows_written_total")) < records:
                if time.monotonic() > deadline:
                    sys.exit("error: the service did not drain the topic within 10 minutes")
                print(f"\r  written {written:,.0f}/{records:,}", end="", flush=True)
                time.sleep(0.2)
        print(f"\r  written {records:,}/{records:,}")
        session = infra.cassandra_session(stack, endpoint)
        rows = session.execute(
            SimpleStatement(
                f"SELECT writetime(count) FROM {keyspace}.sellable_inventory", fetch_size=10_000
            )
        )
        times = [row[0] for row in rows]
    if len(times) != records:
        sys.exit(f"error: {len(times):,} rows in Cassandra, {records:,} expected")
    span = (max(times) - min(times)) / 1e6  # microseconds
    return (records - 1) / max(span, 1e-6)


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
        seen, started = 0, time.perf_counter()
        while seen < args.records:
            seen += sum(1 for m in consumer.consume(10_000, 1.0) if m.error() is None)
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
