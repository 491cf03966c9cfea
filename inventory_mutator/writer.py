"""The mutator's way to Kafka: each accepted mutation becomes one acknowledged event.

One :class:`EventWriter` per app, on ``app.state.writer``; the handlers reach it with
:func:`inventory_mutator.routes.event_writer`. It holds what every request shares: the
settings, the metrics, the Idempotency-Key cache and, between the app's start and stop,
the Avro serdes and the producer.

Example::

    writer = EventWriter(settings, MutatorMetrics(["/inventory/adjustment"]))
    producer = await writer.open()              # topics ensured, producer started
    delivered = await writer.write(INVENTORY_ADJUSTMENTS, adjustment, str(uuid.uuid4()))
    await producer.aclose(3.0)

The record: key = ``encode_key(location, sku)``, the partition the shared partitioner
assigns that key, value = an ``InventoryMutation`` with the mutation id and the event time.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from confluent_kafka import Producer
from confluent_kafka.admin import ClusterMetadata

from inventory_mutator.decisions import Decisions
from inventory_mutator.idempotency import IdempotencyCache
from inventory_mutator.metrics import MutatorMetrics
from inventory_mutator.mutations import Mutation
from inventory_mutator.producer import AsyncProducer, Delivered, ProducerStatus
from inventory_mutator.settings import MutatorSettings
from service_runtime.kafka import ensure_topics_when_available
from shared_schemas.partitioner import key_and_partition
from shared_schemas.schemas import INVENTORY_MUTATION
from shared_schemas.serde import ValueSerde, value_serde
from shared_schemas.topics import (
    INVENTORY_ADJUSTMENTS,
    INVENTORY_RESERVATIONS,
    TopicMismatchError,
    TopicSpec,
)

log = logging.getLogger(__name__)

MUTATION_TOPICS = (INVENTORY_ADJUSTMENTS, INVENTORY_RESERVATIONS)

KAFKA_CHECK_TIMEOUT_SECONDS = 2.5
"""Longest wait for the broker's metadata answer in the broker check."""
READINESS_TIMEOUT_SECONDS = 3.0
"""Longest wait of ``/health/ready`` for the broker check (which goes on in the background)."""


class TopicsMissing(RuntimeError):
    """The mutator's topics are not on the broker (and it may not create them)."""


def producer_config(settings: MutatorSettings) -> dict[str, Any]:
    """The librdkafka settings of the mutator's producer (on top of :class:`AsyncProducer`'s)."""
    timeout_ms = int(settings.mutator_delivery_timeout_seconds * 1000)
    return {
        "bootstrap.servers": settings.kafka_bootstrap_servers,
        # librdkafka gives up when we do, so a dead broker does not leave
        # records queued for minutes behind a request that already got its 503.
        "message.timeout.ms": timeout_ms,
        "socket.connection.setup.timeout.ms": min(timeout_ms, 5000),
        # A broker that lost its topics must not get them back by auto-creation
        # with its default partition count: that breaks co-partitioning. The
        # broker check recreates them with the right one instead.
        "allow.auto.create.topics": False,
    }


class EventWriter:
    """Writes mutations to Kafka as events, and says whether it can."""

    def __init__(self, settings: MutatorSettings, metrics: MutatorMetrics) -> None:
        """A writer not open yet: :meth:`open` starts its producer."""
        self.settings = settings
        self.metrics = metrics
        self.idempotency: IdempotencyCache[bytes] = IdempotencyCache(
            settings.mutator_idempotency_window_seconds, settings.mutator_idempotency_max_keys
        )
        """The 200 bodies already given, by topic and Idempotency-Key."""
        self.decisions = Decisions(settings.mutator_results_max)
        """Decisions on validated reservations, from ``reservation_results``."""
        self.missing_topics: list[str] = []
        """The mutator's topics the last broker check did not find (for readiness)."""
        self._serdes: dict[str, ValueSerde] = {}
        self._producer: AsyncProducer | None = None

    @property
    def producer(self) -> AsyncProducer:
        """The producer in use; only between :meth:`open` and the app's stop."""
        if self._producer is None:
            raise RuntimeError("the event writer is not open: the app has not started")
        return self._producer

    async def open(self) -> AsyncProducer:
        """Ensure the topics (if allowed), load the serdes, start the producer and return it."""
        if self.settings.mutator_ensure_topics:
            try:
                await asyncio.to_thread(self._ensure_topics, 5)
            except Exception as exc:  # start anyway: requests answer 503 until Kafka is back
                log.warning("could not ensure topics at start-up: %s", exc)
        for spec in MUTATION_TOPICS:
            self._serdes[spec.name] = value_serde(
                INVENTORY_MUTATION, spec.name, self.settings.schema_registry_url
            )
        self._producer = AsyncProducer(
            producer_config(self.settings),
            self.check_broker,
            on_replaced=lambda reason: self.metrics.replacements.inc(),
        )
        return self._producer

    async def write(
        self, spec: TopicSpec, mutation: Mutation, mutation_id: str, validate: bool = False
    ) -> Delivered:
        """Produce ``mutation`` as one event and wait for the broker's acknowledgement;
        ``validate``: a reservation the calculator decides before counting it.

        Raises :class:`~inventory_mutator.producer.ProduceFailed` (saying whether the
        event may have been written) when the broker does not acknowledge it in time.
        """
        settings = self.settings
        key, partition = key_and_partition(
            mutation.locationId, mutation.sku, settings.topic_partitions
        )
        value = self._serdes[spec.name].serialize(
            {
                "mutation_id": mutation_id,
                "count": mutation.count,
                "event_time": int(time.time() * 1000),
                "validate": validate,
            }
        )
        return await self.producer.produce(
            spec.name, key, value, partition, settings.mutator_delivery_timeout_seconds
        )

    async def readiness(self) -> dict[str, Any]:
        """Ready when the producer in use is known to work and the broker check passes now."""
        status: ProducerStatus = await self.producer.readiness(READINESS_TIMEOUT_SECONDS)
        facts: dict[str, Any] = {
            "ready": status.ready,
            "kafka": self.settings.kafka_bootstrap_servers,
            "missingTopics": list(self.missing_topics),
            "producerSession": status.session,
        }
        if status.problem is not None:
            facts["problem"] = status.problem
        # Not part of "ready": without decisions the mutator still takes every write, and
        # a validated reservation is answered 202 with the URL to ask later.
        facts["reservationResults"] = {
            "following": self.decisions.follower is not None and self.decisions.follower.following,
            "loaded": self.decisions.loaded,
        }
        return facts

    def check_broker(self, producer: Producer) -> bool:
        """The producer's broker check (blocking, in a thread): can the topics take records?

        One metadata round trip through the producer's own handle. Topics that are gone
        (the embedded broker keeps them in memory: a restart loses them) are created again
        when ``MUTATOR_ENSURE_TOPICS`` allows, and True says the broker had to be repaired.
        """
        metadata = producer.list_topics(timeout=KAFKA_CHECK_TIMEOUT_SECONDS)
        missing = [spec.name for spec in MUTATION_TOPICS if spec.name not in metadata.topics]
        self.missing_topics[:] = missing
        if not missing:
            self._check_partition_counts(metadata)
            return False
        if not self.settings.mutator_ensure_topics:
            raise TopicsMissing(f"topics missing on the broker: {', '.join(missing)}")
        log.warning("topics missing on the broker (was it restarted?): creating %s", missing)
        self._ensure_topics(0)
        self.missing_topics.clear()
        return True

    def _ensure_topics(self, wait_seconds: float) -> None:
        """Create the topics that are missing (blocking), waiting up to ``wait_seconds`` for
        the broker to answer."""
        ensure_topics_when_available(
            self.settings.kafka_bootstrap_servers,
            self.settings.topic_partitions,
            self.settings.topic_replication_factor,
            wait_seconds=wait_seconds,
        )

    def _check_partition_counts(self, metadata: ClusterMetadata) -> None:
        """Raise :class:`TopicMismatchError` unless every topic has ``TOPIC_PARTITIONS``."""
        expected = self.settings.topic_partitions
        wrong = [
            f"{spec.name} has {len(metadata.topics[spec.name].partitions)} partitions"
            for spec in MUTATION_TOPICS
            if len(metadata.topics[spec.name].partitions) != expected
        ]
        if wrong:
            raise TopicMismatchError(f"{'; '.join(wrong)}, expected {expected} (TOPIC_PARTITIONS)")
