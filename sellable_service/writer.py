"""The Cassandra writer: ``sellable_inventory`` in, upserts out, offsets committed after.

Example::

    writer = SellableWriter(settings, table, metrics)
    writer.start()        # a background thread
    ...
    writer.stop()         # finishes the batch in hand, commits what was written

The loop, per batch of up to ``SERVICE_BATCH_SIZE`` records:

1. decode keys and values; an undecodable record is counted, logged with its position
   and skipped (its offset is still committed: it would never decode later either);
2. keep only the newest record per key (a compacted topic's semantics, applied early);
3. write one UNLOGGED batch per location (a single Cassandra partition, so the batch is
   cheap), up to ``SERVICE_WRITE_CONCURRENCY`` in flight;
4. commit the offsets only when every write succeeded. If Cassandra fails, the same
   batch is retried with backoff until it succeeds; nothing is skipped or lost.

Every write carries ``USING TIMESTAMP <offset in sellable_inventory>``. A key always
lives in one partition of that topic, so a later value of a key always has a larger
offset: a replayed or reordered older record can never overwrite a newer one, and
replaying the same record is a no-op. The catch: offsets restart if the topic is ever
deleted and recreated, so then the table must be truncated and rebuilt too (it is a
derived read model; replaying the topic rebuilds it).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import defaultdict
from dataclasses import dataclass

from cassandra.concurrent import execute_concurrent
from cassandra.query import BatchStatement, BatchType
from confluent_kafka import Consumer, KafkaError, Message, TopicPartition

from sellable_service.metrics import ServiceMetrics
from sellable_service.settings import ServiceSettings
from sellable_service.store import WRITE_RETRY_ERRORS, CassandraUnavailable, SellableTable
from shared_schemas.schemas import SELLABLE_INVENTORY
from shared_schemas.serde import SerdeError, decode_key, value_serde

log = logging.getLogger(__name__)

MAX_BATCH_STATEMENTS = 50
"""Rows per UNLOGGED batch: big enough to save round trips, small enough to stay cheap."""


@dataclass(frozen=True, slots=True)
class Upsert:
    """The newest value of one key in a consumed batch; ``value`` None deletes the row."""

    location: str
    sku: str
    value: dict[str, int] | None
    partition: int
    offset: int


class SellableWriter:
    """Consumes the topic into the table on a background thread."""

    def __init__(
        self, settings: ServiceSettings, table: SellableTable, metrics: ServiceMetrics
    ) -> None:
        self.settings = settings
        self.table = table
        self.metrics = metrics
        self._serde = value_serde(
            SELLABLE_INVENTORY, settings.service_topic, settings.schema_registry_url
        )
        self._stop = threading.Event()
        self._assigned = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cassandra-writer")

    @property
    def assigned(self) -> bool:
        """Whether the consumer group gave this consumer partitions."""
        return self._assigned.is_set()

    def start(self) -> None:
        """Start consuming."""
        self._thread.start()

    def stop(self) -> None:
        """Stop after the batch in hand; close the consumer (which leaves the group)."""
        self._stop.set()
        self._thread.join(timeout=60)

    def _consumer(self) -> Consumer:
        s = self.settings
        consumer = Consumer(
            {
                "bootstrap.servers": s.kafka_bootstrap_servers,
                "group.id": s.service_consumer_group,
                "enable.auto.commit": False,
                "auto.offset.reset": "earliest",
                "max.poll.interval.ms": s.service_max_poll_interval_ms,
                "session.timeout.ms": min(6_000, s.service_max_poll_interval_ms),
                # Watermarks for the lag metric come from these statistics, not from a
                # broker round trip per partition inside the write loop.
                "statistics.interval.ms": 1000,
                # The embedded broker answers a fetch only when its wait expires, so a
                # long wait would be added to the read model's lag.
                "fetch.wait.max.ms": 20,
                "stats_cb": lambda _stats: None,
            }
        )

        def on_assign(_consumer: Consumer, partitions: list[TopicPartition]) -> None:
            log.info("assigned %s", [p.partition for p in partitions])
            self._assigned.set()

        consumer.subscribe([s.service_topic], on_assign=on_assign)
        return consumer

    def _run(self) -> None:
        consumer = self._consumer()
        last_lag_update = 0.0
        try:
            while not self._stop.is_set():
                # consume() waits the whole timeout unless the batch fills: keep it short,
                # it is added to the read model's lag whenever traffic is light.
                messages = consumer.consume(self.settings.service_batch_size, 0.05)
                if messages:
                    upserts, commit = self._decode(messages)
                    if not self._write_until_done(upserts):
                        return  # stopping: nothing committed, the records come again
                    consumer.commit(offsets=commit, asynchronous=False)
                if time.monotonic() - last_lag_update > 2:
                    self._update_lag(consumer)
                    last_lag_update = time.monotonic()
        except Exception:
            log.exception("the Cassandra writer stopped on an unexpected error")
            raise
        finally:
            consumer.close()

    def _decode(self, messages: list[Message]) -> tuple[list[Upsert], list[TopicPartition]]:
        newest: dict[bytes, Upsert] = {}
        next_offsets: dict[int, int] = {}
        for message in messages:
            error = message.error()
            if error is not None:
                if error.code() != KafkaError._PARTITION_EOF:
                    log.warning("consumer error: %s", error)
                continue
            partition, offset = message.partition(), message.offset()
            next_offsets[partition] = offset + 1
            try:
                raw_key = message.key()
                if raw_key is None:
                    raise SerdeError("record without a key")
                key = decode_key(raw_key)
                raw_value = message.value()
                value = None if raw_value is None else self._serde.deserialize(raw_value)
            except SerdeError as exc:
                self.metrics.undecodable.inc()
                log.warning(
                    "skipping undecodable record %s:%d:%d: %s",
                    message.topic(),
                    partition,
                    offset,
                    exc,
                )
                continue
            newest[raw_key] = Upsert(key.location, key.sku, value, partition, offset)
        commit = [
            TopicPartition(self.settings.service_topic, partition, offset)
            for partition, offset in next_offsets.items()
        ]
        return list(newest.values()), commit

    def _write_until_done(self, upserts: list[Upsert]) -> bool:
        """Write ``upserts``, retrying with backoff; False only if asked to stop first."""
        delay = 0.2
        while True:
            try:
                started = time.perf_counter()
                self._write(upserts)
                self.metrics.write_seconds.observe(time.perf_counter() - started)
                self.metrics.written.inc(len(upserts))
                return True
            except (CassandraUnavailable, *WRITE_RETRY_ERRORS) as exc:
                self.metrics.write_failures.inc()
                log.warning(
                    "writing %d rows to Cassandra failed (%s); retrying in %.1f s",
                    len(upserts),
                    type(exc).__name__,
                    delay,
                )
            if self._stop.wait(delay):
                return False
            delay = min(delay * 2, 5.0)

    def _write(self, upserts: list[Upsert]) -> None:
        if not upserts:
            return
        session = self.table.session()
        insert, delete = self.table.insert, self.table.delete
        assert insert is not None and delete is not None
        by_location: dict[str, list[Upsert]] = defaultdict(list)
        for upsert in upserts:
            by_location[upsert.location].append(upsert)
        batches = []
        for rows in by_location.values():
            for start in range(0, len(rows), MAX_BATCH_STATEMENTS):
                batch = BatchStatement(batch_type=BatchType.UNLOGGED)
                for row in rows[start : start + MAX_BATCH_STATEMENTS]:
                    if row.value is None:
                        batch.add(delete, (row.offset, row.location, row.sku))
                    else:
                        v = row.value
                        batch.add(
                            insert,
                            (
                                row.location,
                                row.sku,
                                v["count"],
                                v["on_hand"],
                                v["reserved"],
                                v["updated_at"],
                                row.partition,
                                row.offset,
                                row.offset,  # USING TIMESTAMP: see the module docstring
                            ),
                        )
                batches.append((batch, ()))
        results = execute_concurrent(
            session,
            batches,
            concurrency=self.settings.service_write_concurrency,
            raise_on_first_error=True,
        )
        for ok, result in results:
            if not ok:
                raise result

    def _update_lag(self, consumer: Consumer) -> None:
        try:
            assignment = consumer.assignment()
            positions = consumer.position(assignment)
            for tp in positions:
                _, high = consumer.get_watermark_offsets(tp, cached=True)
                if tp.offset >= 0:
                    self.metrics.lag.labels(str(tp.partition)).set(max(0, high - tp.offset))
        except Exception as exc:  # metrics must never stop the writer
            log.debug("lag update failed: %s", exc)
