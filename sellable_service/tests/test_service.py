"""The service against the real embedded broker and Cassandra."""

from __future__ import annotations

import dataclasses
import os
import signal
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from fastapi import FastAPI
from fastapi.testclient import TestClient

from local_stack.broker import EmbeddedBroker
from local_stack.cassandra import PROTOCOL_VERSION, CassandraEndpoint, EmbeddedCassandra
from local_stack.process import free_port
from local_stack.testing import inventory_path, odd_ids, wait_until
from sellable_service.app import create_app
from sellable_service.settings import ServiceSettings
from sellable_service.tests.support import PARTITIONS, Publisher, new_topic, results_topic_for
from sellable_service.writer import ResultUpsert, Upsert
from shared_schemas import encode_key, partition_for
from shared_schemas.reservations import CONFIRMED, FAILED, ReservationResult


def _settings(
    bootstrap: str, cassandra: CassandraEndpoint, topic: str, keyspace: str, **extra: Any
) -> ServiceSettings:
    return ServiceSettings(
        kafka_bootstrap_servers=bootstrap,
        cassandra_contact_points=",".join(cassandra.contact_points),
        cassandra_port=cassandra.port,
        cassandra_protocol_version=cassandra.protocol_version,
        cassandra_keyspace=keyspace,
        service_topic=topic,
        service_results_topic=results_topic_for(topic),
        service_consumer_group=f"group-{uuid.uuid4().hex[:8]}",
        topic_partitions=PARTITIONS,
        **extra,
    )


@pytest.fixture
def topic(kafka_bootstrap: str) -> str:
    return new_topic(kafka_bootstrap)


@pytest.fixture
def publisher(kafka_bootstrap: str, topic: str) -> Iterator[Publisher]:
    writer = Publisher(kafka_bootstrap, topic)
    yield writer
    writer.close()


@pytest.fixture
def keyspace() -> str:
    return f"test_{uuid.uuid4().hex[:10]}"


@pytest.fixture
def new_settings(
    kafka_bootstrap: str, cassandra_endpoint: CassandraEndpoint, topic: str, keyspace: str
) -> Callable[[], ServiceSettings]:
    """Settings for the shared Cassandra, this test's topic and keyspace; each call has a
    consumer group of its own."""
    return lambda: _settings(kafka_bootstrap, cassandra_endpoint, topic, keyspace)


def _count(client: TestClient, location: str, sku: str) -> int | None:
    response = client.get(f"/inventory/locations/{location}/skus/{sku}")
    return response.json()["count"] if response.status_code == 200 else None


def _ready(client: TestClient) -> bool:
    return client.get("/health/ready").status_code == 200


def _send(publisher: Publisher, location: str, skus: Iterable[int]) -> None:
    """sku-<i> gets the count i."""
    for i in skus:
        publisher.send(location, f"sku-{i}", i)
    publisher.flush()


def _all_there(client: TestClient, location: str, skus: Iterable[int]) -> bool:
    """Whether every sku-<i> has the count i (one listing of the location, paged)."""
    found: dict[str, int] = {}
    after: str | None = ""
    while after is not None:
        page = client.get(
            f"/inventory/locations/{location}/skus", params={"limit": 1000, "after": after}
        ).json()
        found.update((item["sku"], item["count"]) for item in page["skus"])
        after = page["next"]
    return all(found.get(f"sku-{i}") == i for i in skus)


def _sample_readiness(client: TestClient, seconds: float) -> list[tuple[float, bool]]:
    """(seconds since the call, ready) every 0.5 s for ``seconds``."""
    started = time.monotonic()
    samples = []
    while (elapsed := time.monotonic() - started) < seconds:
        samples.append((elapsed, _ready(client)))
        time.sleep(0.5)
    return samples


def _metric(client: TestClient, name: str) -> float:
    for line in client.get("/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return 0.0


def test_records_appear_in_cassandra_and_through_get(
    new_settings: Callable[[], ServiceSettings], keyspace: str, publisher: Publisher
) -> None:
    settings = new_settings()
    with TestClient(create_app(settings)) as client:
        publisher.send("STL", "123123", 90, on_hand=100)
        publisher.send("KC", "1", 5)
        publisher.flush()
        wait_until(lambda: _count(client, "STL", "123123") == 90)
        assert client.get("/inventory/locations/STL/skus/123123").json() == {
            "locationId": "STL",
            "sku": "123123",
            "count": 90,
        }
        row = (
            client.app.state.table.session()
            .execute(  # type: ignore[attr-defined]
                f"SELECT on_hand, reserved, source_offset FROM {keyspace}.sellable_inventory "
                "WHERE location = 'STL' AND sku = '123123'"
            )
            .one()
        )
        assert tuple(row) == (100, 10, 0)  # on_hand, reserved, source_offset
        missing = client.get("/inventory/locations/STL/skus/nope")
        assert (missing.status_code, missing.json()["error"]) == (404, "not_found")
        wait_until(lambda: client.get("/health/ready").status_code == 200)


def test_location_listing_pages(
    new_settings: Callable[[], ServiceSettings], publisher: Publisher
) -> None:
    settings = new_settings()
    expected = {f"sku-{i:02d}": i for i in range(25)}
    with TestClient(create_app(settings)) as client:
        for sku, count in expected.items():
            publisher.send("PAGED", sku, count)
        publisher.send("OTHER", "sku-00", 999)
        publisher.flush()
        wait_until(lambda: all(_count(client, "PAGED", s) == c for s, c in expected.items()))
        seen: list[dict[str, Any]] = []
        after = ""
        sizes = []
        while True:
            body = client.get(
                "/inventory/locations/PAGED/skus", params={"limit": 10, "after": after}
            ).json()
            sizes.append(len(body["skus"]))
            seen.extend(body["skus"])
            if body["next"] is None:
                break
            after = body["next"]
        assert sizes == [10, 10, 5]
        assert [item["sku"] for item in seen] == sorted(expected)
        assert {item["sku"]: item["count"] for item in seen} == expected
        exact = client.get("/inventory/locations/PAGED/skus", params={"limit": 25}).json()
        assert (len(exact["skus"]), exact["next"]) == (25, None)
        bad = client.get("/inventory/locations/PAGED/skus", params={"limit": 0})
        assert (bad.status_code, bad.json()["details"][0]["field"]) == (422, "limit")


def _decision(
    location: str, sku: str, count: int, available: int, reservation_offset: int
) -> ReservationResult:
    """A decision as the calculator takes it (shared_schemas.reservations.decide's rule)."""
    status = CONFIRMED if count <= available else FAILED
    reason = "" if status == CONFIRMED else f"{count} unit(s) asked for, {available} sellable"
    mutation_id, event_time = str(uuid.uuid4()), 1_700_000_000_000 + reservation_offset
    return ReservationResult(
        mutation_id, location, sku, count, status, available, reason, reservation_offset, event_time
    )


def _reservation(client: TestClient, mutation_id: str) -> httpx.Response:
    return client.get(f"/inventory/reservations/{mutation_id}")


def test_reservation_results_are_stored_by_mutation_id_and_read_back(
    new_settings: Callable[[], ServiceSettings], keyspace: str, publisher: Publisher
) -> None:
    """Results of one key and of another, through the same consumer as the sellable
    values; a duplicate changes nothing, an unknown id is 404, a bad one 422."""
    confirmed = _decision("STL", "123123", 3, 10, 40)
    failed = _decision("STL", "123123", 20, 7, 41)
    elsewhere = _decision("Zürich City", "a b", -2, 0, 7)  # a release: always confirmed
    for result in (confirmed, failed, elsewhere):
        publisher.send_result(result)
    stl = encode_key("STL", "123123")
    publisher.raw(stl, b"not avro", partition_for(stl, PARTITIONS), publisher.results_topic)
    publisher.send("STL", "123123", 7, on_hand=10)
    publisher.flush()
    with TestClient(create_app(new_settings())) as client:
        ids = [r.mutation_id for r in (confirmed, failed, elsewhere)]
        wait_until(lambda: all(_reservation(client, i).status_code == 200 for i in ids))
        for result in (confirmed, failed, elsewhere):
            assert _reservation(client, result.mutation_id).json() == result.answer()
        assert _count(client, "STL", "123123") == 7
        assert _metric(client, "service_reservation_results_written_total") == 3
        assert _metric(client, "service_undecodable_records_total") == 1

        def source_offset(mutation_id: str) -> int:
            table = client.app.state.table  # type: ignore[attr-defined]
            row = (
                table.session()
                .execute(
                    f"SELECT source_offset FROM {keyspace}.reservation_results "
                    "WHERE mutation_id = %s",
                    (mutation_id,),
                )
                .one()
            )
            return int(row[0])

        first = source_offset(confirmed.mutation_id)
        # A duplicate (a decision published again, as after a calculator failover) is
        # written again, in a batch of its own, and changes nothing but its position.
        publisher.send_result(confirmed)
        publisher.flush()
        wait_until(lambda: source_offset(confirmed.mutation_id) > first)
        assert _metric(client, "service_reservation_results_written_total") == 4
        assert _reservation(client, confirmed.mutation_id).json() == confirmed.answer()
        # An older record of the id, written after the newer one (a reordered replay),
        # loses whole: USING TIMESTAMP its offset in the results topic.
        stale = dataclasses.replace(confirmed, status=FAILED, reason="old")
        writer = client.app.state.writer  # type: ignore[attr-defined]
        writer.write([], [ResultUpsert(stale, partition_for(stl, PARTITIONS), first)])
        assert _reservation(client, confirmed.mutation_id).json() == confirmed.answer()

        unknown = _reservation(client, str(uuid.uuid4()))
        assert (unknown.status_code, unknown.json()["error"]) == (404, "not_found")
        bad = _reservation(client, confirmed.mutation_id.upper())
        assert (bad.status_code, bad.json()["details"][0]["field"]) == (422, "mutationId")


@contextmanager
def _served(app: FastAPI) -> Iterator[httpx.Client]:
    """``app`` served by uvicorn on a free port in a thread, and a client for it."""
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, access_log=False)
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        wait_until(lambda: server.started)
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
            yield client
    finally:
        server.should_exit = True
        thread.join(30)


def test_odd_keys_read_back_one_at_a_time_and_by_location(
    new_settings: Callable[[], ServiceSettings], publisher: Publisher
) -> None:
    run = uuid.uuid4().hex[:6]
    ids = odd_ids(run)
    # Over a real socket: Starlette's TestClient decodes the path twice ("a%2520b" arrives
    # as "a b"), which is the very defect this test must be able to see.
    with _served(create_app(new_settings())) as client:
        for n, odd in enumerate(ids):
            publisher.send(odd, "sku", n)
            publisher.send(f"odd-skus {run}", odd, n)
        publisher.flush()
        for n, odd in enumerate(ids):
            wait_until(lambda o=odd: client.get(inventory_path(o, "sku")).status_code == 200)
            assert client.get(inventory_path(odd, "sku")).json() == {
                "locationId": odd,
                "sku": "sku",
                "count": n,
            }
            listing = client.get(inventory_path(odd)).json()
            assert listing["skus"] == [{"locationId": odd, "sku": "sku", "count": n}], odd
            wait_until(
                lambda o=odd: client.get(inventory_path(f"odd-skus {run}", o)).status_code == 200
            )
            answer = client.get(inventory_path(f"odd-skus {run}", odd)).json()
            assert answer == {"locationId": f"odd-skus {run}", "sku": odd, "count": n}


def test_ids_the_mutator_refuses_are_422_never_500(
    new_settings: Callable[[], ServiceSettings], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before Cassandra sees them: a 65,536-byte location is over its key limit (it was a 500)."""
    # The test client refuses URLs over 64 KiB; the app itself must still answer them.
    monkeypatch.setattr("httpx2._urlparse.MAX_URL_LENGTH", 1_000_000)
    with TestClient(create_app(new_settings())) as client:
        client.app.state.table.wait_connected(30)  # type: ignore[attr-defined]
        for bad in ["L" * 65_536, "L" * 257, "  P  ", ".", "..", "a\r\nb", "a\x00b"]:
            for path in (inventory_path(bad, "1"), inventory_path("STL", bad), inventory_path(bad)):
                response = client.get(path)
                assert response.status_code == 422, (path[:60], response.text[:200])
                assert response.json()["details"][0]["field"] in ("location", "sku")


def test_replayed_and_reordered_records_do_not_regress(
    new_settings: Callable[[], ServiceSettings], publisher: Publisher
) -> None:
    settings = new_settings()
    for count in (10, 20, 30):
        publisher.send("REPLAY", "a", count)
    publisher.flush()
    with TestClient(create_app(settings)) as client:
        wait_until(lambda: _count(client, "REPLAY", "a") == 30)
        # An older record arriving after a newer one (as after a rebalance) loses.
        writer = client.app.state.writer  # type: ignore[attr-defined]
        writer.write(
            [
                Upsert(
                    "REPLAY", "a", {"count": 1, "on_hand": 1, "reserved": 0, "updated_at": 0}, 0, 1
                )
            ]
        )
        assert _count(client, "REPLAY", "a") == 30
    # A whole replay of the topic by a fresh consumer group into the same table.
    replay = new_settings()
    with TestClient(create_app(replay)) as client:
        wait_until(lambda: _metric(client, "service_rows_written_total") >= 1)
        assert _count(client, "REPLAY", "a") == 30
        publisher.send("REPLAY", "a", 40)
        publisher.flush()
        wait_until(lambda: _count(client, "REPLAY", "a") == 40)


def test_undecodable_records_are_skipped_and_counted(
    new_settings: Callable[[], ServiceSettings], publisher: Publisher
) -> None:
    settings = new_settings()
    key = encode_key("BAD", "x")
    partition = partition_for(key, PARTITIONS)
    publisher.raw(key, b"not avro", partition)
    publisher.raw(b"\xff\xff", b"x", partition)
    publisher.raw(None, b"x", partition)
    publisher.send("BAD", "x", 7)
    publisher.flush()
    with TestClient(create_app(settings)) as client:
        wait_until(lambda: _count(client, "BAD", "x") == 7)
        assert _metric(client, "service_undecodable_records_total") == 3


@contextmanager
def _own_cassandra(
    tmp_path: Path, kafka_bootstrap: str, topic: str, keyspace: str
) -> Iterator[tuple[EmbeddedCassandra, ServiceSettings]]:
    """A Cassandra of the test's own (to stop or kill), and service settings pointing at it."""
    cassandra = EmbeddedCassandra(
        port=free_port(), data_dir=tmp_path / "data", fresh=True, log_dir=tmp_path
    )
    cassandra.start()
    try:
        endpoint = CassandraEndpoint(cassandra.contact_points, cassandra.port, PROTOCOL_VERSION)
        yield (
            cassandra,
            _settings(
                kafka_bootstrap, endpoint, topic, keyspace, cassandra_request_timeout_seconds=1.0
            ),
        )
    finally:
        cassandra.stop()


def test_cassandra_down_and_back_mid_stream(
    kafka_bootstrap: str, topic: str, keyspace: str, publisher: Publisher, tmp_path: Path
) -> None:
    with (
        _own_cassandra(tmp_path, kafka_bootstrap, topic, keyspace) as (cassandra, settings),
        TestClient(create_app(settings)) as client,
    ):
        for i in range(50):
            publisher.send("DOWN", f"sku-{i}", i)
        publisher.flush()
        wait_until(lambda: _count(client, "DOWN", "sku-49") == 49, timeout=60)

        cassandra.stop()
        started = time.monotonic()
        response = client.get("/inventory/locations/DOWN/skus/sku-1")
        assert response.status_code == 503
        assert response.json()["error"] == "cassandra_unavailable"
        assert time.monotonic() - started < 5
        for i in range(50, 120):  # written while Cassandra is away
            publisher.send("DOWN", f"sku-{i}", i)
        publisher.flush()
        wait_until(lambda: _metric(client, "service_write_failures_total") >= 1, timeout=30)

        cassandra.start()
        wait_until(
            lambda: all(_count(client, "DOWN", f"sku-{i}") == i for i in range(120)),
            timeout=90,
        )


def test_service_starts_while_cassandra_is_down_and_answers_503(
    kafka_bootstrap: str, topic: str, keyspace: str
) -> None:
    nowhere = CassandraEndpoint(["127.0.0.1"], free_port(), PROTOCOL_VERSION)
    settings = _settings(kafka_bootstrap, nowhere, topic, keyspace)
    with TestClient(create_app(settings)) as client:
        response = client.get("/inventory/locations/STL/skus/1")
        assert (response.status_code, response.json()["error"]) == (503, "cassandra_unavailable")
        result = client.get(f"/inventory/reservations/{uuid.uuid4()}")
        assert (result.status_code, result.json()["error"]) == (503, "cassandra_unavailable")
        assert result.headers["Retry-After"] == "1"
        assert client.get("/health/ready").status_code == 503
        assert client.get("/health/live").status_code == 200


def test_cassandra_killed_for_15_s_then_restarted(
    kafka_bootstrap: str, topic: str, keyspace: str, publisher: Publisher, tmp_path: Path
) -> None:
    """kill -9 of Cassandra for longer than max.poll.interval.ms, restart on the same data.

    Records from before, during and after the outage all reach the table (the ones from
    before survive the kill: the embedded node syncs its commit log before it answers),
    and readiness is false during the outage and true after it. The writer used to stop
    for good: its retry loop stopped polling, the group evicted it, and the commit after
    Cassandra came back failed with UNKNOWN_MEMBER_ID, while readiness stayed 200.
    """
    with (
        _own_cassandra(tmp_path, kafka_bootstrap, topic, keyspace) as (cassandra, settings),
        TestClient(create_app(settings)) as client,
    ):
        _send(publisher, "KILLED", range(40))
        wait_until(lambda: _all_there(client, "KILLED", range(40)), timeout=40)
        wait_until(lambda: _ready(client))

        assert cassandra.process is not None
        cassandra.process.kill()  # SIGKILL to the JVM's process group
        _send(publisher, "KILLED", range(40, 80))
        during = _sample_readiness(client, 15)  # > SERVICE_MAX_POLL_INTERVAL_MS
        cassandra.start()
        _send(publisher, "KILLED", range(80, 120))

        wait_until(lambda: _all_there(client, "KILLED", range(120)), timeout=60)
        wait_until(lambda: _ready(client), timeout=20)
        # The driver notices the closed connections at once; allow it a second.
        assert [ready for at, ready in during if at > 1] == [False] * len(
            [at for at, _ in during if at > 1]
        ), during
        _send(publisher, "KILLED", [120])  # and it keeps going
        wait_until(lambda: _count(client, "KILLED", "sku-120") == 120)


def test_broker_frozen_then_resumed(
    cassandra_endpoint: CassandraEndpoint, keyspace: str, tmp_path: Path
) -> None:
    """SIGSTOP of the broker for longer than the session timeout and max.poll.interval.ms.

    A broker of its own, so freezing it leaves the other tests' broker alone. Records
    flow until the moment of the freeze (so the writer is mid-batch or mid-commit then).
    Readiness turns false once the group session has timed out, the writer rejoins after
    SIGCONT, and every record, from before and after, reaches the table. The writer used
    to die (a commit of nothing after _MAX_POLL_EXCEEDED) while readiness stayed 200.
    """
    broker = EmbeddedBroker(port=free_port(), log_dir=tmp_path)
    broker.start()
    assert broker.process.pid is not None
    group = broker.process.pid  # its own process group (ManagedProcess)
    publisher = Publisher(broker.bootstrap_servers, new_topic(broker.bootstrap_servers))
    try:
        settings = _settings(
            broker.bootstrap_servers, cassandra_endpoint, publisher.topic, keyspace
        )
        with TestClient(create_app(settings)) as client:
            _send(publisher, "FROZEN", range(40))
            wait_until(lambda: _all_there(client, "FROZEN", range(40)), timeout=40)
            wait_until(lambda: _ready(client))

            sent = 40
            streaming_until = time.monotonic() + 1.0
            while time.monotonic() < streaming_until:  # a steady stream, then the freeze
                _send(publisher, "FROZEN", [sent])
                sent += 1
                time.sleep(0.01)
            os.killpg(group, signal.SIGSTOP)
            try:
                during = _sample_readiness(client, 14)  # session 6 s, max poll 10 s
            finally:
                os.killpg(group, signal.SIGCONT)
            wait_until(lambda: _ready(client), timeout=40)
            _send(publisher, "FROZEN", range(sent, sent + 40))
            wait_until(lambda: _all_there(client, "FROZEN", range(sent + 40)), timeout=30)
            # False from the session timeout (6 s, counted from the last heartbeat) on;
            # slack for librdkafka's once-a-second check on a loaded machine.
            late = [ready for at, ready in during if at > 9]
            assert late == [False] * len(late), during
            assert _ready(client)
    finally:
        os.killpg(group, signal.SIGCONT)
        publisher.close()
        broker.stop()


def test_writer_restarts_itself_after_an_unexpected_error(
    new_settings: Callable[[], ServiceSettings], publisher: Publisher
) -> None:
    """A bug-shaped error inside the loop costs a new consumer, not the writer.

    The one injected fault of these tests: nothing real raises an unexpected error on
    demand. The record the failed batch held is read again from the committed offset.
    """
    settings = new_settings().model_copy(update={"service_max_poll_interval_ms": 3_000})
    app = create_app(settings)
    writer = app.state.writer
    real_write = writer.write
    calls: list[int] = []

    def fails_once(upserts: list[Upsert], results: Sequence[ResultUpsert] = ()) -> None:
        calls.append(len(upserts))
        if len(calls) == 1:
            raise RuntimeError("injected")
        real_write(upserts, results)

    writer.write = fails_once
    with TestClient(app) as client:
        _send(publisher, "RESTART", range(5))
        wait_until(lambda: _all_there(client, "RESTART", range(5)), timeout=40)
        wait_until(lambda: _ready(client))
        assert _metric(client, "service_writer_restarts_total") == 1
        _send(publisher, "RESTART", [5])
        wait_until(lambda: _count(client, "RESTART", "sku-5") == 5)
