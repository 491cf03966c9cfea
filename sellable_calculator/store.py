"""The calculator's local state store: the whole state of every key, in RocksDB.

Example::

    store = SellableStore(Path("/tmp/store"))
    key = encode_key("STL", "123123")
    store.apply({key: KeyState(100, 10, True, 1_700_000_000_000, 42, 7)},
                {("inventory_adjustments", 2): 42, ("inventory_reservations", 2): 7},
                changelog_positions={2: 13})
    store.get(key)   # Sellable(count=90, on_hand=100, reserved=10, ...)

Keys are the Kafka key bytes themselves (see ``shared_schemas.serde.encode_key``), so all
skus of a location sit next to each other and one prefix scan lists them. A value is a
key's whole state (:class:`KeyState`): its sums, whether it exists (has an adjustment: a
key with reservations only is kept but not served), and the input positions it reflects.
Next to the values the store keeps, per partition, the *next input offset to apply* of
each input topic and the next offset of the changelog topic the store reflects: values
and positions are written in one atomic batch, so a reader never sees a value without
the position that produced it, and a restart knows where to catch up from. Meta keys
start with a zero byte, which no data key does (a data key starts with the Avro length
of a non-empty location).

The store may hold keys of partitions this instance does not own (any more): they are
kept, so that an instance that gets a partition back only catches up, and the readers
filter them out with an ``owns`` predicate.
"""

from __future__ import annotations

import logging
import shutil
import struct
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from rocksdict import Options, Rdict, WriteBatch

from shared_schemas.reservations import ReservationResult
from shared_schemas.serde import decode_key, location_prefix

log = logging.getLogger(__name__)

_SELLABLE = struct.Struct("<qqqq")
_STATE = struct.Struct("<qqqq?qq")
"""count, on hand, reserved, updated at, exists, adjustments position, reservations position."""
_OFFSET = struct.Struct(">q")
_POSITION_PREFIX = b"\x00position\x00"
_CHANGELOG_PREFIX = b"\x00changelog\x00"
_RESULT_PREFIX = b"\x00reservation\x00"
_RESULTS_POSITION_PREFIX = b"\x00results\x00"
_FORMAT_KEY = b"\x00format"
_FORMAT = b"2"
"""Version 2: whole key states (version 1 held only the served values)."""


@dataclass(frozen=True, slots=True)
class Sellable:
    """The sellable inventory of one key."""

    count: int
    """Sellable: on hand minus reserved."""
    on_hand: int
    reserved: int
    updated_at: int
    """Event time (epoch ms) of the latest mutation included."""


class KeyState(NamedTuple):
    """The whole state of one key, and the input positions of its partition it reflects."""

    on_hand: int
    reserved: int
    exists: bool
    """Whether the key has an adjustment (the original's left join): only then is it served."""
    updated_at: int
    adjustments_position: int
    """Next offset of the key's partition of inventory_adjustments not included."""
    reservations_position: int
    """Next offset of the key's partition of inventory_reservations not included."""

    def sellable(self) -> Sellable:
        """The served value."""
        return Sellable(self.on_hand - self.reserved, self.on_hand, self.reserved, self.updated_at)

    def to_bytes(self) -> bytes:
        """Fixed 49-byte encoding: the store's value, and the body of a changelog record."""
        on_hand, reserved, exists, updated_at, adjustments, reservations = self
        return _STATE.pack(
            on_hand - reserved, on_hand, reserved, updated_at, exists, adjustments, reservations
        )

    @classmethod
    def from_bytes(cls, data: bytes) -> KeyState:
        """Inverse of :meth:`to_bytes`."""
        _, on_hand, reserved, updated_at, exists, adjustments, reservations = _STATE.unpack(data)
        return cls(on_hand, reserved, exists, updated_at, adjustments, reservations)


STATE_SIZE = _STATE.size
NO_STATE = KeyState(0, 0, False, 0, 0, 0)
"""The state of a key nothing has happened to."""


def _everything(key: bytes) -> bool:
    return True


def _position_key(topic: str, partition: int) -> bytes:
    return _POSITION_PREFIX + f"{topic}:{partition}".encode()


def _served(data: bytes) -> Sellable | None:
    """The served value of a stored state; None for a key that does not exist."""
    if not data[32]:
        return None
    return Sellable(*_SELLABLE.unpack_from(data))


class SellableStore:
    """Every key's state plus applied positions, in one RocksDB database."""

    def __init__(self, path: Path) -> None:
        path.mkdir(parents=True, exist_ok=True)
        self.path = path
        # raw_mode: keys and values are plain bytes, no pickling on the hot path.
        self._db = Rdict(str(path), Options(raw_mode=True))
        if self._db.get(_FORMAT_KEY) != _FORMAT:
            self._start_afresh_if_old()

    def _start_afresh_if_old(self) -> None:
        """A store of an older format is emptied: the changelog topic (or, when that has
        nothing yet, the input topics) rebuilds it, so nothing is lost."""
        if next(iter(self._db.keys()), None) is not None:
            log.warning(
                "the store in %s has an older format: emptying it (its partitions are "
                "restored from the changelog topic, or replayed from the input topics)",
                self.path,
            )
            self._db.close()
            shutil.rmtree(self.path)
            self.path.mkdir(parents=True)
            self._db = Rdict(str(self.path), Options(raw_mode=True))
        self._db.put(_FORMAT_KEY, _FORMAT)

    def get(self, key: bytes) -> Sellable | None:
        """The value of one key, or ``None`` if the key does not exist (yet)."""
        data = self._db.get(key)
        return None if data is None else _served(data)

    def state(self, key: bytes) -> KeyState | None:
        """The whole state of one key, or ``None`` if the store has none."""
        data = self._db.get(key)
        return None if data is None else KeyState.from_bytes(data)

    def location(
        self, location: str, owns: Callable[[bytes], bool] = _everything
    ) -> Iterator[tuple[str, Sellable]]:
        """``(sku, value)`` for every existing sku of ``location`` whose key ``owns`` accepts."""
        prefix = location_prefix(location)
        for key, data in self._db.items(from_key=prefix):
            if not key.startswith(prefix):
                break
            value = _served(data)
            if value is not None and owns(key):
                yield decode_key(key).sku, value

    def count(self, owns: Callable[[bytes], bool] = _everything) -> int:
        """How many existing keys ``owns`` accepts (a full scan: for operators, not hot paths)."""
        return sum(
            1
            for key, data in self._db.items()
            if not key.startswith(b"\x00") and data[32] and owns(key)
        )

    def forget(self, partitions: Collection[int], partition_of: Callable[[bytes], int]) -> int:
        """Delete every key state and position of ``partitions`` (a full scan); how many
        keys. For partitions whose local state can no longer be trusted to match the
        changelog: the next assignment restores them from the changelog alone."""
        doomed = set(partitions)
        batch = WriteBatch(raw_mode=True)
        keys = 0
        for key, _ in self._db.items():
            if not key.startswith(b"\x00") and partition_of(key) in doomed:
                batch.delete(key)
                keys += 1
        for topic, partition in list(self.positions()):
            if partition in doomed:
                batch.delete(_position_key(topic, partition))
        for partition in doomed:
            batch.delete(_CHANGELOG_PREFIX + str(partition).encode())
        self._db.write(batch)
        return keys

    def positions(self) -> dict[tuple[str, int], int]:
        """Next offset to apply, per input (topic, partition) this store has seen."""
        result: dict[tuple[str, int], int] = {}
        for key, data in self._db.items(from_key=_POSITION_PREFIX):
            if not key.startswith(_POSITION_PREFIX):
                break
            topic, _, partition = key[len(_POSITION_PREFIX) :].decode().rpartition(":")
            result[(topic, int(partition))] = _OFFSET.unpack(data)[0]
        return result

    def changelog_position(self, partition: int) -> int:
        """Next changelog offset of ``partition`` the store does not reflect; 0 if none."""
        data = self._db.get(_CHANGELOG_PREFIX + str(partition).encode())
        return 0 if data is None else int(_OFFSET.unpack(data)[0])

    def apply(
        self,
        states: Mapping[bytes, KeyState],
        positions: Mapping[tuple[str, int], int],
        changelog_positions: Mapping[int, int] | None = None,
        results: Iterable[ReservationResult] = (),
    ) -> None:
        """Write key states and the positions they bring the store to, atomically, with
        the decisions on validated reservations made on the way."""
        batch = WriteBatch(raw_mode=True)
        for key, state in states.items():
            batch.put(key, state.to_bytes())
        self._put_positions(batch, positions, changelog_positions or {})
        self._put_results(batch, results)
        self._db.write(batch)

    def apply_encoded(
        self,
        states: Mapping[bytes, bytes],
        positions: Mapping[tuple[str, int], int],
        changelog_positions: Mapping[int, int],
        results: Iterable[ReservationResult] = (),
    ) -> None:
        """:meth:`apply` for states already encoded (``KeyState.to_bytes``): a restore."""
        batch = WriteBatch(raw_mode=True)
        for key, data in states.items():
            batch.put(key, data)
        self._put_positions(batch, positions, changelog_positions)
        self._put_results(batch, results)
        self._db.write(batch)

    def reservation(self, mutation_id: str) -> ReservationResult | None:
        """The decision on validated reservation ``mutation_id``, if this store has it."""
        data = self._db.get(_RESULT_PREFIX + mutation_id.encode())
        return None if data is None else ReservationResult.from_bytes(data)

    def add_results(
        self, results: Iterable[ReservationResult], positions: Mapping[int, int]
    ) -> None:
        """Index decisions read from ``reservation_results``, with the next offset to read
        per partition of that topic (:meth:`results_positions`), atomically."""
        batch = WriteBatch(raw_mode=True)
        self._put_results(batch, results)
        for partition, offset in positions.items():
            batch.put(_RESULTS_POSITION_PREFIX + str(partition).encode(), _OFFSET.pack(offset))
        self._db.write(batch)

    def results_positions(self) -> dict[int, int]:
        """Next offset of ``reservation_results`` to index, per partition."""
        result: dict[int, int] = {}
        prefix = _RESULTS_POSITION_PREFIX
        for key, data in self._db.items(from_key=prefix):
            if not key.startswith(prefix):
                break
            result[int(key[len(prefix) :])] = _OFFSET.unpack(data)[0]
        return result

    @staticmethod
    def _put_results(batch: WriteBatch, results: Iterable[ReservationResult]) -> None:
        for result in results:
            batch.put(_RESULT_PREFIX + result.mutation_id.encode(), result.to_bytes())

    @staticmethod
    def _put_positions(
        batch: WriteBatch,
        positions: Mapping[tuple[str, int], int],
        changelog_positions: Mapping[int, int],
    ) -> None:
        for (topic, partition), offset in positions.items():
            batch.put(_position_key(topic, partition), _OFFSET.pack(offset))
        for partition, offset in changelog_positions.items():
            batch.put(_CHANGELOG_PREFIX + str(partition).encode(), _OFFSET.pack(offset))

    def close(self) -> None:
        """Flush and close the database."""
        self._db.close()
