"""Where the local stack keeps downloads, data and logs: ``<project>/.local`` (git-ignored).

Set ``LOCAL_STACK_HOME`` to put it elsewhere.
"""

from __future__ import annotations

import os
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def state_dir() -> Path:
    """The root of everything the local stack writes."""
    return Path(os.environ.get("LOCAL_STACK_HOME") or PROJECT_ROOT / ".local")


def logs_dir() -> Path:
    """Log files of the processes the local stack starts."""
    return state_dir() / "logs"


def run_dir(home: Path | None = None) -> Path:
    """Per-instance data of the servers (e.g. ``run/cassandra-9042``); ``home`` instead of
    :func:`state_dir` for a stack started with another ``LOCAL_STACK_HOME``."""
    return (home or state_dir()) / "run"


def services_file(home: Path | None = None) -> Path:
    """Written by ``python -m local_stack up`` once everything is ready, removed when it
    stops: each service process it started (pid, command, settings, directory)."""
    return run_dir(home) / "services.json"
