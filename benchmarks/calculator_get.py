"""GET throughput and latency of the calculator: local reads and forwarded reads.

    .venv/bin/python -m benchmarks.calculator_get [--seconds 10] [--concurrency 32] [--rounds 3]

Starts an embedded broker (or uses ``KAFKA_BOOTSTRAP_SERVERS``), two calculator
instances and a bare FastAPI app, all one uvicorn worker each, and drives each with
``wrk`` at the same concurrency:

* **bare FastAPI**: the baseline, a handler that only returns the JSON;
* **local**: instance 0 asked for a key it owns (one RocksDB read);
* **forwarded**: instance 0 asked for a key instance 1 owns (one extra HTTP hop).

The three take turns for ``--rounds`` rounds; each ratio is the median of the rounds'
ratios. The issue's targets: local >= 0.8 and forwarded >= 0.45 of bare FastAPI.
"""

from __future__ import annotations

import sys
import tempfile
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
from local_stack.process import free_port
from shared_schemas import encode_key, partition_for, value_serde
from shared_schemas.schemas import INVENTORY_MUTATION
from shared_schemas.topics import INVENTORY_ADJUSTMENTS, ensure_topics

PARTITIONS = 6


def _owned_partitions(url: str) -> set[int]:
    """The partitions the instance at ``url`` serves, by its own routing table."""
    metadata = httpx.get(url + "/metadata").json()
    me = next(i for i in metadata["instances"] if i["self"])
    return set(me["partitions"]) - set(me["restoring"])


def _sku_in(partitions: set[int]) -> str:
    return next(
        str(n)
        for n in range(1_000)
        if partition_for(encode_key("STL", str(n)), PARTITIONS) in partitions
    )


def main() -> None:
    """Start everything, measure the three, print the table and the ratios."""
    parser = load_arguments(__doc__.splitlines()[0])
    args = parser.parse_args()
    with ExitStack() as stack:
        bootstrap = infra.kafka(stack)
        ensure_topics(AdminClient({"bootstrap.servers": bootstrap}), PARTITIONS)
        state = stack.enter_context(tempfile.TemporaryDirectory())
        run = uuid.uuid4().hex[:6]
        urls = []
        for index in range(2):
            port = free_port()
            infra.python_module(
                stack,
                f"calculator-{index}",
                "sellable_calculator",
                KAFKA_BOOTSTRAP_SERVERS=bootstrap,
                TOPIC_PARTITIONS=str(PARTITIONS),
                CALCULATOR_PORT=str(port),
                CALCULATOR_GROUP_ID=f"bench-{run}",
                CALCULATOR_INSTANCE_ID=f"bench-{run}-{index}",
                CALCULATOR_STATE_DIR=state,
            )
            urls.append(f"http://127.0.0.1:{port}")
        # Ready, and the group has split the partitions between the two.
        deadline = time.monotonic() + 60
        while not all(
            httpx.get(u + "/health/ready").status_code == 200 and _owned_partitions(u) for u in urls
        ):
            if time.monotonic() > deadline:
                sys.exit("error: the calculators did not share the partitions within 60 s")
            time.sleep(0.2)
        local_sku = _sku_in(_owned_partitions(urls[0]))
        remote_sku = _sku_in(_owned_partitions(urls[1]))
        producer = Producer({"bootstrap.servers": bootstrap})
        serde = value_serde(INVENTORY_MUTATION, INVENTORY_ADJUSTMENTS.name)
        for sku in (local_sku, remote_sku):
            key = encode_key("STL", sku)
            value = serde.serialize(
                {
                    "mutation_id": str(uuid.uuid4()),
                    "count": 90,
                    "event_time": int(time.time() * 1e3),
                }
            )
            producer.produce(
                INVENTORY_ADJUSTMENTS.name, value, key, partition=partition_for(key, PARTITIONS)
            )
        producer.flush(10)
        del producer  # closed now, not after the broker has gone
        local_url = f"{urls[0]}/inventory/locations/STL/skus/{local_sku}"
        forwarded_url = f"{urls[0]}/inventory/locations/STL/skus/{remote_sku}"
        deadline = time.monotonic() + 30
        while not all(httpx.get(u).status_code == 200 for u in (local_url, forwarded_url)):
            if time.monotonic() > deadline:
                sys.exit("error: the calculators did not pick the keys up within 30 s")
            time.sleep(0.1)

        with bare_fastapi() as bare_url:
            baseline = Target(
                "bare FastAPI", f"{bare_url}/inventory/locations/STL/skus/{local_sku}"
            )
            local = Target("calculator, local", local_url)
            forwarded = Target("calculator, forwarded", forwarded_url)
            results = measure_in_rounds(
                [baseline, local, forwarded], args.rounds, args.seconds, args.concurrency
            )
    print_ratios(results, baseline, {local: 0.8, forwarded: 0.45})


if __name__ == "__main__":
    main()
