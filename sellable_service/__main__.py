"""Run the service: ``python -m sellable_service`` (port 9093 unless SERVICE_PORT says otherwise).

One process serves the GETs and runs the writer that consumes ``sellable_inventory`` and
``reservation_results`` into Cassandra; with ``SERVICE_WORKERS`` above 1, several
processes serve the GETs and one more writes (:mod:`sellable_service.workers`).
SIGTERM/SIGINT: uvicorn finishes the requests in flight, then the writer finishes the
write in hand, the consumer commits the offsets of what was written and leaves its
group, and the Cassandra session closes; the process exits 0.
"""

from __future__ import annotations

import sys

from sellable_service.app import create_app
from sellable_service.settings import ServiceSettings
from sellable_service.workers import serve_with_workers
from service_runtime.server import load_settings, run_service


def main() -> int:
    """Serve until a signal stops the server; the exit status (2: invalid settings)."""
    settings = load_settings(ServiceSettings)
    if settings is None:
        return 2
    if settings.service_workers > 1:
        return serve_with_workers(settings)
    return run_service(
        settings,
        create_app,
        lambda s: (s.service_host, s.service_port),
        ServiceSettings.connections,
    )


if __name__ == "__main__":
    sys.exit(main())
