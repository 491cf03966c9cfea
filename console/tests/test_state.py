"""The collector against fake backends: cells, errors, topology, and a chased write."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx

from console.backends import Outcome
from console.control import NoControl
from console.settings import ConsoleSettings
from console.state import Collector, KeyCell
from console.tests.fakes import CALC_A, CALC_B, MUTATOR, SERVICE, FakeSystem


def _settings(**overrides: Any) -> ConsoleSettings:
    return ConsoleSettings(
        console_calculator_urls=[CALC_A, CALC_B],
        console_service_url=SERVICE,
        console_mutator_url=MUTATOR,
        **overrides,
    )


def _collector(fake: FakeSystem, **overrides: Any) -> tuple[Collector, httpx.AsyncClient]:
    client = httpx.AsyncClient(transport=fake.transport())
    return Collector(_settings(**overrides), client, NoControl("tests")), client


def test_every_side_of_a_key_and_an_unreachable_instance_as_an_error_cell() -> None:
    fake = FakeSystem(counts={("STL", "a b%"): 90})

    async def scenario() -> dict[str, Any]:
        collector, client = _collector(fake)
        async with client:
            collector.watch("STL", "a b%")
            collector.watch("STL", "missing")
            await collector.gather_once()
            return collector.snapshot()

    snapshot = asyncio.run(scenario())
    assert [r["url"] for r in snapshot["readers"]] == [CALC_A, CALC_B, SERVICE]
    assert snapshot["readers"][0]["label"] == "calculator-9094"
    found, missing = (
        next(k for k in snapshot["keys"] if k["sku"] == sku) for sku in ("a b%", "missing")
    )
    assert found["cells"][CALC_A]["count"] == 90
    assert found["cells"][SERVICE]["count"] == 90
    assert found["cells"][CALC_A]["servedBy"] == "calculator-9094"
    assert found["cells"][CALC_B]["error"] == "unreachable: connection refused"
    assert found["agree"] is False  # one side cannot say
    assert missing["cells"][CALC_A]["found"] is False and missing["cells"][CALC_A]["error"] is None
    assert found["owner"] == "calculator-9094"
    topology = snapshot["topology"]
    rows = {row["url"]: row for row in topology["instances"]}
    assert rows[CALC_A]["partitions"] == [0, 1, 2, 3, 4, 5] and rows[CALC_A]["restoring"] == [5]
    assert rows[CALC_A]["ready"] is True
    assert rows[CALC_B]["reachable"] is False
    assert rows[CALC_B]["error"] == "unreachable: connection refused"
    partitions = {p["partition"]: p for p in topology["partitions"]}
    assert partitions[0]["lag"] == 4  # both input topics
    assert partitions[5]["state"] == "restoring"
    assert partitions[2]["serviceLag"] == 7


def test_all_sides_agreeing_turn_the_row_green() -> None:
    fake = FakeSystem(counts={("STL", "x"): 5}, down=set())

    async def scenario() -> dict[str, Any]:
        collector, client = _collector(fake)
        async with client:
            collector.watch("STL", "x")
            await collector.gather_once()
            return collector.snapshot()

    (key,) = asyncio.run(scenario())["keys"]
    assert key["agree"] is True


def test_a_hanging_backend_becomes_a_time_out_and_delays_nothing_else() -> None:
    fake = FakeSystem(counts={("STL", "x"): 5}, down=set(), hanging={CALC_B})

    async def scenario() -> tuple[dict[str, Any], bool]:
        collector, client = _collector(fake, console_backend_timeout_seconds=0.2)
        async with client:
            collector.watch("STL", "x")
            key = collector.watched[0]
            collector.tick(slow=True)
            # The others answer while the hanging one is still in flight.
            while collector.cells[(SERVICE, key)].checked_at is None:
                await asyncio.sleep(0.005)
            still_waiting = collector.key_probes[(CALC_B, key)].busy()
            while collector.key_probes[(CALC_B, key)].busy():
                await asyncio.sleep(0.01)
            return collector.snapshot(), still_waiting

    snapshot, still_waiting = asyncio.run(scenario())
    assert still_waiting
    (key,) = snapshot["keys"]
    assert key["cells"][CALC_B]["error"] == "no answer within 0.2 s"
    assert key["cells"][SERVICE]["count"] == 5


def test_a_cell_knows_when_its_count_last_changed() -> None:
    cell = KeyCell()
    cell.update(Outcome(200, {"count": 1}, at=100.0))
    assert (cell.changed_at, cell.first_seen) == (100.0, True)
    cell.update(Outcome(200, {"count": 1}, at=101.0))
    assert cell.changed_at == 100.0
    cell.update(Outcome(None, None, error="unreachable: connection refused", at=102.0))
    assert cell.view(0)["error"] and cell.view(0)["lastCount"] == 1 and cell.changed_at == 100.0
    cell.update(Outcome(200, {"count": 3}, at=103.0))
    assert (cell.changed_at, cell.first_seen, cell.error) == (103.0, False, None)


def test_a_write_is_chased_to_the_calculators_first_and_cassandra_after() -> None:
    fake = FakeSystem(down=set(), service_catches_up_after=3)

    async def scenario() -> dict[str, Any]:
        collector, client = _collector(fake)
        async with client:
            response = await client.post(
                f"{MUTATOR}/inventory/adjustment",
                json={"locationId": "STL", "sku": "x", "count": 100},
            )
            write = collector.record_write(
                "adjustment", "STL", "x", 100, False, 200, response.json()
            )
            while not write.done:
                await asyncio.sleep(0.01)
            return write.view()

    write = asyncio.run(scenario())
    sides = write["sides"]
    assert sides[CALC_A]["count"] == sides[CALC_B]["count"] == sides[SERVICE]["count"] == 100
    # The service answered the old value three times first: it shows the write later.
    assert sides[SERVICE]["ms"] > max(sides[CALC_A]["ms"], sides[CALC_B]["ms"])
    assert fake.service_reads >= 4


def test_a_refused_write_is_not_chased() -> None:
    fake = FakeSystem(down=set())

    async def scenario() -> dict[str, Any]:
        collector, client = _collector(fake)
        async with client:
            write = collector.record_write(
                "adjustment", "STL", "x", 0, False, 422, {"error": "invalid_request"}
            )
            return write.view()

    write = asyncio.run(scenario())
    assert write["done"] and write["sides"] == {} and write["error"] == "invalid_request"


def test_watching_more_than_the_limit_drops_the_oldest() -> None:
    fake = FakeSystem()

    async def scenario() -> list[str]:
        collector, client = _collector(fake, console_max_watched_keys=2)
        async with client:
            for sku in ("a", "b", "c", "b"):
                collector.watch("L", sku)
            return [k.sku for k in collector.watched]

    assert asyncio.run(scenario()) == ["b", "c"]


def test_a_routing_table_of_an_unexpected_shape_is_an_error_not_a_crash() -> None:
    fake = FakeSystem(counts={("STL", "x"): 5}, down=set())
    fake.metadata = lambda: {"partitionCount": 6, "instances": [{"self": True}]}  # type: ignore[method-assign]

    async def scenario() -> dict[str, Any]:
        collector, client = _collector(fake)
        async with client:
            collector.watch("STL", "x")
            await collector.gather_once()
            return collector.snapshot()

    snapshot = asyncio.run(scenario())
    assert "could not be read" in snapshot["topology"]["error"]
    assert snapshot["keys"][0]["cells"][SERVICE]["count"] == 5
