"""The topic catalogue: the one place topic names, partition counts and configs live.

Example::

    from confluent_kafka.admin import AdminClient
    from shared_schemas.topics import ensure_topics

    ensure_topics(AdminClient({"bootstrap.servers": "127.0.0.1:9092"}), partitions=6)

The input topics (adjustments and reservations), ``sellable_inventory`` and
``reservation_results`` are *co-partitioned*: same partition count, same key bytes, so
partition p of each holds the same keys and one calculator instance can join them
without a shuffle. A mismatch is therefore an error, never something to live with.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import AdminClient, NewTopic

log = logging.getLogger(__name__)

DEFAULT_PARTITIONS = 6


@dataclass(frozen=True)
class TopicSpec:
    """A topic the system uses and how it must be created."""

    name: str
    description: str
    config: Mapping[str, str] = field(default_factory=dict)
    co_partitioned: bool = True
    """Co-partitioned topics get the configured partition count; others get one partition."""

    def partition_count(self, partitions: int) -> int:
        """Partitions this topic needs when the co-partitioned topics have ``partitions``."""
        return partitions if self.co_partitioned else 1


INVENTORY_ADJUSTMENTS = TopicSpec(
    "inventory_adjustments",
    "Event log of on-hand adjustments (key: location+sku, value: InventoryMutation).",
    # An event log is the source of truth: keep it forever.
    {"cleanup.policy": "delete", "retention.ms": "-1", "retention.bytes": "-1"},
)
INVENTORY_RESERVATIONS = TopicSpec(
    "inventory_reservations",
    "Event log of reservations (key: location+sku, value: InventoryMutation).",
    {"cleanup.policy": "delete", "retention.ms": "-1", "retention.bytes": "-1"},
)
SELLABLE_INVENTORY = TopicSpec(
    "sellable_inventory",
    "Latest sellable inventory per key (value: SellableInventory); compacted.",
    {"cleanup.policy": "compact"},
)
RESERVATION_RESULTS = TopicSpec(
    "reservation_results",
    "Decisions on validated reservations (key: location+sku, value: ReservationResult), "
    "published by the calculator that owns the key.",
    # A log of decisions, kept as long as the reservations they answer.
    {"cleanup.policy": "delete", "retention.ms": "-1", "retention.bytes": "-1"},
)
CALCULATOR_INSTANCES = TopicSpec(
    "sellable_calculator_instances",
    "Which calculator instance serves which partitions at which URL; compacted by instance id.",
    {"cleanup.policy": "compact"},
    co_partitioned=False,
)

ALL_TOPICS: tuple[TopicSpec, ...] = (
    INVENTORY_ADJUSTMENTS,
    INVENTORY_RESERVATIONS,
    SELLABLE_INVENTORY,
    RESERVATION_RESULTS,
    CALCULATOR_INSTANCES,
)
"""The topics every service may create; each calculator group adds its changelog
(:func:`changelog_topic`)."""


def changelog_topic(group: str) -> TopicSpec:
    """The changelog of calculator group ``group``: ``<group>-changelog``, one per group
    as Kafka Streams has one per application, so that groups sharing a cluster never
    restore each other's records.

    The calculator's state per key with the input positions it reflects; compacted.
    Internal to the calculator (its own fixed binary value, see
    ``sellable_calculator.changelog``): an instance that takes over a partition restores
    it from here, as a Kafka Streams task restores its store from its changelog topic.
    """
    return TopicSpec(
        f"{group}-changelog",
        f"State per key of calculator group {group} (internal, compacted).",
        {"cleanup.policy": "compact"},
    )


class TopicMismatchError(RuntimeError):
    """An existing topic does not have the partition count the system needs."""


class TopicAdminError(RuntimeError):
    """The broker could not be reached or refused to create a topic."""


def _check_partition_counts(
    existing: Mapping[str, Any], specs: list[TopicSpec], partitions: int
) -> None:
    """Raise :class:`TopicMismatchError` naming every existing topic of ``specs`` whose
    partition count is not what the configuration asks for."""
    mismatches = [
        f"{spec.name} has {len(existing[spec.name].partitions)} partitions, "
        f"expected {spec.partition_count(partitions)}"
        for spec in specs
        if spec.name in existing
        and len(existing[spec.name].partitions) != spec.partition_count(partitions)
    ]
    if mismatches:
        raise TopicMismatchError(
            "topic partition counts do not match the configuration ("
            + "; ".join(mismatches)
            + "). Co-partitioned topics must share one partition count: "
            "set TOPIC_PARTITIONS to the existing count or recreate the topics."
        )


def ensure_topics(
    admin: AdminClient,
    partitions: int = DEFAULT_PARTITIONS,
    topics: Iterable[TopicSpec] = ALL_TOPICS,
    replication_factor: int = 1,
    timeout: float = 15.0,
) -> list[str]:
    """Create the topics that are missing; return the names created.

    Idempotent. Raises :class:`TopicMismatchError` when an existing topic has another
    partition count than required, and :class:`TopicAdminError` when the broker does
    not answer or refuses.
    """
    specs = list(topics)
    try:
        existing = admin.list_topics(timeout=timeout).topics
    except KafkaException as exc:
        raise TopicAdminError(f"cannot list topics: {exc}") from exc

    _check_partition_counts(existing, specs, partitions)
    missing = [
        NewTopic(
            spec.name,
            num_partitions=spec.partition_count(partitions),
            replication_factor=replication_factor,
            config=dict(spec.config),
        )
        for spec in specs
        if spec.name not in existing
    ]
    if not missing:
        return []
    created: list[str] = []
    for name, future in admin.create_topics(missing, request_timeout=timeout).items():
        try:
            future.result(timeout=timeout)
            created.append(name)
            log.info("created topic %s", name)
        except KafkaException as exc:
            error = exc.args[0] if exc.args else None
            # Another process created it between our list and create: that is fine,
            # but its partition count must still be checked.
            if isinstance(error, KafkaError) and error.code() == KafkaError.TOPIC_ALREADY_EXISTS:
                continue
            raise TopicAdminError(f"cannot create topic {name}: {exc}") from exc
        except TimeoutError as exc:
            raise TopicAdminError(f"timed out creating topic {name}") from exc
    if len(created) != len(missing):
        # Re-check the ones that raced with someone else.
        return created + ensure_topics(admin, partitions, specs, replication_factor, timeout)
    return created
