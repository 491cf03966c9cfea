"""The running sums and their recovery, deterministically: no broker, no timing luck.

A crash (kill -9) leaves the store ahead of Bytewax's last snapshot, and on restart the
two input topics replay through separate consumers in any order relative to each other.
These tests drive :class:`PartitionSums` through exactly such replays and apply its
updates to a real store the way the sink does (the sink's publishing is tested against
the real broker in ``test_recovery.py``; what is held back while replaying, key by key,
in ``test_replay.py``).
"""

from __future__ import annotations

import random
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
from sellable_calculator.tests.support import apply_batch, start_inputs
from shared_schemas.serde import encode_key

STL = encode_key("STL", "123123")
KC = encode_key("KC", "1")
PARTITION = 2


@pytest.fixture
def store(tmp_path: Path) -> SellableStore:
    return SellableStore(tmp_path / "store")


def test_sums_are_on_hand_minus_reserved_per_key(store: SellableStore) -> None:
    logic = PartitionSums(None, store)
    (update,) = apply_batch(
        logic,
        store,
        MutationBatch(ADJUSTMENT, PARTITION, [(STL, 100, 1_000, 0), (KC, 7, 1_001, 1)], 2),
        MutationBatch(RESERVATION, PARTITION, [(STL, 10, 2_000, 0)], 1),
    )
    assert update.partition == PARTITION
    assert update.changes == {STL: Sellable(90, 100, 10, 2_000), KC: Sellable(7, 7, 0, 1_001)}
    assert update.next_offsets == {ADJUSTMENT: 2, RESERVATION: 1}
    assert store.get(STL) == Sellable(90, 100, 10, 2_000)


def test_key_exists_once_adjusted_and_earlier_reservations_count(store: SellableStore) -> None:
    logic = PartitionSums(None, store)
    (update,) = apply_batch(
        logic, store, MutationBatch(RESERVATION, PARTITION, [(STL, 10, 5, 3)], 4)
    )
    assert update.changes == {}  # the left join: no adjustment, no key
    assert update.next_offsets == {RESERVATION: 4}  # progress still moves
    (update,) = apply_batch(
        logic, store, MutationBatch(ADJUSTMENT, PARTITION, [(STL, 100, 6, 0)], 1)
    )
    assert update.changes == {STL: Sellable(90, 100, 10, 6)}


def test_negative_adjustments_and_resume_from_snapshot(store: SellableStore) -> None:
    logic = PartitionSums(None, store)
    apply_batch(
        logic, store, MutationBatch(ADJUSTMENT, PARTITION, [(STL, 100, 1, 0), (STL, -30, 2, 1)], 2)
    )
    snapshot = logic.snapshot()
    apply_batch(logic, store, MutationBatch(ADJUSTMENT, PARTITION, [(STL, 1_000, 3, 2)], 3))
    assert snapshot.sums[STL] == (70, 0, True, 2)  # the snapshot did not see the later batch
    assert snapshot.applied == {ADJUSTMENT: 2}
    resumed = PartitionSums(snapshot, store)
    apply_batch(resumed, store, MutationBatch(ADJUSTMENT, PARTITION, [(STL, 1_000, 3, 2)], 3))
    (update,) = apply_batch(
        resumed, store, MutationBatch(RESERVATION, PARTITION, [(STL, 5, 4, 0)], 1)
    )
    assert update.changes == {STL: Sellable(1_065, 1_070, 5, 4)}


def test_a_reservation_replayed_before_the_adjustment_it_follows_is_not_lost(
    store: SellableStore,
) -> None:
    """Adjust +100 (stored, not yet in a snapshot), crash, reserve 7, restart: 93."""
    first = PartitionSums(None, store)
    start_inputs(first, store, PARTITION)
    snapshot = first.snapshot()  # the last snapshot before the crash
    apply_batch(first, store, MutationBatch(ADJUSTMENT, PARTITION, [(STL, 100, 1, 0)], 1))
    assert store.get(STL) == Sellable(100, 100, 0, 1)
    # kill -9 here; a reservation is written while the instance is down.
    health = DataflowHealth()
    restarted = PartitionSums(snapshot, store, health)
    start_inputs(restarted, store, PARTITION, snapshot)
    # The reservations' consumer replays first: the key does not exist in the sums yet.
    assert (
        apply_batch(restarted, store, MutationBatch(RESERVATION, PARTITION, [(STL, 7, 2, 0)], 1))
        == []
    )
    assert health.replaying() == [PARTITION]
    assert store.get(STL) == Sellable(100, 100, 0, 1)  # the true value it had, not a mix
    (update,) = apply_batch(
        restarted, store, MutationBatch(ADJUSTMENT, PARTITION, [(STL, 100, 1, 0)], 1)
    )
    assert update.changes == {STL: Sellable(93, 100, 7, 2)}
    assert update.next_offsets == {ADJUSTMENT: 1, RESERVATION: 1}
    assert store.get(STL) == Sellable(93, 100, 7, 2)
    assert health.replaying() == []


def test_a_store_behind_the_snapshot_is_repaired_at_the_first_batch(store: SellableStore) -> None:
    """Values in the snapshot but missing from the store are published at start."""
    logic = PartitionSums(None, store)
    start_inputs(logic, store, PARTITION)
    logic.on_batch([MutationBatch(ADJUSTMENT, PARTITION, [(STL, 100, 1, 0)], 1)])  # lost write
    snapshot = logic.snapshot()
    restarted = PartitionSums(snapshot, store)
    (update,) = apply_batch(restarted, store, MutationBatch(RESERVATION, PARTITION, [], 0))
    assert update.changes == {STL: Sellable(100, 100, 0, 1)}
    assert store.get(STL) == Sellable(100, 100, 0, 1)


def test_state_of_an_older_version_is_refused_with_advice(store: SellableStore) -> None:
    with pytest.raises(TypeError, match="delete the instance's state directory"):
        PartitionSums({STL: (1, 0, True, 1)}, store)  # type: ignore[arg-type]


Record = tuple[int, bytes, int]
"""(kind, key, count) of one mutation."""


def _chunks(rng: random.Random, logs: dict[int, list[Record]], start: dict[int, int]):  # type: ignore[no-untyped-def]
    """The two topics from ``start`` on, as the two consumers deliver them: batches of
    consecutive records of one topic, the topics interleaved at random."""
    position = dict(start)
    while any(position[k] < len(logs[k]) for k in logs):
        kind = rng.choice([k for k in logs if position[k] < len(logs[k])])
        size = rng.randint(1, 4)
        records = logs[kind][position[kind] : position[kind] + size]
        mutations = [
            (key, count, 0, position[kind] + i) for i, (_, key, count) in enumerate(records)
        ]
        position[kind] += len(records)
        yield MutationBatch(kind, PARTITION, mutations, position[kind])


def _truth(logs: dict[int, list[Record]], upto: dict[int, int]) -> dict[bytes, int]:
    """Sellable per existing key after the first ``upto[kind]`` records of each topic."""
    on_hand: dict[bytes, int] = {}
    reserved: dict[bytes, int] = {}
    for _, key, count in logs[ADJUSTMENT][: upto.get(ADJUSTMENT, 0)]:
        on_hand[key] = on_hand.get(key, 0) + count
    for _, key, count in logs[RESERVATION][: upto.get(RESERVATION, 0)]:
        reserved[key] = reserved.get(key, 0) + count
    return {key: value - reserved.get(key, 0) for key, value in on_hand.items()}


def _assert_store_matches_its_positions(
    store: SellableStore, logs: dict[int, list[Record]]
) -> None:
    """Every stored value is exactly the truth at the store's own positions: never a mix."""
    positions = {
        kind: store.positions().get((INPUT_TOPICS[kind], PARTITION), 0)
        for kind in (ADJUSTMENT, RESERVATION)
    }
    truth = _truth(logs, positions)
    keys = {key for _, key, _ in logs[ADJUSTMENT]}
    stored = {key: value.count for key in keys if (value := store.get(key)) is not None}
    assert stored == truth, f"store at {positions}"


@pytest.mark.parametrize("seed", range(150))
def test_any_crash_point_and_replay_order_ends_exact_and_never_shows_a_mix(
    tmp_path: Path, seed: int
) -> None:
    """Random writes, a snapshot, a crash later (or earlier: a store that lost writes),
    more writes while down, then a replay in another interleaving of the two topics."""
    rng = random.Random(seed)
    keys = [encode_key("L", str(n)) for n in range(4)]
    logs: dict[int, list[Record]] = {ADJUSTMENT: [], RESERVATION: []}
    for _ in range(rng.randint(5, 40)):
        kind = rng.choice((ADJUSTMENT, RESERVATION))
        logs[kind].append((kind, rng.choice(keys), rng.randint(1, 9)))
    store = SellableStore(tmp_path / "store")

    # Before the crash: the original interleaving, with a snapshot somewhere in it.
    original = PartitionSums(None, store)
    start_inputs(original, store, PARTITION)
    batches = list(_chunks(rng, logs, {ADJUSTMENT: 0, RESERVATION: 0}))
    snapshot_at, crash_at = rng.randint(0, len(batches)), rng.randint(0, len(batches))
    snapshot = original.snapshot()
    for i, batch in enumerate(batches[: max(snapshot_at, crash_at)]):
        if i < crash_at:
            apply_batch(original, store, batch)
        else:  # the store lost these writes: the snapshot is ahead of it
            original.on_batch([batch])
        if i + 1 == snapshot_at:
            snapshot = original.snapshot()
    _assert_store_matches_its_positions(store, logs)

    # Restart from the snapshot; everything after it replays, in another order.
    restarted = PartitionSums(snapshot, store)
    start_inputs(restarted, store, PARTITION, snapshot)
    for batch in _chunks(rng, logs, {k: snapshot.applied.get(k, 0) for k in logs}):
        apply_batch(restarted, store, batch)
        _assert_store_matches_its_positions(store, logs)
    final = _truth(logs, {k: len(v) for k, v in logs.items()})
    assert {key: value.count for key in keys if (value := store.get(key))} == final
