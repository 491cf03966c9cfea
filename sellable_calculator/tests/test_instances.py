"""Two calculator instances as real processes against the real broker."""

from __future__ import annotations

import logging
import random
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from local_stack.process import ManagedProcess, free_port
from local_stack.testing import inventory_path, odd_ids, wait_until
from sellable_calculator.__main__ import _records_missing
from sellable_calculator.settings import CalculatorSettings
from sellable_calculator.store import KeyState, SellableStore
from sellable_calculator.tests.support import (
    PARTITIONS,
    Calculator,
    Mutations,
    lone_calculator,
    sku_owned_by,
    unique_location,
    wait_for_assignment,
)
from shared_schemas import encode_key, partition_for
from shared_schemas.topics import INVENTORY_ADJUSTMENTS, INVENTORY_RESERVATIONS


def test_original_scenario_same_answer_from_both_instances(
    calculators: list[Calculator], mutations: Mutations
) -> None:
    location = unique_location("STL")
    for owner in (0, 1):
        sku = sku_owned_by(calculators[owner], location)
        mutations.adjust(location, sku, 100)
        mutations.reserve(location, sku, 10)
        for calculator in calculators:
            wait_until(lambda c=calculator, s=sku: c.count_of(location, s) == 90)
            response = calculator.sellable(location, sku)
            assert response.json() == {"locationId": location, "sku": sku, "count": 90}
            owner_id = calculators[owner].env["CALCULATOR_INSTANCE_ID"]
            assert response.headers["X-Served-By"] == owner_id
            if calculator.index == owner:
                assert "X-Forwarded-By" not in response.headers
            else:
                assert (
                    response.headers["X-Forwarded-By"] == calculator.env["CALCULATOR_INSTANCE_ID"]
                )


def test_keys_with_spaces_and_non_ascii_are_forwarded_intact(
    calculators: list[Calculator], mutations: Mutations
) -> None:
    location = unique_location("Zürich City")
    for owner in (0, 1):
        sku = f"x y%z-{sku_owned_by(calculators[owner], location)}"
        owned = calculators[owner].partitions()
        while partition_for(encode_key(location, sku), PARTITIONS) not in owned:
            sku += "+"
        mutations.adjust(location, sku, 3)
        for calculator in calculators:
            wait_until(lambda c=calculator, s=sku: c.count_of(location, s) == 3)
            assert calculator.sellable(location, sku).json()["sku"] == sku


def test_odd_keys_read_back_one_at_a_time_and_by_location_on_both_instances(
    calculators: list[Calculator], mutations: Mutations
) -> None:
    """Each GET answers the id it was asked for, local or forwarded.

    ``a b`` and ``a%20b`` are different locations: a listing forwarded with its path
    decoded once too often answered one with the other's skus (or 503 for ``a%2Fb``).
    """
    run = uuid.uuid4().hex[:6]
    ids = odd_ids(run)
    expected: dict[str, dict[str, int]] = {}
    for n, location in enumerate(ids):
        # Every location has skus on both instances, so every listing is a real fan-out.
        skus = {
            sku_owned_by(calculators[0], location): n + 1,
            sku_owned_by(calculators[1], location): n + 100,
        }
        for sku, count in skus.items():
            mutations.send(INVENTORY_ADJUSTMENTS.name, location, sku, count)
        expected[location] = skus
    odd_sku_location = f"odd-skus {run}"
    for n, sku in enumerate(ids):
        mutations.send(INVENTORY_ADJUSTMENTS.name, odd_sku_location, sku, n + 1)
    mutations.flush()
    for calculator in calculators:
        for n, sku in enumerate(ids):
            response = wait_until(
                lambda c=calculator, s=sku: (
                    (r := c.get(inventory_path(odd_sku_location, s))).status_code == 200 and r
                ),
            )
            assert response.json() == {"locationId": odd_sku_location, "sku": sku, "count": n + 1}
            where = calculator.get(
                "/metadata" + inventory_path(odd_sku_location, sku).removeprefix("/inventory")
            )
            assert (where.json()["locationId"], where.json()["sku"]) == (odd_sku_location, sku)
        for location, skus in expected.items():
            response = wait_until(
                lambda c=calculator, loc=location: (
                    (r := c.get(inventory_path(loc))).status_code == 200
                    and len(r.json()["skus"]) == len(expected[loc])
                    and r
                )
            )
            body = response.json()
            assert body["locationId"] == location
            assert {i["sku"]: i["count"] for i in body["skus"]} == skus, location
            assert {i["locationId"] for i in body["skus"]} == {location}
            assert len(body["instances"]) == 2


# (Longer request lines than 10,000 characters are refused by uvicorn itself: 400.)
INVALID_PATH_IDS = ["  P  ", " P", ".", "..", "a\r\nb", "a\x00b", "L" * 257, "L" * 10_000]


@pytest.mark.parametrize("bad", INVALID_PATH_IDS, ids=lambda b: repr(b)[:12])
def test_ids_the_mutator_refuses_are_422_on_every_get(
    calculators: list[Calculator], bad: str
) -> None:
    for calculator in calculators:
        for path in (
            inventory_path(bad, "1"),
            inventory_path("STL", bad),
            inventory_path(bad),
            "/metadata" + inventory_path(bad, "1").removeprefix("/inventory"),
        ):
            response = calculator.get(path)
            assert response.status_code == 422, (path[:60], response.text[:200])
            error = response.json()
            assert error["error"] == "invalid_request"
            assert error["details"][0]["field"] in ("location", "sku")
    # "/" cannot be in an id: encoded or not, it splits the path and matches no route.
    assert calculators[0].get(inventory_path("a/b", "1")).status_code == 404


def test_unknown_key_is_404_json_on_both(calculators: list[Calculator]) -> None:
    location = unique_location()
    for calculator in calculators:
        for owner in (0, 1):
            response = calculator.sellable(location, sku_owned_by(calculators[owner], location))
            assert response.status_code == 404
            assert response.json()["error"] == "not_found"


def test_reservations_before_the_first_adjustment_still_count(
    calculators: list[Calculator], mutations: Mutations
) -> None:
    location = unique_location()
    position = mutations.reserve(location, "early", 4)
    # The reservation alone does not create the key (the original's left join).
    response = calculators[0].sellable(location, "early", position=str(position))
    assert response.status_code == 404
    mutations.adjust(location, "early", 10)
    wait_until(lambda: calculators[1].count_of(location, "early") == 6)


def test_exact_sums_after_concurrent_mutations_over_every_partition(
    calculators: list[Calculator], mutations: Mutations
) -> None:
    location = unique_location("BULK")
    skus = [f"sku-{i}" for i in range(60)]
    assert {partition_for(encode_key(location, s), PARTITIONS) for s in skus} == set(
        range(PARTITIONS)
    )
    rng = random.Random(7)
    expected = dict.fromkeys(skus, 0)
    plan = []
    for sku in skus:
        plan.append((INVENTORY_ADJUSTMENTS.name, sku, 1_000))
        expected[sku] += 1_000
    for _ in range(3_000):
        sku = rng.choice(skus)
        if rng.random() < 0.6:
            count = rng.choice([5, 10, -3])
            plan.append((INVENTORY_ADJUSTMENTS.name, sku, count))
            expected[sku] += count
        else:
            count = rng.randint(1, 4)
            plan.append((INVENTORY_RESERVATIONS.name, sku, count))
            expected[sku] -= count

    def send(chunk: list[tuple[str, str, int]]) -> None:
        for topic, sku, count in chunk:
            mutations.send(topic, location, sku, count)
        mutations.flush()

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(send, [plan[i::4] for i in range(4)]))
    for calculator in calculators:
        wait_until(
            lambda c=calculator: all(c.count_of(location, s) == expected[s] for s in skus),
            timeout=60,
        )
    listing = calculators[0].get(f"/inventory/locations/{location}/skus").json()
    assert {item["sku"]: item["count"] for item in listing["skus"]} == expected
    assert sorted(listing["instances"]) == sorted(
        c.env["CALCULATOR_INSTANCE_ID"] for c in calculators
    )


def test_read_your_writes_returns_the_value_including_the_position(
    calculators: list[Calculator], mutations: Mutations
) -> None:
    location = unique_location("RYW")
    for owner in (0, 1):
        sku = sku_owned_by(calculators[owner], location)
        adjusted = mutations.adjust(location, sku, 50)
        for step in range(1, 6):
            reserved = mutations.reserve(location, sku, 1)
            # Immediately after the write, from either instance: the answer includes both
            # writes (each topic partition is applied at its own pace, hence two positions).
            for calculator in calculators:
                response = calculator.sellable(
                    location, sku, position=[str(adjusted), str(reserved)]
                )
                assert response.status_code == 200, response.text
                assert response.json()["count"] == 50 - step
        for step in range(1, 4):
            adjusted = mutations.adjust(location, sku, 10)
            response = calculators[1 - owner].sellable(location, sku, position=str(adjusted))
            assert response.json()["count"] == 45 + 10 * step


def test_read_your_writes_rejects_bad_positions_and_times_out(
    calculators: list[Calculator], mutations: Mutations
) -> None:
    location = unique_location()
    sku = sku_owned_by(calculators[0], location)
    position = mutations.adjust(location, sku, 1)
    calculator = calculators[0]
    assert calculator.sellable(location, sku, position="nonsense").status_code == 422
    wrong_topic = f"sellable_inventory:{position.partition}:0"
    assert calculator.sellable(location, sku, position=wrong_topic).status_code == 422
    other_partition = f"{position.topic}:{(position.partition + 1) % PARTITIONS}:0"
    response = calculator.sellable(location, sku, position=other_partition)
    # Well formed, but not this key's partition (which depends on the deployment): 409.
    assert (response.status_code, response.json()["error"]) == (409, "position_elsewhere")
    assert response.json()["details"][0]["field"] == "position"
    for refused in (
        f" {position} ",
        f"{position}\n",
        f"{position.topic}:+1:0",
        "inventory_adjustments:1:\u0661",
    ):
        assert calculator.sellable(location, sku, position=refused).status_code == 422, refused
    for timeout in ("0", "-1", "31", "inf", "nan", " 1", "1_0", "abc"):
        response = calculator.sellable(location, sku, timeout=timeout)
        assert response.status_code == 422, timeout
        assert response.json()["details"][0]["field"] == "timeout"
    for fresh in ("yes", "1", "True", ""):
        response = calculator.sellable(location, sku, fresh=fresh)
        assert response.status_code == 422, fresh
        assert response.json()["details"][0]["field"] == "fresh"
    for fresh in ("true", "false"):
        # With the position: the adjustment may not be applied yet when the GET comes.
        answer = calculator.sellable(location, sku, fresh=fresh, position=str(position))
        assert answer.json()["count"] == 1
    future = f"{position.topic}:{position.partition}:{position.offset + 1_000_000}"
    started = time.monotonic()
    response = calculator.sellable(location, sku, position=future, timeout=0.3)
    assert response.status_code == 504
    assert time.monotonic() - started < 5
    body = response.json()
    assert body["position"] == future
    assert int(body["reached"].rsplit(":", 1)[1]) >= position.offset


def test_metadata_names_the_owner_of_a_key(calculators: list[Calculator]) -> None:
    location = unique_location()
    for owner in (0, 1):
        sku = sku_owned_by(calculators[owner], location)
        for calculator in calculators:
            body = calculator.get(f"/metadata/locations/{location}/skus/{sku}").json()
            assert body["partition"] == partition_for(encode_key(location, sku), PARTITIONS)
            assert body["owner"]["instanceId"] == calculators[owner].env["CALCULATOR_INSTANCE_ID"]
    metadata = calculators[1].get("/metadata").json()
    assert metadata["unownedPartitions"] == []
    assert sorted(p for i in metadata["instances"] for p in i["partitions"]) == list(
        range(PARTITIONS)
    )


def test_count_is_the_keys_written_per_owning_instance(
    calculators: list[Calculator], mutations: Mutations
) -> None:
    """``/inventory/count`` counts keys (not mutations), each on the instance that owns it.

    The topics hold what earlier tests wrote, so the counts start from a baseline: one
    adjustment per partition first, and once each is visible every earlier adjustment of
    its partition is applied (keys only appear through adjustments), so the baseline
    holds still until this test writes again.
    """
    barrier = unique_location("BARRIER")
    skus = {partition_for(encode_key(barrier, str(n)), PARTITIONS): str(n) for n in range(200)}
    assert sorted(skus) == list(range(PARTITIONS))
    for sku in skus.values():
        mutations.send(INVENTORY_ADJUSTMENTS.name, barrier, sku, 1)
    mutations.flush()
    for calculator in calculators:
        wait_until(lambda c=calculator: all(c.count_of(barrier, s) == 1 for s in skus.values()))

    def local_counts() -> list[int]:
        return [c.get("/inventory/count", scope="local").json()["count"] for c in calculators]

    before = local_counts()
    location = unique_location("COUNT")
    new_keys = (3, 5)  # per owning instance
    skus_of: list[list[str]] = [[], []]
    first = calculators[0].partitions()
    for n in range(1_000):
        owner = 0 if partition_for(encode_key(location, str(n)), PARTITIONS) in first else 1
        if len(skus_of[owner]) < new_keys[owner]:
            skus_of[owner].append(str(n))
    new = skus_of[0] + skus_of[1]
    # A key with reservations only does not exist (the left join): counted nowhere. It
    # shares a partition with new[0], whose reservation after it shows it was applied.
    shared = partition_for(encode_key(location, new[0]), PARTITIONS)
    reserved_only = next(
        f"reserved-only-{n}"
        for n in range(1_000)
        if partition_for(encode_key(location, f"reserved-only-{n}"), PARTITIONS) == shared
    )
    mutations.send(INVENTORY_RESERVATIONS.name, location, reserved_only, 4)
    for sku in new:
        # Several mutations of one key are still one key.
        mutations.send(INVENTORY_ADJUSTMENTS.name, location, sku, 5)
        mutations.send(INVENTORY_ADJUSTMENTS.name, location, sku, 2)
        mutations.send(INVENTORY_RESERVATIONS.name, location, sku, 1)
    mutations.flush()
    wait_until(lambda: all(calculators[0].count_of(location, s) == 6 for s in new))
    expected_local = [before[0] + new_keys[0], before[1] + new_keys[1]]
    assert local_counts() == expected_local
    expected = {
        "count": sum(expected_local),
        "instances": {
            c.env["CALCULATOR_INSTANCE_ID"]: expected_local[c.index] for c in calculators
        },
    }
    for calculator in calculators:
        assert calculator.get("/inventory/count").json() == expected
    assert calculators[0].sellable(location, reserved_only).status_code == 404


def test_bad_records_are_skipped_and_counted(
    calculators: list[Calculator], mutations: Mutations
) -> None:
    location = unique_location("BAD")
    sku = sku_owned_by(calculators[1], location)
    key = encode_key(location, sku)
    partition = partition_for(key, PARTITIONS)
    calculator = calculators[1]
    topic = INVENTORY_ADJUSTMENTS.name
    before = calculator.metric("calculator_undecodable_records_total", topic=topic)
    mutations.raw(topic, key, b"not avro at all", partition)  # bad value
    mutations.raw(topic, b"\xff\xfe", b"x", partition)  # bad key
    mutations.raw(topic, key, None, partition)  # tombstone on an event log
    # Another partition instance 1 owns: wrong for the key.
    misplaced = next(p for p in calculator.partitions() if p != partition)
    mutations.raw(topic, key, b"\xc3\x01", misplaced)
    mutations.adjust(location, sku, 42)  # the flow goes on behind them
    wait_until(lambda: calculator.count_of(location, sku) == 42)
    wait_until(
        lambda: calculator.metric("calculator_undecodable_records_total", topic=topic) >= before + 4
    )


def test_owner_down_answers_503_quickly_when_fresh_a_marked_standby_answer_otherwise(
    calculators: list[Calculator], mutations: Mutations
) -> None:
    location = unique_location("DOWN")
    mine, theirs = sku_owned_by(calculators[0], location), sku_owned_by(calculators[1], location)
    mutations.adjust(location, mine, 5)
    mutations.adjust(location, theirs, 6)
    wait_until(lambda: calculators[0].count_of(location, theirs) == 6)
    assert calculators[1].process is not None
    calculators[1].process.kill()  # a crash: its routing record stays (a clean stop withdraws it)
    try:
        started = time.monotonic()
        response = calculators[0].sellable(location, theirs, fresh="true")
        assert response.status_code == 503
        assert time.monotonic() - started < 3
        body = response.json()
        assert body["error"] == "owner_unavailable"
        assert calculators[1].env["CALCULATOR_INSTANCE_ID"] in body["message"]
        # Without fresh=true the standby replica answers, marked as such: with the value,
        # or 404 if the adjustment had not reached it when the owner died.
        stale = calculators[0].sellable(location, theirs)
        assert stale.headers["x-replica"] == "standby", stale.text
        assert stale.headers["x-stale-reason"] == "owner_unavailable"
        assert (stale.status_code, stale.json().get("count")) in ((200, 6), (404, None))
        assert calculators[0].count_of(location, mine) == 5
        assert calculators[0].get(f"/inventory/locations/{location}/skus").status_code == 503
    finally:
        calculators[1].start()
    wait_for_assignment(calculators)
    assert calculators[0].count_of(location, theirs) == 6


def test_kill_9_mid_stream_and_restart_gives_exact_values(
    calculators: list[Calculator], mutations: Mutations
) -> None:
    victim = calculators[0]
    location = unique_location("KILL")
    skus = [sku_owned_by(calculators[0], location, start=100 * i) for i in range(10)]
    expected = dict.fromkeys(skus, 0)
    for sku in skus:
        mutations.send(INVENTORY_ADJUSTMENTS.name, location, sku, 10_000)
        expected[sku] += 10_000
    mutations.flush()
    rounds = 40
    for round_ in range(rounds):
        for sku in skus:
            mutations.send(INVENTORY_RESERVATIONS.name, location, sku, 1)
            mutations.send(INVENTORY_ADJUSTMENTS.name, location, sku, 3)
            expected[sku] += 2
        if round_ == rounds // 2:
            mutations.flush()
            # Mid-stream: wait until the instance has applied some of it, then kill -9.
            wait_until(lambda: victim.count_of(location, skus[0]) not in (None, 10_000))
            assert victim.process is not None
            victim.process.kill()
    mutations.flush()
    victim.start()
    wait_for_assignment(calculators)
    for calculator in calculators:
        wait_until(
            lambda c=calculator: all(c.count_of(location, s) == expected[s] for s in skus),
            timeout=60,
        )


def test_state_ahead_of_the_topics_is_discarded_and_rebuilt(
    kafka_bootstrap: str, mutations: Mutations, tmp_path: Path
) -> None:
    """A store that applied far more than the topics hold (a reset broker, recreated
    topics) belongs to topics that are gone: it is deleted and the partition rebuilt from
    what the topics hold now, and the instance serves the true values."""
    location = unique_location("STALE")
    sku = "1"
    key = encode_key(location, sku)
    partition = partition_for(key, PARTITIONS)
    mutations.adjust(location, sku, 7)
    instance = lone_calculator(kafka_bootstrap, tmp_path, "stale")
    store = SellableStore(tmp_path / instance.instance_id / "store")
    store.apply(
        {key: KeyState(10**6, 0, True, 0, 10**9, 10**9)},
        {(INVENTORY_ADJUSTMENTS.name, partition): 10**9},
        {partition: 10**9},
    )
    store.close()
    instance.start()
    try:
        assert instance.process is not None
        wait_until(lambda: "the broker does not have" in instance.process.log_tail(60), timeout=60)
        assert f"'inventory_adjustments:{partition}': 999999999" in instance.process.log_tail(60)
        wait_until(lambda: instance.count_of(location, sku) == 7, timeout=60)
        wait_until(instance.ready)
    finally:
        if instance.process is not None:
            instance.process.stop()


def test_end_offsets_that_lag_behind_records_the_broker_has_are_no_reason_to_discard(
    kafka_bootstrap: str, mutations: Mutations, caplog: pytest.LogCaptureFixture
) -> None:
    """The embedded broker's end offsets lag: a store 'ahead' of them is checked, not feared."""
    location = unique_location("LAG")
    position = mutations.adjust(location, "1", 1)
    settings = CalculatorSettings(
        kafka_bootstrap_servers=kafka_bootstrap, topic_partitions=PARTITIONS
    )
    where = (position.topic, position.partition)
    lagging = {where: position.offset - 2}
    with caplog.at_level(logging.INFO, logger="sellable_calculator"):
        assert _records_missing(settings, {where: position.offset + 1}, lagging) == {}
    assert "lag the store's positions" in caplog.text
    missing = _records_missing(settings, {where: position.offset + 50}, lagging)
    assert missing == {f"{position.topic}:{position.partition}": position.offset + 49}


def test_an_instance_that_stops_cleanly_leaves_the_routing_table(
    calculators: list[Calculator], tmp_path: Path
) -> None:
    """A third instance joins (the group gives it partitions); SIGTERM: it hands them
    back and deletes its record, so nobody routes or fans out to it."""
    env = {
        **calculators[0].env,
        "CALCULATOR_PORT": str(free_port()),
        "CALCULATOR_INSTANCE_ID": f"leaving-{uuid.uuid4().hex[:6]}",
        "CALCULATOR_STATE_DIR": str(tmp_path),
    }
    leaving = Calculator(0, int(env["CALCULATOR_PORT"]), env, tmp_path / "logs")
    leaving.start()

    def listed() -> set[str]:
        return {i["instanceId"] for i in calculators[1].get("/metadata").json()["instances"]}

    wait_for_assignment([*calculators, leaving])
    assert env["CALCULATOR_INSTANCE_ID"] in listed()
    assert leaving.partitions()
    assert leaving.process is not None
    assert leaving.process.stop() == 0
    wait_for_assignment(calculators)
    # The partitions it took over are back with the others.
    assert listed() == {c.env["CALCULATOR_INSTANCE_ID"] for c in calculators}
    assert calculators[1].get("/metadata").json()["unownedPartitions"] == []


def test_a_second_instance_on_the_same_state_directory_is_refused_in_words(
    calculators: list[Calculator], tmp_path: Path
) -> None:
    """Same instance id and state directory as a running instance: exit 2, saying why."""
    env = {**calculators[0].env, "CALCULATOR_PORT": str(free_port())}
    process = ManagedProcess(
        "duplicate", [sys.executable, "-m", "sellable_calculator"], env=env, log_dir=tmp_path
    )
    with process:
        process.start()
        assert process.wait(60) == 2
        assert "another process uses it" in process.log_tail(20)
        assert "Traceback" not in process.log_tail(20)
