"""The embedded broker: start, a real produce/consume round trip, stop, nothing left behind."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from local_stack.broker import EmbeddedBroker, broker_answers, external_kafka, tansu_binary
from local_stack.process import PrerequisiteError, free_port, port_in_use
from local_stack.tests._util import gone


def test_broker_produce_consume_round_trip(tmp_path: Path) -> None:
    port = free_port()
    with EmbeddedBroker(port=port, log_dir=tmp_path) as broker:
        pid = broker.process.pid
        assert broker.bootstrap_servers == f"127.0.0.1:{port}"
        bootstrap = broker.bootstrap_servers
        admin = AdminClient({"bootstrap.servers": bootstrap})
        admin.create_topics([NewTopic("round-trip", num_partitions=2)])["round-trip"].result(10)
        producer = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True})
        producer.produce("round-trip", b"hello", b"key", partition=1)
        assert producer.flush(10) == 0
        # assign(), not subscribe(): a group join on Tansu waits max.poll.interval.ms.
        consumer = Consumer(
            {"bootstrap.servers": bootstrap, "group.id": "t", "enable.auto.commit": False}
        )
        consumer.assign([TopicPartition("round-trip", 1, 0)])
        message = consumer.poll(10)
        consumer.close()
        assert message is not None and message.error() is None
        assert (message.key(), message.value()) == (b"key", b"hello")
        assert (tmp_path / "broker.log").is_file()
    assert gone(pid)
    assert not port_in_use(port)
    assert not broker_answers(bootstrap, timeout=0.5)


def test_broker_refuses_a_taken_port(tmp_path: Path) -> None:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        broker = EmbeddedBroker(port=port, log_dir=tmp_path)
        with pytest.raises(PrerequisiteError, match=f"^port {port} is taken"):
            broker.start()
        assert broker.process.pid is None  # nothing was started


def test_tansu_binary_is_executable() -> None:
    binary = tansu_binary()
    assert binary.name == "tansu"
    assert binary.stat().st_mode & 0o100


def test_external_kafka_override(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KAFKA_BOOTSTRAP_SERVERS", raising=False)
    assert external_kafka() is None
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", "kafka-1:9092,kafka-2:9092")
    assert external_kafka() == "kafka-1:9092,kafka-2:9092"


def test_kafka_bootstrap_fixture_is_a_live_broker(kafka_bootstrap: str) -> None:
    assert broker_answers(kafka_bootstrap)
