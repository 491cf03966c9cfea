"""Readiness tells the truth: a frozen or killed broker makes the calculator 503, and it
comes back by itself once the broker does.

A broker of its own per test, so freezing and killing it disturbs no other test.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import httpx
from confluent_kafka.admin import AdminClient

from local_stack.broker import EmbeddedBroker
from local_stack.process import free_port
from local_stack.testing import wait_until
from sellable_calculator.tests.support import PARTITIONS, Calculator, lone_calculator
from shared_schemas.topics import ensure_topics


def _ready(calculator: Calculator) -> httpx.Response:
    return httpx.get(calculator.url + "/health/ready", timeout=5)


def test_a_frozen_or_killed_broker_makes_the_calculator_not_ready(tmp_path: Path) -> None:
    with EmbeddedBroker(port=free_port(), log_dir=tmp_path) as broker:
        ensure_topics(AdminClient({"bootstrap.servers": broker.bootstrap_servers}), PARTITIONS)
        calculator = lone_calculator(broker.bootstrap_servers, tmp_path, "ready")
        calculator.start()
        try:
            wait_until(lambda: _ready(calculator).status_code == 200, timeout=30)
            assert broker.process.pid is not None
            os.kill(broker.process.pid, signal.SIGSTOP)
            try:
                wait_until(lambda: _ready(calculator).status_code == 503, timeout=20)
                # Its inputs say the leader is silent; past the session timeout the
                # instance also knows it may have lost its partitions to the group.
                wait_until(lambda: not _ready(calculator).json()["inGroup"], timeout=15)
                facts = _ready(calculator).json()
                assert facts["partitions"] == [] or facts["inputProblems"], facts
            finally:
                os.kill(broker.process.pid, signal.SIGCONT)
            wait_until(lambda: _ready(calculator).status_code == 200, timeout=30)
            broker.process.kill()
            wait_until(lambda: _ready(calculator).status_code == 503, timeout=20)
            # It keeps serving what it has meanwhile (and says it is not ready).
            assert calculator.get("/health/live").status_code == 200
        finally:
            assert calculator.process is not None
            calculator.process.stop()
