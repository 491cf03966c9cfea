"""``SERVICE_WORKERS=2``: two API processes and one writer process, as a real process
tree against the real broker and Cassandra."""

from __future__ import annotations

import os
import re
import signal
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from local_stack.cassandra import CassandraEndpoint
from local_stack.process import ManagedProcess, free_port
from local_stack.testing import inventory_path, wait_until
from sellable_service.tests.support import PARTITIONS, Publisher, new_topic, results_topic_for
from shared_schemas.reservations import CONFIRMED, ReservationResult


@pytest.fixture
def service(
    kafka_bootstrap: str, cassandra_endpoint: CassandraEndpoint, tmp_path: Path
) -> Iterator[tuple[ManagedProcess, str, Publisher]]:
    """The service with two API workers on its own topic and keyspace, and a publisher."""
    topic = new_topic(kafka_bootstrap)
    port = free_port()
    env = {
        **os.environ,
        "SERVICE_WORKERS": "2",
        "SERVICE_PORT": str(port),
        "KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap,
        "CASSANDRA_CONTACT_POINTS": ",".join(cassandra_endpoint.contact_points),
        "CASSANDRA_PORT": str(cassandra_endpoint.port),
        "CASSANDRA_KEYSPACE": f"test_{uuid.uuid4().hex[:10]}",
        "SERVICE_TOPIC": topic,
        "SERVICE_RESULTS_TOPIC": results_topic_for(topic),
        "SERVICE_CONSUMER_GROUP": f"group-{uuid.uuid4().hex[:8]}",
        "TOPIC_PARTITIONS": str(PARTITIONS),
    }
    if cassandra_endpoint.protocol_version is not None:
        env["CASSANDRA_PROTOCOL_VERSION"] = str(cassandra_endpoint.protocol_version)
    process = ManagedProcess(
        "service-workers", [sys.executable, "-m", "sellable_service"], env=env, log_dir=tmp_path
    )
    url = f"http://127.0.0.1:{port}"
    publisher = Publisher(kafka_bootstrap, topic)
    with process:
        process.start()
        process.wait_ready(lambda: httpx.get(url + "/health/ready").status_code == 200, 90)
        yield process, url, publisher
    publisher.close()


def _readiness(url: str) -> httpx.Response:
    # A new connection each time, so that either worker may answer.
    return httpx.get(url + "/health/ready", timeout=5)


def _count(url: str, location: str, sku: str) -> int | None:
    response = httpx.get(url + inventory_path(location, sku), timeout=5)
    return response.json()["count"] if response.status_code == 200 else None


def _metric(url: str, name: str) -> float:
    text = httpx.get(url + "/metrics", timeout=5).text
    match = re.search(rf"^{name} (\S+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def test_two_api_workers_serve_what_one_writer_writes(
    service: tuple[ManagedProcess, str, Publisher],
) -> None:
    process, url, publisher = service
    for sku in range(50):
        publisher.send("W", f"s{sku}", sku)
    result = ReservationResult(str(uuid.uuid4()), "W", "s1", 1, CONFIRMED, 1, "", 0, 1_000)
    publisher.send_result(result)
    publisher.flush()
    wait_until(lambda: all(_count(url, "W", f"s{sku}") == sku for sku in range(50)))
    reservation = f"{url}/inventory/reservations/{result.mutation_id}"
    wait_until(lambda: httpx.get(reservation, timeout=5).status_code == 200)
    assert httpx.get(reservation, timeout=5).json() == result.answer()

    api_processes: set[int] = set()

    def both_workers_answered() -> bool:
        api_processes.add(_readiness(url).json()["apiProcess"])
        return len(api_processes) == 2

    wait_until(both_workers_answered)
    facts = _readiness(url).json()
    assert facts["ready"] is True and facts["writer"] == "writing", facts
    assert facts["writerProcess"] not in api_processes
    assert {process.pid, facts["writerProcess"]}.isdisjoint(api_processes)
    # /metrics adds up the processes: the rows were written by the writer process, and
    # every API worker shows them.
    assert all(_metric(url, "service_rows_written_total") == 50 for _ in range(6))
    assert _metric(url, "service_reservation_results_written_total") == 1


def test_a_killed_writer_process_is_replaced_and_readiness_says_so_meanwhile(
    service: tuple[ManagedProcess, str, Publisher],
) -> None:
    process, url, publisher = service
    writer = _readiness(url).json()["writerProcess"]
    os.kill(writer, signal.SIGKILL)
    wait_until(lambda: _readiness(url).status_code == 503, timeout=15)
    assert "writer" in _readiness(url).json()
    wait_until(lambda: _readiness(url).status_code == 200, timeout=60)
    assert _readiness(url).json()["writerProcess"] != writer
    publisher.send("K", "after", 7)
    publisher.flush()
    wait_until(lambda: _count(url, "K", "after") == 7)
    assert process.is_running()


def test_sigterm_stops_every_process_and_exits_0(
    service: tuple[ManagedProcess, str, Publisher],
) -> None:
    process, url, _ = service
    writer = _readiness(url).json()["writerProcess"]
    assert process.pid is not None
    os.kill(process.pid, signal.SIGTERM)
    assert process.wait(60) == 0
    with pytest.raises(ProcessLookupError):
        os.kill(writer, 0)
