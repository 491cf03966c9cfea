"""The routing follower never stops unnoticed: it survives bad records, restarts a failed
consumer, and when it cannot recover, readiness says so and the process exits 1.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient
from fastapi.testclient import TestClient

from local_stack.broker import EmbeddedBroker
from local_stack.process import ManagedProcess, free_port
from local_stack.testing import wait_until
from sellable_calculator.app import CalculatorRuntime, create_app
from sellable_calculator.metrics import CalculatorMetrics
from sellable_calculator.progress import Progress
from sellable_calculator.routing import InstanceInfo, RoutingFollower, RoutingTable
from sellable_calculator.settings import CalculatorSettings
from sellable_calculator.store import SellableStore
from sellable_calculator.tests.support import PARTITIONS, Calculator, lone_calculator
from shared_schemas.topics import CALCULATOR_INSTANCES, ensure_topics

GHOST = InstanceInfo(
    "ghost",
    "http://127.0.0.1:1",
    (),
    PARTITIONS,
    0.0,
    group=CalculatorSettings().calculator_group_id,
)
"""An advertisement that owns nothing, so it changes no routing."""


class _Message:
    def __init__(self, key: bytes, value: bytes) -> None:
        self._key, self._value = key, value

    def error(self) -> None:
        return None

    def key(self) -> bytes:
        return self._key

    def value(self) -> bytes:
        return self._value


class _FailingConsumer:
    """Fails on its first poll (``fail``) or hands out ``records`` once, then nothing."""

    def __init__(self, fail: bool, records: list[_Message]) -> None:
        self._fail, self._records = fail, list(records)

    def poll(self, timeout: float) -> _Message | None:
        if self._fail:
            raise RuntimeError("consumer broke")
        if self._records:
            return self._records.pop(0)
        time.sleep(timeout / 10)
        return None

    def close(self) -> None:
        pass


class _QuickFollower(RoutingFollower):
    RESTART_DELAYS = (0.01, 0.01)


def _settings() -> CalculatorSettings:
    return CalculatorSettings(topic_partitions=PARTITIONS)


def test_a_failed_consumer_is_replaced_and_the_table_kept_current() -> None:
    table = RoutingTable(InstanceInfo.of(_settings()))
    consumers = iter([True, False])  # the first one fails, the second works
    failures: list[BaseException] = []
    follower = _QuickFollower(
        table,
        _settings(),
        on_failure=failures.append,
        consumer_factory=lambda: _FailingConsumer(  # type: ignore[arg-type, return-value]
            next(consumers), [_Message(b"ghost", GHOST.to_json())]
        ),
    )
    follower.start()
    try:
        wait_until(lambda: "ghost" in [i.instance_id for i in table.instances()], timeout=5)
        assert follower.following and not failures
    finally:
        follower.stop()
    assert not follower.following


def test_a_follower_that_cannot_recover_gives_up_and_says_so() -> None:
    table = RoutingTable(InstanceInfo.of(_settings()))
    given_up = threading.Event()
    failures: list[BaseException] = []

    def on_failure(exc: BaseException) -> None:
        failures.append(exc)
        given_up.set()

    follower = _QuickFollower(
        table,
        _settings(),
        on_failure=on_failure,
        consumer_factory=lambda: _FailingConsumer(True, []),  # type: ignore[arg-type, return-value]
    )
    follower.start()
    assert given_up.wait(5)
    wait_until(lambda: not follower.following, timeout=5)
    # Three failures: the first two were retried (two restart delays), the third was not.
    assert [str(e) for e in failures] == ["consumer broke"]


def test_readiness_is_503_when_the_routing_table_is_not_followed(tmp_path: Path) -> None:
    settings = _settings()
    following = True
    runtime = CalculatorRuntime(
        settings,
        SellableStore(tmp_path / "store"),
        Progress(),
        RoutingTable(InstanceInfo.of(settings)),
        CalculatorMetrics(),
        routing_following=lambda: following,
    )
    try:
        with TestClient(create_app(runtime)) as client:
            ready = client.get("/health/ready")
            assert (ready.status_code, ready.json()["routingFollowing"]) == (200, True)
            following = False
            ready = client.get("/health/ready")
            assert (ready.status_code, ready.json()["routingFollowing"]) == (503, False)
    finally:
        runtime.store.close()


def _calculator(broker: EmbeddedBroker, tmp_path: Path, **extra: str) -> Calculator:
    return lone_calculator(broker.bootstrap_servers, tmp_path, "routing", **extra)


def _ready(calculator: Calculator) -> httpx.Response:
    return httpx.get(calculator.url + "/health/ready", timeout=5)


def test_a_bad_routing_record_does_not_stop_the_follower(tmp_path: Path) -> None:
    """A record whose partition is a number too large for an int killed the thread."""
    with EmbeddedBroker(port=free_port(), log_dir=tmp_path) as broker:
        ensure_topics(AdminClient({"bootstrap.servers": broker.bootstrap_servers}), PARTITIONS)
        calculator = _calculator(broker, tmp_path)
        calculator.start()
        try:
            wait_until(lambda: _ready(calculator).status_code == 200, timeout=30)
            group = calculator.env["CALCULATOR_GROUP_ID"]
            # A claim newer than any assignment: once read, the ghost owns partition 0.
            ghost = replace(GHOST, group=group, partitions=(0,), generation=2**62)
            bad: dict[str, Any] = {**json.loads(ghost.to_json()), "instance_id": "bad"}
            producer = Producer({"bootstrap.servers": broker.bootstrap_servers})
            producer.produce(
                CALCULATOR_INSTANCES.name,
                json.dumps(bad).replace("[]", "[1e400]").encode(),
                b"bad",
            )
            producer.produce(CALCULATOR_INSTANCES.name, ghost.to_json(), b"ghost")
            assert producer.flush(10) == 0
            del producer  # not left retrying against the broker once it has stopped

            def ghost_known() -> bool:
                owners = calculator.get("/metadata").json()["partitions"]
                return bool(owners[0]["owner"] == "ghost")

            assert wait_until(ghost_known, timeout=10)
            assert _ready(calculator).status_code == 200
        finally:
            assert calculator.process is not None
            calculator.process.stop()


def test_the_process_exits_1_when_the_follower_cannot_recover(tmp_path: Path) -> None:
    """Fault injected into the follower only (every consumer it makes fails); the broker,
    the dataflow and the API are real."""
    inject = tmp_path / "inject"
    inject.mkdir()
    (inject / "sitecustomize.py").write_text(
        "from sellable_calculator.routing import RoutingFollower\n"
        "def _broken(self):\n"
        "    raise RuntimeError('injected: no consumer for the instances topic')\n"
        "RoutingFollower._consumer = _broken\n"
        "RoutingFollower.RESTART_DELAYS = (1.0, 1.0)\n"
    )
    with EmbeddedBroker(port=free_port(), log_dir=tmp_path) as broker:
        ensure_topics(AdminClient({"bootstrap.servers": broker.bootstrap_servers}), PARTITIONS)
        root = str(Path(__file__).resolve().parents[2])
        calculator = _calculator(broker, tmp_path, PYTHONPATH=f"{inject}{os.pathsep}{root}")
        process = ManagedProcess(
            "calculator",
            [sys.executable, "-m", "sellable_calculator"],
            calculator.env,
            None,
            tmp_path,
        )
        process.start()
        try:
            assert process.wait(30) == 1, process.log_tail()
            log = process.log_path.read_text()
            assert "giving up" in log, log
            assert "the routing follower failed for good" in log, log
        finally:
            process.stop()
