"""The producer's session handling against a fake librdkafka producer.

The fake reports what a real one reports (delivery callbacks inside ``poll()``, purge
reports, a fatal error raised from ``poll()``), scripted by the test, so every fatal path
can be driven on purpose; ``test_broker_faults.py`` drives the ones the real broker
produces.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import pytest
from confluent_kafka import KafkaError, KafkaException
from fastapi.testclient import TestClient

from inventory_mutator import producer as producer_module
from inventory_mutator.app import create_app
from inventory_mutator.producer import AsyncProducer, Delivered, ProduceFailed
from inventory_mutator.settings import MutatorSettings
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


@pytest.fixture
def broker(monkeypatch: pytest.MonkeyPatch) -> FakeBroker:
    """A fake broker; every librdkafka producer the mutator makes is a fake on it."""
    fake = FakeBroker()
    monkeypatch.setattr(producer_module, "Producer", fake.factory)
    return fake


def run(coroutine_function: Callable[[], Any]) -> Any:
    return asyncio.run(coroutine_function())


async def eventually(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


@pytest.mark.parametrize(
    "error",
    [
        KafkaError(KafkaError.PRODUCER_FENCED, "Broker: producer fenced"),
        KafkaError(KafkaError.OUT_OF_ORDER_SEQUENCE_NUMBER, "Broker: out of order", fatal=True),
        KafkaError(KafkaError._FATAL, "Local: Fatal error", fatal=True),
    ],
    ids=["fenced", "out-of-order", "fatal"],
)
def test_a_session_ending_delivery_error_replaces_the_producer(
    broker: FakeBroker, error: KafkaError
) -> None:
    """In-flight records fail "may have been written"; later ones go to a new producer."""
    broker.mode = "hold"

    async def scenario() -> None:
        producer = AsyncProducer({})
        in_flight = [
            asyncio.ensure_future(producer.produce(TOPIC, b"k", b"v", n, 10.0)) for n in range(3)
        ]
        await asyncio.sleep(0.01)
        broker.producers[0].fail_held(error)
        outcomes = await asyncio.gather(*in_flight, return_exceptions=True)
        assert all(isinstance(o, ProduceFailed) for o in outcomes), outcomes
        assert all(o.may_be_written and o.error == "kafka_unavailable" for o in outcomes)
        assert len(broker.producers) == 2, "a fresh producer replaces the broken one"
        assert producer.session == 2
        assert broker.producers[0].purged
        # Not ready until the new producer is confirmed; the supervisor checks it soon.
        broker.mode = "ack"
        await eventually(lambda: producer.status().ready)
        delivered = await producer.produce(TOPIC, b"k", b"v", 1, 10.0)
        assert isinstance(delivered, Delivered)
        assert await producer.aclose(1.0) == 0

    run(scenario)


def test_a_fatal_error_raised_from_poll_replaces_the_producer(broker: FakeBroker) -> None:
    """confluent-kafka raises a fatal error from poll(): the records held are answered."""
    broker.mode = "hold"

    async def scenario() -> None:
        producer = AsyncProducer({})
        queued = asyncio.ensure_future(producer.produce(TOPIC, b"k", b"v", 0, 10.0))
        await asyncio.sleep(0.01)
        broker.producers[0].held[0] = (*broker.producers[0].held[0][:3], "queue")
        flying = asyncio.ensure_future(producer.produce(TOPIC, b"k", b"v", 1, 10.0))
        await asyncio.sleep(0.01)
        broker.producers[0].raise_from_poll = KafkaError(
            KafkaError.UNKNOWN_PRODUCER_ID, "Broker: Unknown Producer Id", fatal=True
        )
        never_sent, maybe = await asyncio.gather(queued, flying, return_exceptions=True)
        assert isinstance(never_sent, ProduceFailed) and not never_sent.may_be_written
        assert isinstance(maybe, ProduceFailed) and maybe.may_be_written
        assert producer.session == 2
        await eventually(lambda: producer.status().ready)  # confirmed by the supervisor
        await producer.aclose(1.0)

    run(scenario)


def test_a_fatal_error_from_error_cb_replaces_the_producer(broker: FakeBroker) -> None:

    async def scenario() -> None:
        producer = AsyncProducer({})
        await producer.produce(TOPIC, b"k", b"v", 0, 10.0)
        broker.producers[0].errors_for_error_cb.append(
            KafkaError(KafkaError._FATAL, "Local: Fatal error", fatal=True)
        )
        broker.mode = "hold"
        waiting = asyncio.ensure_future(producer.produce(TOPIC, b"k", b"v", 0, 10.0))
        with pytest.raises(ProduceFailed) as failed:
            await waiting
        assert failed.value.may_be_written
        assert producer.session == 2
        await producer.aclose(1.0)

    run(scenario)


def test_a_record_refused_by_a_fatal_producer_goes_to_a_fresh_one(broker: FakeBroker) -> None:
    """produce() itself says _FATAL: nothing was queued, so the record is sent again."""

    async def scenario() -> None:
        producer = AsyncProducer({})
        broker.producers[0].fatal = KafkaError(KafkaError._FATAL, "fatal", fatal=True)
        delivered = await producer.produce(TOPIC, b"k", b"v", 3, 10.0)
        assert delivered.partition == 3
        assert producer.session == 2
        await producer.aclose(1.0)

    run(scenario)


def test_a_wedged_producer_is_replaced_once_the_broker_answers(
    broker: FakeBroker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Records time out while the broker answers metadata (a restarted broker that does
    not know the producer id): two passing checks later the producer is replaced."""
    monkeypatch.setattr(producer_module, "CHECK_INTERVAL_SECONDS", 0.05, raising=False)
    broker.mode, broker.reachable = "hold", False

    async def scenario() -> None:
        producer = AsyncProducer({})
        with pytest.raises(ProduceFailed) as timed_out:
            await producer.produce(TOPIC, b"k", b"v", 0, 0.05)
        assert timed_out.value.may_be_written
        status = await producer.readiness(1.0)
        assert not status.ready and status.session == 1
        broker.reachable = True  # the broker is back, the session still delivers nothing
        await eventually(lambda: producer.session == 2)
        broker.mode = "ack"
        await eventually(lambda: producer.status().ready)
        assert (await producer.produce(TOPIC, b"k", b"v", 0, 1.0)).partition == 0
        await producer.aclose(1.0)

    run(scenario)


def test_a_broker_that_lost_its_topics_gets_them_back_and_a_new_producer(
    broker: FakeBroker,
) -> None:
    repairs: list[str] = []

    def check(fake: Any) -> bool:
        if not set(broker.topics) >= {TOPIC}:
            broker.topics = (TOPIC, INVENTORY_RESERVATIONS.name)
            repairs.append("created")
            return True
        fake.list_topics(1.0)
        return False

    async def scenario() -> None:
        producer = AsyncProducer({}, check)
        await producer.produce(TOPIC, b"k", b"v", 0, 1.0)
        broker.topics = ()  # restarted empty
        await producer.readiness(1.0)  # finds the topics gone: recreates them, new session
        assert repairs == ["created"] and producer.session == 2
        await eventually(lambda: producer.status().ready)
        assert (await producer.readiness(1.0)).ready
        await producer.aclose(1.0)

    run(scenario)


def test_close_answers_every_waiting_request_within_its_timeout(broker: FakeBroker) -> None:
    broker.mode = "hold"

    async def scenario() -> None:
        producer = AsyncProducer({})
        flying = asyncio.ensure_future(producer.produce(TOPIC, b"k", b"v", 0, 60.0))
        await asyncio.sleep(0.01)
        broker.mode = "queue"
        queued = asyncio.ensure_future(producer.produce(TOPIC, b"k", b"v", 1, 60.0))
        await asyncio.sleep(0.01)
        loop = asyncio.get_running_loop()
        started = loop.time()
        assert await producer.aclose(0.2) == 2
        assert loop.time() - started < 1.0
        maybe, never_sent = await asyncio.gather(flying, queued, return_exceptions=True)
        assert isinstance(maybe, ProduceFailed) and maybe.may_be_written
        assert isinstance(never_sent, ProduceFailed) and not never_sent.may_be_written
        with pytest.raises(ProduceFailed) as closing:
            await producer.produce(TOPIC, b"k", b"v", 0, 1.0)
        assert closing.value.error == "shutting_down" and not closing.value.may_be_written
        assert not producer.status().ready

    run(scenario)


def test_the_app_answers_503_json_and_is_ready_again_with_a_new_producer(
    broker: FakeBroker,
) -> None:
    """Over the app: a fenced producer gives a JSON 503, never a 500; readiness follows."""
    settings = MutatorSettings(
        kafka_bootstrap_servers="127.0.0.1:1",
        mutator_ensure_topics=False,
        mutator_delivery_timeout_seconds=5,
    )
    body = {"locationId": "STL", "sku": "1", "count": 1}
    with TestClient(create_app(settings)) as client:
        assert client.post("/inventory/adjustment", json=body).status_code == 200
        assert client.get("/health/ready").status_code == 200
        broker.fail_with = KafkaError(KafkaError.PRODUCER_FENCED, "Broker: producer fenced")
        answer = client.post("/inventory/adjustment", json=body)
        broker.fail_with = None
        assert answer.status_code == 503
        assert answer.json()["error"] == "kafka_unavailable"
        assert "PRODUCER_FENCED" in answer.json()["message"]
        assert "may have been written" in answer.json()["message"]
        ready = client.get("/health/ready")
        for _ in range(50):
            if ready.status_code == 200:
                break
            ready = client.get("/health/ready")
        assert ready.status_code == 200, ready.text
        assert ready.json()["producerSession"] == 2
        assert client.post("/inventory/adjustment", json=body).status_code == 200
        metrics = client.get("/metrics").text
        assert "mutator_producer_replacements_total 1.0" in metrics
