"""The producer's session handling against a fake librdkafka producer
(:mod:`inventory_mutator.tests.support`), so every fatal path can be driven on purpose;
``test_broker_faults.py`` drives the ones the real broker produces.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from confluent_kafka import KafkaError
from fastapi.testclient import TestClient

from inventory_mutator import producer as producer_module
from inventory_mutator.app import create_app
from inventory_mutator.producer import AsyncProducer, Delivered, ProduceFailed
from inventory_mutator.settings import MutatorSettings
from inventory_mutator.tests.support import TOPIC, FakeBroker, eventually, run
from shared_schemas.topics import INVENTORY_RESERVATIONS


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
