"""End-to-end: the running system, over HTTP only."""

from __future__ import annotations

import random
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from integration_tests.support import PARTITIONS, System
from local_stack.testing import wait_until
from shared_schemas import encode_key, partition_for


def _location(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def test_the_original_integration_test(system: System) -> None:
    """Adjust by 100, reserve 10: the three GET endpoints agree on 90."""
    location = _location("STL")
    system.adjust(location, "123123", "100")
    system.reserve(location, "123123", "10")
    system.wait_all_agree(location, {"123123": 90})
    for base in system.readers:
        assert system.get(base, location, "123123").json() == {
            "locationId": location,
            "sku": "123123",
            "count": 90,
        }


def test_many_keys_over_every_partition_and_both_forwarding_directions(system: System) -> None:
    location = _location("MANY")
    skus = [f"sku-{i}" for i in range(48)]
    assert {partition_for(encode_key(location, s), PARTITIONS) for s in skus} == set(
        range(PARTITIONS)
    )
    expected = {sku: 10 + i for i, sku in enumerate(skus)}
    for sku, count in expected.items():
        system.adjust(location, sku, count)
    system.wait_all_agree(location, expected, timeout=60)
    served_by: dict[str, set[str]] = {}
    for base in system.calculators:
        for sku in skus:
            response = system.get(base, location, sku)
            served_by.setdefault(response.headers["X-Served-By"], set()).add(
                "forwarded" if "X-Forwarded-By" in response.headers else "local"
            )
    # Each instance answered some keys itself and got others forwarded to it.
    assert len(served_by) == 2
    assert all(kinds == {"local", "forwarded"} for kinds in served_by.values())
    for base in system.readers:
        response = system.get(base, location, "no-such-sku")
        assert response.status_code == 404
        assert response.json()["error"] == "not_found"


def test_bad_input_is_refused_and_nothing_becomes_visible(system: System) -> None:
    location = _location("BAD")
    bad = [
        ("adjustment", {"locationId": location, "sku": "x", "count": 0}),
        ("adjustment", {"locationId": location, "sku": "x", "count": "lots"}),
        ("reservation", {"locationId": location, "sku": "x", "count": 0}),
        ("adjustment", {"locationId": " ", "sku": "x", "count": 1}),
    ]
    for kind, body in bad:
        response = system.client.post(f"{system.mutator}/inventory/{kind}", json=body)
        assert response.status_code == 422, response.text
        assert response.json()["details"]
    malformed = system.client.post(
        f"{system.mutator}/inventory/adjustment",
        content=b"{not json",
        headers={"Content-Type": "application/json"},
    )
    assert malformed.status_code == 400
    # A good write after the bad ones is a barrier: once it is visible everywhere,
    # anything the bad requests had written would be too.
    system.adjust(location, "barrier", 1)
    system.wait_all_agree(location, {"barrier": 1})
    for base in system.readers:
        assert system.get(base, location, "x").status_code == 404


def test_read_your_writes_with_the_mutators_position(system: System) -> None:
    location = _location("RYW")
    for sku in ("a", "b", "c", "d"):  # keys of both instances, most likely
        adjusted = system.adjust(location, sku, 20)
        reserved = system.reserve(location, sku, 5)
        for base in system.calculators:
            response = system.get(
                base, location, sku, position=[adjusted["position"], reserved["position"]]
            )
            assert response.status_code == 200, response.text
            assert response.json()["count"] == 15


def test_concurrent_load_ends_exact_on_all_three_sides(system: System) -> None:
    location = _location("LOAD")
    skus = [f"sku-{i}" for i in range(30)]
    rng = random.Random(42)
    plan: list[tuple[str, str, int]] = [("adjustment", sku, 500) for sku in skus]
    for _ in range(600):
        sku = rng.choice(skus)
        if rng.random() < 0.5:
            plan.append(("adjustment", sku, rng.choice([1, 2, 5, -1])))
        else:
            plan.append(("reservation", sku, rng.randint(1, 3)))
    expected = dict.fromkeys(skus, 0)
    for kind, sku, count in plan:
        expected[sku] += count if kind == "adjustment" else -count

    def send(item: tuple[str, str, int]) -> None:
        kind, sku, count = item
        if kind == "adjustment":
            system.adjust(location, sku, count)
        else:
            system.reserve(location, sku, count)

    # The initial adjustments first, so no reservation races ahead of its key's creation
    # in a way that matters: the sums are order-independent anyway.
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(send, plan))
    system.wait_all_agree(location, expected, timeout=120)


def test_a_calculator_killed_and_restarted_ends_exact(system: System, log_dir: Path) -> None:
    location = _location("CRASH")
    skus = [f"sku-{i}" for i in range(24)]
    expected = dict.fromkeys(skus, 0)
    for sku in skus:
        system.adjust(location, sku, 100)
        expected[sku] += 100
    system.wait_all_agree(location, expected, timeout=60)

    victim_url, survivor_url = system.calculators[1], system.calculators[0]
    victim = system.services["calculator-1"]
    own = [s for s in skus if partition_for(encode_key(location, s), PARTITIONS) % 2 == 0]
    assert own, "the survivor owns some of the keys"

    victim.kill()
    for sku in skus:  # writes keep being accepted while the instance is down
        system.reserve(location, sku, 7)
        expected[sku] -= 7
    # The survivor keeps serving its own keys, with the new values.
    wait_until(
        lambda: all(system.count_at(survivor_url, location, s) == expected[s] for s in own),
        timeout=60,
    )
    restarted = victim.restarted("calculator-1-restarted", log_dir)
    system.replacements.append(restarted)  # it serves the remaining tests, like the original
    restarted.wait_ready(
        lambda: httpx.get(victim_url + "/health/live").status_code == 200, timeout=60
    )
    try:
        system.wait_all_agree(location, expected, timeout=120)
    except AssertionError as exc:
        # The log of the restarted instance is what tells why (it is gone after the run).
        tail = restarted.log_path.read_text(errors="replace").splitlines()[-40:]
        raise AssertionError(f"{exc}\n--- {restarted.log_path}:\n" + "\n".join(tail)) from None


def test_location_listing_on_both_sides(system: System) -> None:
    location = _location("LIST")
    expected = {f"sku-{i:02d}": i + 1 for i in range(12)}
    for sku, count in expected.items():
        system.adjust(location, sku, count)
    system.wait_all_agree(location, expected, timeout=60)
    listing = system.client.get(
        f"{system.calculators[0]}/inventory/locations/{location}/skus"
    ).json()
    assert {item["sku"]: item["count"] for item in listing["skus"]} == expected
