"""The contracts package stands apart from the service plumbing: importing all of it
loads nothing of the web stack (a consumer of the topics needs no HTTP server)."""

from __future__ import annotations

import pkgutil
import subprocess
import sys

import shared_schemas


def test_importing_every_contract_module_loads_no_web_framework() -> None:
    modules = [
        f"shared_schemas.{m.name}"
        for m in pkgutil.iter_modules(shared_schemas.__path__)
        if m.name != "tests"
    ]
    assert "shared_schemas.serde" in modules and "shared_schemas.responses" in modules
    code = (
        "import importlib, sys\n"
        f"for name in {modules!r}: importlib.import_module(name)\n"
        "web = sorted({m.split('.')[0] for m in sys.modules} & "
        "{'fastapi', 'starlette', 'uvicorn', 'httptools', 'uvloop', 'service_runtime'})\n"
        "print(','.join(web))\n"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert loaded == "", f"shared_schemas loads {loaded}"
