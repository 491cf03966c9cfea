"""Kafka plumbing of the services: the co-partitioned topics created as soon as the broker
answers.

Example::

    ensure_topics_when_available("127.0.0.1:9092", partitions=6)   # names created

The topic catalogue itself (names, configs, :func:`~shared_schemas.topics.ensure_topics`)
is a contract and lives in :mod:`shared_schemas.topics`; waiting for a broker that is
still starting is the services' business.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from confluent_kafka import Message
from confluent_kafka.admin import AdminClient

from service_runtime.retry import Backoff, retrying
from shared_schemas.topics import (
    ALL_TOPICS,
    DEFAULT_PARTITIONS,
    TopicAdminError,
    TopicSpec,
    ensure_topics,
)

log = logging.getLogger(__name__)

AVAILABILITY_BACKOFF = Backoff(first=1.0, cap=1.0)
"""Waits between attempts while the broker does not answer: a steady 1 s, for a broker
that is starting."""


def ensure_topics_when_available(
    bootstrap_servers: str,
    partitions: int = DEFAULT_PARTITIONS,
    replication_factor: int = 1,
    wait_seconds: float = 60.0,
    topics: Iterable[TopicSpec] = ALL_TOPICS,
) -> list[str]:
    """:func:`ensure_topics`, retrying while the broker is unreachable, up to ``wait_seconds``.

    A partition mismatch is raised at once: waiting does not fix it.
    """
    admin = AdminClient({"bootstrap.servers": bootstrap_servers})
    retry = retrying(
        f"creating the topics on Kafka at {bootstrap_servers}",
        AVAILABILITY_BACKOFF,
        retry_on=TopicAdminError,  # TopicMismatchError is not one: raised at once
        deadline=wait_seconds,
        logger=log,
        level=logging.INFO,  # expected while the broker starts
    )
    try:
        return retry(
            ensure_topics, admin, partitions, list(topics), replication_factor, timeout=5.0
        )
    except TopicAdminError as exc:  # the last failure, past the deadline
        raise TopicAdminError(
            f"Kafka at {bootstrap_servers} not reachable within {wait_seconds:g} s: {exc}"
        ) from exc


def position_of(message: Message) -> tuple[str, int, int]:
    """The topic, partition and offset of a record consumed or delivered without error
    (librdkafka always sets them then; its Python stubs say they may be None)."""
    topic, partition, offset = message.topic(), message.partition(), message.offset()
    if topic is None or partition is None or offset is None:
        raise ValueError(f"a record without a position: {topic}:{partition}:{offset}")
    return topic, partition, offset
