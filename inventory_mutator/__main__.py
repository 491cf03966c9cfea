"""Run the mutator: ``python -m inventory_mutator`` (port 9091 unless MUTATOR_PORT says otherwise).

SIGTERM/SIGINT: uvicorn stops accepting requests; the producer takes no new records and
waits at most ``MUTATOR_SHUTDOWN_TIMEOUT_SECONDS`` for Kafka to acknowledge the ones in
flight, then answers the requests still waiting (503, saying whether the event may have
been written), whatever the broker does; uvicorn finishes those responses, the lifespan
destroys the producer, and the process exits 0.
"""

from __future__ import annotations

import sys

from inventory_mutator.app import create_app
from inventory_mutator.settings import MutatorSettings
from service_runtime.server import load_settings, run_service


def main() -> int:
    """Serve until a signal stops the server; the exit status (2: invalid settings)."""
    settings = load_settings(MutatorSettings)
    if settings is None:
        return 2
    return run_service(
        settings,
        create_app,
        lambda s: (s.mutator_host, s.mutator_port),
        lambda s: f"Kafka {s.kafka_bootstrap_servers}, {s.topic_partitions} partitions",
    )


if __name__ == "__main__":
    sys.exit(main())
