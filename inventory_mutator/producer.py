"""An asyncio front for confluent-kafka's producer: ``await produce(...)`` never blocks the loop.

Example::

    producer = AsyncProducer({"bootstrap.servers": "127.0.0.1:9092"})
    delivered = await producer.produce("inventory_adjustments", key, value, partition=2,
                                       timeout=5.0)
    print(delivered.partition, delivered.offset)
    await asyncio.to_thread(producer.close)

librdkafka delivers acknowledgements through callbacks that run inside ``poll()``. Here
the event loop itself calls ``poll(0)`` (which never waits) every half millisecond while
records are in flight, and not at all when none are: the callbacks then resolve their
futures on the loop's own thread. A background polling thread would cost a thread switch
and a fight for the GIL per acknowledgement, which at a few thousand requests a second
was a tenth of the mutator's throughput. The producer is idempotent with ``acks=all``, so
a retry inside librdkafka never writes a record twice.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
from dataclasses import dataclass
from typing import Any

from confluent_kafka import KafkaError, KafkaException, Message, Producer

log = logging.getLogger(__name__)

POLL_INTERVAL_SECONDS = 0.0005
"""How often the loop collects acknowledgements while records are in flight."""


class ProduceFailed(Exception):
    """The broker did not acknowledge the record: refused, unreachable or too slow."""

    def __init__(self, reason: str, may_be_written: bool) -> None:
        super().__init__(reason)
        self.may_be_written = may_be_written
        """Whether the record might still land (a timeout) or certainly did not."""


@dataclass(frozen=True, slots=True)
class Delivered:
    """Where an acknowledged record landed."""

    topic: str
    partition: int
    offset: int


_Outcome = tuple["asyncio.Future[Delivered]", "Delivered | ProduceFailed"]


class AsyncProducer:
    """One confluent-kafka producer shared by every request of the process.

    Create it and call :meth:`produce` from the same running event loop; call
    :meth:`close` (blocking: from a thread) once no request is waiting any more.
    """

    def __init__(self, config: dict[str, Any]) -> None:
        self._producer = Producer(
            {
                "enable.idempotence": True,
                "acks": "all",
                "linger.ms": 0,
                **config,
            }
        )
        self._in_flight = 0
        self._polling_loop: asyncio.AbstractEventLoop | None = None
        """The loop whose _poll callback is scheduled, if any."""
        # Outcomes reported by the callbacks during one poll(). They are settled after
        # poll() returns rather than inside the callback, so a flush() from another thread
        # at shutdown never touches a future from outside its loop.
        self._outcomes: list[_Outcome] = []
        # (deadline, sequence, future): the request-side timeout, checked on each poll; a
        # heap instead of a timer per request, which cost more than the rest of produce().
        self._deadlines: list[tuple[float, int, asyncio.Future[Delivered], float]] = []
        self._sequence = itertools.count()

    async def produce(
        self, topic: str, key: bytes, value: bytes, partition: int, timeout: float
    ) -> Delivered:
        """Produce one record and wait (at most ``timeout`` s) for the broker's acknowledgement."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Delivered] = loop.create_future()
        outcomes = self._outcomes

        def on_delivery(error: KafkaError | None, message: Message) -> None:
            if error is None:
                outcomes.append(
                    (future, Delivered(message.topic(), message.partition(), message.offset()))
                )
            else:
                # A message timed out inside librdkafka may still have reached the log.
                failure = ProduceFailed(
                    str(error), may_be_written=error.code() == KafkaError._MSG_TIMED_OUT
                )
                outcomes.append((future, failure))

        try:
            self._producer.produce(topic, value, key, partition=partition, on_delivery=on_delivery)
        except BufferError as exc:
            raise ProduceFailed("the producer's local queue is full", False) from exc
        except KafkaException as exc:
            raise ProduceFailed(str(exc), False) from exc
        self._in_flight += 1
        heapq.heappush(
            self._deadlines, (loop.time() + timeout, next(self._sequence), future, timeout)
        )
        if self._polling_loop is not loop:
            # Not polling yet (or the loop that was has gone, as between test clients).
            self._polling_loop = loop
            loop.call_soon(self._poll, loop)
        return await future

    def _poll(self, loop: asyncio.AbstractEventLoop) -> None:
        """Collect acknowledgements, expire overdue requests, and come back while needed."""
        self._producer.poll(0)
        if self._outcomes:
            # The same list object stays in place: callbacks of records still in flight
            # hold a reference to it.
            outcomes = self._outcomes.copy()
            self._outcomes.clear()
            self._in_flight -= len(outcomes)
            for future, result in outcomes:
                if future.done() or future.get_loop() is not loop:
                    continue  # timed out already, or its loop is gone: nobody to tell
                if isinstance(result, ProduceFailed):
                    future.set_exception(result)
                else:
                    future.set_result(result)
        deadlines, now = self._deadlines, loop.time()
        while deadlines and (deadlines[0][2].done() or deadlines[0][0] <= now):
            _, _, future, timeout = heapq.heappop(deadlines)
            if not future.done() and future.get_loop() is loop:
                future.set_exception(
                    ProduceFailed(
                        f"no acknowledgement from Kafka within {timeout:g} s",
                        may_be_written=True,
                    )
                )
        if self._polling_loop is not loop:
            return  # a newer loop took over polling
        if self._in_flight > 0:
            loop.call_later(POLL_INTERVAL_SECONDS, self._poll, loop)
        else:
            self._polling_loop = None

    def list_topics(self, timeout: float) -> set[str]:
        """Names of the broker's topics (blocking: call it from a thread)."""
        return set(self._producer.list_topics(timeout=timeout).topics)

    def close(self, timeout: float = 10.0) -> int:
        """Flush what is queued; return how many records were left undelivered (blocking)."""
        remaining = self._producer.flush(timeout)
        if remaining:
            log.error("%d record(s) not acknowledged at shutdown", remaining)
        # Dropping the last reference destroys the librdkafka handle now, rather than at
        # interpreter exit (where it would still be trying to reach the broker).
        del self._producer
        return remaining
