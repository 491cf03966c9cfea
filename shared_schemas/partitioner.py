"""Kafka's default partitioner for keyed records, in one place.

``partition_for(key, n)`` is ``toPositive(Utils.murmur2(key)) % n``, exactly what Kafka's
Java producer and librdkafka's ``murmur2_random`` partitioner compute. The mutator uses it
to pick the partition it produces to, and the calculator uses it to find which instance
owns a key, so the two always agree with each other and with any Java client.
``key_and_partition(location, sku, n)`` gives both the key bytes and the partition of an
inventory key, remembered for the most recently used keys: the request paths of the
mutator and the calculator start with it.
"""

from __future__ import annotations

from functools import lru_cache

from shared_schemas.serde import encode_key

_SEED = 0x9747B28C
_M = 0x5BD1E995
_MASK32 = 0xFFFFFFFF


def murmur2(data: bytes) -> int:
    """Kafka's ``Utils.murmur2``: the 32-bit MurmurHash2 as a signed Java ``int``."""
    length = len(data)
    h = (_SEED ^ length) & _MASK32
    tail = length & ~3
    for i in range(0, tail, 4):
        k = int.from_bytes(data[i : i + 4], "little")
        k = (k * _M) & _MASK32
        k ^= k >> 24
        k = (k * _M) & _MASK32
        h = ((h * _M) & _MASK32) ^ k
    remaining = length & 3
    if remaining == 3:
        h ^= data[tail + 2] << 16
    if remaining >= 2:
        h ^= data[tail + 1] << 8
    if remaining >= 1:
        h ^= data[tail]
        h = (h * _M) & _MASK32
    h ^= h >> 13
    h = (h * _M) & _MASK32
    h ^= h >> 15
    return h - (1 << 32) if h & 0x80000000 else h


def partition_for(key: bytes, partitions: int) -> int:
    """The partition Kafka's default partitioner assigns ``key`` among ``partitions``."""
    if partitions <= 0:
        raise ValueError(f"partition count must be positive, got {partitions}")
    return (murmur2(key) & 0x7FFFFFFF) % partitions


KEY_CACHE_SIZE = 16_384
"""(location, sku) pairs whose key bytes and partition are remembered (about 3 MB)."""


@lru_cache(maxsize=KEY_CACHE_SIZE)
def key_and_partition(location: str, sku: str, partitions: int) -> tuple[bytes, int]:
    """The key bytes of (``location``, ``sku``) and their partition among ``partitions``.

    Memoised: encoding the key and hashing it in pure Python cost a few microseconds
    per request, a measurable share of a hot GET; busy keys are asked for again and again.
    """
    key = encode_key(location, sku)
    return key, partition_for(key, partitions)
