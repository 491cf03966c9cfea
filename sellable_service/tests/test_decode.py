"""The writer's decode step, on records built in memory: no broker, no Cassandra."""

from __future__ import annotations

import pytest
from confluent_kafka import KafkaError, KafkaException, Message

from sellable_service.metrics import ServiceMetrics
from sellable_service.settings import ServiceSettings
from sellable_service.store import SellableTable
from sellable_service.writer import Batch, SellableWriter, Upsert
from shared_schemas import encode_key, value_serde
from shared_schemas.schemas import SELLABLE_INVENTORY

TOPIC = "sellable_inventory"
STL = encode_key("STL", "123123")
KC = encode_key("KC", "7")


def _value(count: int, on_hand: int) -> dict[str, int]:
    return {"count": count, "on_hand": on_hand, "reserved": on_hand - count, "updated_at": 1_000}


def _record(
    partition: int, offset: int, key: bytes | None, value: dict[str, int] | None
) -> Message:
    raw = None if value is None else value_serde(SELLABLE_INVENTORY, TOPIC).serialize(value)
    return _raw(partition, offset, key, raw)


def _raw(partition: int, offset: int, key: bytes | None, value: bytes | None) -> Message:
    return Message(topic=TOPIC, partition=partition, offset=offset, key=key, value=value)


@pytest.fixture
def writer() -> SellableWriter:
    """A writer that is never started: decoding needs neither its consumer nor Cassandra."""
    settings = ServiceSettings(service_topic=TOPIC)
    return SellableWriter(settings, SellableTable(settings), ServiceMetrics())


def _undecodable(writer: SellableWriter) -> float:
    return writer.metrics.registry.get_sample_value("service_undecodable_records_total") or 0.0


def test_the_newest_record_of_each_key_wins_and_each_partition_moves_past_its_last(
    writer: SellableWriter,
) -> None:
    batch = writer.decode(
        [
            _record(2, 10, STL, _value(90, 100)),
            _record(4, 3, KC, _value(1, 1)),
            _record(2, 11, STL, _value(80, 100)),
        ]
    )
    assert batch.upserts == {
        STL: Upsert("STL", "123123", _value(80, 100), 2, 11),
        KC: Upsert("KC", "7", _value(1, 1), 4, 3),
    }
    assert batch.next_offsets == {2: 12, 4: 4}
    assert _undecodable(writer) == 0


def test_a_tombstone_is_an_upsert_without_a_value(writer: SellableWriter) -> None:
    batch = writer.decode([_record(1, 5, STL, _value(3, 3)), _record(1, 6, STL, None)])
    assert batch.upserts == {STL: Upsert("STL", "123123", None, 1, 6)}
    assert batch.next_offsets == {1: 7}


def test_undecodable_records_are_counted_skipped_and_still_passed(writer: SellableWriter) -> None:
    batch = writer.decode(
        [
            _raw(0, 20, STL, b"not avro"),  # bad value
            _raw(0, 21, b"\xff\xfe", b"x"),  # bad key
            _raw(0, 22, None, b"x"),  # no key
            _record(3, 8, KC, _value(2, 2)),
        ]
    )
    assert batch.upserts == {KC: Upsert("KC", "7", _value(2, 2), 3, 8)}
    # Their offsets are committed too: they would never decode later either.
    assert batch.next_offsets == {0: 23, 3: 9}
    assert _undecodable(writer) == 3


def test_the_end_of_a_partition_is_no_record(writer: SellableWriter) -> None:
    end = Message(topic=TOPIC, partition=2, error=KafkaError(KafkaError._PARTITION_EOF))
    batch = writer.decode([_record(2, 4, STL, _value(1, 1)), end])
    assert batch.next_offsets == {2: 5}
    assert list(batch.upserts) == [STL]
    assert _undecodable(writer) == 0


def test_a_fatal_consumer_error_raises(writer: SellableWriter) -> None:
    fatal = Message(error=KafkaError(KafkaError._FATAL, "fenced", fatal=True))
    with pytest.raises(KafkaException, match="fenced"):
        writer.decode([_record(2, 4, STL, _value(1, 1)), fatal])


def test_merging_a_re_read_batch_keeps_the_newer_record_of_each_key(
    writer: SellableWriter,
) -> None:
    """What a partition assigned while Cassandra is retried adds to the batch in hand."""
    in_hand = writer.decode([_record(2, 11, STL, _value(80, 100)), _record(4, 3, KC, _value(1, 1))])
    re_read = writer.decode([_record(2, 10, STL, _value(90, 100)), _record(4, 9, KC, _value(5, 5))])
    in_hand.merge(re_read)
    assert in_hand == Batch(
        {
            STL: Upsert("STL", "123123", _value(80, 100), 2, 11),
            KC: Upsert("KC", "7", _value(5, 5), 4, 9),
        },
        {2: 12, 4: 10},
    )
