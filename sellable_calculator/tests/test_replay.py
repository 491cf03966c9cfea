"""What :class:`PartitionSums` publishes while a partition replays up to its store.

After a restart the store may be ahead of the recovered sums. Until both inputs reach
the positions the store had reached (its own positions for *this* partition), nothing is
published; at that point every key whose sums differ from the store is, once; from then
on each batch publishes the keys it changed. Deterministic: a real store, no broker.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from sellable_calculator.dataflow import (
    ADJUSTMENT,
    INPUT_TOPICS,
    RESERVATION,
    MutationBatch,
    PartitionSums,
)
from sellable_calculator.health import DataflowHealth
from sellable_calculator.store import Sellable, SellableStore
from sellable_calculator.tests.support import apply_batch
from shared_schemas.serde import encode_key

P = 3
A, B, D = (encode_key("STL", sku) for sku in ("a", "b", "d"))
ADJUSTMENTS, RESERVATIONS = INPUT_TOPICS[ADJUSTMENT], INPUT_TOPICS[RESERVATION]


@pytest.fixture
def store(tmp_path: Path) -> SellableStore:
    return SellableStore(tmp_path / "store")


def _adjust(*mutations: tuple[bytes, int, int, int], upto: int) -> MutationBatch:
    return MutationBatch(ADJUSTMENT, P, list(mutations), upto)


def _reserve(*mutations: tuple[bytes, int, int, int], upto: int) -> MutationBatch:
    return MutationBatch(RESERVATION, P, list(mutations), upto)


def _restarted(
    store: SellableStore,
    positions: dict[tuple[str, int], int],
    health: DataflowHealth | None = None,
) -> PartitionSums:
    """A start without a snapshot over ``store``, which has reached ``positions``."""
    store.apply({}, positions)
    return PartitionSums(None, store, health)


def _replayed_after_a_crash(store: SellableStore, health: DataflowHealth) -> PartitionSums:
    """Partition P's topics, the store written up to their ends (B's value wrong), and a
    restart without any snapshot that replays everything, reservations first.

    adjustments: A +100 (t1), B +5 (t2), A +50 (t3); reservations: A 10 (t4), D 4 (t5).
    """
    store.apply({A: Sellable(140, 150, 10, 4), B: Sellable(4, 4, 0, 2)}, {})
    logic = _restarted(store, {(ADJUSTMENTS, P): 3, (RESERVATIONS, P): 2}, health)
    assert apply_batch(logic, store, _reserve((A, 10, 4, 0), (D, 4, 5, 1), upto=2)) == []
    assert health.replaying() == [P]
    assert apply_batch(logic, store, _adjust((A, 100, 1, 0), (B, 5, 2, 1), upto=2)) == []
    # Held back: A would be 90 here (100 on hand, 10 reserved), which it never was.
    assert store.get(A) == Sellable(140, 150, 10, 4)
    return logic


def test_reaching_the_store_publishes_only_the_keys_that_differ_from_it(
    store: SellableStore,
) -> None:
    health = DataflowHealth()
    logic = _replayed_after_a_crash(store, health)
    (update,) = apply_batch(logic, store, _adjust((A, 50, 3, 2), upto=3))
    # A equals the store: not published again. D has no adjustment: it does not exist.
    assert update.changes == {B: Sellable(5, 5, 0, 2)}
    assert update.next_offsets == {ADJUSTMENT: 3, RESERVATION: 2}
    assert health.replaying() == []
    assert store.get(B) == Sellable(5, 5, 0, 2)
    assert store.get(D) is None


def test_after_catching_up_a_batch_publishes_what_it_changed_and_nothing_else(
    store: SellableStore,
) -> None:
    logic = _replayed_after_a_crash(store, DataflowHealth())
    apply_batch(logic, store, _adjust((A, 50, 3, 2), upto=3))
    store.apply({B: Sellable(0, 0, 0, 0)}, {})  # the comparison with the store is over
    (update,) = apply_batch(logic, store, _adjust((A, 1, 6, 3), upto=4))
    assert update.changes == {A: Sellable(141, 151, 10, 6)}
    (update,) = apply_batch(logic, store, _reserve((D, 1, 7, 2), upto=3))
    assert update.changes == {}  # D still has no adjustment
    assert update.next_offsets == {ADJUSTMENT: 4, RESERVATION: 3}


def test_a_store_ahead_on_reservations_only_holds_back_until_they_reach_it(
    store: SellableStore,
) -> None:
    logic = _restarted(store, {(RESERVATIONS, P): 2})
    assert apply_batch(logic, store, _adjust((A, 100, 1, 0), upto=1)) == []
    assert apply_batch(logic, store, _reserve((A, 10, 2, 0), upto=1)) == []
    (update,) = apply_batch(logic, store, _reserve((A, 5, 3, 1), upto=2))
    assert update.changes == {A: Sellable(85, 100, 15, 3)}
    assert update.next_offsets == {ADJUSTMENT: 1, RESERVATION: 2}


def test_records_skipped_past_the_stores_position_count_as_reaching_it(
    store: SellableStore,
) -> None:
    """The batch's next offset counts, not its last decoded record's."""
    logic = _restarted(store, {(ADJUSTMENTS, P): 2})
    (update,) = apply_batch(logic, store, _adjust((A, 100, 1, 0), upto=5))
    assert update.changes == {A: Sellable(100, 100, 0, 1)}


def test_other_partitions_positions_hold_nothing_back(store: SellableStore) -> None:
    health = DataflowHealth()
    logic = _restarted(store, {(ADJUSTMENTS, P + 1): 100, (RESERVATIONS, P - 1): 100}, health)
    (update,) = apply_batch(logic, store, _adjust((A, 7, 1, 0), upto=1))
    assert update.changes == {A: Sellable(7, 7, 0, 1)}
    assert health.replaying() == []
