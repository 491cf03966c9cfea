"""The Bytewax dataflow: adjustments and reservations in, sellable inventory out.

Example (what ``python -m sellable_calculator`` does for each assignment of partitions)::

    from bytewax.run import cli_main
    states = restore(settings, store, partitions, stop)
    flow = build_dataflow(settings, Generation(partitions, states, stop, generation), store,
                          progress, metrics, DataflowHealth())
    cli_main(flow, workers_per_process=1)      # returns once ``stop`` is set

The shape is a Kafka Streams task per partition, made explicit::

    inventory_adjustments  p ─┐                       ┌─▶ sellable_inventory p
                              ├─▶ "p" ─▶ running sums ─┼─▶ <group>-changelog p
    inventory_reservations p ─┘   per key              └─▶ local store (RocksDB)

* **Input**: :class:`MutationSource` reads exactly the partitions this instance was
  assigned, of both input topics, from the positions their restored state reflects.
  Records are decoded in the source, in batches; an undecodable one is counted, logged
  with its topic/partition/offset and skipped (no dead-letter topic: the input topics
  keep everything forever, so the record can always be found again).
* **State**: :class:`PartitionSums` is keyed by *partition number*, so partition p of
  both topics meets in one place, in order, with no shuffle between instances. It keeps
  on hand = Σ adjustments and reserved = Σ reservations per key; a key exists once it has
  an adjustment (the original's left join), and reservations that came first still count.
* **Output**: :class:`SellableSink` publishes every changed value to ``sellable_inventory``
  (same key bytes, same partition) and every changed key state to the changelog, waits
  for the broker's acknowledgement, and only then writes the states together with the
  new input positions and changelog offsets to the store.

State does not live in Bytewax (no Bytewax recovery): it lives in the store and in the
changelog topic, which a new owner of a partition restores it from
(:mod:`sellable_calculator.changelog`). A dataflow runs for one assignment of partitions;
a rebalance stops it and the next assignment starts a new one.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import lru_cache
from typing import Any

from bytewax import operators as op
from bytewax.dataflow import Dataflow
from bytewax.inputs import FixedPartitionedSource, StatefulSourcePartition
from bytewax.operators import StatefulBatchLogic
from bytewax.outputs import DynamicSink, StatelessSinkPartition
from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition

from sellable_calculator.changelog import (
    ADJUSTMENT,
    INPUT_TOPICS,
    RESERVATION,
    PartitionState,
    encode_record,
)
from sellable_calculator.health import DataflowHealth, input_problem
from sellable_calculator.metrics import CalculatorMetrics
from sellable_calculator.progress import Progress
from sellable_calculator.settings import CalculatorSettings
from sellable_calculator.store import NO_STATE, KeyState, SellableStore
from service_runtime.kafka import position_of
from service_runtime.retry import Backoff, retrying
from shared_schemas.partitioner import partition_for
from shared_schemas.reservations import CONFIRMED, Decision, ReservationResult, decide
from shared_schemas.schemas import INVENTORY_MUTATION, RESERVATION_RESULT
from shared_schemas.schemas import SELLABLE_INVENTORY as SELLABLE_SCHEMA
from shared_schemas.serde import SerdeError, ValueSerde, decode_key, encode_key, value_serde
from shared_schemas.topics import RESERVATION_RESULTS, SELLABLE_INVENTORY

log = logging.getLogger(__name__)

_IDLE_BACKOFF = timedelta(milliseconds=10)
"""How long an idle input partition waits before polling again (adds at most this latency)."""

_OUT_OF_RANGE_RETRY = timedelta(milliseconds=500)
"""How long a partition waits before asking again for an offset the broker called out of range."""

_LAG_REFRESH_SECONDS = 1.0
"""How often an idle input partition updates its lag gauge (the statistics interval)."""

Mutation = tuple[bytes, int, int, int]
"""(key bytes, count, event time ms, offset): one decoded adjustment or reservation."""


@dataclass(frozen=True, slots=True)
class MutationBatch:
    """Decoded records of one input partition, in offset order."""

    kind: int
    """ADJUSTMENT or RESERVATION."""
    partition: int
    mutations: list[Mutation]
    next_offset: int
    """Offset after the last record read, skipped ones included."""
    validated: dict[int, str] = field(default_factory=dict)
    """Offset → mutation id of the reservations that asked to be validated."""


@dataclass(frozen=True, slots=True)
class PartitionUpdate:
    """What one run of :class:`PartitionSums` changed in one partition."""

    partition: int
    changes: dict[bytes, KeyState]
    """The new state of every key that changed."""
    resume: dict[int, int]
    """Next offset to apply per input kind before this update: where the partition's
    inputs resume if only part of this update reaches the changelog."""
    next_offsets: dict[int, int]
    """Next offset to apply per input kind: the positions the states bring the store to."""
    results: dict[bytes, list[ReservationResult]] = field(default_factory=dict)
    """Decisions on validated reservations made by this update, per key, in order."""
    republish: list[ReservationResult] = field(default_factory=list)
    """Decisions made before (their reservations are replayed after a crash and already
    counted in their key's state): published again, since the crash may have come
    before they were."""


@dataclass(frozen=True)
class Generation:
    """One assignment of partitions to this instance, and the dataflow that runs it."""

    partitions: tuple[int, ...]
    states: dict[int, PartitionState]
    """The restored state of every partition."""
    stop: threading.Event
    """Set when the assignment is revoked or the instance stops: the dataflow ends."""
    generation: int
    """When the assignment came (epoch ms); written into every changelog record."""
    still_member: Callable[[threading.Event], bool | None] = lambda _stop: True
    """Asks the group whether this instance still holds the assignment (None: no answer
    before the event was set) (:meth:`GroupMembership.still_member`): the sink's fence
    against publishing after a freeze during which the group gave the partitions away."""
    fenced: threading.Event = field(default_factory=threading.Event)
    """Set by the sink when the group said no: nothing more was published or stored, and
    the dataflow stops. The local state of these partitions may then be behind the
    changelog in ways a catch-up cannot see, so the next assignment restores them anew."""


class MisplacedKeyError(SerdeError):
    """A record sits in another partition than the shared partitioner assigns its key."""


class _KeyCheck:
    """Validates keys and their partition, remembering keys already seen.

    Keys repeat a lot (a few thousand skus receive millions of mutations), so caching the
    check keeps the Avro decode and the pure-Python murmur2 off the hot path.
    """

    def __init__(self, partitions: int) -> None:
        @lru_cache(maxsize=65_536)
        def partition_of(key: bytes) -> int:
            decode_key(key)  # raises SerdeError for bytes that are not an inventory key
            return partition_for(key, partitions)

        self.partition_of = partition_of


class _MutationPartition(StatefulSourcePartition[tuple[str, MutationBatch], int]):
    """One partition of one input topic; resume state is the next offset to read."""

    def __init__(
        self,
        source: MutationSource,
        consumer: Consumer,
        kind: int,
        partition: int,
        next_offset: int,
        serde: ValueSerde,
    ) -> None:
        """One partition of ``source`` (its settings, stop event, metrics and health),
        reading ``consumer`` from ``next_offset``."""
        metrics = source.metrics
        self._consumer = consumer
        self._kind = kind
        self._topic = INPUT_TOPICS[kind]
        self._partition = partition
        self._item_key = str(partition)
        self._next_offset = next_offset
        self._serde = serde
        self._key_check = source.key_check
        self._batch_size = source.settings.calculator_batch_size
        self._stop = source.generation.stop
        self._records = metrics.records.labels(self._topic)
        self._undecodable = metrics.undecodable.labels(self._topic)
        self._lag = metrics.lag.labels(self._topic, str(partition))
        self._tp = TopicPartition(self._topic, partition)
        self._awake: datetime | None = None
        self._lag_due = 0.0
        self._health = source.health
        self._out_of_range: str | None = None
        self._started = False
        self._health.expect_input(self._topic, partition)

    def next_batch(self) -> list[tuple[str, MutationBatch]]:
        if self._stop.is_set():
            raise StopIteration  # a clean shutdown: Bytewax finishes the epoch and exits
        if not self._started:
            # One empty batch first, so every partition's sums look at the store once at
            # start (to hold back a replay, or repair the store) even if no record comes.
            self._started = True
            first = MutationBatch(self._kind, self._partition, [], self._next_offset)
            return [(self._item_key, first)]
        messages = self._consumer.consume(self._batch_size, 0)
        if not messages:
            # Idle: come back in a few milliseconds instead of spinning. Spinning would
            # hold the GIL thousands of times a second and slow the REST API down.
            self._awake = datetime.now(UTC) + _IDLE_BACKOFF
            self._update_lag()
            return []
        self._awake = None
        mutations: list[Mutation] = []
        validated: dict[int, str] = {}
        reservations = self._kind == RESERVATION
        deserialize = self._serde.deserialize
        partition_of = self._key_check.partition_of
        for message in messages:
            error = message.error()
            if error is not None:
                if error.code() == KafkaError._AUTO_OFFSET_RESET:
                    self._retry_offset(error)
                elif error.code() != KafkaError._PARTITION_EOF:
                    log.warning("consumer error on %s: %s", self._tp, error)
                continue
            _, _, offset = position_of(message)
            self._next_offset = offset + 1
            self._out_of_range = None
            key = message.key()
            try:
                raw_value = message.value()
                if key is None or raw_value is None:
                    raise SerdeError("record without key or value")
                if partition_of(key) != self._partition:
                    raise MisplacedKeyError(
                        f"key belongs in partition {partition_of(key)}, not {self._partition}"
                    )
                value: dict[str, Any] = deserialize(raw_value)
            except SerdeError as exc:
                self._undecodable.inc()
                log.warning(
                    "skipping undecodable record %s:%d:%d: %s",
                    self._topic,
                    self._partition,
                    offset,
                    exc,
                )
                continue
            mutations.append((key, value["count"], value["event_time"], offset))
            if reservations and value.get("validate"):
                validated[offset] = value["mutation_id"]
        self._records.inc(len(messages))
        self._update_lag()
        batch = MutationBatch(self._kind, self._partition, mutations, self._next_offset, validated)
        return [(self._item_key, batch)]

    def next_awake(self) -> datetime | None:
        return self._awake

    def _retry_offset(self, error: KafkaError) -> None:
        """The broker says our next offset is out of range: ask again in a moment.

        Seen with the embedded broker right after a restart, when it briefly reports a
        log end below records already read. With Kafka it can also mean the records are
        gone (retention, a recreated topic); then this repeats, loudly, rather than
        silently skipping or recounting mutations.
        """
        log.warning(
            "%s[%d]: offset %d is out of range on the broker (%s); retrying in %g s",
            self._topic,
            self._partition,
            self._next_offset,
            error.str(),
            _OUT_OF_RANGE_RETRY.total_seconds(),
        )
        self._out_of_range = f"offset {self._next_offset} is out of range on the broker"
        self._health.report_input(self._topic, self._partition, self._out_of_range)
        self._consumer.seek(TopicPartition(self._topic, self._partition, self._next_offset))
        self._awake = datetime.now(UTC) + _OUT_OF_RANGE_RETRY

    def on_statistics(self, statistics: str) -> None:
        """librdkafka's statistics (once a second, from inside ``consume``): report health."""
        problem = self._out_of_range or input_problem(statistics, self._topic, self._partition)
        self._health.report_input(self._topic, self._partition, problem)

    def _update_lag(self) -> None:
        """Refresh the lag gauge, at most once per _LAG_REFRESH_SECONDS."""
        # Cached watermarks come from librdkafka's statistics (refreshed once a second):
        # no broker round trip, and no point in asking more often than they change.
        now = time.monotonic()
        if now < self._lag_due:
            return
        self._lag_due = now + _LAG_REFRESH_SECONDS
        try:
            _, high = self._consumer.get_watermark_offsets(self._tp, cached=True)
        except Exception:  # statistics not in yet
            return
        if high >= 0:
            self._lag.set(max(0, high - self._next_offset))

    def snapshot(self) -> int:
        return self._next_offset

    def close(self) -> None:
        self._consumer.close()


class MutationSource(FixedPartitionedSource[tuple[str, MutationBatch], int]):
    """The assigned partitions of both input topics, as batches keyed by partition number."""

    def __init__(
        self,
        settings: CalculatorSettings,
        generation: Generation,
        metrics: CalculatorMetrics,
        health: DataflowHealth,
    ) -> None:
        self.settings, self.generation, self.metrics, self.health = (
            settings,
            generation,
            metrics,
            health,
        )
        self.key_check = _KeyCheck(settings.topic_partitions)

    def list_parts(self) -> list[str]:
        return [
            f"{kind}:{partition}"
            for kind in (ADJUSTMENT, RESERVATION)
            for partition in self.generation.partitions
        ]

    def build_part(
        self, step_id: str, for_part: str, resume_state: int | None
    ) -> _MutationPartition:
        # Bytewax's resume state is unused (no Bytewax recovery): the restored state of the
        # partition says where its inputs resume.
        kind_text, _, partition_text = for_part.partition(":")
        kind, partition = int(kind_text), int(partition_text)
        next_offset = self.generation.states[partition].applied.get(kind, 0)
        part: _MutationPartition | None = None

        def on_statistics(statistics: str) -> None:
            if part is not None:
                part.on_statistics(statistics)

        consumer = Consumer(
            {
                "bootstrap.servers": self.settings.kafka_bootstrap_servers,
                # Offsets live in the store and the changelog, not in a consumer group.
                "group.id": f"{self.settings.instance_id}-unused",
                "enable.auto.commit": False,
                "enable.auto.offset.store": False,
                "statistics.interval.ms": 1000,
                # Statistics feed the cached watermarks (lag) and the readiness report.
                "stats_cb": on_statistics,
                "fetch.wait.max.ms": 50,
                "queued.max.messages.kbytes": 65536,
                # Never jump elsewhere on "offset out of range": jumping to the end would
                # skip mutations, to the start would count them twice. The partition
                # reports the error and seeks back to where its state says it is.
                "auto.offset.reset": "error",
            }
        )
        consumer.assign([TopicPartition(INPUT_TOPICS[kind], partition, next_offset)])
        log.info("reading %s[%d] from offset %d", INPUT_TOPICS[kind], partition, next_offset)
        serde = value_serde(
            INVENTORY_MUTATION, INPUT_TOPICS[kind], self.settings.schema_registry_url
        )
        part = _MutationPartition(self, consumer, kind, partition, next_offset, serde)
        return part


class PartitionSums(StatefulBatchLogic[MutationBatch, PartitionUpdate, PartitionState]):
    """Running sums of every key of one partition.

    Every batch adds its mutations to the keys' states and hands on the keys it changed.
    A mutation below the input position a key's state already reflects is skipped: after
    a restore the inputs resume from where the partition's *last complete* batch started,
    and keys the interrupted batch did publish must not count it twice
    (:mod:`sellable_calculator.changelog`).
    """

    def __init__(
        self,
        restored: dict[int, PartitionState],
        load: Callable[[bytes], KeyState | None] = lambda key: None,
        load_result: Callable[[str], ReservationResult | None] = lambda mutation_id: None,
    ) -> None:
        """Sums that take their partition's state from ``restored`` on the first batch
        (Bytewax builds the logic before it says which key it is for), and the state of
        a key that is not there from ``load`` (the local store) the first time it comes:
        a restore then only reads the changelog records the store does not have, rather
        than every key of the partition into memory. ``load_result`` finds a decision
        already made (the store's index), for a validated reservation replayed after a
        crash."""
        self._restored = restored
        self._load = load
        self._load_result = load_result
        self._results: dict[bytes, list[ReservationResult]] = {}
        self._republish: list[ReservationResult] = []
        self._states: dict[bytes, KeyState] = {}
        self._applied: dict[int, int] = {}
        self._partition: int | None = None

    def on_batch(self, values: list[MutationBatch]) -> tuple[Iterable[PartitionUpdate], bool]:
        partition = values[0].partition
        if self._partition is None:
            state = self._restored[partition]
            self._partition, self._states, self._applied = partition, state.states, state.applied
        resume = dict(self._applied)
        changed = self._apply(values)
        applied = self._applied
        adjustments, reservations = applied.get(ADJUSTMENT, 0), applied.get(RESERVATION, 0)
        states = self._states
        changes: dict[bytes, KeyState] = {}
        for key in changed:
            on_hand, reserved, exists, updated_at, key_adjustments, key_reservations = states[key]
            # A restored key may already reflect more than the partition has applied (the
            # batch being replayed): its positions never go back, or it would count the
            # replayed mutations again.
            states[key] = changes[key] = KeyState(
                on_hand,
                reserved,
                exists,
                updated_at,
                max(adjustments, key_adjustments),
                max(reservations, key_reservations),
            )
        update = PartitionUpdate(
            partition, changes, resume, dict(applied), self._results, self._republish
        )
        if self._results or self._republish:
            self._results, self._republish = {}, []
        return [update], StatefulBatchLogic.RETAIN

    def _apply(self, values: list[MutationBatch]) -> set[bytes]:
        """Add the batches to the states; the keys that changed."""
        states, load = self._states, self._load
        changed: set[bytes] = set()
        for batch in values:
            adjusting = batch.kind == ADJUSTMENT
            validated = batch.validated
            for key, count, event_time, offset in batch.mutations:
                state = states.get(key)
                if state is None:
                    state = load(key) or NO_STATE
                on_hand, reserved, exists, updated_at, adjustments, reservations = state
                if offset < (adjustments if adjusting else reservations):
                    # Already in the key's restored state.
                    if validated and offset in validated:
                        self._decided_before(validated[offset])
                    continue
                if adjusting:
                    on_hand += count
                    exists = True
                elif validated and offset in validated:
                    decision = decide(count, on_hand, reserved, exists)
                    self._decided(key, validated[offset], count, decision, offset, event_time)
                    if decision.status != CONFIRMED:
                        # Not counted; the key still changes (the decision travels with
                        # its state, and its positions move past the reservation).
                        states[key] = state
                        changed.add(key)
                        continue
                    reserved += count
                else:
                    reserved += count
                states[key] = KeyState(
                    on_hand,
                    reserved,
                    exists,
                    max(updated_at, event_time),
                    adjustments,
                    reservations,
                )
                changed.add(key)
            self._applied[batch.kind] = batch.next_offset
        return changed

    def _decided(
        self,
        key: bytes,
        mutation_id: str,
        count: int,
        decision: Decision,
        offset: int,
        event_time: int,
    ) -> None:
        """Keep a decision just made, to publish with this update."""
        where = decode_key(key)
        result = ReservationResult(
            mutation_id,
            where.location,
            where.sku,
            count,
            decision.status,
            decision.available,
            decision.reason,
            offset,
            event_time,
        )
        self._results.setdefault(key, []).append(result)

    def _decided_before(self, mutation_id: str) -> None:
        """A replayed validated reservation: publish its decision again, as it was made."""
        result = self._load_result(mutation_id)
        if result is None:
            # Cannot happen while the changelog carries each decision with the state
            # that counts it; said loudly rather than decided again differently.
            log.error("no decision found for replayed validated reservation %s", mutation_id)
            return
        self._republish.append(result)

    def snapshot(self) -> PartitionState:
        return PartitionState(dict(self._states), dict(self._applied))


REPUBLISH_BACKOFF = Backoff(first=0.5, cap=5.0, factor=1, step=0.5)
"""Waits before publishing a batch again: 0.5 s longer each time, 5 s at most."""


class PublishFailed(Exception):
    """The broker did not take every value of a batch; the whole batch is published again."""


class _SellableSinkPartition(StatelessSinkPartition[tuple[str, PartitionUpdate]]):
    def __init__(self, sink: SellableSink) -> None:
        self._settings = settings = sink.settings
        self._store = sink.store
        self._progress = sink.progress
        self._published = sink.metrics.published
        self._run = sink.generation
        self._stop = sink.generation.stop
        self._generation = sink.generation.generation
        self._fence_interval = settings.calculator_session_timeout_seconds / 3
        self._confirmed_at = time.monotonic()
        self._dropping = False
        self._serde = value_serde(
            SELLABLE_SCHEMA, SELLABLE_INVENTORY.name, settings.schema_registry_url
        )
        self._results_serde = value_serde(
            RESERVATION_RESULT, RESERVATION_RESULTS.name, settings.schema_registry_url
        )
        self._decided = sink.metrics.reservations_decided
        self._producer = self._new_producer()
        self._failures: list[KafkaError] = []
        self._changelog = settings.changelog_topic
        self._changelog_ends: dict[int, int] = {}
        """Per partition, the next changelog offset after the records acknowledged so far."""
        self._republish = retrying(
            "publishing sellable values", REPUBLISH_BACKOFF, retry_on=PublishFailed, logger=log
        )

    def _new_producer(self) -> Producer:
        return Producer(
            {
                "bootstrap.servers": self._settings.kafka_bootstrap_servers,
                "enable.idempotence": True,
                "acks": "all",
                "linger.ms": 5,
                "compression.type": "lz4",
                # A broker that lost its topics must not recreate them with its own
                # partition count: co-partitioning depends on ours.
                "allow.auto.create.topics": False,
            }
        )

    def _on_delivery(self, err: KafkaError | None, message: Message) -> None:
        if err is not None:
            self._failures.append(err)
        elif message.topic() == self._changelog:
            partition, offset = message.partition(), message.offset()
            if partition is None or offset is None:
                return
            if offset >= self._changelog_ends.get(partition, 0):
                self._changelog_ends[partition] = offset + 1

    def _fenced(self, publishing: bool) -> bool:
        """Whether this batch must be dropped: the group took the partitions away while
        this process was not looking (frozen, starved), or is taking them back now.

        Asked before publishing (a batch that changed nothing only moves positions on),
        once per third of the session timeout, and always after a longer pause: a
        process that was frozen for longer than the session timeout finds out here,
        before it publishes what it computed from state that is no longer current. A
        dropped batch is neither published nor stored: whoever runs the partition next
        starts from the store and the changelog, and reads those mutations again.
        """
        run = self._run
        if run.fenced.is_set():  # another worker's sink heard it first
            self._dropping = True
        if self._dropping:
            # Every batch after a dropped one: each builds on the states of the one before
            # it, so publishing it would publish positions past mutations nobody stored.
            return True
        now = time.monotonic()
        if not publishing or now - self._confirmed_at < self._fence_interval:
            return False
        answer = run.still_member(run.stop)
        while answer is None and not run.stop.is_set():
            # No verdict (a silent broker): publishing would wait for it just the same.
            log.warning("the group has not confirmed this instance's assignment yet")
            answer = run.still_member(run.stop)
        if answer:
            self._confirmed_at = time.monotonic()
            return False
        self._dropping = True
        if answer is None:
            return True  # revoked meanwhile: the group waits for this dataflow to stop
        log.warning(
            "the group no longer gives this instance partitions %s: dropping the batch in "
            "hand and stopping their dataflow",
            list(run.partitions),
        )
        run.fenced.set()
        run.stop.set()
        return True

    def write_batch(self, items: list[tuple[str, PartitionUpdate]]) -> None:
        if any(update.changes for _, update in items):
            if self._fenced(publishing=True):
                return
        elif self._fenced(publishing=False):
            return
        serialize, generation = self._serde.serialize, self._generation
        changelog = self._changelog
        records: list[tuple[str, int, bytes, bytes]] = []
        decisions: list[tuple[str, int, bytes, bytes]] = []
        for _, update in items:
            partition, resume, results = update.partition, update.resume, update.results
            for key, state in update.changes.items():
                if state.exists:
                    records.append(
                        (SELLABLE_INVENTORY.name, partition, key, serialize(_record(state)))
                    )
                decided = results.get(key, ()) if results else ()
                records.append(
                    (
                        changelog,
                        partition,
                        key,
                        encode_record(
                            state, resume, generation, [result.to_bytes() for result in decided]
                        ),
                    )
                )
            if results or update.republish:
                decisions += self._result_records(update)
        # Publish first, store second: the store never claims a position whose states the
        # changelog has not acknowledged, so after a crash the changelog is never behind
        # the store, and a restore from it misses nothing the store had.
        self._changelog_ends.clear()
        self._publish(records)
        if decisions:
            # Decisions only once the changelog holds them with the states that count
            # them: a replay then finds them and publishes the same again, rather than
            # deciding anew, perhaps otherwise, what a client has already been told.
            self._publish(decisions)
        for _, update in items:
            partition = update.partition
            positions = {
                (INPUT_TOPICS[kind], partition): offset
                for kind, offset in update.next_offsets.items()
            }
            end = self._changelog_ends.get(partition)
            self._store.apply(
                update.changes,
                positions,
                None if end is None else {partition: end},
                (result for decided in update.results.values() for result in decided),
            )
            self._published.inc(sum(1 for state in update.changes.values() if state.exists))
            for (topic, partition_), offset in positions.items():
                self._progress.advance(topic, partition_, offset)

    def _result_records(self, update: PartitionUpdate) -> list[tuple[str, int, bytes, bytes]]:
        """The ``reservation_results`` records of ``update``'s decisions, new and replayed."""
        serialize, partition = self._results_serde.serialize, update.partition
        records = []
        for key, decided in update.results.items():
            for result in decided:
                self._decided.labels(result.status).inc()
                records.append(
                    (RESERVATION_RESULTS.name, partition, key, serialize(result.record()))
                )
        for result in update.republish:
            key = encode_key(result.location, result.sku)
            records.append((RESERVATION_RESULTS.name, partition, key, serialize(result.record())))
        return records

    def _publish(self, records: list[tuple[str, int, bytes, bytes]]) -> None:
        """Publish ``records`` in order and wait until the broker acknowledged every one.

        The idempotent producer retries by itself, in order and without duplicates, so a
        slow or paused broker only means waiting (readiness says not ready meanwhile: the
        sources are not polled). A fatal error (the broker fenced the producer's session
        after a long pause) or a failed delivery means publishing the whole batch again,
        in order, with a new producer if the old one is dead: every record is an upsert
        of a key's latest value, so a duplicate is harmless and the newest value of each
        key stays the last one (a duplicate changelog record is as harmless: a restore
        keeps the latest per key). A stop request while the broker does not answer fails
        the dataflow (exit status 1); the next start restores from the store and the
        changelog, which hold nothing of the failed batch.
        """
        self._republish(self._publish_once, records)

    def _publish_once(self, records: list[tuple[str, int, bytes, bytes]]) -> None:
        """One attempt of :meth:`_publish`: :class:`PublishFailed` to try again, with a new
        producer already in place if the old one is dead; RuntimeError when stopping."""
        self._failures.clear()
        try:
            for topic, partition, key, value in records:
                self._produce(topic, key, value, partition)
            while (remaining := self._producer.flush(5)) and not self._fatal():
                log.warning("waiting for the broker to acknowledge %d value(s)", remaining)
                if self._stop.is_set():
                    raise RuntimeError(f"stopping with {remaining} value(s) unacknowledged")
        except KafkaException as exc:  # produce() on a producer in its fatal state
            self._failures.append(exc.args[0])
        if not self._failures:
            return
        # The stop is checked here rather than given to retrying() as its event, which
        # would refuse even a first attempt: on a stop the sinks still flush what is in
        # hand, and only a batch that then fails ends the dataflow.
        if self._stop.is_set():
            raise RuntimeError(f"stopping with sellable values unpublished: {self._failures[0]}")
        fatal = self._fatal()
        if fatal:
            self._producer.purge()
            self._producer = self._new_producer()
        raise PublishFailed(
            f"{len(records)} value(s): {self._failures[0].str()}"
            + (", with a new producer" if fatal else "")
        )

    def _fatal(self) -> bool:
        return any(error.fatal() for error in self._failures)

    def _produce(self, topic: str, key: bytes, value: bytes, partition: int) -> None:
        while True:
            try:
                self._producer.produce(
                    topic,
                    value,
                    key,
                    partition=partition,
                    on_delivery=self._on_delivery,
                )
                return
            except BufferError:
                self._producer.poll(0.05)  # local queue full: let deliveries drain

    def close(self) -> None:
        self._producer.flush(5)


def _record(state: KeyState) -> dict[str, int]:
    """The ``sellable_inventory`` record of one key's state."""
    return {
        "count": state.on_hand - state.reserved,
        "on_hand": state.on_hand,
        "reserved": state.reserved,
        "updated_at": state.updated_at,
    }


class SellableSink(DynamicSink[tuple[str, PartitionUpdate]]):
    """Publishes changed values and key states, then writes them to the store."""

    def __init__(
        self,
        settings: CalculatorSettings,
        generation: Generation,
        store: SellableStore,
        progress: Progress,
        metrics: CalculatorMetrics,
    ) -> None:
        self.settings, self.generation, self.store, self.progress = (
            settings,
            generation,
            store,
            progress,
        )
        self.metrics = metrics

    def build(self, step_id: str, worker_index: int, worker_count: int) -> _SellableSinkPartition:
        return _SellableSinkPartition(self)


def build_dataflow(
    settings: CalculatorSettings,
    generation: Generation,
    store: SellableStore,
    progress: Progress,
    metrics: CalculatorMetrics,
    health: DataflowHealth,
) -> Dataflow:
    """The calculator's dataflow over the partitions of ``generation``, from their
    restored states; it ends when ``generation.stop`` is set."""
    flow = Dataflow("sellable_calculator")
    source = MutationSource(settings, generation, metrics, health)
    batches = op.input("mutations", flow, source)
    states = generation.states
    updates = op.stateful_batch(
        "sums", batches, lambda _resume: PartitionSums(states, store.state, store.reservation)
    )
    op.output("sellable", updates, SellableSink(settings, generation, store, progress, metrics))
    return flow
