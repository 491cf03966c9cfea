"""Run the mutator: ``python -m inventory_mutator`` (port 9091 unless MUTATOR_PORT says otherwise).

SIGTERM/SIGINT: uvicorn stops accepting requests; the producer takes no new records and
waits at most ``MUTATOR_SHUTDOWN_TIMEOUT_SECONDS`` for Kafka to acknowledge the ones in
flight, then answers the requests still waiting (503, saying whether the event may have
been written), whatever the broker does; uvicorn finishes those responses, the lifespan
destroys the producer, and the process exits 0.
"""

from __future__ import annotations

import logging
import sys

from pydantic import ValidationError

from inventory_mutator.app import create_app
from inventory_mutator.settings import MutatorSettings
from shared_schemas.http import configure_logging, serve
from shared_schemas.settings import unknown_settings

log = logging.getLogger("inventory_mutator")


def main() -> int:
    """Serve until a signal stops the server."""
    try:
        settings = MutatorSettings()
    except ValidationError as exc:
        print(f"error: invalid settings: {exc}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level)
    for warning in unknown_settings(MutatorSettings):
        log.warning("%s", warning)
    log.info(
        "inventory_mutator listening on http://%s:%d (Kafka %s, %d partitions)",
        settings.mutator_host,
        settings.mutator_port,
        settings.kafka_bootstrap_servers,
        settings.topic_partitions,
    )
    serve(
        create_app(settings),
        settings.mutator_host,
        settings.mutator_port,
        settings.log_level,
        settings,
    )
    log.info("inventory_mutator stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
