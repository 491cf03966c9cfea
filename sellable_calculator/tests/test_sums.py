"""The running sums and the changelog they move through, deterministically: no broker,
no timing luck.

An instance that takes over a partition restores it from the changelog and resumes the
inputs where the partition's last record says; a crash may have published only part of
the last batch, and the two input topics replay through separate consumers in any order
relative to each other. These tests drive :class:`PartitionSums` through exactly such
takeovers, with the changelog records the sink would publish (the sink and the restore
against the real broker are tested in ``test_recovery.py`` and ``test_group.py``).
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path

import pytest

from sellable_calculator.changelog import (
    ADJUSTMENT,
    RESERVATION,
    ChangelogReader,
    PartitionState,
    decode_record,
    encode_record,
)
from sellable_calculator.dataflow import MutationBatch, PartitionSums, PartitionUpdate
from sellable_calculator.store import KeyState, Sellable, SellableStore
from sellable_calculator.tests.support import apply_batch, sums_of
from shared_schemas.reservations import ReservationResult
from shared_schemas.serde import encode_key

STL = encode_key("STL", "123123")
KC = encode_key("KC", "1")
PARTITION = 2


@pytest.fixture
def store(tmp_path: Path) -> SellableStore:
    return SellableStore(tmp_path / "store")


def test_sums_are_on_hand_minus_reserved_per_key(store: SellableStore) -> None:
    logic = sums_of(PARTITION)
    (update,) = apply_batch(
        logic,
        store,
        MutationBatch(ADJUSTMENT, PARTITION, [(STL, 100, 1_000, 0), (KC, 7, 1_001, 1)], 2),
        MutationBatch(RESERVATION, PARTITION, [(STL, 10, 2_000, 0)], 1),
    )
    assert update.partition == PARTITION
    assert update.changes == {
        STL: KeyState(100, 10, True, 2_000, 2, 1),
        KC: KeyState(7, 0, True, 1_001, 2, 1),
    }
    assert update.resume == {}
    assert update.next_offsets == {ADJUSTMENT: 2, RESERVATION: 1}
    assert store.get(STL) == Sellable(90, 100, 10, 2_000)


def test_key_exists_once_adjusted_and_earlier_reservations_count(store: SellableStore) -> None:
    logic = sums_of(PARTITION)
    (update,) = apply_batch(
        logic, store, MutationBatch(RESERVATION, PARTITION, [(STL, 10, 5, 3)], 4)
    )
    # The left join: no adjustment, no key to serve; but the state changed (changelog).
    assert update.changes == {STL: KeyState(0, 10, False, 5, 0, 4)}
    assert store.get(STL) is None
    (update,) = apply_batch(
        logic, store, MutationBatch(ADJUSTMENT, PARTITION, [(STL, 100, 6, 0)], 1)
    )
    assert store.get(STL) == Sellable(90, 100, 10, 6)
    assert update.resume == {RESERVATION: 4}


def test_negative_adjustments_and_a_restored_state(store: SellableStore) -> None:
    restored = PartitionState(
        {STL: KeyState(50, 5, True, 9, 3, 1)}, {ADJUSTMENT: 3, RESERVATION: 1}
    )
    logic = sums_of(PARTITION, restored)
    apply_batch(logic, store, MutationBatch(ADJUSTMENT, PARTITION, [(STL, -20, 10, 3)], 4))
    assert store.get(STL) == Sellable(25, 30, 5, 10)


def test_a_replayed_mutation_the_key_already_reflects_is_skipped(store: SellableStore) -> None:
    """The last batch before a crash reached the changelog for STL but not for KC: the
    partition resumes before that batch; STL skips it, KC applies it."""
    restored = PartitionState(
        {STL: KeyState(105, 0, True, 9, 6, 0), KC: KeyState(1, 0, True, 9, 4, 0)},
        {ADJUSTMENT: 4, RESERVATION: 0},  # the resume positions of the last record
    )
    logic = sums_of(PARTITION, restored)
    (update,) = apply_batch(
        logic,
        store,
        MutationBatch(ADJUSTMENT, PARTITION, [(STL, 5, 1, 4), (KC, 2, 1, 5)], 6),
    )
    assert update.changes == {KC: KeyState(3, 0, True, 9, 6, 0)}
    (update,) = apply_batch(logic, store, MutationBatch(ADJUSTMENT, PARTITION, [(STL, 1, 1, 6)], 7))
    assert store.get(STL) == Sellable(106, 106, 0, 9)


def test_a_key_ahead_of_the_partition_keeps_its_positions(store: SellableStore) -> None:
    """A key changed by a reservation while the partition still replays adjustments below
    the key's position must not fall back to the partition's position: the replayed
    adjustments would count twice."""
    restored = PartitionState({STL: KeyState(100, 0, True, 9, 10, 0)}, {ADJUSTMENT: 8})
    logic = sums_of(PARTITION, restored)
    (update,) = apply_batch(
        logic, store, MutationBatch(RESERVATION, PARTITION, [(STL, 3, 1, 0)], 1)
    )
    assert update.changes[STL].adjustments_position == 10
    apply_batch(logic, store, MutationBatch(ADJUSTMENT, PARTITION, [(STL, 7, 1, 9)], 10))
    assert store.get(STL) == Sellable(97, 100, 3, 9)


Record = tuple[int, bytes, int]
"""(kind, key, count) of one mutation."""


def _chunks(
    rng: random.Random, logs: dict[int, list[Record]], start: dict[int, int]
) -> Iterator[MutationBatch]:
    """The two topics from ``start`` on, as the two consumers deliver them: batches of
    consecutive records of one topic, the topics interleaved at random."""
    position = {k: start.get(k, 0) for k in logs}
    while any(position[k] < len(logs[k]) for k in logs):
        kind = rng.choice([k for k in logs if position[k] < len(logs[k])])
        size = rng.randint(1, 4)
        records = logs[kind][position[kind] : position[kind] + size]
        mutations = [
            (key, count, 0, position[kind] + i) for i, (_, key, count) in enumerate(records)
        ]
        position[kind] += len(records)
        yield MutationBatch(kind, PARTITION, mutations, position[kind])


def _sums(logs: dict[int, list[Record]], key: bytes, upto: dict[int, int]) -> tuple[int, int]:
    """(on hand, reserved) of ``key`` after the first ``upto[kind]`` records of each topic."""
    return (
        sum(c for _, k, c in logs[ADJUSTMENT][: upto.get(ADJUSTMENT, 0)] if k == key),
        sum(c for _, k, c in logs[RESERVATION][: upto.get(RESERVATION, 0)] if k == key),
    )


def _records(update: PartitionUpdate, generation: int) -> list[tuple[bytes, bytes]]:
    """The changelog records the sink publishes for ``update``."""
    return [
        (key, encode_record(state, update.resume, generation))
        for key, state in update.changes.items()
    ]


@pytest.mark.parametrize("seed", range(150))
def test_any_crash_point_and_replay_order_ends_exact_and_every_record_is_true(
    seed: int,
) -> None:
    """Random writes; the owner publishes its changelog batch by batch and crashes at a
    random point, part-way through publishing a batch; a new owner restores from the
    changelog and replays the rest in another interleaving (and maybe crashes too)."""
    rng = random.Random(seed)
    keys = [encode_key("L", str(n)) for n in range(4)]
    logs: dict[int, list[Record]] = {ADJUSTMENT: [], RESERVATION: []}
    for _ in range(rng.randint(5, 40)):
        kind = rng.choice((ADJUSTMENT, RESERVATION))
        logs[kind].append((kind, rng.choice(keys), rng.randint(1, 9)))
    changelog: list[tuple[bytes, bytes]] = []

    for generation in (1, 2, 3):
        # Restore from the changelog, then run until a crash (the last owner never does).
        restored = PartitionState({})
        reader = ChangelogReader(restored)
        for key, value in changelog:
            reader.apply(key, value)
        # The local store holds every key's state; the restore hands on only some of them
        # (those the changelog brought), the others are read from the store when they come.
        store = dict(restored.states)
        for key in list(restored.states):
            if rng.random() < 0.5:
                del restored.states[key]
        owner = PartitionSums({PARTITION: restored}, store.get)
        batches = list(_chunks(rng, logs, restored.applied))
        crash_at = rng.randint(0, len(batches)) if generation < 3 else len(batches)
        for i, batch in enumerate(batches):
            (update,) = owner.on_batch([batch])[0]
            records = _records(update, generation)
            if i == crash_at:
                changelog.extend(records[: rng.randint(0, len(records))])
                break
            changelog.extend(records)

    # Every record ever published is the truth at the positions it claims: never a mix.
    reader = ChangelogReader(PartitionState({}))
    for key, value in changelog:
        data = reader.apply(key, value)
        assert data is not None
        state = KeyState.from_bytes(data)
        upto = {ADJUSTMENT: state.adjustments_position, RESERVATION: state.reservations_position}
        assert (state.on_hand, state.reserved) == _sums(logs, key, upto)
    # And the end is exact.
    everything = {k: len(v) for k, v in logs.items()}
    final = reader.state.states
    for key in keys:
        if key in final:
            assert (final[key].on_hand, final[key].reserved) == _sums(logs, key, everything)
        else:
            assert _sums(logs, key, everything) == (0, 0)


def _validated_chunks(
    rng: random.Random,
    logs: dict[int, list[Record]],
    ids: dict[int, str],
    start: dict[int, int],
) -> Iterator[MutationBatch]:
    """:func:`_chunks`, with the reservations at the offsets of ``ids`` validated."""
    for batch in _chunks(rng, logs, start):
        if batch.kind == RESERVATION:
            validated = {m[3]: ids[m[3]] for m in batch.mutations if m[3] in ids}
            batch = MutationBatch(
                batch.kind, PARTITION, batch.mutations, batch.next_offset, validated
            )
        yield batch


@pytest.mark.parametrize("seed", range(150))
def test_validated_reservations_are_decided_once_whatever_the_crash_and_replay_order(
    seed: int,
) -> None:
    """As the test above, with validated reservations: the owner publishes a batch's
    changelog records (with the decisions they carry), and only then its decisions, and
    may crash anywhere in between. Every validated reservation gets exactly one decision,
    however often it is published; the states count exactly the confirmed ones; and a
    key that only ever had validated reservations is never oversold."""
    rng = random.Random(seed)
    keys = [encode_key("L", str(n)) for n in range(3)]
    logs: dict[int, list[Record]] = {ADJUSTMENT: [], RESERVATION: []}
    ids: dict[int, str] = {}
    for _ in range(rng.randint(5, 40)):
        kind = rng.choice((ADJUSTMENT, RESERVATION, RESERVATION))
        key = rng.choice(keys)
        if kind == RESERVATION and (key == keys[0] or rng.random() < 0.6):
            # keys[0] only ever gets validated reservations: it must never go below 0.
            ids[len(logs[RESERVATION])] = f"id-{seed}-{len(logs[RESERVATION])}"
        count = rng.randint(1, 9) if kind == ADJUSTMENT or key == keys[0] else rng.randint(-3, 9)
        logs[kind].append((kind, key, count or 1))
    changelog: list[tuple[bytes, bytes]] = []
    published: dict[str, list[ReservationResult]] = {}

    for generation in (1, 2, 3):
        restored = PartitionState({})
        reader = ChangelogReader(restored)
        for key, value in changelog:
            reader.apply(key, value)
        # The store's index: decisions restored from the changelog, and those published.
        index = {result.mutation_id: result for result in reader.results}
        index.update((mid, results[-1]) for mid, results in published.items())
        owner = PartitionSums({PARTITION: restored}, lambda key: None, index.get)
        batches = list(_validated_chunks(rng, logs, ids, restored.applied))
        crash_at = rng.randint(0, len(batches)) if generation < 3 else len(batches)
        for i, batch in enumerate(batches):
            (update,) = owner.on_batch([batch])[0]
            records = [
                (
                    key,
                    encode_record(
                        state,
                        update.resume,
                        generation,
                        [r.to_bytes() for r in update.results.get(key, [])],
                    ),
                )
                for key, state in update.changes.items()
            ]
            decided = [r for rs in update.results.values() for r in rs] + update.republish
            if i == crash_at:
                cut = rng.randint(0, len(records) + 1)  # past the end: after the changelog
                changelog.extend(records[:cut])
                if cut > len(records):
                    for result in decided[: rng.randint(0, len(decided))]:
                        published.setdefault(result.mutation_id, []).append(result)
                break
            changelog.extend(records)
            for result in decided:
                published.setdefault(result.mutation_id, []).append(result)

    # One decision per validated reservation, the same however often it was published.
    assert set(published) == set(ids.values())
    for results in published.values():
        assert len(set(results)) == 1
    decision = {mid: results[0] for mid, results in published.items()}
    # The end state counts exactly the unvalidated and the confirmed reservations.
    final = ChangelogReader(PartitionState({}))
    for key, value in changelog:
        final.apply(key, value)
    for key in keys:
        reserved = sum(
            count
            for offset, (_, k, count) in enumerate(logs[RESERVATION])
            if k == key and (offset not in ids or decision[ids[offset]].status == "CONFIRMED")
        )
        on_hand = sum(c for _, k, c in logs[ADJUSTMENT] if k == key)
        state = final.state.states.get(key)
        assert ((state.on_hand, state.reserved) if state else (0, 0)) == (on_hand, reserved)
    # Never oversold: every state ever published of the validated-only key.
    for key, value in changelog:
        state = KeyState.from_bytes(decode_record(value)[0])
        if key == keys[0]:
            assert state.on_hand - state.reserved >= 0
