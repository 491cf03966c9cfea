"""The sink's publishing when the producer fails or the group fences the instance: unit
tests with a fake producer."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import KafkaError

from sellable_calculator import dataflow
from sellable_calculator.changelog import ADJUSTMENT, PartitionState, decode_record
from sellable_calculator.dataflow import Generation, PartitionUpdate, SellableSink
from sellable_calculator.metrics import CalculatorMetrics
from sellable_calculator.progress import Progress
from sellable_calculator.settings import CalculatorSettings
from sellable_calculator.store import KeyState, Sellable, SellableStore
from shared_schemas.serde import encode_key
from shared_schemas.topics import SELLABLE_INVENTORY

CHANGELOG = CalculatorSettings().changelog_topic

STL = encode_key("STL", "123123")
KC = encode_key("KC", "1")


class FakeMessage:
    def __init__(self, topic: str, partition: int, offset: int) -> None:
        self._where = (topic, partition, offset)

    def topic(self) -> str:
        return self._where[0]

    def partition(self) -> int:
        return self._where[1]

    def offset(self) -> int:
        return self._where[2]


class FakeProducer:
    """Acknowledges every record (numbering each topic partition's records from 100), or
    fails each with ``error``."""

    def __init__(self, error: KafkaError | None) -> None:
        self.error = error
        self.queued: list[tuple[str, int, bytes, bytes, Any]] = []
        self.acknowledged: list[tuple[str, bytes, bytes]] = []
        self.offsets: dict[tuple[str, int], int] = {}
        self.purged = False

    def produce(
        self, topic: str, value: bytes, key: bytes, partition: int, on_delivery: Any
    ) -> None:
        self.queued.append((topic, partition, key, value, on_delivery))

    def flush(self, timeout: float) -> int:
        for topic, partition, key, value, on_delivery in self.queued:
            if self.error is not None:
                on_delivery(self.error, None)
                continue
            offset = self.offsets.get((topic, partition), 100)
            self.offsets[(topic, partition)] = offset + 1
            self.acknowledged.append((topic, key, value))
            on_delivery(None, FakeMessage(topic, partition, offset))
        self.queued.clear()
        return 0

    def purge(self) -> None:
        self.purged = True


def _sink(
    store: SellableStore,
    progress: Progress,
    stop: threading.Event | None = None,
    still_member: Callable[[threading.Event], bool | None] = lambda _: True,
) -> tuple[dataflow._SellableSinkPartition, Generation]:
    run = Generation((2,), {2: PartitionState({})}, stop or threading.Event(), 7, still_member)
    sink = SellableSink(CalculatorSettings(), run, store, progress, CalculatorMetrics())
    return sink.build("sellable", 0, 1), run


UPDATE = PartitionUpdate(
    2,
    {STL: KeyState(100, 7, True, 5, 8, 0), KC: KeyState(0, 3, False, 5, 8, 0)},
    {ADJUSTMENT: 6},
    {ADJUSTMENT: 8},
)


def test_values_and_states_are_published_then_stored(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    producer = FakeProducer(None)
    monkeypatch.setattr(dataflow._SellableSinkPartition, "_new_producer", lambda self: producer)
    store, progress = SellableStore(tmp_path / "store"), Progress()
    sink, _ = _sink(store, progress)
    sink.write_batch([("2", UPDATE)])
    published = [(topic, key) for topic, key, _ in producer.acknowledged]
    # A key with reservations only has a state (changelog) but no value to publish.
    assert published == [
        (SELLABLE_INVENTORY.name, STL),
        (CHANGELOG, STL),
        (CHANGELOG, KC),
    ]
    state, resume, generation = decode_record(producer.acknowledged[1][2])
    assert (KeyState.from_bytes(state), resume, generation) == (
        UPDATE.changes[STL],
        {ADJUSTMENT: 6, 1: 0},
        7,
    )
    assert store.get(STL) == Sellable(93, 100, 7, 5)
    assert store.changelog_position(2) == 102  # after the changelog's last record
    assert progress.reached("inventory_adjustments", 2) == 8


def test_a_fatal_producer_error_publishes_the_batch_again_with_a_new_producer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fenced = KafkaError(KafkaError._FATAL, "fenced by a newer producer", fatal=True)
    producers = [FakeProducer(fenced), FakeProducer(None)]
    made = iter(producers)
    monkeypatch.setattr(dataflow._SellableSinkPartition, "_new_producer", lambda self: next(made))
    monkeypatch.setattr(dataflow.time, "sleep", lambda _: None)
    store, progress = SellableStore(tmp_path / "store"), Progress()
    sink, _ = _sink(store, progress)
    sink.write_batch([("2", UPDATE)])
    assert producers[0].purged
    assert [key for _, key, _ in producers[1].acknowledged] == [STL, STL, KC]
    assert store.get(STL) == Sellable(93, 100, 7, 5)  # stored only once published
    assert progress.reached("inventory_adjustments", 2) == 8


def test_a_stop_while_publishing_fails_fails_the_dataflow_and_stores_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    refused = KafkaError(KafkaError._MSG_TIMED_OUT, "no answer")
    monkeypatch.setattr(
        dataflow._SellableSinkPartition, "_new_producer", lambda self: FakeProducer(refused)
    )
    stop = threading.Event()
    stop.set()
    store = SellableStore(tmp_path / "store")
    sink, _ = _sink(store, Progress(), stop)
    with pytest.raises(RuntimeError, match="unpublished"):
        sink.write_batch([("2", UPDATE)])
    assert store.get(STL) is None
    assert store.positions() == {}


def test_a_fenced_instance_publishes_and_stores_nothing_more(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After a freeze the group has moved on: this batch and every later one are dropped."""
    producer = FakeProducer(None)
    monkeypatch.setattr(dataflow._SellableSinkPartition, "_new_producer", lambda self: producer)
    answers = iter([False, True])
    store = SellableStore(tmp_path / "store")
    sink, run = _sink(store, Progress(), still_member=lambda _: next(answers))
    monkeypatch.setattr(sink, "_confirmed_at", 0.0)  # a long pause since the last check
    sink.write_batch([("2", UPDATE)])
    sink.write_batch([("2", UPDATE)])
    assert producer.acknowledged == []
    assert store.get(STL) is None
    assert run.fenced.is_set() and run.stop.is_set()


def test_a_revoke_during_the_check_drops_the_batch_without_fencing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    producer = FakeProducer(None)
    monkeypatch.setattr(dataflow._SellableSinkPartition, "_new_producer", lambda self: producer)
    stop = threading.Event()

    def revoked_meanwhile(_stop: threading.Event) -> bool | None:
        stop.set()
        return None

    store = SellableStore(tmp_path / "store")
    sink, run = _sink(store, Progress(), stop, revoked_meanwhile)
    monkeypatch.setattr(sink, "_confirmed_at", 0.0)
    sink.write_batch([("2", UPDATE)])
    assert producer.acknowledged == [] and store.get(STL) is None
    assert not run.fenced.is_set()
