"""The Cassandra writer: ``sellable_inventory`` and ``reservation_results`` in, upserts
out, offsets committed after.

Example::

    writer = SellableWriter(settings, table, metrics)
    writer.start()        # a background thread
    writer.health()       # WriterHealth(ready=True, state="writing", assigned=True)
    writer.stop()         # leaves the group, committing what was written

One consumer (one group) subscribes to both topics and routes each record by its topic:
a ``sellable_inventory`` record upserts its key's row of the ``sellable_inventory``
table, a ``reservation_results`` record the row of its mutation id in the
``reservation_results`` table. The loop, per batch of up to ``SERVICE_BATCH_SIZE``
records of either topic:

1. decode keys and values; an undecodable record is counted, logged with its position
   and skipped (its offset is still committed: it would never decode later either);
2. keep only the newest record per key (a compacted topic's semantics, applied early),
   and per mutation id;
3. write one UNLOGGED batch per location (a single Cassandra partition, so the batch is
   cheap) and one INSERT per reservation result (each is a partition of its own), up to
   ``SERVICE_WRITE_CONCURRENCY`` in flight;
4. only once every write succeeded, store the offsets the batch covers, of both topics;
   the consumer commits stored offsets every second, when partitions are revoked and
   when it closes.

Every write carries ``USING TIMESTAMP <offset in the topic it was read from>``. A key
always lives in one partition of ``sellable_inventory``, so a later value of a key
always has a larger offset: a replayed or reordered older record can never overwrite a
newer one, and replaying the same record is a no-op. Likewise every result of a
mutation id lives in one partition of ``reservation_results`` (the key is the
reservation's location and sku): decisions are deterministic, so a duplicate result is
identical, and whichever is written last, the row is that of the latest record, whole.
The catch: offsets restart if a topic is ever deleted and recreated, so then its table
must be truncated and rebuilt too (it is a derived read model; replaying the topic
rebuilds it).

Faults are ordinary events here, because replays are harmless:

* Cassandra fails: the batch stays in hand and is retried with backoff, while the
  assigned partitions are **paused** and the consumer keeps polling, so the group keeps
  this member (a loop stuck in retries would exceed ``max.poll.interval.ms`` and be
  evicted). Resumed once the batch is written.
* The group takes partitions away (session timeout while the broker is frozen, poll
  interval exceeded, a rebalance): their offsets are dropped from the batch in hand,
  the consumer rejoins by itself and reads again from the last committed offset.
* A commit fails: logged and counted; a later commit covers the same offsets, or the
  next owner re-reads them.
* Anything unexpected: the consumer is closed and a new one starts after a backoff
  (``service_writer_restarts``); uncommitted records are read again.

:meth:`SellableWriter.health` says whether the writer is making progress; the service's
``/health/ready`` reports it.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal

from cassandra import ConsistencyLevel
from cassandra.concurrent import execute_concurrent
from cassandra.query import BatchStatement, BatchType, Statement
from confluent_kafka import Consumer, KafkaError, KafkaException, Message, TopicPartition

from sellable_service.metrics import ServiceMetrics
from sellable_service.settings import ServiceSettings
from sellable_service.store import WRITE_RETRY_ERRORS, CassandraUnavailable, SellableTable
from service_runtime.kafka import position_of
from service_runtime.retry import Backoff, RetryStopped, retrying
from shared_schemas.reservations import ReservationResult, mutation_id_problem
from shared_schemas.schemas import RESERVATION_RESULT, SELLABLE_INVENTORY
from shared_schemas.serde import SerdeError, decode_key, value_serde

log = logging.getLogger(__name__)

MAX_BATCH_STATEMENTS = 50
"""Rows per UNLOGGED batch: big enough to save round trips, small enough to stay cheap."""

WRITE_BACKOFF = Backoff(first=0.2, cap=2.0)
"""Waits between attempts at a batch Cassandra refused. Short at most: an attempt while
Cassandra is down fails at once (no host), and the writer polls Kafka meanwhile anyway."""

RESTART_BACKOFF = Backoff(first=1.0, cap=30.0)
"""Waits between restarts of the consumer after an unexpected error."""
RESTART_FRESH_AFTER = 5 * RESTART_BACKOFF.cap
"""A consumer that ran this long before failing had recovered: its failure is a new
incident, restarted after the first wait again."""

COMMIT_INTERVAL_MS = 1_000
"""How often the consumer commits the offsets the writer stored (after writing)."""

WriterState = Literal[
    "starting", "writing", "unassigned", "retrying", "restarting", "stalled", "stopped"
]


@dataclass(frozen=True, slots=True)
class WriterHealth:
    """Whether the writer is making progress, for ``/health/ready``.

    ``state``: *starting* (no assignment yet), *writing* (all well), *unassigned* (the
    group took the partitions away: broker unreachable or rebalancing), *retrying*
    (Cassandra refuses the batch in hand), *restarting* (after an unexpected error),
    *stalled* (the loop has not come round within ``max.poll.interval.ms``), *stopped*.
    """

    ready: bool
    state: WriterState
    assigned: bool


@dataclass(frozen=True, slots=True)
class Upsert:
    """The newest value of one key in a consumed batch; ``value`` None deletes the row."""

    location: str
    sku: str
    value: dict[str, int] | None
    partition: int
    offset: int


@dataclass(frozen=True, slots=True)
class ResultUpsert:
    """A reservation result consumed, and where it was read (its partition and offset in
    ``reservation_results``)."""

    result: ReservationResult
    partition: int
    offset: int


@dataclass(slots=True)
class Batch:
    """Records in hand: the newest upsert per key, the newest result per mutation id,
    and per (topic, partition) the next offset."""

    upserts: dict[bytes, Upsert] = field(default_factory=dict)
    results: dict[str, ResultUpsert] = field(default_factory=dict)
    next_offsets: dict[tuple[str, int], int] = field(default_factory=dict)

    def merge(self, other: Batch) -> None:
        """Add records consumed later (or re-read after a rebalance) to this batch."""
        for key, upsert in other.upserts.items():
            held = self.upserts.get(key)
            if held is None or held.offset < upsert.offset:
                self.upserts[key] = upsert
        for mutation_id, result in other.results.items():
            kept = self.results.get(mutation_id)
            if kept is None or kept.offset < result.offset:
                self.results[mutation_id] = result
        for position, offset in other.next_offsets.items():
            self.next_offsets[position] = max(offset, self.next_offsets.get(position, 0))


class SellableWriter:
    """Consumes the two topics into their tables on a background thread, through any fault."""

    def __init__(
        self, settings: ServiceSettings, table: SellableTable, metrics: ServiceMetrics
    ) -> None:
        self.settings = settings
        self.table = table
        self.metrics = metrics
        self._serde = value_serde(
            SELLABLE_INVENTORY, settings.service_topic, settings.schema_registry_url
        )
        self._results_serde = value_serde(
            RESERVATION_RESULT, settings.service_results_topic, settings.schema_registry_url
        )
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cassandra-writer", daemon=True)
        # Written by the writer thread (callbacks run inside its poll), read by the API:
        # plain attribute swaps, each atomic under the GIL.
        self._owned: frozenset[tuple[str, int]] = frozenset()  # (topic, partition)
        self._ever_assigned = False
        self._state: WriterState = "starting"
        self._loop_at = time.monotonic()
        self._pending: Batch | None = None
        self._paused = False

    @property
    def assigned(self) -> bool:
        """Whether the consumer group gives this consumer partitions right now."""
        return bool(self._owned)

    def health(self) -> WriterHealth:
        """Whether the writer is moving: alive, assigned, writing, its loop turning."""
        state = self._state
        if not self._thread.is_alive():
            state = "stopped"
        elif state == "writing" and not self._owned:
            state = "unassigned" if self._ever_assigned else "starting"
        elif (
            state == "writing"
            and time.monotonic() - self._loop_at > self.settings.service_max_poll_interval_ms / 1e3
        ):
            state = "stalled"  # the group is about to evict it too
        return WriterHealth(state == "writing", state, bool(self._owned))

    def start(self) -> None:
        """Start consuming."""
        self._thread.start()

    def stop(self) -> None:
        """Stop after the write in hand; close the consumer (commits, leaves the group)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=60)

    # --- the consumer and its lifecycle -----------------------------------------------

    def _consumer(self) -> Consumer:
        s = self.settings
        consumer = Consumer(
            {
                "bootstrap.servers": s.kafka_bootstrap_servers,
                "group.id": s.service_consumer_group,
                "auto.offset.reset": "earliest",
                # At least once: an offset is stored only after its rows are written
                # (store_offsets below); the consumer commits what is stored in the
                # background, on revocation and on close. A commit never blocks the
                # loop, so a frozen broker cannot stall it past max.poll.interval.ms.
                "enable.auto.offset.store": False,
                "enable.auto.commit": True,
                "auto.commit.interval.ms": COMMIT_INTERVAL_MS,
                "on_commit": self._on_commit,
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
        consumer.subscribe(
            [s.service_topic, s.service_results_topic],
            on_assign=self._on_assign,
            on_revoke=self._on_revoke,
            on_lost=self._on_lost,
        )
        return consumer

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        log.info("assigned partitions %s", _named(partitions))
        if self._paused and partitions:
            # Still retrying a batch: newly assigned partitions wait too. Assign first,
            # a partition can only be paused once assigned.
            consumer.assign(partitions)
            consumer.pause(partitions)
        self._owned = frozenset(_positions(partitions))
        self._ever_assigned = True

    def _on_revoke(self, _consumer: Consumer, partitions: list[TopicPartition]) -> None:
        log.info("partitions %s revoked", _named(partitions))
        self._forget(partitions)

    def _on_lost(self, _consumer: Consumer, partitions: list[TopicPartition]) -> None:
        log.warning(
            "partitions %s lost (the group went on without this member); rejoining",
            _named(partitions),
        )
        self._forget(partitions)

    def _forget(self, partitions: list[TopicPartition]) -> None:
        """Partitions are no longer ours: never store offsets for them from the batch in
        hand (the next owner reads them again from the last commit; our rows written
        meanwhile are harmless, see ``USING TIMESTAMP``)."""
        gone = set(_positions(partitions))
        self._owned = self._owned - gone
        if self._pending is not None:
            for position in gone:
                self._pending.next_offsets.pop(position, None)

    def _on_commit(self, error: KafkaError | None, partitions: list[TopicPartition]) -> None:
        if error is not None and error.code() != KafkaError._NO_OFFSET:
            # Not fatal: the rows are written; a later commit covers these offsets, or
            # whoever owns the partitions next reads them again (idempotent).
            self.metrics.commit_failures.inc()
            log.warning("committing offsets failed (%s); a later commit covers them", error)

    def _run(self) -> None:
        """Run consumers one after another until stopped; an unexpected error only
        costs a restart (and a replay of what was not committed)."""
        restart = retrying(
            "the Cassandra writer (restarted with a new consumer: uncommitted records are "
            "read again)",
            RESTART_BACKOFF,
            stop=self._stop,
            fresh_after=RESTART_FRESH_AFTER,
            on_retry=self._restarting,
            logger=log,
            level=logging.ERROR,
            exc_info=True,
        )
        with contextlib.suppress(RetryStopped):  # stopped while waiting to restart
            restart(self._run_consumer)  # returns once asked to stop

    def _restarting(self, _error: BaseException, _delay: float) -> None:
        self.metrics.writer_restarts.inc()
        self._state = "restarting"

    def _run_consumer(self) -> None:
        self._owned, self._pending, self._paused = frozenset(), None, False
        self._state = "writing"
        consumer = self._consumer()
        try:
            self._loop(consumer)
        finally:
            self._owned = frozenset()
            try:
                consumer.close()  # commits what was stored, leaves the group
            except Exception as exc:  # closing must not hide why the loop ended
                log.warning("closing the consumer failed: %s", exc)

    def _loop(self, consumer: Consumer) -> None:
        last_lag_update = 0.0
        next_attempt = 0.0
        failures = 0  # in a row, at the batch in hand
        while not self._stop.is_set():
            self._loop_at = now = time.monotonic()
            # consume() waits the whole timeout unless the batch fills: keep it short,
            # it is added to the read model's lag whenever traffic is light. While a
            # batch waits for Cassandra it only keeps the membership alive (paused).
            timeout = 0.05 if self._pending is None else min(max(next_attempt - now, 0), 0.5)
            messages = consumer.consume(self.settings.service_batch_size, timeout)
            if messages:
                batch = self.decode(messages)
                if self._pending is None:
                    self._pending = batch
                else:  # arrived from a partition assigned while retrying
                    self._pending.merge(batch)
            if self._pending is not None and time.monotonic() >= next_attempt:
                if self._try_write(self._pending):
                    self._store(consumer, self._pending)
                    self._pending, failures, self._state = None, 0, "writing"
                    if self._paused:
                        consumer.resume(consumer.assignment())
                        self._paused = False
                        log.info("Cassandra took the batch in hand; consuming again")
                else:
                    # Not a tenacity retry: the loop must keep polling while it waits.
                    failures += 1
                    self._state = "retrying"
                    next_attempt = time.monotonic() + WRITE_BACKOFF.delay(failures)
            if self._pending is not None:
                # Every turn, not once: a rebalance may hand over unpaused partitions.
                consumer.pause(consumer.assignment())
                self._paused = True
            if time.monotonic() - last_lag_update > 2:
                self._update_lag(consumer)
                last_lag_update = time.monotonic()

    def _try_write(self, batch: Batch) -> bool:
        """Write ``batch``; False (logged, counted) if Cassandra refused it."""
        upserts, results = list(batch.upserts.values()), list(batch.results.values())
        try:
            started = time.perf_counter()
            self.write(upserts, results)
        except (CassandraUnavailable, *WRITE_RETRY_ERRORS) as exc:
            self.metrics.write_failures.inc()
            log.warning(
                "writing %d rows and %d reservation results to Cassandra failed (%s: %s); "
                "retrying, partitions paused",
                len(upserts),
                len(results),
                type(exc).__name__,
                str(exc)[:200],
            )
            return False
        self.metrics.write_seconds.observe(time.perf_counter() - started)
        self.metrics.written.inc(len(upserts))
        self.metrics.results_written.inc(len(results))
        return True

    def _store(self, consumer: Consumer, batch: Batch) -> None:
        """Store the offsets of a written batch, for the consumer to commit."""
        for (topic, partition), offset in batch.next_offsets.items():
            try:
                consumer.store_offsets(offsets=[TopicPartition(topic, partition, offset)])
            except KafkaException as exc:
                # Revoked between the write and now: the next owner re-reads these.
                log.info("not storing offset %d of %s-%d: %s", offset, topic, partition, exc)

    def decode(self, messages: list[Message]) -> Batch:
        """Step 1 and 2 of the loop: the newest upsert per key and the newest result per
        mutation id of ``messages``, and the offset after each partition's last record,
        undecodable ones included.

        An undecodable record (no key, a bad key, a bad value; for a result also no value
        or a mutation id that is not a UUID in canonical form, which no GET could ask
        for) is counted in ``service_undecodable_records``, logged with its position and
        skipped. A ``sellable_inventory`` value of None (a tombstone) is an upsert that
        deletes the row. Consumer errors are logged and skipped, except a fatal one,
        which raises :class:`KafkaException`.
        """
        batch = Batch()
        results_topic = self.settings.service_results_topic
        for message in messages:
            error = message.error()
            if error is not None:
                if error.fatal():
                    raise KafkaException(error)  # a new consumer is the only way on
                if error.code() != KafkaError._PARTITION_EOF:
                    # _MAX_POLL_EXCEEDED, transport errors…: the consumer rejoins and
                    # reconnects by itself; the revocation callbacks did the bookkeeping.
                    log.warning("consumer error: %s", error)
                continue
            topic, partition, offset = position_of(message)
            batch.next_offsets[(topic, partition)] = offset + 1
            try:
                raw_key = message.key()
                if raw_key is None:
                    raise SerdeError("record without a key")
                key = decode_key(raw_key)
                raw_value = message.value()
                if topic == results_topic:
                    result = self._decode_result(raw_value)
                    batch.results[result.mutation_id] = ResultUpsert(result, partition, offset)
                    continue
                value = None if raw_value is None else self._serde.deserialize(raw_value)
            except SerdeError as exc:
                self.metrics.undecodable.inc()
                log.warning(
                    "skipping undecodable record %s:%d:%d: %s", topic, partition, offset, exc
                )
                continue
            batch.upserts[raw_key] = Upsert(key.location, key.sku, value, partition, offset)
        return batch

    def _decode_result(self, raw_value: bytes | None) -> ReservationResult:
        """A ``reservation_results`` value; raises :class:`SerdeError` for one that is
        missing, undecodable, or whose mutation id no GET could ask for."""
        if raw_value is None:
            raise SerdeError("a reservation result without a value")
        result = ReservationResult.from_record(self._results_serde.deserialize(raw_value))
        problem = mutation_id_problem(result.mutation_id)
        if problem is not None:
            raise SerdeError(f"mutation_id {result.mutation_id[:64]!r} {problem}")
        return result

    def write(self, upserts: list[Upsert], results: Sequence[ResultUpsert] = ()) -> None:
        """Step 3 of the loop: upsert (or delete) the rows, one UNLOGGED batch per
        location, and insert the reservation results, one statement each (each is a
        Cassandra partition of its own, and a batch across partitions would only load
        its coordinator). Every row is written ``USING TIMESTAMP`` its offset, so an older
        record written after a newer one of its key changes nothing. Raises what
        Cassandra raised."""
        if not upserts and not results:
            return
        session = self.table.session()
        insert, delete = self.table.insert, self.table.delete
        insert_result = self.table.insert_result
        assert insert is not None and delete is not None and insert_result is not None
        by_location: dict[str, list[Upsert]] = defaultdict(list)
        for upsert in upserts:
            by_location[upsert.location].append(upsert)
        consistency = ConsistencyLevel.name_to_value[self.settings.cassandra_write_consistency]
        statements: list[tuple[Statement, tuple[()]]] = []
        for rows in by_location.values():
            for start in range(0, len(rows), MAX_BATCH_STATEMENTS):
                batch = BatchStatement(batch_type=BatchType.UNLOGGED, consistency_level=consistency)
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
                statements.append((batch, ()))
        for stored in results:
            r = stored.result
            bound = insert_result.bind(
                (
                    r.mutation_id,
                    r.location,
                    r.sku,
                    r.count,
                    r.status,
                    r.available,
                    r.reason,
                    r.reservation_offset,
                    r.event_time,
                    stored.partition,
                    stored.offset,
                    stored.offset,  # USING TIMESTAMP: see the module docstring
                )
            )
            bound.consistency_level = consistency
            statements.append((bound, ()))
        outcomes = execute_concurrent(
            session,
            statements,
            concurrency=self.settings.service_write_concurrency,
            raise_on_first_error=True,
        )
        for ok, outcome in outcomes:
            if not ok:
                raise outcome

    def _update_lag(self, consumer: Consumer) -> None:
        try:
            assignment = consumer.assignment()
            positions = consumer.position(assignment)
            for tp in positions:
                _, high = consumer.get_watermark_offsets(tp, cached=True)
                if tp.offset >= 0:
                    lag = max(0, high - tp.offset)
                    self.metrics.lag.labels(tp.topic, str(tp.partition)).set(lag)
        except Exception as exc:  # metrics must never stop the writer
            log.debug("lag update failed: %s", exc)


def _positions(partitions: Iterable[TopicPartition]) -> Iterable[tuple[str, int]]:
    """(topic, partition) of each of ``partitions``."""
    return ((p.topic, p.partition) for p in partitions)


def _named(partitions: Iterable[TopicPartition]) -> list[str]:
    """``topic-partition`` of each of ``partitions``, sorted, for the log."""
    return [f"{topic}-{partition}" for topic, partition in sorted(_positions(partitions))]
