"""Single-request POST throughput and latency of the mutator, next to bare FastAPI.

    .venv/bin/python -m benchmarks.mutator_post [--seconds 10] [--concurrency 32] [--rounds 3]

Starts an embedded broker (or uses ``KAFKA_BOOTSTRAP_SERVERS``), the mutator with one
uvicorn worker, and a bare FastAPI app whose POST only parses the JSON and answers. Both
get the same ``wrk`` load: one adjustment per request, each waiting for the broker's
acknowledgement (``acks=all``, idempotent producer). The two take turns for ``--rounds``
rounds; the ratio is the median of the rounds' ratios. The issue's target: >= 0.7 of bare.
"""

from __future__ import annotations

from contextlib import ExitStack

import httpx
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
from shared_schemas.topics import ensure_topics

BODY = '{"locationId":"STL","sku":"123123","count":"1"}'


def main() -> None:
    """Start the broker, the mutator and the baseline; load each; print the comparison."""
    parser = load_arguments(__doc__.splitlines()[0])
    args = parser.parse_args()
    with ExitStack() as stack:
        bootstrap = infra.kafka(stack)
        ensure_topics(AdminClient({"bootstrap.servers": bootstrap}), 6)
        port = free_port()
        mutator = infra.python_module(
            stack,
            "mutator",
            "inventory_mutator",
            KAFKA_BOOTSTRAP_SERVERS=bootstrap,
            MUTATOR_PORT=str(port),
        )
        url = f"http://127.0.0.1:{port}"
        mutator.wait_ready(lambda: httpx.get(url + "/health/ready").status_code == 200, 60)
        with bare_fastapi() as bare_url:
            baseline = Target("bare FastAPI POST", bare_url + "/inventory/adjustment", "POST", BODY)
            measured = Target("mutator POST", url + "/inventory/adjustment", "POST", BODY)
            results = measure_in_rounds(
                [baseline, measured], args.rounds, args.seconds, args.concurrency
            )
    print_ratios(results, baseline, {measured: 0.7})


if __name__ == "__main__":
    main()
