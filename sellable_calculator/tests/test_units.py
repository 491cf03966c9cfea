"""Unit tests of the calculator's pieces: store, progress, routing, settings."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
from pydantic import ValidationError

from sellable_calculator.health import DataflowHealth
from sellable_calculator.progress import Progress
from sellable_calculator.routing import InstanceInfo, RoutingTable
from sellable_calculator.settings import CalculatorSettings
from sellable_calculator.store import Sellable, SellableStore
from shared_schemas.serde import encode_key

STL = encode_key("STL", "123123")
KC = encode_key("KC", "1")


def test_store_values_positions_and_location_scan(tmp_path: Path) -> None:
    store = SellableStore(tmp_path / "store")
    other = encode_key("STLX", "1")
    store.apply(
        {STL: Sellable(90, 100, 10, 5), KC: Sellable(1, 1, 0, 6), other: Sellable(2, 2, 0, 7)},
        {("inventory_adjustments", 0): 12, ("inventory_reservations", 0): 3},
    )
    assert store.get(STL) == Sellable(90, 100, 10, 5)
    assert store.get(encode_key("STL", "nope")) is None
    assert list(store.location("STL")) == [("123123", Sellable(90, 100, 10, 5))]
    assert store.count() == 3
    assert store.count(lambda key: key != KC) == 2
    assert store.positions() == {("inventory_adjustments", 0): 12, ("inventory_reservations", 0): 3}
    store.close()
    reopened = SellableStore(tmp_path / "store")
    assert reopened.get(KC) == Sellable(1, 1, 0, 6)
    reopened.close()


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


def _info(name: str, partitions: tuple[int, ...], started: float, count: int = 6) -> InstanceInfo:
    return InstanceInfo(name, f"http://{name}", partitions, count, started)


def test_routing_table_latest_start_wins_and_self_always_wins() -> None:
    table = RoutingTable(_info("me", (0, 2), 10.0))
    table.update(_info("old", (1, 3), 1.0))
    table.update(_info("new", (3, 5), 2.0))
    table.update(_info("usurper", (0,), 99.0))
    table.update(_info("wrong-count", (4,), 50.0, count=12))
    owners = {p: (table.owner(p).instance_id if table.owner(p) else None) for p in range(6)}
    assert owners == {0: "me", 1: "old", 2: "me", 3: "new", 4: None, 5: "new"}
    table.remove("new")
    assert table.owner(5) is None
    assert InstanceInfo.from_json(table.me.to_json()) == table.me


def test_settings_ownership() -> None:
    base = {"topic_partitions": 6, "calculator_instance_count": 2}
    assert CalculatorSettings(**base, calculator_instance_index=1).owned_partitions == (1, 3, 5)
    assert CalculatorSettings(**base, calculator_partitions="5,1").owned_partitions == (1, 5)
    assert CalculatorSettings(**base).instance_id == "calculator-0"
    with pytest.raises(ValidationError, match="must be below"):
        CalculatorSettings(**base, calculator_instance_index=2)
    with pytest.raises(ValidationError, match="not below TOPIC_PARTITIONS"):
        CalculatorSettings(**base, calculator_partitions="6")


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
