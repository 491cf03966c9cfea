"""The writer's decode step, on records built in memory: no broker, no Cassandra."""

from __future__ import annotations

import pytest
from confluent_kafka import KafkaError, KafkaException, Message

from sellable_service.metrics import ServiceMetrics
from sellable_service.settings import ServiceSettings
from sellable_service.store import SellableTable
from sellable_service.writer import Batch, ResultUpsert, SellableWriter, Upsert
from shared_schemas import encode_key, value_serde
from shared_schemas.reservations import CONFIRMED, FAILED, ReservationResult
from shared_schemas.schemas import RESERVATION_RESULT, SELLABLE_INVENTORY

TOPIC = "sellable_inventory"
RESULTS = "reservation_results"
STL = encode_key("STL", "123123")
KC = encode_key("KC", "7")


def _value(count: int, on_hand: int) -> dict[str, int]:
    return {"count": count, "on_hand": on_hand, "reserved": on_hand - count, "updated_at": 1_000}


def _record(
    partition: int, offset: int, key: bytes | None, value: dict[str, int] | None
) -> Message:
    raw = None if value is None else value_serde(SELLABLE_INVENTORY, TOPIC).serialize(value)
    return _raw(partition, offset, key, raw)


def _raw(
    partition: int, offset: int, key: bytes | None, value: bytes | None, topic: str = TOPIC
) -> Message:
    return Message(topic=topic, partition=partition, offset=offset, key=key, value=value)


def _decision(mutation_id: str, count: int = 3, status: str = CONFIRMED) -> ReservationResult:
    reason = "" if status == CONFIRMED else f"{count} unit(s) asked for, 2 sellable"
    return ReservationResult(mutation_id, "STL", "123123", count, status, 2, reason, 41, 1_000)


def _result(partition: int, offset: int, result: ReservationResult) -> Message:
    value = value_serde(RESERVATION_RESULT, RESULTS).serialize(result.record())
    return _raw(partition, offset, STL, value, RESULTS)


A = "9b2f8c1e-3d4a-4a7e-8f60-0c1d2e3f4a5b"
B = "0c1d2e3f-4a5b-4a7e-8f60-9b2f8c1e3d4a"


@pytest.fixture
def writer() -> SellableWriter:
    """A writer that is never started: decoding needs neither its consumer nor Cassandra."""
    settings = ServiceSettings(service_topic=TOPIC, service_results_topic=RESULTS)
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
    assert batch.next_offsets == {(TOPIC, 2): 12, (TOPIC, 4): 4}
    assert _undecodable(writer) == 0


def test_a_tombstone_is_an_upsert_without_a_value(writer: SellableWriter) -> None:
    batch = writer.decode([_record(1, 5, STL, _value(3, 3)), _record(1, 6, STL, None)])
    assert batch.upserts == {STL: Upsert("STL", "123123", None, 1, 6)}
    assert batch.next_offsets == {(TOPIC, 1): 7}


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
    assert batch.next_offsets == {(TOPIC, 0): 23, (TOPIC, 3): 9}
    assert _undecodable(writer) == 3


def test_the_end_of_a_partition_is_no_record(writer: SellableWriter) -> None:
    end = Message(topic=TOPIC, partition=2, error=KafkaError(KafkaError._PARTITION_EOF))
    batch = writer.decode([_record(2, 4, STL, _value(1, 1)), end])
    assert batch.next_offsets == {(TOPIC, 2): 5}
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
        {},
        {(TOPIC, 2): 12, (TOPIC, 4): 10},
    )


def test_results_are_kept_per_mutation_id_beside_the_rows_of_their_key(
    writer: SellableWriter,
) -> None:
    """Many results share a key (a location and sku): each mutation id is a row of its own,
    and the partitions of the two topics move on separately."""
    failed = _decision(B, 20, FAILED)
    batch = writer.decode(
        [
            _record(2, 10, STL, _value(9, 10)),
            _result(2, 5, _decision(A)),
            _result(2, 6, failed),
            _result(2, 7, _decision(A)),  # a duplicate (a replayed decision)
        ]
    )
    assert batch.upserts == {STL: Upsert("STL", "123123", _value(9, 10), 2, 10)}
    assert batch.results == {A: ResultUpsert(_decision(A), 2, 7), B: ResultUpsert(failed, 2, 6)}
    assert batch.next_offsets == {(TOPIC, 2): 11, (RESULTS, 2): 8}
    assert _undecodable(writer) == 0


def test_undecodable_results_are_counted_skipped_and_still_passed(writer: SellableWriter) -> None:
    sellable_value = value_serde(SELLABLE_INVENTORY, TOPIC).serialize(_value(1, 1))
    batch = writer.decode(
        [
            _raw(1, 0, STL, b"not avro", RESULTS),
            _raw(1, 1, STL, None, RESULTS),  # no value: a result is never a tombstone
            _raw(1, 2, None, b"x", RESULTS),  # no key
            _raw(1, 3, STL, sellable_value, RESULTS),  # a record of the other topic's schema
            _result(1, 4, _decision(A.upper())),  # no GET could ask for it
            _result(1, 5, _decision("not-a-uuid")),
            _result(1, 6, _decision(B)),
        ]
    )
    assert batch.results == {B: ResultUpsert(_decision(B), 1, 6)}
    assert batch.next_offsets == {(RESULTS, 1): 7}
    assert _undecodable(writer) == 6


def test_merging_keeps_the_newer_result_of_each_mutation_id(writer: SellableWriter) -> None:
    in_hand = writer.decode([_result(2, 3, _decision(B)), _result(2, 7, _decision(A))])
    re_read = writer.decode([_result(2, 6, _decision(A)), _result(2, 9, _decision(B))])
    in_hand.merge(re_read)
    assert in_hand.results == {
        A: ResultUpsert(_decision(A), 2, 7),
        B: ResultUpsert(_decision(B), 2, 9),
    }
    assert in_hand.next_offsets == {(RESULTS, 2): 10}
