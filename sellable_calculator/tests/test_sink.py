"""The sink's publishing when the producer fails: unit tests with a fake producer."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import KafkaError

from sellable_calculator import dataflow
from sellable_calculator.dataflow import ADJUSTMENT, PartitionUpdate, SellableSink
from sellable_calculator.metrics import CalculatorMetrics
from sellable_calculator.progress import Progress
from sellable_calculator.settings import CalculatorSettings
from sellable_calculator.store import Sellable, SellableStore
from shared_schemas.serde import encode_key

STL = encode_key("STL", "123123")


class FakeProducer:
    """Acknowledges every record, or fails each with ``error`` while ``failing`` says so."""

    def __init__(self, error: KafkaError | None) -> None:
        self.error = error
        self.queued: list[tuple[bytes, bytes, Any]] = []
        self.acknowledged: list[tuple[bytes, bytes]] = []
        self.purged = False

    def produce(
        self, topic: str, value: bytes, key: bytes, partition: int, on_delivery: Any
    ) -> None:
        self.queued.append((key, value, on_delivery))

    def flush(self, timeout: float) -> int:
        for key, value, on_delivery in self.queued:
            if self.error is None:
                self.acknowledged.append((key, value))
            on_delivery(self.error, None)
        self.queued.clear()
        return 0

    def purge(self) -> None:
        self.purged = True


def test_a_fatal_producer_error_publishes_the_batch_again_with_a_new_producer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fenced = KafkaError(KafkaError._FATAL, "fenced by a newer producer", fatal=True)
    producers = [FakeProducer(fenced), FakeProducer(None)]
    made = iter(producers)
    monkeypatch.setattr(dataflow._SellableSinkPartition, "_new_producer", lambda self: next(made))
    monkeypatch.setattr(dataflow.time, "sleep", lambda _: None)
    store = SellableStore(tmp_path / "store")
    progress = Progress()
    sink = SellableSink(
        CalculatorSettings(), store, progress, CalculatorMetrics(), threading.Event()
    ).build("sellable", 0, 1)
    update = PartitionUpdate(2, {STL: Sellable(93, 100, 7, 5)}, {ADJUSTMENT: 8})
    sink.write_batch([("2", update)])
    assert producers[0].purged
    assert [key for key, _ in producers[1].acknowledged] == [STL]
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
    sink = SellableSink(CalculatorSettings(), store, Progress(), CalculatorMetrics(), stop).build(
        "sellable", 0, 1
    )
    update = PartitionUpdate(2, {STL: Sellable(93, 100, 7, 5)}, {ADJUSTMENT: 8})
    with pytest.raises(RuntimeError, match="unpublished"):
        sink.write_batch([("2", update)])
    assert store.get(STL) is None
    assert store.positions() == {}
