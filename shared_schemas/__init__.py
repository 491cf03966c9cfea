"""What every service shares: Avro schemas, serdes, key encoding, partitioner, topics.

Example::

    from shared_schemas import encode_key, partition_for, value_serde
    from shared_schemas.schemas import INVENTORY_MUTATION
    from shared_schemas.topics import INVENTORY_ADJUSTMENTS

    key = encode_key("STL", "123123")
    partition = partition_for(key, 6)
    value = value_serde(INVENTORY_MUTATION, INVENTORY_ADJUSTMENTS.name).serialize(
        {"mutation_id": "0b8e…", "count": 100, "event_time": 1_700_000_000_000}
    )

Nothing else in the project spells a topic name, derives a key or picks a partition.
"""

from shared_schemas.partitioner import key_and_partition, murmur2, partition_for
from shared_schemas.serde import (
    InventoryKey,
    SerdeError,
    ValueSerde,
    decode_key,
    encode_key,
    value_serde,
)

__all__ = [
    "InventoryKey",
    "SerdeError",
    "ValueSerde",
    "decode_key",
    "encode_key",
    "key_and_partition",
    "murmur2",
    "partition_for",
    "value_serde",
]
