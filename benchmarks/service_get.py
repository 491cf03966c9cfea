"""GET throughput of the Cassandra-backed service, next to bare FastAPI and raw driver reads.

    .venv/bin/python -m benchmarks.service_get [--seconds 10] [--rounds 3] [--warmup 15]

Starts an embedded broker and Cassandra (or uses ``KAFKA_BOOTSTRAP_SERVERS`` /
``CASSANDRA_CONTACT_POINTS``), the service with one process, the service with
``SERVICE_WORKERS=2`` and a bare FastAPI app (all on httptools + uvloop), writes one
key, then measures in the same run:

* **bare FastAPI**: a handler that only returns the JSON (wrk);
* **service**: ``GET /inventory/locations/STL/skus/123123`` (wrk), one process and two
  API workers;
* **raw driver**: the same prepared SELECT with ``execute_async``, 32 in flight, from
  one Python process: what Cassandra itself delivers to a Python client here.

The servers and the raw driver take turns for ``--rounds`` rounds; each ratio is the
median of the rounds' ratios. The ceiling, 1/(1/bare + 1/raw) from each round's figures,
is what one interpreter doing a bare request and a driver read could reach; the target:
the one-process service >= 0.95 of it.
"""

from __future__ import annotations

import os
import statistics
import threading
import time
import uuid
from contextlib import ExitStack

import httpx
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
    stack = ExitStack()
    session = infra.cassandra_session(stack, endpoint)
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
    stack.close()
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
        # The same service on two API worker processes (and its own writer process).
        workers_port = free_port()
        workers = infra.sellable_service(
            stack,
            bootstrap,
            endpoint,
            workers_port,
            CASSANDRA_KEYSPACE=keyspace,
            SERVICE_CONSUMER_GROUP=f"bench-{keyspace}-workers",
            SERVICE_WORKERS="2",
        )
        workers_url = f"http://127.0.0.1:{workers_port}/inventory/locations/STL/skus/123123"
        workers.wait_ready(lambda: httpx.get(workers_url).status_code == 200, 90)

        with bare_fastapi() as bare_url:
            baseline = Target("bare FastAPI", bare_url + "/inventory/locations/STL/skus/123123")
            measured = Target("service GET (Cassandra)", url)
            two_workers = Target("service GET, 2 workers", workers_url)
            # A longer warm-up than the default: the embedded Cassandra has only just started,
            # and its JIT needs several thousand reads before it serves at full speed.
            raw: list[tuple[float, float]] = []

            def raw_round(round_number: int) -> None:
                raw.append(raw_driver_reads(endpoint, keyspace, args.seconds))
                print(
                    f"{'raw driver reads #' + str(round_number):<34}{raw[-1][0]:>10,.0f}"
                    f"   ({raw[-1][1]:,.0f} µs of its CPU per read)",
                    flush=True,
                )

            results = measure_in_rounds(
                [baseline, measured, two_workers],
                args.rounds,
                args.seconds,
                args.concurrency,
                warmup_seconds=args.warmup,
                after_each_round=raw_round,
            )
    print_ratios(results, baseline, {measured: None, two_workers: None})
    service_rate = statistics.median(r.requests_per_second for r in results[measured])
    workers_rate = statistics.median(r.requests_per_second for r in results[two_workers])
    raw_rate = statistics.median(rate for rate, _ in raw)
    print(
        f"raw driver execute_async, 32 in flight, one process: median {raw_rate:,.0f} "
        f"reads/s, {statistics.median(cpu for _, cpu in raw):,.0f} µs of its CPU per read"
    )
    # A GET is one bare request plus one driver read in the same interpreter: if the two
    # costs simply add up, this is as fast as the service can be here. Per round, from
    # that round's bare and raw figures, like every other ratio.
    ceilings = [
        1 / (1 / bare.requests_per_second + 1 / rate)
        for bare, (rate, _) in zip(results[baseline], raw, strict=True)
    ]
    reached = [
        mine.requests_per_second / ceiling
        for mine, ceiling in zip(results[measured], ceilings, strict=True)
    ]
    median = statistics.median(reached)
    print(
        f"ceiling for HTTP + driver in one interpreter, 1/(1/bare + 1/raw): median "
        f"{statistics.median(ceilings):,.0f} req/s; the service (one process) reaches median "
        f"{median:.2f} of it (rounds: {' '.join(f'{r:.2f}' for r in reached)}); "
        f"target >= 0.95: {'met' if median >= 0.95 else 'NOT met'}"
    )
    print(
        f"2 API workers: {workers_rate:,.0f} req/s = {workers_rate / service_rate:.2f}x one "
        f"process ({workers_rate / 2:,.0f} req/s per worker; the machine has "
        f"{os.cpu_count()} cores, shared with wrk and Cassandra)"
    )


if __name__ == "__main__":
    main()
