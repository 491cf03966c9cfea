"""Run the service: ``python -m sellable_service`` (port 9093 unless SERVICE_PORT says otherwise).

One process serves the GETs and runs the writer that consumes ``sellable_inventory`` into
Cassandra. SIGTERM/SIGINT: uvicorn finishes the requests in flight, then the writer
finishes the write in hand, the consumer commits the offsets of what was written and
leaves its group, and the Cassandra session closes; the process exits 0.
"""

from __future__ import annotations

import logging
import sys

from pydantic import ValidationError

from sellable_service.app import create_app
from sellable_service.settings import ServiceSettings
from shared_schemas.http import configure_logging, serve
from shared_schemas.settings import unknown_settings

log = logging.getLogger("sellable_service")


def main() -> int:
    """Serve until a signal stops the server."""
    try:
        settings = ServiceSettings()
    except ValidationError as exc:
        print(f"error: invalid settings: {exc}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level)
    for warning in unknown_settings(ServiceSettings):
        log.warning("%s", warning)
    log.info(
        "sellable_service listening on http://%s:%d (Kafka %s, topic %s; Cassandra %s:%d)",
        settings.service_host,
        settings.service_port,
        settings.kafka_bootstrap_servers,
        settings.service_topic,
        settings.cassandra_contact_points,
        settings.cassandra_port,
    )
    serve(
        create_app(settings),
        settings.service_host,
        settings.service_port,
        settings.log_level,
        settings,
    )
    log.info("sellable_service stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
