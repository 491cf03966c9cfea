"""Run the live console: ``python -m console`` (port 9090 unless CONSOLE_PORT says otherwise).

``make up`` starts it last, with the URLs of the services it started and leave to stop
and start the calculators (through local_stack's control API). By hand, against a
running system::

    CONSOLE_CALCULATOR_URLS=http://127.0.0.1:9094,http://127.0.0.1:9095 python -m console

SIGTERM/SIGINT: the event streams end, uvicorn finishes the requests in flight, the
requests the console has in flight to the backends are cancelled, and the process
exits 0.
"""

from __future__ import annotations

import logging
import sys

from console.app import create_app
from console.settings import ConsoleSettings
from service_runtime.server import load_settings, run_service


def _describe(settings: ConsoleSettings) -> str:
    control = (
        "off"
        if not settings.console_allow_control
        else "through local_stack"
        if settings.console_control_url
        else "by signals to this machine's calculator processes"
    )
    return (
        f"mutator {settings.console_mutator_url}, service {settings.console_service_url}, "
        f"calculators {', '.join(settings.console_calculator_urls)}; stop/start: {control}"
    )


def main() -> int:
    """Serve until a signal stops the server; the exit status (2: invalid settings)."""
    overrides = {"console_allow_control": True} if "--allow-control" in sys.argv[1:] else {}
    settings = load_settings(ConsoleSettings, **overrides)
    if settings is None:
        return 2
    # httpx logs every request at INFO: several a second to each backend while watched.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    return run_service(settings, create_app, lambda s: (s.console_host, s.console_port), _describe)


if __name__ == "__main__":
    sys.exit(main())
