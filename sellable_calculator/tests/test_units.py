"""Unit tests of the calculator's pieces: store, progress, routing, settings, health,
the changelog record and the hand-over of assignments."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import pytest
from pydantic import ValidationError

from sellable_calculator.changelog import (
    ADJUSTMENT,
    RESERVATION,
    ChangelogError,
    decode_record,
    encode_record,
)
from sellable_calculator.health import DataflowHealth
from sellable_calculator.membership import Assignments
from sellable_calculator.progress import Progress
from sellable_calculator.routing import InstanceInfo, RoutingTable
from sellable_calculator.settings import CalculatorSettings
from sellable_calculator.standby import range_owner, standby_partitions
from sellable_calculator.store import KeyState, Sellable, SellableStore
from shared_schemas.partitioner import partition_for
from shared_schemas.serde import encode_key

STL = encode_key("STL", "123123")
KC = encode_key("KC", "1")


def test_store_states_positions_and_location_scan(tmp_path: Path) -> None:
    store = SellableStore(tmp_path / "store")
    other = encode_key("STLX", "1")
    reserved_only = encode_key("STL", "reserved-only")
    store.apply(
        {
            STL: KeyState(100, 10, True, 5, 12, 3),
            KC: KeyState(1, 0, True, 6, 12, 3),
            other: KeyState(2, 0, True, 7, 12, 3),
            reserved_only: KeyState(0, 4, False, 8, 0, 3),
        },
        {("inventory_adjustments", 0): 12, ("inventory_reservations", 0): 3},
        {0: 40},
    )
    assert store.get(STL) == Sellable(90, 100, 10, 5)
    assert store.state(STL) == KeyState(100, 10, True, 5, 12, 3)
    assert store.get(encode_key("STL", "nope")) is None
    # A key with reservations only is kept (its reservations count later) but not served.
    assert store.get(reserved_only) is None
    assert store.state(reserved_only) == KeyState(0, 4, False, 8, 0, 3)
    assert list(store.location("STL")) == [("123123", Sellable(90, 100, 10, 5))]
    assert store.count() == 3
    assert store.count(lambda key: key != KC) == 2
    assert store.positions() == {("inventory_adjustments", 0): 12, ("inventory_reservations", 0): 3}
    assert store.changelog_position(0) == 40
    assert store.changelog_position(1) == 0
    store.close()
    reopened = SellableStore(tmp_path / "store")
    assert reopened.get(KC) == Sellable(1, 1, 0, 6)
    reopened.close()


def test_store_states_by_partition_and_forgetting_partitions(tmp_path: Path) -> None:
    store = SellableStore(tmp_path / "store")
    keys = [encode_key("L", str(n)) for n in range(40)]

    def partition_of(key: bytes) -> int:
        return partition_for(key, 6)

    store.apply(
        {key: KeyState(n, 0, True, 0, 1, 0) for n, key in enumerate(keys)},
        {("inventory_adjustments", p): 1 for p in range(6)},
        {p: 7 for p in range(6)},
    )
    forgotten = store.forget([0], partition_of)
    assert forgotten == sum(1 for k in keys if partition_of(k) == 0)
    assert all((store.state(k) is None) == (partition_of(k) == 0) for k in keys)
    assert store.changelog_position(0) == 0 and store.changelog_position(1) == 7
    assert ("inventory_adjustments", 0) not in store.positions()
    assert ("inventory_adjustments", 1) in store.positions()
    store.close()


def test_a_store_of_the_older_format_starts_empty(tmp_path: Path) -> None:
    from rocksdict import Options, Rdict

    old = Rdict(str(tmp_path / "store"), Options(raw_mode=True))
    old.put(STL, b"x" * 32)  # version 1: 32-byte values, no format key
    old.close()
    store = SellableStore(tmp_path / "store")
    assert store.get(STL) is None
    assert store.count() == 0
    store.close()


def test_changelog_records_round_trip_and_refuse_other_formats() -> None:
    state = KeyState(100, 10, True, 5, 12, 3)
    value = encode_record(state, {ADJUSTMENT: 11, RESERVATION: 2}, 1_700_000_000_000)
    data, resume, generation = decode_record(value)
    assert KeyState.from_bytes(data) == state
    assert resume == {ADJUSTMENT: 11, RESERVATION: 2}
    assert generation == 1_700_000_000_000
    with pytest.raises(ChangelogError):
        decode_record(value[:-1])
    with pytest.raises(ChangelogError):
        decode_record(b"\x02" + value[1:])


def test_progress_wakes_waiters_and_times_out() -> None:
    async def scenario() -> tuple[bool, bool, bool]:
        progress = Progress({("t", 0): 5})
        already = await progress.wait_for("t", 0, 4, timeout=0.01)
        waiter = asyncio.create_task(progress.wait_for("t", 0, 9, timeout=5))
        await asyncio.sleep(0)
        progress.advance("t", 0, 8)  # offset 8 applied is not enough for 9
        progress.advance("t", 0, 3)  # never backwards
        assert progress.reached("t", 0) == 8
        progress.advance("t", 0, 10)
        woken = await waiter
        timed_out = await progress.wait_for("t", 1, 0, timeout=0.05)
        return already, woken, timed_out

    assert asyncio.run(scenario()) == (True, True, False)


def test_progress_gives_up_waiters_of_partitions_that_moved_away() -> None:
    async def scenario() -> tuple[bool, bool]:
        progress = Progress({("t", 0): 5, ("t", 1): 5})
        # Waits of an hour: only giving up (or the offset) can end them within the test.
        moved = asyncio.create_task(progress.wait_for("t", 0, 9, timeout=3600))
        kept = asyncio.create_task(progress.wait_for("t", 1, 9, timeout=3600))
        await asyncio.sleep(0)
        progress.give_up(frozenset({0}))
        given_up = await asyncio.wait_for(moved, 30)
        assert not kept.done()
        progress.advance("t", 1, 10)
        return given_up, await asyncio.wait_for(kept, 30)

    assert asyncio.run(scenario()) == (False, True)
    progress = Progress({("t", 0): 5, ("t", 1): 5})
    progress.forget(frozenset({0}))
    assert (progress.reached("t", 0), progress.reached("t", 1)) == (0, 5)


def _info(
    name: str,
    partitions: tuple[int, ...],
    generation: int,
    count: int = 6,
    group: str = "g",
    restoring: tuple[int, ...] = (),
) -> InstanceInfo:
    return InstanceInfo(
        name, f"http://{name}", partitions, count, 1.0, restoring, group, generation
    )


def test_routing_table_the_newest_assignment_wins() -> None:
    table = RoutingTable(_info("me", (0, 2), 10))
    table.update(_info("old", (1, 3), 1))
    table.update(_info("new", (3, 5), 20, restoring=(5,)))
    table.update(_info("dead", (0, 4), 5))  # its partition 0 went to "me" since
    table.update(_info("wrong-count", (4,), 50, count=12))
    table.update(_info("other-group", (4,), 99, group="h"))
    owners = {p: (table.owner(p).instance_id if table.owner(p) else None) for p in range(6)}
    assert owners == {0: "me", 1: "old", 2: "me", 3: "new", 4: "dead", 5: "new"}
    assert table.owner(5).is_restoring(5) and not table.owner(3).is_restoring(3)
    assert [i.instance_id for i in table.owning_instances()] == ["dead", "me", "new", "old"]
    assert table.owned_by("new") == [3, 5]
    # A newer assignment of "me" takes partition 4 over from the dead instance's record.
    table.set_me(table.me.assigned((0, 2, 4), (4,), 30))
    assert table.owner(4).instance_id == "me"
    assert [i.instance_id for i in table.owning_instances()] == ["me", "new", "old"]
    table.remove("new")
    assert table.owner(5) is None
    assert InstanceInfo.from_json(table.me.to_json()) == table.me


def test_an_advertisement_of_an_older_version_still_reads() -> None:
    old = b'{"instance_id": "a", "url": "http://a/", "partitions": [1], "partition_count": 6,'
    old += b' "started_at": 1.5}'
    info = InstanceInfo.from_json(old)
    assert (info.url, info.partitions, info.restoring, info.generation, info.group) == (
        "http://a",
        (1,),
        (),
        0,
        "",
    )


def test_an_advertisement_carries_member_id_and_standby_replicas() -> None:
    info = InstanceInfo(
        "a", "http://a", (1,), 6, 1.5, member_id="a-1", standby=(2, 3), standby_lag=((2, 5),)
    )
    assert InstanceInfo.from_json(info.to_json()) == info


def _member(name: str, partitions: tuple[int, ...]) -> InstanceInfo:
    return InstanceInfo(name, f"http://{name}", partitions, 6, 1.0, member_id=f"{name}-x")


def test_range_owner_is_librdkafkas_range_assignment() -> None:
    # 6 partitions over 3 members: {0,1} {2,3} {4,5}; over 4: {0,1} {2,3} {4} {5}.
    assert [range_owner(p, 3, 6) for p in range(6)] == [0, 0, 1, 1, 2, 2]
    assert [range_owner(p, 4, 6) for p in range(6)] == [0, 0, 1, 1, 2, 3]
    assert [range_owner(p, 1, 6) for p in range(6)] == [0] * 6
    assert [range_owner(p, 7, 6) for p in range(6)] == [0, 1, 2, 3, 4, 5]


def test_the_standby_of_a_partition_is_where_it_goes_if_its_owner_dies() -> None:
    a, b, c = _member("a", (0, 1)), _member("b", (2, 3)), _member("c", (4, 5))
    owners = {p: m for m in (a, b, c) for p in m.partitions}
    # Without b, range gives a {0,1,2} and c {3,4,5}: a keeps 2 warm, c keeps 3.
    # Without a: b {0,1,2}, c {3,4,5}. Without c: a {0,1,2}, b {3,4,5}.
    assert standby_partitions(owners, a, 1, 6) == {2}
    assert standby_partitions(owners, b, 1, 6) == {0, 1, 4, 5}
    assert standby_partitions(owners, c, 1, 6) == {3}
    # Two replicas with three members: every other member keeps every partition.
    assert standby_partitions(owners, a, 2, 6) == {2, 3, 4, 5}
    assert standby_partitions(owners, a, 0, 6) == frozenset()
    # Alone: nobody to keep a standby for, even with replicas asked for.
    alone = _member("a", tuple(range(6)))
    assert standby_partitions(dict.fromkeys(range(6), alone), alone, 1, 6) == frozenset()
    # A newcomer that owns nothing yet keeps a standby of what it would get: a {0,1,2}
    # and b {3,4,5} now; without b, range gives a {0,1,2} and d {3,4,5}.
    a, b, d = _member("a", (0, 1, 2)), _member("b", (3, 4, 5)), _member("d", ())
    owners = {p: m for m in (a, b) for p in m.partitions}
    assert standby_partitions(owners, d, 1, 6) == {3, 4, 5}
    # a does not count d, which owns nothing (a dead instance's record looks the same):
    # it keeps b's partitions too until d owns some, one standby more for a moment.
    assert standby_partitions(owners, a, 1, 6) == {3, 4, 5}


def test_the_routing_table_names_standby_holders_but_never_the_owner_or_a_dead_one() -> None:
    table = RoutingTable(InstanceInfo("me", "http://me", (0,), 6, 1.0, group="g"))
    table.update(InstanceInfo("b", "http://b", (1,), 6, 2.0, group="g", standby=(0, 2)))
    lagging = ((1, 4),)
    table.update(
        InstanceInfo("c", "http://c", (2,), 6, 3.0, group="g", standby=(1, 2), standby_lag=lagging)
    )
    table.update(InstanceInfo("gone", "http://g", (), 6, 0.5, group="g", standby=(1,)))
    assert [i.instance_id for i in table.standby_holders(0)] == ["b"]
    assert [i.instance_id for i in table.standby_holders(1)] == ["c"]
    assert table.standby_holders(2) == [table.owner(1)]  # b; c owns 2 itself
    version = table.version
    table.change_me(lambda me: me.assigned((0, 3), (), 5))
    assert table.version > version and table.owner(3) == table.me


def test_settings_identity() -> None:
    assert CalculatorSettings(calculator_port=9096).instance_id == "calculator-9096"
    assert CalculatorSettings(calculator_port=9096).advertised_url == "http://127.0.0.1:9096"
    named = CalculatorSettings(calculator_advertised_url="http://calc-a:9094/")
    assert named.instance_id == "calculator-calc-a-9094"
    assert named.advertised_url == "http://calc-a:9094"
    anywhere = CalculatorSettings(calculator_host="0.0.0.0")
    assert (
        anywhere.advertised_url.startswith("http://") and "0.0.0.0" not in anywhere.advertised_url
    )
    assert CalculatorSettings(calculator_instance_id="x").instance_dir.name == "x"
    with pytest.raises(ValidationError):
        CalculatorSettings(calculator_session_timeout_seconds=0.5)


def test_assignments_hand_over_and_a_revoke_waits_for_the_dataflow() -> None:
    assignments = Assignments(revoke_timeout=5)
    assignments.assigned((3, 1))
    first = assignments.next()
    assert first is not None
    partitions, generation, stop = first
    assert partitions == (1, 3) and not stop.is_set()
    revoked = threading.Thread(target=assignments.revoked, kwargs={"lost": True})
    revoked.start()
    assert stop.wait(5)  # the revoke stops the running dataflow ...
    time.sleep(0.1)
    assert revoked.is_alive()  # ... and waits until it says it has stopped
    assignments.finished()
    revoked.join(5)
    assert not revoked.is_alive()
    assert assignments.take_lost() and not assignments.take_lost()
    assignments.assigned((1,))
    second = assignments.next()
    assert second is not None and second[1] > generation
    assignments.close()
    assert second[2].is_set()  # closing stops the dataflow that runs
    assignments.finished()
    assert assignments.next() is None


def test_dataflow_health_is_not_ready_until_every_expected_input_reads() -> None:
    health = DataflowHealth(stale_after=0.2)
    health.expect_input("inventory_adjustments", 0)
    health.expect_input("inventory_reservations", 0)
    assert set(health.problems()) == {"inventory_adjustments:0", "inventory_reservations:0"}
    health.report_input("inventory_adjustments", 0, None)
    health.report_input("inventory_reservations", 0, None)
    health.expect_input("inventory_adjustments", 0)  # registering again changes nothing
    assert health.problems() == {}
    time.sleep(0.3)  # no report since: the dataflow is not polling
    assert "not polling" in health.problems()["inventory_adjustments:0"]
