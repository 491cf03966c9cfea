"""The topic catalogue against a real broker: creation, idempotence, partition mismatch."""

from __future__ import annotations

import uuid

import pytest
from confluent_kafka.admin import AdminClient

from shared_schemas.topics import (
    ALL_TOPICS,
    SELLABLE_INVENTORY,
    TopicMismatchError,
    TopicSpec,
    ensure_topics,
)


@pytest.fixture
def admin(kafka_bootstrap: str) -> AdminClient:
    return AdminClient({"bootstrap.servers": kafka_bootstrap})


def _partitions(admin: AdminClient, name: str) -> int:
    return len(admin.list_topics(name, timeout=10).topics[name].partitions)


def _unique(prefix: str, **kwargs: object) -> TopicSpec:
    return TopicSpec(f"{prefix}-{uuid.uuid4().hex[:8]}", "test topic", **kwargs)  # type: ignore[arg-type]


def test_catalogue_names_are_unique_and_sellable_is_compacted() -> None:
    names = [spec.name for spec in ALL_TOPICS]
    assert len(names) == len(set(names))
    assert SELLABLE_INVENTORY.config["cleanup.policy"] == "compact"


def test_ensure_topics_creates_missing_topics_once(admin: AdminClient) -> None:
    spread = _unique("spread")
    single = _unique("single", co_partitioned=False)
    assert sorted(ensure_topics(admin, 4, [spread, single])) == sorted([spread.name, single.name])
    assert _partitions(admin, spread.name) == 4
    assert _partitions(admin, single.name) == 1
    # Second run: nothing to do, nothing raised.
    assert ensure_topics(admin, 4, [spread, single]) == []


def test_ensure_topics_applies_topic_config(admin: AdminClient) -> None:
    from confluent_kafka.admin import ConfigResource

    compacted = _unique("compacted", config={"cleanup.policy": "compact"})
    ensure_topics(admin, 2, [compacted])
    resource = ConfigResource(ConfigResource.Type.TOPIC, compacted.name)
    configs = admin.describe_configs([resource])[resource].result(timeout=10)
    assert configs["cleanup.policy"].value == "compact"


def test_partition_count_mismatch_is_a_clear_error(admin: AdminClient) -> None:
    topic = _unique("mismatch")
    ensure_topics(admin, 3, [topic])
    with pytest.raises(TopicMismatchError, match=rf"{topic.name} has 3 partitions, expected 6"):
        ensure_topics(admin, 6, [topic])
    assert _partitions(admin, topic.name) == 3  # nothing was changed


def test_catalogue_topics_are_created_with_the_configured_count(admin: AdminClient) -> None:
    ensure_topics(admin, 6)
    for spec in ALL_TOPICS:
        assert _partitions(admin, spec.name) == spec.partition_count(6)
