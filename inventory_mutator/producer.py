"""An asyncio front for confluent-kafka's producer: ``await produce(...)`` never blocks the loop.

Example::

    producer = AsyncProducer({"bootstrap.servers": "127.0.0.1:9092"})
    delivered = await producer.produce("inventory_adjustments", key, value, partition=2,
                                       timeout=5.0)
    print(delivered.partition, delivered.offset)
    producer.close()

librdkafka delivers acknowledgements through callbacks that run inside ``poll()``. A
background thread polls; each callback hands its result to the waiting coroutine with
``loop.call_soon_threadsafe``. The producer is idempotent with ``acks=all``, so a retry
inside librdkafka never writes a record twice.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from dataclasses import dataclass
from typing import Any

from confluent_kafka import KafkaError, KafkaException, Message, Producer

log = logging.getLogger(__name__)


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


class AsyncProducer:
    """One confluent-kafka producer shared by every request of the process."""

    def __init__(self, config: dict[str, Any]) -> None:
        self._producer = Producer(
            {
                "enable.idempotence": True,
                "acks": "all",
                "linger.ms": 0,
                **config,
            }
        )
        self._stop = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        # Outcomes collected by the delivery callbacks during one poll(), handed to the
        # event loop in one call: one wake-up per poll instead of one per record.
        self._settled: list[tuple[asyncio.Future[Delivered], Delivered | ProduceFailed]] = []
        self._poller = threading.Thread(target=self._poll, name="kafka-poll", daemon=True)
        self._poller.start()

    def _poll(self) -> None:
        while not self._stop.is_set():
            self._producer.poll(0.05)
            if self._settled and self._loop is not None:
                batch, self._settled = self._settled, []
                self._loop.call_soon_threadsafe(_settle_all, batch)

    async def produce(
        self, topic: str, key: bytes, value: bytes, partition: int, timeout: float
    ) -> Delivered:
        """Produce one record and wait for the broker's acknowledgement."""
        loop = self._loop = asyncio.get_running_loop()
        future: asyncio.Future[Delivered] = loop.create_future()

        def on_delivery(error: KafkaError | None, message: Message) -> None:
            if error is None:
                result: Delivered | ProduceFailed = Delivered(
                    message.topic(), message.partition(), message.offset()
                )
            else:
                # A message timed out inside librdkafka may still have reached the log.
                result = ProduceFailed(
                    str(error), may_be_written=error.code() == KafkaError._MSG_TIMED_OUT
                )
            self._settled.append((future, result))

        try:
            self._producer.produce(topic, value, key, partition=partition, on_delivery=on_delivery)
        except BufferError as exc:
            raise ProduceFailed("the producer's local queue is full", False) from exc
        except KafkaException as exc:
            raise ProduceFailed(str(exc), False) from exc
        # A timer rather than asyncio.wait_for: no extra task per request on this hot path.
        timer = loop.call_later(timeout, _expire, future, timeout)
        try:
            return await future
        finally:
            timer.cancel()

    def list_topics(self, timeout: float) -> set[str]:
        """Names of the broker's topics (blocking: call it from a thread)."""
        return set(self._producer.list_topics(timeout=timeout).topics)

    def close(self, timeout: float = 10.0) -> int:
        """Flush what is queued, stop polling; return how many records were left undelivered."""
        remaining = self._producer.flush(timeout)
        self._stop.set()
        self._poller.join(timeout=1)
        if remaining:
            log.error("%d record(s) not acknowledged at shutdown", remaining)
        # Dropping the last reference destroys the librdkafka handle now, rather than at
        # interpreter exit (where it would still be trying to reach the broker).
        del self._producer
        return remaining


def _settle_all(batch: list[tuple[asyncio.Future[Delivered], Delivered | ProduceFailed]]) -> None:
    for future, result in batch:
        if future.done():
            continue  # it timed out already; the late outcome has nobody to tell
        if isinstance(result, ProduceFailed):
            future.set_exception(result)
        else:
            future.set_result(result)


def _expire(future: asyncio.Future[Delivered], timeout: float) -> None:
    if not future.done():
        future.set_exception(
            ProduceFailed(
                f"no acknowledgement from Kafka within {timeout:g} s", may_be_written=True
            )
        )
