"""The changelog: how a partition's state moves between instances through Kafka.

Every batch the dataflow publishes writes, for each key it changed, the key's whole
state to the group's compacted changelog topic, ``<group>-changelog`` (same key bytes,
same partition number as the inputs), as a Kafka Streams task writes its store's
changelog.
A record says which input positions the key's state reflects, and where the partition's
inputs resume if it is the partition's last record: the positions *before* its batch,
because a crash may have published only part of that batch. On a restore, a key whose
state already reflects a replayed mutation skips it
(:class:`~sellable_calculator.dataflow.PartitionSums`), so every mutation counts once.

An instance that is assigned a partition restores it (:func:`restore`): from its local
store when that is there, plus whatever the changelog holds after the offset the store
reflects (written by another owner meanwhile); from the whole changelog on an empty disk.

Example::

    value = encode_record(state, resume={ADJUSTMENT: 40, RESERVATION: 12}, generation=g)
    state, resume, generation = decode_record(value)
"""

from __future__ import annotations

import logging
import struct
import threading
import time
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field

from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition

from sellable_calculator.metrics import CalculatorMetrics
from sellable_calculator.settings import CalculatorSettings
from sellable_calculator.store import STATE_SIZE, KeyState, SellableStore
from shared_schemas.reservations import ReservationResult
from shared_schemas.serde import SerdeError
from shared_schemas.topics import INVENTORY_ADJUSTMENTS, INVENTORY_RESERVATIONS

log = logging.getLogger(__name__)

ADJUSTMENT, RESERVATION = 0, 1
INPUT_TOPICS = (INVENTORY_ADJUSTMENTS.name, INVENTORY_RESERVATIONS.name)
"""Input topic names, indexed by ADJUSTMENT / RESERVATION."""

_VERSION = b"\x01"
_WITH_RESULTS = b"\x02"
"""Version 2: version 1 followed by the decisions on validated reservations its batch made
for the key (a count, then each one's length and bytes)."""
_TAIL = struct.Struct("<qqq")
"""resume adjustments, resume reservations, generation."""
_COUNT = struct.Struct("<H")
_LENGTH = struct.Struct("<I")
RECORD_SIZE = 1 + STATE_SIZE + _TAIL.size
"""Size of a version-1 record (no decisions)."""


class ChangelogError(ValueError):
    """A changelog record this version cannot read."""


def encode_record(
    state: KeyState,
    resume: Mapping[int, int],
    generation: int,
    results: Sequence[bytes] = (),
) -> bytes:
    """The changelog value of one key's state, written in a batch that started at the
    partition's positions ``resume`` (per input kind), by the assignment ``generation``.

    ``results``: the decisions (``ReservationResult.to_bytes``) that batch made on the
    key's validated reservations. They travel in the same record as the state that counts
    them, so that whoever replays the batch after a crash finds the decisions the state
    already reflects, and publishes those again instead of deciding anew.
    """
    body = state.to_bytes() + _TAIL.pack(
        resume.get(ADJUSTMENT, 0), resume.get(RESERVATION, 0), generation
    )
    if not results:
        return _VERSION + body
    parts = [_WITH_RESULTS, body, _COUNT.pack(len(results))]
    for data in results:
        parts += (_LENGTH.pack(len(data)), data)
    return b"".join(parts)


def decode_record(value: bytes) -> tuple[bytes, dict[int, int], int]:
    """(encoded key state, resume positions per input kind, generation) of a record."""
    version = value[:1]
    if not (
        (version == _VERSION and len(value) == RECORD_SIZE)
        or (version == _WITH_RESULTS and len(value) >= RECORD_SIZE + _COUNT.size)
    ):
        raise ChangelogError(f"not a changelog record of version 1 or 2 ({len(value)} bytes)")
    adjustments, reservations, generation = _TAIL.unpack_from(value, 1 + STATE_SIZE)
    return (
        value[1 : 1 + STATE_SIZE],
        {ADJUSTMENT: adjustments, RESERVATION: reservations},
        generation,
    )


def record_results(value: bytes) -> list[bytes]:
    """The decisions a record carries (see :func:`encode_record`); none for version 1."""
    if value[:1] != _WITH_RESULTS:
        return []
    (count,) = _COUNT.unpack_from(value, RECORD_SIZE)
    offset = RECORD_SIZE + _COUNT.size
    results = []
    for _ in range(count):
        (length,) = _LENGTH.unpack_from(value, offset)
        offset += _LENGTH.size
        if offset + length > len(value):
            raise ChangelogError("a changelog record's decisions are truncated")
        results.append(value[offset : offset + length])
        offset += length
    return results


def _decode_results(value: bytes) -> list[ReservationResult]:
    """The decisions of a record, decoded; ChangelogError for anything broken."""
    try:
        return [ReservationResult.from_bytes(data) for data in record_results(value)]
    except (struct.error, SerdeError, KeyError) as exc:
        raise ChangelogError(f"a changelog record's decisions cannot be read: {exc}") from exc


@dataclass
class PartitionState:
    """One owned partition: every key's state and the next input offset to apply per kind."""

    states: dict[bytes, KeyState]
    applied: dict[int, int] = field(default_factory=dict)
    """Next offset to apply per input kind (ADJUSTMENT / RESERVATION); absent: 0."""


@dataclass
class ChangelogReader:
    """Applies one partition's changelog records, in offset order, to its state.

    The latest record of a key wins, except a record of an older assignment after one of
    a newer (written by an instance that had lost the partition and not noticed yet: its
    states are true, but older than what the newer owner wrote before it). The inputs
    resume where the last record applied says.
    """

    state: PartitionState
    newest_generation: int = 0
    records: int = 0
    keep_states: bool = True
    """Whether :attr:`state` collects the key states (a restore hands them to the
    dataflow); a standby replica only writes them to the store."""
    results: list[ReservationResult] = field(default_factory=list)
    """Decisions the applied records carried, for the store's index; the caller empties it."""

    def apply(self, key: bytes, value: bytes) -> bytes | None:
        """Apply one record; the encoded key state it brought, or None if it was skipped."""
        data, resume, generation = decode_record(value)
        if generation < self.newest_generation:
            return None
        results = _decode_results(value)
        self.newest_generation = generation
        self.results += results
        if self.keep_states:
            self.state.states[key] = KeyState.from_bytes(data)
        self.state.applied = resume
        self.records += 1
        return data


@dataclass
class RestoreReport:
    """What a restore did, for logs and metrics."""

    partition: int
    from_offset: int
    """The changelog offset the local store reflected (0: an empty store)."""
    records: int = 0
    seconds: float = 0.0


_RESTORE_BATCH = 10_000
"""Changelog records read (and written to the store in one batch) at a time."""


def restore(
    settings: CalculatorSettings,
    store: SellableStore,
    partitions: Collection[int],
    stop: threading.Event,
    metrics: CalculatorMetrics | None = None,
) -> dict[int, PartitionState] | None:
    """Bring the local store's state of ``partitions`` up to the end of the changelog;
    per partition, the key states the changelog brought (the others are in the store,
    :class:`~sellable_calculator.dataflow.PartitionSums` reads them when their key comes)
    and the input positions to resume from. None when ``stop`` was set meanwhile (the
    assignment was revoked)."""
    stored = store.positions()
    result: dict[int, PartitionState] = {}
    consumer = _changelog_consumer(settings)
    try:
        for partition in sorted(partitions):
            applied = {
                kind: stored[(INPUT_TOPICS[kind], partition)]
                for kind in (ADJUSTMENT, RESERVATION)
                if (INPUT_TOPICS[kind], partition) in stored
            }
            state = PartitionState({}, applied)
            report = _catch_up(consumer, settings.changelog_topic, store, partition, state, stop)
            if report is None:
                return None
            result[partition] = state
            _log_restore(report, len(state.states))
            if metrics is not None:
                metrics.partitions_restored.inc()
                metrics.records_restored.inc(report.records)
                metrics.restore_seconds.observe(report.seconds)
    finally:
        consumer.close()
    return result


def _changelog_consumer(settings: CalculatorSettings) -> Consumer:
    return Consumer(
        {
            "bootstrap.servers": settings.kafka_bootstrap_servers,
            "group.id": f"{settings.instance_id}-restore-unused",
            "enable.auto.commit": False,
            "enable.partition.eof": True,
            "auto.offset.reset": "earliest",
            "fetch.wait.max.ms": 50,
            "queued.max.messages.kbytes": 65536,
        }
    )


def _catch_up(
    consumer: Consumer,
    topic: str,
    store: SellableStore,
    partition: int,
    state: PartitionState,
    stop: threading.Event,
) -> RestoreReport | None:
    """Apply the changelog of ``partition`` after the offset the store reflects."""
    started = time.monotonic()
    start = store.changelog_position(partition)
    report = RestoreReport(partition, start)
    tp = TopicPartition(topic, partition)
    _, end = consumer.get_watermark_offsets(tp, timeout=10)
    if end <= start:  # nothing after what the store reflects
        report.seconds = time.monotonic() - started
        return report
    consumer.assign([TopicPartition(topic, partition, start)])
    reader = ChangelogReader(state)
    next_offset = start
    idle_since = time.monotonic()
    try:
        while True:
            if stop.is_set():
                return None
            # A short wait: consume() waits it out whenever fewer records than a batch are
            # left, once per partition restored.
            messages = consumer.consume(_RESTORE_BATCH, 0.02)
            if not messages:
                if time.monotonic() - idle_since > 30:  # the broker went silent
                    raise KafkaException(
                        KafkaError(KafkaError._TIMED_OUT, f"restoring {tp}: no records for 30 s")
                    )
                continue
            idle_since = time.monotonic()
            encoded: dict[bytes, bytes] = {}
            at_end = False
            for message in messages:
                error = message.error()
                if error is not None:
                    if error.code() == KafkaError._PARTITION_EOF:
                        at_end = True
                        continue
                    if error.fatal():
                        raise KafkaException(error)
                    log.warning("restoring %s: %s", tp, error)
                    continue
                next_offset = (message.offset() or 0) + 1
                key, value = message.key(), message.value()
                if key is None or value is None:
                    continue
                data = reader.apply(key, value)
                if data is not None:
                    encoded[key] = data
            report.records = reader.records
            positions = {
                (INPUT_TOPICS[kind], partition): offset for kind, offset in state.applied.items()
            }
            store.apply_encoded(encoded, positions, {partition: next_offset}, reader.results)
            reader.results = []
            if at_end and next_offset >= end:
                break
    finally:
        consumer.unassign()
    report.seconds = time.monotonic() - started
    return report


def _log_restore(report: RestoreReport, keys: int) -> None:
    """One line per partition restored; ``keys``: how many keys the records brought."""
    if report.records == 0:
        log.info(
            "partition %d: local state is current (changelog offset %d)",
            report.partition,
            report.from_offset,
        )
        return
    rate = report.records / report.seconds if report.seconds > 0 else float("inf")
    log.info(
        "partition %d: restored %d changelog record(s) from offset %d in %.2f s "
        "(%.0f records/s) %s: %d key(s)",
        report.partition,
        report.records,
        report.from_offset,
        report.seconds,
        rate,
        "on top of the local store" if report.from_offset else "into an empty store",
        keys,
    )
