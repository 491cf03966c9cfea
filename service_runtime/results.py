"""Following ``reservation_results``: every decision on a validated reservation, as it comes.

Example::

    def keep(results: list[tuple[int, int, ReservationResult]]) -> None:
        for partition, offset, result in results:
            index[result.mutation_id] = result

    follower = ResultsFollower(
        "127.0.0.1:9092", None, partitions=6, on_results=keep, start=lambda: {}
    )
    follower.start()          # a daemon thread; follower.loaded is set once caught up
    ...
    follower.stop()

The mutator follows the topic to answer a validated reservation as soon as it is decided,
and every calculator to answer ``GET /inventory/reservations/{mutationId}`` for any id.
No consumer group: each follower reads every partition, from where ``start()`` says (the
positions a persistent index already holds), else from the beginning. A consumer that
fails is replaced, with a growing pause, from the positions ``start()`` gives then.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Mapping

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, TopicPartition

from service_runtime.retry import Backoff, RetryStopped, retrying
from shared_schemas.reservations import ReservationResult
from shared_schemas.schemas import RESERVATION_RESULT
from shared_schemas.serde import SerdeError, value_serde
from shared_schemas.topics import RESERVATION_RESULTS

log = logging.getLogger(__name__)

Results = list[tuple[int, int, ReservationResult]]
"""(partition, offset, result) of records read, in offset order per partition."""

RESTART_BACKOFF = Backoff(first=0.5, cap=10.0)
"""Pauses before each new consumer after a failure."""


class ResultsFollower:
    """Reads every partition of ``reservation_results`` on a background thread."""

    def __init__(
        self,
        bootstrap_servers: str,
        schema_registry_url: str | None,
        partitions: int,
        on_results: Callable[[Results], None],
        start: Callable[[], Mapping[int, int]] = dict,
        client_id: str = "results-follower",
    ) -> None:
        """``on_results`` gets each batch read (on the follower's thread); ``start()``
        gives the next offset to read per partition (absent: the beginning)."""
        self._bootstrap = bootstrap_servers
        self._serde = value_serde(RESERVATION_RESULT, RESERVATION_RESULTS.name, schema_registry_url)
        self._partitions = partitions
        self._on_results = on_results
        self._start = start
        self._client_id = client_id
        self._stop = threading.Event()
        self.loaded = threading.Event()
        """Set once every partition was read to its end once (the index is current)."""
        self.undecodable = 0
        self._thread = threading.Thread(target=self._run, name=client_id, daemon=True)

    @property
    def following(self) -> bool:
        """Whether the thread runs (it only ends when stopped)."""
        return self._thread.is_alive()

    def start(self) -> None:
        """Start following."""
        self._thread.start()

    def stop(self) -> None:
        """Stop following and close the consumer (nothing to do if it never started)."""
        self._stop.set()
        if self._thread.ident is not None:
            self._thread.join(timeout=5)

    def _run(self) -> None:
        retry = retrying(
            "following reservation_results",
            RESTART_BACKOFF,
            stop=self._stop,
            fresh_after=30.0,
            logger=log,
        )
        with contextlib.suppress(RetryStopped):
            retry(self._follow)

    def _consumer(self) -> Consumer:
        consumer = Consumer(
            {
                "bootstrap.servers": self._bootstrap,
                "group.id": f"{self._client_id}-unused",
                "client.id": self._client_id,
                "enable.auto.commit": False,
                "enable.partition.eof": True,  # tells when the index is current
                # Offsets beyond the log's end (a broker that lost its data): read it all
                # again; a decision read twice is the same decision.
                "auto.offset.reset": "earliest",
                # The embedded broker holds a fetch for this long when nothing is
                # there, even if a record comes meanwhile: each decision can wait it out
                # (20 ms cost a validated reservation about 6 ms at p50; 10 is the middle
                # ground between that and idle fetches).
                "fetch.wait.max.ms": 10,
            }
        )
        positions = self._start()
        consumer.assign(
            [
                TopicPartition(RESERVATION_RESULTS.name, p, positions.get(p, OFFSET_BEGINNING))
                for p in range(self._partitions)
            ]
        )
        return consumer

    def _follow(self) -> None:
        """Hand batches to ``on_results`` until stopped; raises whatever breaks the consumer."""
        consumer = self._consumer()
        at_end: set[int] = set()
        try:
            while not self._stop.is_set():
                # Wait for the first record only, then take what has come with it:
                # consume(n, timeout) waits out its whole timeout unless n records come,
                # and held every decision back for up to that long.
                messages = consumer.consume(1, 0.2)
                if messages:
                    messages += consumer.consume(999, 0)
                results: Results = []
                for message in messages:
                    error = message.error()
                    if error is not None:
                        if error.fatal():
                            raise KafkaException(error)
                        if error.code() == KafkaError._PARTITION_EOF:
                            at_end.add(message.partition() or 0)
                            if len(at_end) >= self._partitions:
                                self.loaded.set()
                        elif error.code() != KafkaError.UNKNOWN_TOPIC_OR_PART:
                            log.warning("reservation_results: %s", error)
                        continue
                    partition, offset = message.partition() or 0, message.offset() or 0
                    try:
                        record = self._serde.deserialize(message.value() or b"")
                        results.append((partition, offset, ReservationResult.from_record(record)))
                    except (SerdeError, KeyError) as exc:
                        self.undecodable += 1
                        log.warning(
                            "skipping undecodable result %s:%d:%d: %s",
                            RESERVATION_RESULTS.name,
                            partition,
                            offset,
                            exc,
                        )
                if results:
                    self._on_results(results)
        finally:
            consumer.close()
