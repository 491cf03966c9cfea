"""End-to-end: every id the mutator accepts reads back on all three GET endpoints, and
every id it refuses is refused everywhere (shared_schemas.ids)."""

from __future__ import annotations

import uuid

from integration_tests.support import System
from local_stack.testing import REFUSED_IDS, inventory_path, odd_ids, wait_until


def test_every_accepted_id_reads_back_on_every_get(system: System) -> None:
    """One key at a time and by location, on the Cassandra service and both calculators."""
    run = uuid.uuid4().hex[:6]
    ids = odd_ids(run)
    sku_location = f"odd skus {run}"
    for n, odd in enumerate(ids):
        system.adjust(odd, "sku", str(n + 1))  # as a location
        system.adjust(sku_location, odd, n + 1)  # as a sku
    for base in system.readers:
        for n, odd in enumerate(ids):
            for location, sku in ((odd, "sku"), (sku_location, odd)):
                response = wait_until(
                    lambda b=base, loc=location, s=sku: (
                        (r := system.client.get(b + inventory_path(loc, s))).status_code == 200
                        and r
                    ),
                    timeout=60,
                )
                assert response.json() == {"locationId": location, "sku": sku, "count": n + 1}
            listing = system.client.get(base + inventory_path(odd)).json()
            assert listing["locationId"] == odd
            assert listing["skus"] == [{"locationId": odd, "sku": "sku", "count": n + 1}], base
    for base in system.calculators:
        listing = system.client.get(base + inventory_path(sku_location)).json()
        assert {i["sku"]: i["count"] for i in listing["skus"]} == {
            odd: n + 1 for n, odd in enumerate(ids)
        }


def test_refused_ids_are_never_written_and_never_a_server_error(system: System) -> None:
    """The mutator says which rule an id breaks; no GET answers such an id with a 5xx."""
    for bad, rule in REFUSED_IDS:
        if isinstance(bad, str) and len(bad) > 1_000:
            continue  # over the body limit (413) and the HTTP layer's request-line limit
        for body in (
            {"locationId": bad, "sku": "1", "count": 1},
            {"locationId": "STL", "sku": bad, "count": 1},
        ):
            response = system.client.post(f"{system.mutator}/inventory/adjustment", json=body)
            assert response.status_code == 422, (bad, response.text)
            assert any(rule in d["problem"] for d in response.json()["details"]), response.text
        if not isinstance(bad, str) or not bad or "/" in bad:
            continue  # no path can carry it to a GET at all
        for base in system.readers:
            for path in (inventory_path(bad, "1"), inventory_path("STL", bad), inventory_path(bad)):
                response = system.client.get(base + path)
                assert response.status_code == 422, (base, path, response.text)
    # The case: "  P  " was stored as "P". Now it is refused, and "P" stays unknown.
    location = f"P-{uuid.uuid4().hex[:6]}"
    response = system.client.post(
        f"{system.mutator}/inventory/adjustment",
        json={"locationId": f"  {location}  ", "sku": "1", "count": 1},
    )
    assert response.status_code == 422
    barrier = system.adjust(location, "barrier", 1)
    assert barrier["offset"] >= 0
    system.wait_all_agree(location, {"barrier": 1})
    for base in system.readers:
        assert system.client.get(base + inventory_path(location, "1")).status_code == 404


def test_counts_accept_json_integers_and_ascii_digit_strings_only(system: System) -> None:
    location = f"COUNTS-{uuid.uuid4().hex[:6]}"
    for count in ("\u0663", "\uff11\uff12", "\u00b2", "9" * 5_000, " 1", "1.0", 1.5, True):
        response = system.client.post(
            f"{system.mutator}/inventory/adjustment",
            json={"locationId": location, "sku": "x", "count": count},
        )
        assert response.status_code == 422, (count, response.text)
        assert response.json()["details"][0]["field"] == "count"
        assert "int()" not in response.text and "set_int_max_str_digits" not in response.text
    system.adjust(location, "x", "100")
    system.adjust(location, "x", "+5")
    system.reserve(location, "x", "10")
    system.adjust(location, "x", -3)
    system.wait_all_agree(location, {"x": 92})


def test_a_body_not_declared_json_is_415_and_never_written(system: System) -> None:
    location = f"CT-{uuid.uuid4().hex[:6]}"
    body = f'{{"locationId": "{location}", "sku": "x", "count": 1}}'.encode()
    for content_type in (None, "text/plain", "application/x-www-form-urlencoded", "text/xml"):
        headers = {} if content_type is None else {"Content-Type": content_type}
        response = system.client.post(
            f"{system.mutator}/inventory/adjustment", content=body, headers=headers
        )
        assert response.status_code == 415, (content_type, response.text)
        assert response.json()["error"] == "unsupported_media_type"
    system.adjust(location, "barrier", 1)
    system.wait_all_agree(location, {"barrier": 1})
    for base in system.readers:
        assert system.client.get(base + inventory_path(location, "x")).status_code == 404
