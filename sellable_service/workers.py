"""The read model on several processes: ``SERVICE_WORKERS`` API workers and one writer.

Example::

    SERVICE_WORKERS=2 python -m sellable_service

The GETs are stateless (every answer comes from Cassandra), so any number of processes
can serve them on one port; the writer, which consumes ``sellable_inventory`` and
``reservation_results`` into Cassandra, must run exactly once. So with more than one
worker, ``python -m sellable_service`` becomes a small supervisor of:

* **one writer process** (:func:`run_writer`): the consumer and the Cassandra writes.
  Every half second it writes its health to a report file. If it dies, the supervisor
  starts a new one (after 1 s, doubling up to 30 s while it keeps dying), and logs it.
* **N API worker processes** (:func:`api_app`, served by uvicorn's supervisor, which
  restarts a worker that dies): the GETs, ``/health/*`` and ``/metrics``. A worker is
  ready while its Cassandra session is up and the writer's report is fresh (under
  :data:`REPORT_STALE_SECONDS` old) and says it is writing.

``/metrics`` adds up every process's figures (prometheus-client's multiprocess mode:
each process writes its own files under a directory the supervisor makes, and removes
on exit). SIGTERM/SIGINT stops the workers first, then the writer (which commits what
it wrote and leaves its group), and the process exits 0.
"""

from __future__ import annotations

import contextlib
import json
import logging
import multiprocessing
import os
import shutil
import signal
import tempfile
import threading
import time
from pathlib import Path
from types import FrameType
from typing import Any

from fastapi import FastAPI
from prometheus_client import CollectorRegistry
from prometheus_client.multiprocess import MultiProcessCollector

from sellable_service.app import WriterElsewhere, create_app, readiness_facts
from sellable_service.settings import ServiceSettings
from service_runtime.retry import Backoff, RetryStopped, retrying
from service_runtime.server import (
    EVENT_LOOP,
    HTTP_IMPLEMENTATION,
    load_settings,
    serve_workers,
    server_config,
    tune_gc_for_serving,
)

log = logging.getLogger("sellable_service")

REPORT_ENV = "SELLABLE_SERVICE_WRITER_REPORT"
"""Environment variable naming the writer's report file, for the processes started here."""
METRICS_ENV = "PROMETHEUS_MULTIPROC_DIR"
"""prometheus-client's multiprocess directory (read by it when it is first imported)."""
REPORT_INTERVAL_SECONDS = 0.5
REPORT_STALE_SECONDS = 5.0
"""A writer report older than this means the writer is frozen or gone: not ready."""
RESTART_BACKOFF = Backoff(first=1.0, cap=30.0)
"""Waits before starting a writer again after it died."""
RESTART_FRESH_AFTER = 60.0
"""A writer that ran this long before it died is started again after the first wait."""


def read_writer_report(path: Path) -> dict[str, Any]:
    """The readiness facts of the writer process from its report file.

    ``ready`` is false when the report is missing, unreadable or stale, and ``writer``
    then says why (``no report``, ``no report for 7.2 s``).
    """
    try:
        report = json.loads(path.read_text())
    except (OSError, ValueError):
        return {"ready": False, "writer": "no report", "consumerAssigned": False}
    age = time.time() - float(report.pop("time", 0))
    if age > REPORT_STALE_SECONDS:
        return {"ready": False, "writer": f"no report for {age:.1f} s", "consumerAssigned": False}
    facts: dict[str, Any] = report
    return facts


def _write_report(path: Path, facts: dict[str, Any]) -> None:
    # Written whole then renamed, so that a reader never sees half a report.
    partial = path.with_suffix(".partial")
    partial.write_text(json.dumps({**facts, "time": time.time()}))
    os.replace(partial, path)


def run_writer(report: Path) -> None:
    """The writer process: consume ``sellable_inventory`` and ``reservation_results`` into
    Cassandra until SIGTERM/SIGINT, reporting its health to ``report`` every
    :data:`REPORT_INTERVAL_SECONDS`."""
    from sellable_service.metrics import ServiceMetrics
    from sellable_service.store import SellableTable
    from sellable_service.writer import SellableWriter

    settings = load_settings(ServiceSettings)
    if settings is None:
        raise SystemExit(2)
    stop = threading.Event()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    table = SellableTable(settings)
    writer = SellableWriter(settings, table, ServiceMetrics())
    table.start()
    writer.start()
    log.info(
        "writer process %d consuming %s and %s",
        os.getpid(),
        settings.service_topic,
        settings.service_results_topic,
    )
    try:
        while not stop.wait(REPORT_INTERVAL_SECONDS):
            facts = readiness_facts(table.available, writer.health())
            _write_report(report, facts | {"writerProcess": os.getpid()})
    finally:
        writer.stop()
        table.close()
        log.info("writer process %d stopped", os.getpid())


def api_app() -> FastAPI:
    """The app of one API worker process (a uvicorn factory): GETs and health, no writer."""

    settings = load_settings(ServiceSettings)
    if settings is None:
        raise SystemExit(2)
    report = Path(os.environ[REPORT_ENV])
    registry = CollectorRegistry()
    MultiProcessCollector(registry, os.environ[METRICS_ENV])
    elsewhere = WriterElsewhere(lambda: read_writer_report(report), registry)
    app = create_app(settings, writer_elsewhere=elsewhere)
    tune_gc_for_serving()
    log.info("API worker %d started", os.getpid())
    return app


class WriterExited(Exception):
    """The writer process exited without being asked to."""


class _WriterSupervisor:
    """Keeps one writer process running until :meth:`stop`."""

    def __init__(self, report: Path) -> None:
        self._report = report
        self._stopping = threading.Event()
        self._process: multiprocessing.process.BaseProcess | None = None
        self._thread = threading.Thread(target=self._supervise, name="writer-supervisor")
        self.restarts = 0

    def start(self) -> None:
        self._thread.start()

    def _start_process(self) -> None:
        context = multiprocessing.get_context("spawn")
        self._process = context.Process(target=run_writer, args=(self._report,), name="writer")
        self._process.start()

    def _supervise(self) -> None:
        restart = retrying(
            "the writer process",
            RESTART_BACKOFF,
            retry_on=WriterExited,
            stop=self._stopping,
            fresh_after=RESTART_FRESH_AFTER,
            on_retry=self._count_restart,
            logger=log,
            level=logging.ERROR,
        )
        with contextlib.suppress(RetryStopped):  # stopped while waiting to restart
            restart(self._run_process)

    def _run_process(self) -> None:
        """Start a writer process and wait until it exits; :class:`WriterExited` unless
        that was :meth:`stop`."""
        self._start_process()
        assert self._process is not None
        self._process.join()
        if not self._stopping.is_set():
            raise WriterExited(
                f"writer process {self._process.pid} exited with status {self._process.exitcode}"
            )

    def _count_restart(self, _error: BaseException, _delay: float) -> None:
        self.restarts += 1

    def stop(self) -> None:
        """Stop the writer process (SIGTERM, then SIGKILL after 60 s) and the supervision."""
        self._stopping.set()
        process = self._process
        if process is not None and process.is_alive():
            process.terminate()
            process.join(timeout=60)
            if process.is_alive():
                log.error("writer process %d did not stop within 60 s: killing it", process.pid)
                process.kill()
                process.join()
        self._thread.join(timeout=5)


def serve_with_workers(settings: ServiceSettings) -> int:
    """Run the writer process and ``settings.service_workers`` API workers until a signal."""
    runtime_dir = Path(tempfile.mkdtemp(prefix="sellable-service-"))
    metrics_dir = runtime_dir / "metrics"
    metrics_dir.mkdir()
    report = runtime_dir / "writer.json"
    # Read by the spawned processes (prometheus-client reads its variable at import).
    os.environ[REPORT_ENV] = str(report)
    os.environ[METRICS_ENV] = str(metrics_dir)
    log.info(
        "sellable_service listening on http://%s:%d with %d API workers and one writer "
        "process (%s, %s); %s",
        settings.service_host,
        settings.service_port,
        settings.service_workers,
        HTTP_IMPLEMENTATION,
        EVENT_LOOP,
        settings.connections(),
    )
    writer = _WriterSupervisor(report)
    writer.start()
    try:
        config = server_config(
            f"{__name__}:api_app",
            settings.service_host,
            settings.service_port,
            settings.log_level,
            settings,
            factory=True,
        )
        serve_workers(config, settings.service_workers)
    finally:
        writer.stop()
        shutil.rmtree(runtime_dir, ignore_errors=True)
    log.info("sellable_service stopped")
    return 0
