"""The embedded broker and Cassandra: start, a real round trip, stop, nothing left behind."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

from cassandra.cluster import Cluster
from cassandra.policies import RoundRobinPolicy
from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from local_stack.broker import EmbeddedBroker
from local_stack.cassandra import PROTOCOL_VERSION, EmbeddedCassandra
from local_stack.process import free_port, port_in_use


def _gone(pid: int | None) -> bool:
    assert pid is not None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_broker_produce_consume_round_trip(tmp_path: Path) -> None:
    port = free_port()
    with EmbeddedBroker(port=port, log_dir=tmp_path) as broker:
        pid = broker.process.pid
        bootstrap = broker.bootstrap_servers
        admin = AdminClient({"bootstrap.servers": bootstrap})
        admin.create_topics([NewTopic("round-trip", num_partitions=2)])["round-trip"].result(10)
        producer = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True})
        producer.produce("round-trip", b"hello", b"key", partition=1)
        assert producer.flush(10) == 0
        consumer = Consumer(
            {"bootstrap.servers": bootstrap, "group.id": "t", "enable.auto.commit": False}
        )
        consumer.assign([TopicPartition("round-trip", 1, 0)])
        message = consumer.poll(10)
        consumer.close()
        assert message is not None and message.error() is None
        assert (message.key(), message.value()) == (b"key", b"hello")
    assert _gone(pid)
    assert not port_in_use(port)


def test_cassandra_cql_round_trip(tmp_path: Path) -> None:
    port = free_port()
    with EmbeddedCassandra(
        port=port, data_dir=tmp_path / "data", fresh=True, log_dir=tmp_path
    ) as cassandra:
        assert cassandra.process is not None
        pid = cassandra.process.pid
        cluster = Cluster(
            cassandra.contact_points,
            port=cassandra.port,
            protocol_version=PROTOCOL_VERSION,
            load_balancing_policy=RoundRobinPolicy(),
        )
        session = cluster.connect()
        keyspace = f"t_{uuid.uuid4().hex[:8]}"
        session.execute(
            f"CREATE KEYSPACE {keyspace} WITH replication = "
            "{'class': 'SimpleStrategy', 'replication_factor': 1}"
        )
        session.execute(f"CREATE TABLE {keyspace}.kv (k text PRIMARY KEY, v bigint)")
        session.execute(f"INSERT INTO {keyspace}.kv (k, v) VALUES (%s, %s)", ("a", 42))
        assert session.execute(f"SELECT v FROM {keyspace}.kv WHERE k = 'a'").one().v == 42
        cluster.shutdown()
    assert _gone(pid)
    assert not port_in_use(port)
