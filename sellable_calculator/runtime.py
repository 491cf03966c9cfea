"""What a calculator instance's REST API shares with the dataflow of the same process.

Example::

    runtime = CalculatorRuntime(settings, store, progress, routing, metrics)
    app = create_app(runtime)                # app.state.runtime is this runtime
    runtime_of(request).store.get(key)       # in a handler
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from starlette.requests import Request

from sellable_calculator.changelog import INPUT_TOPICS
from sellable_calculator.health import DataflowHealth
from sellable_calculator.metrics import CalculatorMetrics
from sellable_calculator.progress import Progress
from sellable_calculator.routing import RoutingTable
from sellable_calculator.settings import CalculatorSettings
from sellable_calculator.standby import StandbyReplicas
from sellable_calculator.store import SellableStore
from shared_schemas.partitioner import partition_for


@dataclass
class CalculatorRuntime:
    """What the API shares with the dataflow of the same process."""

    settings: CalculatorSettings
    store: SellableStore
    progress: Progress
    routing: RoutingTable
    metrics: CalculatorMetrics
    dataflow_running: Callable[[], bool] = lambda: True
    end_offsets_at_start: dict[tuple[str, int], int] = field(default_factory=dict)
    """Input end offsets of the assigned partitions seen when they were assigned; the
    instance is ready once it has applied them."""
    health: DataflowHealth = field(default_factory=DataflowHealth)
    """Whether the dataflow can read its input, and which partitions still replay."""
    routing_following: Callable[[], bool] = lambda: True
    """Whether the routing table is still kept current (:attr:`RoutingFollower.following`)."""
    in_group: Callable[[], bool] = lambda: True
    """Whether this instance holds a current assignment (:attr:`GroupMembership.in_group`)."""
    member_id: Callable[[], str] = lambda: ""
    """This instance's member id in the calculator group (:attr:`GroupMembership.member_id`)."""
    standby: StandbyReplicas | None = None
    """The partitions kept warm as a standby replica; None: none."""
    advertise: Callable[[], None] = lambda: None
    """Publish this instance's routing entry (:class:`~sellable_calculator.routing.Advertiser`)."""
    catching_up: frozenset[int] = frozenset()
    """Owned partitions that had not applied their inputs' end offsets seen at the
    assignment when last asked (:meth:`behind`): after a takeover, the writes made while
    nobody ran the partition. Their answers say so (``X-Behind``)."""
    owned: frozenset[int] = frozenset()
    """The partitions this instance serves from its store, as a set (every inventory GET
    asks whether it owns one): the assigned partitions once restored. Replaced, never
    changed in place, by the thread that runs the assignments."""

    def partition_of(self, key: bytes) -> int:
        """The partition of ``key`` in every co-partitioned topic."""
        return partition_for(key, self.settings.topic_partitions)

    def behind(self, partition: int) -> int:
        """Input records of ``partition`` up to the end offsets seen at the assignment that
        this store has not applied yet; once 0, the partition leaves :attr:`catching_up`."""
        behind = 0
        for topic in INPUT_TOPICS:
            end = self.end_offsets_at_start.get((topic, partition), 0)
            behind += max(0, end - self.progress.reached(topic, partition))
        if behind == 0:
            self.catching_up = self.catching_up - {partition}
        return behind

    def owns(self, key: bytes) -> bool:
        """Whether this instance serves the partition of ``key`` (in every input topic)."""
        return self.partition_of(key) in self.owned

    async def readiness(self) -> dict[str, Any]:
        """The facts ``/health/ready`` reports; ``ready`` only when all of them are good.

        A coroutine because that is what :func:`service_runtime.http.operations_router`
        awaits.
        """
        behind = {
            f"{topic}:{partition}": end - self.progress.reached(topic, partition)
            for (topic, partition), end in self.end_offsets_at_start.items()
            if self.progress.reached(topic, partition) < end
        }
        running = self.dataflow_running()
        input_problems = self.health.problems()
        routing = self.routing_following()
        in_group = self.in_group()
        me = self.routing.me
        restoring = list(me.restoring)
        followed, warm = ([], []) if self.standby is None else self.standby.partitions()
        return {
            "ready": running
            and routing
            and in_group
            and not behind
            and not input_problems
            and not restoring,
            "instance": me.instance_id,
            "inGroup": in_group,
            "partitions": list(me.partitions),
            "restoring": restoring,
            "dataflowRunning": running,
            "routingFollowing": routing,
            # Not part of readiness: the instance serves what it owns without them.
            "standby": {"partitions": followed, "warm": warm},
            "behind": behind,
            "inputProblems": input_problems,
        }


def runtime_of(request: Request) -> CalculatorRuntime:
    """The runtime of the app serving ``request`` (:func:`sellable_calculator.app.create_app`).

    Not a FastAPI dependency: resolving one costs measurable time on a GET this hot. And
    item access, not ``state.runtime``: Starlette's ``State`` answers that only after a
    failed attribute lookup, on every request.
    """
    runtime: CalculatorRuntime = request.app.state["runtime"]
    return runtime
