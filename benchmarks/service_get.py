"""GET throughput of the Cassandra-backed service, next to bare FastAPI and raw driver reads.

    .venv/bin/python -m benchmarks.service_get [--seconds 10] [--rounds 3] [--warmup 15]

Starts an embedded broker and Cassandra (or uses ``KAFKA_BOOTSTRAP_SERVERS`` /
``CASSANDRA_CONTACT_POINTS``), the service with one uvicorn worker and a bare FastAPI
app, writes one key, then measures in the same run:

* **bare FastAPI**: a handler that only returns the JSON (wrk);
* **service**: ``GET /inventory/locations/STL/skus/123123`` (wrk);
* **raw driver**: the same prepared SELECT with ``execute_async``, 32 in flight, from
  one Python process: what Cassandra itself delivers to a Python client here.

The service and the baseline take turns for ``--rounds`` rounds; the ratio is the median
of the rounds' ratios. The issue's target: service >= 0.6 of bare FastAPI.
"""

from __future__ import annotations

import statistics
import threading
import time
import uuid
from contextlib import ExitStack

import httpx
from cassandra.cluster import EXEC_PROFILE_DEFAULT, Cluster, ExecutionProfile
from cassandra.policies import RoundRobinPolicy
from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient

from benchmarks import infra
from benchmarks.load import (
    Target,
    bare_fastapi,
    load_arguments,
    measure_in_rounds,
    print_ratios,
)
from local_stack.cassandra import CassandraEndpoint
from local_stack.process import free_port
from shared_schemas import encode_key, partition_for, value_serde
from shared_schemas.schemas import SELLABLE_INVENTORY
from shared_schemas.topics import SELLABLE_INVENTORY as TOPIC
from shared_schemas.topics import ensure_topics


def raw_driver_reads(
    endpoint: CassandraEndpoint, keyspace: str, seconds: float
) -> tuple[float, float]:
    """Reads/s of the prepared single-row SELECT with 32 requests in flight, and the
    microseconds of this process's CPU (all threads) each read cost."""
    profile = ExecutionProfile(load_balancing_policy=RoundRobinPolicy())
    version = endpoint.protocol_version
    extra = {"protocol_version": version} if version else {}
    cluster = Cluster(
        endpoint.contact_points,
        port=endpoint.port,
        execution_profiles={EXEC_PROFILE_DEFAULT: profile},
        **extra,
    )
    session = cluster.connect()
    select = session.prepare(
        f"SELECT count FROM {keyspace}.sellable_inventory WHERE location = ? AND sku = ?"
    )
    done = 0
    finished = threading.Event()
    deadline = time.monotonic() + seconds
    lock = threading.Lock()
    in_flight = 32

    def fire() -> None:
        future = session.execute_async(select, ("STL", "123123"))
        future.add_callbacks(on_done, on_error)

    def on_done(_rows: object) -> None:
        nonlocal done, in_flight
        with lock:
            done += 1
        if time.monotonic() < deadline:
            fire()
        else:
            with lock:
                in_flight -= 1
                if in_flight == 0:
                    finished.set()

    def on_error(exc: BaseException) -> None:
        on_done(None)

    started, cpu_started = time.monotonic(), time.process_time()
    for _ in range(32):
        fire()
    finished.wait(seconds + 30)
    elapsed, cpu = time.monotonic() - started, time.process_time() - cpu_started
    cluster.shutdown()
    return done / elapsed, cpu / done * 1e6


def main() -> None:
    """Start everything, measure the three, print the table and the ratio."""
    parser = load_arguments(__doc__.splitlines()[0])
    parser.add_argument("--warmup", type=float, default=15.0, help="warm-up seconds per server")
    args = parser.parse_args()
    keyspace = f"bench_{uuid.uuid4().hex[:8]}"
    with ExitStack() as stack:
        bootstrap = infra.kafka(stack)
        endpoint = infra.cassandra(stack)
        ensure_topics(AdminClient({"bootstrap.servers": bootstrap}), 6)
        producer = Producer({"bootstrap.servers": bootstrap})
        key = encode_key("STL", "123123")
        producer.produce(
            TOPIC.name,
            value_serde(SELLABLE_INVENTORY, TOPIC.name).serialize(
                {"count": 90, "on_hand": 100, "reserved": 10, "updated_at": 0}
            ),
            key,
            partition=partition_for(key, 6),
        )
        producer.flush(10)
        port = free_port()
        service = infra.sellable_service(
            stack,
            bootstrap,
            endpoint,
            port,
            CASSANDRA_KEYSPACE=keyspace,
            SERVICE_CONSUMER_GROUP=f"bench-{keyspace}",
        )
        url = f"http://127.0.0.1:{port}/inventory/locations/STL/skus/123123"
        service.wait_ready(lambda: httpx.get(url).status_code == 200, 90)

        with bare_fastapi() as bare_url:
            baseline = Target("bare FastAPI", bare_url + "/inventory/locations/STL/skus/123123")
            measured = Target("service GET (Cassandra)", url)
            # A longer warm-up than the default: the embedded Cassandra has only just started,
            # and its JIT needs several thousand reads before it serves at full speed.
            results = measure_in_rounds(
                [baseline, measured],
                args.rounds,
                args.seconds,
                args.concurrency,
                warmup_seconds=args.warmup,
            )
        raw, raw_cpu_us = raw_driver_reads(endpoint, keyspace, args.seconds)
    print_ratios(results, baseline, {measured: 0.6})
    service_rate = statistics.median(r.requests_per_second for r in results[measured])
    bare_rate = statistics.median(r.requests_per_second for r in results[baseline])
    print(
        f"raw driver execute_async, 32 in flight, one process: {raw:,.0f} reads/s, "
        f"{raw_cpu_us:,.0f} µs of its CPU per read; service/raw driver: {service_rate / raw:.2f}"
    )
    # A GET is one bare request plus one driver read in the same interpreter: if the two
    # costs simply add up, this is as fast as the service can be here.
    ceiling = 1 / (1 / bare_rate + 1 / raw)
    print(
        f"ceiling for HTTP + driver in one interpreter, 1/(1/bare + 1/raw): {ceiling:,.0f} "
        f"req/s = {ceiling / bare_rate:.2f} of bare; the service reaches "
        f"{service_rate / ceiling:.2f} of it"
    )


if __name__ == "__main__":
    main()
