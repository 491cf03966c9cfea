"""The producer's request timeouts: one heap of deadlines, checked on every poll.

Against the fake producer (:mod:`inventory_mutator.tests.support`) holding every record
in flight, so only the deadlines decide when a request is answered.
"""

from __future__ import annotations

import asyncio

from inventory_mutator.producer import AsyncProducer, Delivered, ProduceFailed
from inventory_mutator.tests.support import TOPIC, FakeBroker, run


def test_requests_time_out_in_deadline_order_not_arrival_order(broker: FakeBroker) -> None:
    broker.mode = "hold"
    failed: list[tuple[str, float, ProduceFailed]] = []

    async def request(producer: AsyncProducer, name: str, timeout: float) -> None:
        loop = asyncio.get_running_loop()
        started = loop.time()
        try:
            await producer.produce(TOPIC, b"k", b"v", 0, timeout)
        except ProduceFailed as exc:
            failed.append((name, loop.time() - started, exc))

    async def scenario() -> None:
        producer = AsyncProducer({})
        await asyncio.gather(
            request(producer, "slow", 0.3),
            request(producer, "fast", 0.1),
            request(producer, "middle", 0.2),
        )
        assert [name for name, _, _ in failed] == ["fast", "middle", "slow"]
        for (_, waited, exc), timeout in zip(failed, (0.1, 0.2, 0.3), strict=True):
            assert waited >= timeout
            assert str(exc) == f"no acknowledgement from Kafka within {timeout:g} s"
            assert exc.timed_out and exc.may_be_written
        # A timed-out record makes the session suspect: not ready until it delivers again.
        assert not producer.status().ready
        assert producer.status().problem == "records time out; checking the broker"
        await producer.aclose(0.1)

    run(scenario)


def test_an_acknowledged_request_is_not_timed_out_later(broker: FakeBroker) -> None:
    """Its deadline stays in the heap until a poll reaches it, and is then dropped."""

    async def scenario() -> None:
        producer = AsyncProducer({})
        delivered = await producer.produce(TOPIC, b"k", b"v", 2, 0.05)
        assert delivered == Delivered(TOPIC, 2, 0)
        await asyncio.sleep(0.1)  # past its deadline
        broker.mode = "hold"
        # Polling again (a record in flight) reaches the old deadline: nothing to answer.
        waiting = asyncio.ensure_future(producer.produce(TOPIC, b"k", b"v", 0, 5.0))
        await asyncio.sleep(0.1)
        assert producer.status().ready, producer.status()
        assert not waiting.done()
        await producer.aclose(0.1)
        assert waiting.done()

    run(scenario)


def test_a_request_its_caller_gave_up_on_is_not_timed_out_later(broker: FakeBroker) -> None:
    """A cancelled request's future is done: its deadline passes without a stall."""

    async def scenario() -> None:
        producer = AsyncProducer({})
        await producer.produce(TOPIC, b"k", b"v", 0, 1.0)  # the session works
        broker.mode = "hold"
        given_up = asyncio.ensure_future(producer.produce(TOPIC, b"k", b"v", 0, 0.05))
        kept = asyncio.ensure_future(producer.produce(TOPIC, b"k", b"v", 1, 5.0))
        await asyncio.sleep(0.01)
        given_up.cancel()
        await asyncio.sleep(0.15)  # past the cancelled request's deadline, polling on
        assert given_up.cancelled()
        assert not kept.done()
        assert producer.status().ready, producer.status()
        await producer.aclose(0.1)

    run(scenario)
