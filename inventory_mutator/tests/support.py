"""Helpers for the mutator's tests: a fake librdkafka producer on a fake broker.

The fake reports what a real one reports (delivery callbacks inside ``poll()``, purge
reports, a fatal error raised from ``poll()``), scripted by the test, so every path of
:class:`inventory_mutator.producer.AsyncProducer` can be driven on purpose. The ``broker``
fixture (``conftest.py``) puts it in place of ``confluent_kafka.Producer``.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

from confluent_kafka import KafkaError, KafkaException

from shared_schemas.topics import INVENTORY_ADJUSTMENTS, INVENTORY_RESERVATIONS

TOPIC = INVENTORY_ADJUSTMENTS.name


@dataclass
class FakeMessage:
    """The parts of a confluent_kafka.Message the producer reads."""

    _topic: str
    _partition: int
    _offset: int

    def topic(self) -> str:
        return self._topic

    def partition(self) -> int:
        return self._partition

    def offset(self) -> int:
        return self._offset


@dataclass
class FakeBroker:
    """What the fake producers' records meet; the test changes it as it goes."""

    mode: str = "ack"
    """``ack``: acknowledged at the next poll; ``hold``: in flight until told otherwise;
    ``queue``: never sent (purged as _PURGE_QUEUE)."""
    fail_with: KafkaError | None = None
    """When set, every record in flight gets this delivery error at the next poll."""
    reachable: bool = True
    topics: tuple[str, ...] = (INVENTORY_ADJUSTMENTS.name, INVENTORY_RESERVATIONS.name)
    producers: list[FakeProducer] = field(default_factory=list)
    offsets: itertools.count[int] = field(default_factory=itertools.count)

    def factory(self, config: dict[str, Any]) -> FakeProducer:
        producer = FakeProducer(self, config)
        self.producers.append(producer)
        return producer


class FakeProducer:
    """Enough of confluent_kafka.Producer: produce, poll, purge, list_topics."""

    def __init__(self, broker: FakeBroker, config: dict[str, Any]) -> None:
        self.broker = broker
        self.config = config
        self.held: list[tuple[str, int, Callable[..., None], str]] = []
        self.reports: list[tuple[Callable[..., None], KafkaError | None, FakeMessage]] = []
        self.fatal: KafkaError | None = None
        self.raise_from_poll: KafkaError | None = None
        self.errors_for_error_cb: list[KafkaError] = []
        self.purged = False

    def produce(
        self, topic: str, value: bytes, key: bytes, partition: int, on_delivery: Callable[..., None]
    ) -> None:
        if self.fatal is not None:
            raise KafkaException(KafkaError(KafkaError._FATAL, "Local: Fatal error", fatal=True))
        self.held.append((topic, partition, on_delivery, self.broker.mode))

    def fail_held(self, error: KafkaError) -> None:
        """Every record held gets ``error`` as its delivery report."""
        for topic, partition, on_delivery, _ in self.held:
            self.reports.append((on_delivery, error, FakeMessage(topic, partition, -1)))
        self.held.clear()

    def poll(self, timeout: float = -1) -> int:
        for error in self.errors_for_error_cb:
            self.config["error_cb"](error)
        self.errors_for_error_cb.clear()
        if self.raise_from_poll is not None:
            error, self.raise_from_poll = self.raise_from_poll, None
            raise KafkaException(error)
        failure = self.broker.fail_with
        if failure is not None:
            self.fail_held(failure)
        still_held = []
        for topic, partition, on_delivery, mode in self.held:
            if mode == "ack" and self.broker.mode == "ack":
                message = FakeMessage(topic, partition, next(self.broker.offsets))
                self.reports.append((on_delivery, None, message))
            else:
                still_held.append((topic, partition, on_delivery, mode))
        self.held = still_held
        reports, self.reports = self.reports, []
        for on_delivery, error, message in reports:
            on_delivery(error, message)
        return len(reports)

    def purge(self, in_queue: bool = True, in_flight: bool = True, blocking: bool = True) -> None:
        self.purged = True
        for topic, partition, on_delivery, mode in self.held:
            code = KafkaError._PURGE_QUEUE if mode == "queue" else KafkaError._PURGE_INFLIGHT
            error = KafkaError(code, "Local: Purged")
            self.reports.append((on_delivery, error, FakeMessage(topic, partition, -1)))
        self.held.clear()

    def flush(self, timeout: float = -1) -> int:
        self.poll(0)
        return len(self.held)

    def list_topics(self, timeout: float = -1) -> Any:
        if not self.broker.reachable:
            raise KafkaException(KafkaError(KafkaError._TRANSPORT, "Local: transport failure"))
        partitions = {p: object() for p in range(6)}
        return SimpleNamespace(
            topics={name: SimpleNamespace(partitions=partitions) for name in self.broker.topics}
        )


def run(coroutine_function: Callable[[], Any]) -> Any:
    return asyncio.run(coroutine_function())


async def eventually(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)
