"""The calculator's local state store: the latest sellable inventory per key, in RocksDB.

Example::

    store = SellableStore(Path("/tmp/store"))
    store.apply({encode_key("STL", "123123"): Sellable(90, 100, 10, 1_700_000_000_000)},
                {("inventory_adjustments", 2): 42})
    store.get(encode_key("STL", "123123"))   # Sellable(count=90, on_hand=100, ...)

Keys are the Kafka key bytes themselves (see ``shared_schemas.serde.encode_key``), so all
skus of a location sit next to each other and one prefix scan lists them. Next to the
values the store keeps, per input partition, the *next offset to apply*: values and
positions are written in one atomic batch, so a reader never sees a value without the
position that produced it. Position keys start with a zero byte, which no data key does
(a data key starts with the Avro length of a non-empty location).

The store may also hold keys of partitions this instance no longer owns (after the
instance count changed): they are kept, because the recovery state of those partitions
still refers to them, and the readers filter them out with an ``owns`` predicate.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from rocksdict import Options, Rdict, WriteBatch

from shared_schemas.serde import decode_key, location_prefix

_VALUE = struct.Struct("<qqqq")
_OFFSET = struct.Struct(">q")
_POSITION_PREFIX = b"\x00position\x00"


@dataclass(frozen=True, slots=True)
class Sellable:
    """The sellable inventory of one key."""

    count: int
    """Sellable: on hand minus reserved."""
    on_hand: int
    reserved: int
    updated_at: int
    """Event time (epoch ms) of the latest mutation included."""

    def to_bytes(self) -> bytes:
        """Fixed 32-byte encoding for the store."""
        return _VALUE.pack(self.count, self.on_hand, self.reserved, self.updated_at)

    @classmethod
    def from_bytes(cls, data: bytes) -> Sellable:
        """Inverse of :meth:`to_bytes`."""
        return cls(*_VALUE.unpack(data))


def _everything(key: bytes) -> bool:
    return True


def _position_key(topic: str, partition: int) -> bytes:
    return _POSITION_PREFIX + f"{topic}:{partition}".encode()


class SellableStore:
    """Sellable inventory per key plus applied positions, in one RocksDB database."""

    def __init__(self, path: Path) -> None:
        path.mkdir(parents=True, exist_ok=True)
        self.path = path
        # raw_mode: keys and values are plain bytes, no pickling on the hot path.
        self._db = Rdict(str(path), Options(raw_mode=True))

    def get(self, key: bytes) -> Sellable | None:
        """The value of one key, or ``None`` if the key does not exist (yet)."""
        data = self._db.get(key)
        return None if data is None else Sellable.from_bytes(data)

    def location(
        self, location: str, owns: Callable[[bytes], bool] = _everything
    ) -> Iterator[tuple[str, Sellable]]:
        """``(sku, value)`` for every sku of ``location`` whose key ``owns`` accepts."""
        prefix = location_prefix(location)
        for key, data in self._db.items(from_key=prefix):
            if not key.startswith(prefix):
                break
            if owns(key):
                yield decode_key(key).sku, Sellable.from_bytes(data)

    def count(self, owns: Callable[[bytes], bool] = _everything) -> int:
        """How many keys ``owns`` accepts (a full scan: for operators, not hot paths)."""
        keys = self._db.keys()  # iterating the Rdict itself fails in raw mode
        return sum(1 for key in keys if not key.startswith(b"\x00") and owns(key))

    def positions(self) -> dict[tuple[str, int], int]:
        """Next offset to apply, per (topic, partition) this store has seen."""
        result: dict[tuple[str, int], int] = {}
        for key, data in self._db.items(from_key=_POSITION_PREFIX):
            if not key.startswith(_POSITION_PREFIX):
                break
            topic, _, partition = key[len(_POSITION_PREFIX) :].decode().rpartition(":")
            result[(topic, int(partition))] = _OFFSET.unpack(data)[0]
        return result

    def apply(
        self, values: Mapping[bytes, Sellable], positions: Mapping[tuple[str, int], int]
    ) -> None:
        """Write new values and the positions they bring the store to, atomically."""
        batch = WriteBatch(raw_mode=True)
        for key, value in values.items():
            batch.put(key, value.to_bytes())
        for (topic, partition), offset in positions.items():
            batch.put(_position_key(topic, partition), _OFFSET.pack(offset))
        self._db.write(batch)

    def close(self) -> None:
        """Flush and close the database."""
        self._db.close()
