"""The Bytewax dataflow: adjustments and reservations in, sellable inventory out.

Example (what ``python -m sellable_calculator`` does, minus the REST API)::

    from bytewax.run import cli_main
    flow = build_dataflow(settings, store, progress, metrics, stop, DataflowHealth())
    cli_main(flow, workers_per_process=1, epoch_interval=timedelta(seconds=2),
             recovery_config=RecoveryConfig(recovery_dir))

The shape is a Kafka Streams task per partition, made explicit::

    inventory_adjustments  p ─┐                       ┌─▶ local store (RocksDB)
                              ├─▶ "p" ─▶ running sums ─┤
    inventory_reservations p ─┘   per key              └─▶ sellable_inventory p

* **Input**: :class:`MutationSource` reads exactly the partitions this instance owns of
  both input topics. Records are decoded in the source, in batches; an undecodable one
  is counted, logged with its topic/partition/offset and skipped (no dead-letter topic:
  the input topics keep everything forever, so the record can always be found again).
* **State**: :class:`PartitionSums` is keyed by *partition number*, so partition p of
  both topics meets in one place, in order, with no shuffle between instances. It keeps
  on hand = Σ adjustments and reserved = Σ reservations per key; a key exists once it has
  an adjustment (the original's left join), and reservations that came first still count.
* **Output**: :class:`SellableSink` publishes every changed value to ``sellable_inventory``
  (same key bytes, same partition), waits for the broker's acknowledgement, and only then
  writes the values together with the new input positions to the store.

Recovery: Bytewax snapshots the sums, the input offsets they include and the source
offsets together at every epoch, so a crash resumes from a consistent point and replays
what came after it: nothing is lost or counted twice. After a kill -9 the store is usually
*ahead* of that snapshot (it is written every batch, the snapshot every epoch), and the
two input topics replay through separate consumers, in no particular order relative to
each other. So while a partition replays what its store already holds, its changes are
held back (the store keeps serving the values it had, which were true); once both inputs
have caught up with the store's positions, every key whose sums differ from the store is
published and stored in one go. See :class:`PartitionSums`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import lru_cache
from typing import Any, NamedTuple

from bytewax import operators as op
from bytewax.dataflow import Dataflow
from bytewax.inputs import FixedPartitionedSource, StatefulSourcePartition
from bytewax.operators import StatefulBatchLogic
from bytewax.outputs import DynamicSink, StatelessSinkPartition
from confluent_kafka import (
    OFFSET_BEGINNING,
    Consumer,
    KafkaError,
    KafkaException,
    Producer,
    TopicPartition,
)

from sellable_calculator.health import DataflowHealth, input_problem
from sellable_calculator.metrics import CalculatorMetrics
from sellable_calculator.progress import Progress
from sellable_calculator.settings import CalculatorSettings
from sellable_calculator.store import Sellable, SellableStore
from service_runtime.kafka import position_of
from service_runtime.retry import Backoff, retrying
from shared_schemas.partitioner import partition_for
from shared_schemas.schemas import INVENTORY_MUTATION
from shared_schemas.schemas import SELLABLE_INVENTORY as SELLABLE_SCHEMA
from shared_schemas.serde import SerdeError, ValueSerde, decode_key, value_serde
from shared_schemas.topics import INVENTORY_ADJUSTMENTS, INVENTORY_RESERVATIONS, SELLABLE_INVENTORY

log = logging.getLogger(__name__)

ADJUSTMENT, RESERVATION = 0, 1
INPUT_TOPICS = (INVENTORY_ADJUSTMENTS.name, INVENTORY_RESERVATIONS.name)
"""Input topic names, indexed by ADJUSTMENT / RESERVATION."""

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


@dataclass(frozen=True, slots=True)
class PartitionUpdate:
    """What one run of :class:`PartitionSums` changed in one partition."""

    partition: int
    changes: dict[bytes, Sellable]
    """The new value of every key that changed."""
    next_offsets: dict[int, int]
    """Next offset to apply per input kind: the positions the values bring the store to."""


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
        self._stop = source.stop
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
        self._records.inc(len(messages))
        self._update_lag()
        batch = MutationBatch(self._kind, self._partition, mutations, self._next_offset)
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
    """The owned partitions of both input topics, as batches keyed by partition number."""

    def __init__(
        self,
        settings: CalculatorSettings,
        stop: threading.Event,
        metrics: CalculatorMetrics,
        health: DataflowHealth,
    ) -> None:
        self.settings, self.stop, self.metrics, self.health = settings, stop, metrics, health
        self.key_check = _KeyCheck(settings.topic_partitions)

    def list_parts(self) -> list[str]:
        return [
            f"{kind}:{partition}"
            for kind in (ADJUSTMENT, RESERVATION)
            for partition in self.settings.owned_partitions
        ]

    def build_part(
        self, step_id: str, for_part: str, resume_state: int | None
    ) -> _MutationPartition:
        kind_text, _, partition_text = for_part.partition(":")
        kind, partition = int(kind_text), int(partition_text)
        next_offset = OFFSET_BEGINNING if resume_state is None else resume_state
        part: _MutationPartition | None = None

        def on_statistics(statistics: str) -> None:
            if part is not None:
                part.on_statistics(statistics)

        consumer = Consumer(
            {
                "bootstrap.servers": self.settings.kafka_bootstrap_servers,
                # Offsets live in Bytewax's recovery snapshots, not in a consumer group.
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
        start = "from the beginning" if resume_state is None else f"from offset {next_offset}"
        log.info("reading %s[%d] %s", INPUT_TOPICS[kind], partition, start)
        serde = value_serde(
            INVENTORY_MUTATION, INPUT_TOPICS[kind], self.settings.schema_registry_url
        )
        part = _MutationPartition(self, consumer, kind, partition, max(next_offset, 0), serde)
        return part


KeySums = tuple[int, int, bool, int]
"""(on hand, reserved, has an adjustment, latest event time ms) of one key."""

_NO_SUMS: KeySums = (0, 0, False, 0)


class PartitionState(NamedTuple):
    """The recovery state of one partition: its sums and the input offsets they include."""

    sums: dict[bytes, KeySums]
    applied: dict[int, int]
    """Next offset to apply per input kind (ADJUSTMENT / RESERVATION); absent: none yet."""


def _sellable(sums: KeySums) -> Sellable:
    on_hand, reserved, _, updated_at = sums
    return Sellable(on_hand - reserved, on_hand, reserved, updated_at)


class PartitionSums(StatefulBatchLogic[MutationBatch, PartitionUpdate, PartitionState]):
    """Running sums of every key of one partition, and when they may be published.

    Normally every batch publishes the keys it changed. After a restart the first batch
    compares the sums' input offsets with the positions the store has reached:

    * **Replaying** (the store is ahead, as after a kill -9 between two snapshots): the
      sums apply the replayed mutations but publish nothing. The two inputs replay through
      separate consumers, so a value computed half-way mixes new adjustments with old
      reservations (or the reverse): a number that was never true. The store keeps its
      own, true values meanwhile.
    * **Caught up** (every input's offset is at or past the store's): every key whose sums
      differ from the store is published at once with the new positions, and from then on
      each batch publishes what it changed. Comparing every key, not only the replayed
      ones, also repairs a store that is *behind* the snapshot.

    Values in the state dict are immutable tuples, so a shallow copy is a consistent
    snapshot even while later batches replace entries.
    """

    def __init__(
        self,
        resume: PartitionState | None,
        store: SellableStore,
        health: DataflowHealth | None = None,
    ) -> None:
        if resume is not None and not isinstance(resume, PartitionState):
            raise TypeError(
                "the recovery state was written by an older version of the calculator; "
                "delete the instance's state directory (CALCULATOR_STATE_DIR) and start again"
            )
        self._sums: dict[bytes, KeySums] = dict(resume.sums) if resume else {}
        self._applied: dict[int, int] = dict(resume.applied) if resume else {}
        self._store = store
        self._health = health
        self._store_reached: dict[int, int] | None = None
        """The store's positions per input kind at start; None until the first batch."""
        self._caught_up = False
        """Whether the sums have reached the store and been compared with it."""

    def on_batch(self, values: list[MutationBatch]) -> tuple[Iterable[PartitionUpdate], bool]:
        partition = values[0].partition
        if self._store_reached is None:
            self._store_reached = self._store_positions(partition)
            if self._replaying():
                log.info(
                    "partition %d replays up to the store's positions %s before publishing",
                    partition,
                    {INPUT_TOPICS[k]: offset for k, offset in self._store_reached.items()},
                )
                if self._health is not None:
                    self._health.set_replaying(partition, True)
        changed = self._apply(values)
        if not self._caught_up:
            if self._replaying():
                return [], StatefulBatchLogic.RETAIN
            changed = self._differing_from_store()
            self._caught_up = True
            if self._health is not None:
                self._health.set_replaying(partition, False)
            if changed:
                log.info(
                    "partition %d caught up with its store at %s: %d key(s) published",
                    partition,
                    self._positions_text(),
                    len(changed),
                )
        sums = self._sums
        changes = {key: _sellable(sums[key]) for key in changed}
        update = PartitionUpdate(partition, changes, dict(self._applied))
        return [update], StatefulBatchLogic.RETAIN

    def _apply(self, values: list[MutationBatch]) -> set[bytes]:
        """Add the batches to the sums; the keys that exist and changed."""
        sums = self._sums
        changed: set[bytes] = set()
        for batch in values:
            adjusting = batch.kind == ADJUSTMENT
            for key, count, event_time, _offset in batch.mutations:
                on_hand, reserved, exists, updated_at = sums.get(key, _NO_SUMS)
                if adjusting:
                    on_hand += count
                    exists = True
                else:
                    reserved += count
                sums[key] = (on_hand, reserved, exists, max(updated_at, event_time))
                if exists:
                    changed.add(key)
            self._applied[batch.kind] = batch.next_offset
        return changed

    def _store_positions(self, partition: int) -> dict[int, int]:
        """The store's positions per input kind: what the sums must reach to publish."""
        stored = self._store.positions()
        return {
            kind: stored[(INPUT_TOPICS[kind], partition)]
            for kind in (ADJUSTMENT, RESERVATION)
            if (INPUT_TOPICS[kind], partition) in stored
        }

    def _replaying(self) -> bool:
        """Whether some input is still below the position the store had reached."""
        reached = self._store_reached or {}
        return any(self._applied.get(kind, 0) < offset for kind, offset in reached.items())

    def _differing_from_store(self) -> set[bytes]:
        """Keys whose sums are not what the store holds (a full pass, once per start)."""
        get = self._store.get
        return {key for key, sums in self._sums.items() if sums[2] and get(key) != _sellable(sums)}

    def _positions_text(self) -> str:
        return ", ".join(f"{INPUT_TOPICS[k]}@{o}" for k, o in sorted(self._applied.items()))

    def snapshot(self) -> PartitionState:
        return PartitionState(dict(self._sums), dict(self._applied))


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
        self._stop = sink.stop
        self._serde = value_serde(
            SELLABLE_SCHEMA, SELLABLE_INVENTORY.name, settings.schema_registry_url
        )
        self._producer = self._new_producer()
        self._failures: list[KafkaError] = []
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

    def _on_delivery(self, err: KafkaError | None, _msg: Any) -> None:
        if err is not None:
            self._failures.append(err)

    def write_batch(self, items: list[tuple[str, PartitionUpdate]]) -> None:
        records = [
            (update.partition, key, self._serde.serialize(_record(value)))
            for _, update in items
            for key, value in update.changes.items()
        ]
        # Publish first, store second: the store never claims a position whose values
        # the topic has not acknowledged, so after a crash the store is never ahead of
        # the topic (and PartitionSums may hold back a replay until it reaches the store).
        self._publish(records)
        for _, update in items:
            positions = {
                (INPUT_TOPICS[kind], update.partition): offset
                for kind, offset in update.next_offsets.items()
            }
            self._store.apply(update.changes, positions)
            self._published.inc(len(update.changes))
            for (topic, partition), offset in positions.items():
                self._progress.advance(topic, partition, offset)

    def _publish(self, records: list[tuple[int, bytes, bytes]]) -> None:
        """Publish ``records`` in order and wait until the broker acknowledged every one.

        The idempotent producer retries by itself, in order and without duplicates, so a
        slow or paused broker only means waiting (readiness says not ready meanwhile: the
        sources are not polled). A fatal error (the broker fenced the producer's session
        after a long pause) or a failed delivery means publishing the whole batch again,
        in order, with a new producer if the old one is dead: every record is an upsert
        of a key's latest value, so a duplicate is harmless and the newest value of each
        key stays the last one. A stop request while the broker does not answer fails
        the dataflow (exit status 1); recovery resumes from the last snapshot.
        """
        self._republish(self._publish_once, records)

    def _publish_once(self, records: list[tuple[int, bytes, bytes]]) -> None:
        """One attempt of :meth:`_publish`: :class:`PublishFailed` to try again, with a new
        producer already in place if the old one is dead; RuntimeError when stopping."""
        self._failures.clear()
        try:
            for partition, key, value in records:
                self._produce(key, value, partition)
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

    def _produce(self, key: bytes, value: bytes, partition: int) -> None:
        while True:
            try:
                self._producer.produce(
                    SELLABLE_INVENTORY.name,
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


def _record(value: Sellable) -> dict[str, int]:
    """The ``sellable_inventory`` record of one value."""
    return {
        "count": value.count,
        "on_hand": value.on_hand,
        "reserved": value.reserved,
        "updated_at": value.updated_at,
    }


class SellableSink(DynamicSink[tuple[str, PartitionUpdate]]):
    """Publishes changed values to ``sellable_inventory``, then writes them to the store."""

    def __init__(
        self,
        settings: CalculatorSettings,
        store: SellableStore,
        progress: Progress,
        metrics: CalculatorMetrics,
        stop: threading.Event,
    ) -> None:
        self.settings, self.store, self.progress = settings, store, progress
        self.metrics, self.stop = metrics, stop

    def build(self, step_id: str, worker_index: int, worker_count: int) -> _SellableSinkPartition:
        return _SellableSinkPartition(self)


def build_dataflow(
    settings: CalculatorSettings,
    store: SellableStore,
    progress: Progress,
    metrics: CalculatorMetrics,
    stop: threading.Event,
    health: DataflowHealth,
) -> Dataflow:
    """The calculator's dataflow for the partitions ``settings`` says this instance owns."""
    flow = Dataflow("sellable_calculator")
    batches = op.input("mutations", flow, MutationSource(settings, stop, metrics, health))
    updates = op.stateful_batch(
        "sums", batches, lambda resume: PartitionSums(resume, store, health)
    )
    op.output("sellable", updates, SellableSink(settings, store, progress, metrics, stop))
    return flow
