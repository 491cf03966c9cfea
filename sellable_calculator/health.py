"""What the dataflow tells readiness: can it read its input.

Example::

    health = DataflowHealth()
    health.report_input("inventory_adjustments", 2, None)            # reading fine
    health.report_input("inventory_adjustments", 3, "broker down")   # a problem
    health.problems()  # {'inventory_adjustments:3': 'broker down'}

The Bytewax worker thread writes here; the API thread reads it for ``/health/ready``.
Every input partition reports about once a second (from librdkafka's statistics, which
arrive only while the dataflow keeps polling). A report that stops coming is a problem in
itself: a worker stuck in a sink or a frozen process reads nothing, whatever its last
report said.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterable
from typing import Any

STALE_AFTER_SECONDS = 5.0
"""An input partition that has not reported for this long counts as not being read."""

SILENT_BROKER_SECONDS = 3.0
"""A leader that has not answered for this long is down or frozen (fetches answer in ≤50 ms)."""


class DataflowHealth:
    """Thread-safe problems of the input partitions."""

    def __init__(self, stale_after: float = STALE_AFTER_SECONDS) -> None:
        self._lock = threading.Lock()
        self._stale_after = stale_after
        self._inputs: dict[tuple[str, int], tuple[float, str | None]] = {}

    def expect_input(self, topic: str, partition: int) -> None:
        """Register an input partition before its first report (it is not read yet)."""
        with self._lock:
            self._inputs.setdefault((topic, partition), (time.monotonic(), "not read yet"))

    def report_input(self, topic: str, partition: int, problem: str | None) -> None:
        """What an input partition found on its last look: ``None`` when it reads fine."""
        with self._lock:
            self._inputs[(topic, partition)] = (time.monotonic(), problem)

    def expect_only(self, inputs: Iterable[tuple[str, int]]) -> None:
        """A new assignment: forget every input partition but ``inputs``, which are
        registered as not read yet."""
        now = time.monotonic()
        with self._lock:
            self._inputs = {tp: (now, "not read yet") for tp in inputs}

    def problems(self) -> dict[str, str]:
        """``{"topic:partition": problem}`` for every input partition that cannot be read."""
        now = time.monotonic()
        with self._lock:
            inputs = dict(self._inputs)
        result: dict[str, str] = {}
        for (topic, partition), (at, problem) in sorted(inputs.items()):
            if now - at > self._stale_after:
                problem = f"no report for {now - at:.0f} s (dataflow not polling)"
            if problem is not None:
                result[f"{topic}:{partition}"] = problem
        return result


def input_problem(statistics: str, topic: str, partition: int) -> str | None:
    """What librdkafka's statistics JSON says is wrong with reading ``topic[partition]``.

    ``None`` when the partition is fetching from a leader that answers. The broker's
    ``rxidle`` (microseconds since it last sent us anything) catches a frozen broker, which
    keeps its connections open and so still looks ``UP``.
    """
    try:
        stats: dict[str, Any] = json.loads(statistics)
        part = stats["topics"][topic]["partitions"][str(partition)]
    except (ValueError, KeyError, TypeError):
        return "the topic partition is not in the broker's metadata"
    leader = part.get("leader", -1)
    if leader < 0:
        return "no leader for the partition"
    broker = next((b for b in stats.get("brokers", {}).values() if b.get("nodeid") == leader), None)
    if broker is None or broker.get("state") != "UP":
        return f"leader broker {leader} is {'unknown' if broker is None else broker.get('state')}"
    idle = broker.get("rxidle", -1) / 1e6
    if idle > SILENT_BROKER_SECONDS:
        return f"leader broker {leader} has not answered for {idle:.0f} s"
    if part.get("fetch_state") != "active":
        return f"not fetching (state {part.get('fetch_state')})"
    return None
