"""Run one calculator instance: group membership, the Bytewax dataflow and its REST API.

    python -m sellable_calculator                      # port 9094
    python -m sellable_calculator --port 9095          # one more: it joins the group
    python -m sellable_calculator --workers 2          # two Bytewax workers

The instance joins the calculator group (:mod:`sellable_calculator.membership`); each
assignment of partitions the group hands it is restored (:mod:`sellable_calculator.changelog`)
and run by a dataflow of its own on the main thread (Bytewax wants it there for signal
handling), until the group takes the assignment back. The API runs on a uvicorn server
thread and reads the same RocksDB store. SIGTERM or SIGINT stops the dataflow (its sinks
flush), leaves the group (the others take the partitions over at once) and the routing
table, then stops the API. A second signal exits at once; the changelog makes even that
(or kill -9) safe. If the routing follower fails and cannot recover, the instance stops
the same way and exits with status 1, so that a supervisor restarts it.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from types import FrameType

import uvicorn
from bytewax.run import cli_main
from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition

from sellable_calculator.app import create_app
from sellable_calculator.changelog import INPUT_TOPICS, restore
from sellable_calculator.dataflow import Generation, build_dataflow
from sellable_calculator.membership import Assignments, GroupMembership
from sellable_calculator.metrics import CalculatorMetrics
from sellable_calculator.progress import Progress
from sellable_calculator.routing import (
    Advertiser,
    InstanceInfo,
    RoutingFollower,
    RoutingTable,
    withdraw,
)
from sellable_calculator.runtime import CalculatorRuntime
from sellable_calculator.settings import CalculatorSettings
from sellable_calculator.standby import StandbyReplicas
from sellable_calculator.store import SellableStore
from service_runtime.kafka import ensure_topics_when_available
from service_runtime.results import Results, ResultsFollower
from service_runtime.server import (
    load_settings,
    server_config,
    start_in_thread,
    tune_gc_for_serving,
)
from shared_schemas.topics import (
    ALL_TOPICS,
    TopicAdminError,
    TopicMismatchError,
    changelog_topic,
)

log = logging.getLogger("sellable_calculator")

ROUTING_LOAD_SECONDS = 5.0
"""How long the API waits at start for the routing table to be read to its end."""


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m sellable_calculator", description=__doc__)
    parser.add_argument("--workers", type=int, help="Bytewax workers (CALCULATOR_WORKERS)")
    parser.add_argument("--port", type=int, help="REST port (CALCULATOR_PORT)")
    return parser.parse_args(argv)


def _end_offsets(
    settings: CalculatorSettings,
    partitions: tuple[int, ...],
    topics: tuple[str, ...] = INPUT_TOPICS,
) -> dict[tuple[str, int], int]:
    """High watermarks of ``partitions`` of ``topics`` (by default the inputs: what
    'caught up' means)."""
    consumer = Consumer(
        {"bootstrap.servers": settings.kafka_bootstrap_servers, "group.id": "unused"}
    )
    try:
        return {
            (topic, p): consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1]
            for topic in topics
            for p in partitions
        }
    finally:
        consumer.close()


def _missing_records(
    settings: CalculatorSettings, positions: dict[tuple[str, int], int]
) -> dict[str, int]:
    """``{"topic:partition": offset}`` where the broker has no record the store applied.

    Asks for the last record each position says was applied (``position - 1``): if the
    broker returns it, the topic holds it, whatever its end offset says.
    """
    consumer = Consumer(
        {
            "bootstrap.servers": settings.kafka_bootstrap_servers,
            "group.id": "unused",
            "enable.auto.commit": False,
            "auto.offset.reset": "error",
            "fetch.wait.max.ms": 100,
        }
    )
    missing: dict[str, int] = {}
    try:
        for (topic, partition), position in positions.items():
            consumer.assign([TopicPartition(topic, partition, position - 1)])
            deadline = time.monotonic() + 5
            found = False
            while not found and time.monotonic() < deadline:
                message = consumer.poll(0.2)
                if message is not None and message.error() is None:
                    found = message.offset() == position - 1
                    break
                error = None if message is None else message.error()
                if error is not None and error.code() == KafkaError._AUTO_OFFSET_RESET:
                    break
            if not found:
                missing[f"{topic}:{partition}"] = position - 1
    finally:
        consumer.close()
    return missing


def _stored_positions(
    settings: CalculatorSettings, store: SellableStore, partitions: tuple[int, ...]
) -> dict[tuple[str, int], int]:
    """Every position the store claims for ``partitions``: next input offsets and next
    changelog offsets."""
    positions = {tp: o for tp, o in store.positions().items() if tp[1] in partitions}
    for partition in partitions:
        changelog = store.changelog_position(partition)
        if changelog:
            positions[(settings.changelog_topic, partition)] = changelog
    return positions


def _records_missing(
    settings: CalculatorSettings,
    positions: dict[tuple[str, int], int],
    end_offsets: dict[tuple[str, int], int],
) -> dict[str, int]:
    """``{"topic:partition": offset}`` of records the store applied that the broker does
    not have (a reset broker, recreated topics).

    The embedded broker reports end offsets a few records behind what consumers already
    read, so an end offset below the store's position means nothing by itself: only a
    record that is really missing does.
    """
    ahead = {
        tp: applied
        for tp, applied in positions.items()
        if tp in end_offsets and applied > end_offsets[tp]
    }
    if not ahead:
        return {}
    missing = _missing_records(settings, ahead)
    if not missing:
        log.info(
            "the broker's end offsets lag the store's positions %s, but it has those records",
            {f"{t}:{p}": (o, end_offsets[(t, p)]) for (t, p), o in ahead.items()},
        )
    return missing


def _discard_state_from_other_topics(
    runtime: CalculatorRuntime, partitions: tuple[int, ...], checked: set[int]
) -> None:
    """Delete the local state of ``partitions`` if it was built from records the broker
    does not have: then it belongs to topics that are gone, and the partitions are
    restored from what the topics hold now (the changelog, or the inputs from the start).

    Each partition is checked once per process (``checked``): what this process itself
    stored came from this broker, and asking costs a round trip per topic partition, on
    every rebalance, before the partition can be served again.
    """
    settings, store = runtime.settings, runtime.store
    unchecked = tuple(p for p in partitions if p not in checked)
    checked.update(partitions)
    positions = _stored_positions(settings, store, unchecked)
    if not positions:
        return
    topics = (*INPUT_TOPICS, settings.changelog_topic)
    missing = _records_missing(settings, positions, _end_offsets(settings, unchecked, topics))
    if not missing:
        return
    stale = tuple(sorted({int(tp.rpartition(":")[2]) for tp in missing}))
    keys = store.forget(stale, runtime.partition_of)
    runtime.progress.forget(frozenset(stale))
    log.warning(
        "the local state of partitions %s was built from records the broker does not have "
        "(partition: offset already applied %s): the broker was reset or the topics were "
        "recreated. Deleted it (%d key(s)); those partitions are restored from what the "
        "topics hold now.",
        list(stale),
        missing,
        keys,
    )


def _withdraw(settings: CalculatorSettings, me: InstanceInfo) -> None:
    """Leave the routing table on a clean stop; a failure only means a stale entry."""
    try:
        withdraw(settings, me)
    except (RuntimeError, KafkaException) as exc:
        log.warning("could not withdraw from the routing table: %s", exc)


def _start_api(runtime: CalculatorRuntime) -> tuple[uvicorn.Server, threading.Thread]:
    settings = runtime.settings
    config = server_config(
        create_app(runtime),
        settings.calculator_host,
        settings.calculator_port,
        settings.log_level,
        settings,
    )
    return start_in_thread(config)


class _Stopping:
    """Why the instance stops: a signal, or a part it cannot run without (the routing
    follower, the group membership) that failed for good.

    ``requested`` is set once a stop began; :attr:`assignments` is closed at the same
    time, which stops the running dataflow (Bytewax closes the epoch, the sinks flush).
    """

    def __init__(self, assignments: Assignments) -> None:
        self.requested = threading.Event()
        self.failed = threading.Event()
        self.assignments = assignments

    def on_failure(self, what: str) -> Callable[[BaseException], None]:
        """A callback for ``what`` failing for good: stop, and exit 1 afterwards."""

        def failed(exc: BaseException) -> None:
            # Serving with a routing table nobody keeps current, or partitions the group
            # may have given to someone else, would answer from the wrong instance: stop
            # (cleanly, so the changelog stays consistent) and exit non-zero, so that a
            # supervisor restarts this instance.
            log.error("%s failed for good (%s): stopping the instance", what, exc)
            self.failed.set()
            self.stop()

        return failed

    def stop(self) -> None:
        """Begin a stop: no more assignments, the running dataflow ends."""
        self.requested.set()
        self.assignments.close()

    def on_signal(self, signum: int, _frame: FrameType | None) -> None:
        """SIGTERM or SIGINT: stop cleanly; a second one exits at once."""
        if self.requested.is_set():
            log.warning("second %s: exiting now", signal.Signals(signum).name)
            os._exit(130)
        log.info("%s received: stopping the dataflow", signal.Signals(signum).name)
        self.stop()


def _settings(argv: list[str] | None) -> CalculatorSettings | None:
    """The settings from the environment and the command line, logging set up at their
    level; None (said on stderr) when they are invalid."""
    args = _parse_args(argv)
    overrides = {
        "calculator_workers": args.workers,
        "calculator_port": args.port,
    }
    return load_settings(
        CalculatorSettings, **{k: v for k, v in overrides.items() if v is not None}
    )


def _configure_process(settings: CalculatorSettings) -> None:
    """The GIL switch interval, and the start-up log line."""
    # The dataflow and the REST API share one interpreter: a shorter switch interval
    # hands the GIL to a waiting request sooner (the default is 5 ms).
    sys.setswitchinterval(0.0005)
    log.info(
        "starting %s: group %s, %d partitions, %d worker(s), state in %s, Kafka %s",
        settings.instance_id,
        settings.calculator_group_id,
        settings.topic_partitions,
        settings.calculator_workers,
        settings.instance_dir,
        settings.kafka_bootstrap_servers,
    )


def main(argv: list[str] | None = None) -> int:
    """Run until stopped; the exit status says whether it stopped cleanly."""
    settings = _settings(argv)
    if settings is None:
        return 2
    _configure_process(settings)
    try:
        ensure_topics_when_available(
            settings.kafka_bootstrap_servers,
            settings.topic_partitions,
            settings.topic_replication_factor,
            topics=(*ALL_TOPICS, changelog_topic(settings.calculator_group_id)),
        )
    except (TopicMismatchError, TopicAdminError, KafkaException) as exc:
        log.error("cannot start: %s", exc)
        return 2

    try:
        store = SellableStore(settings.instance_dir / "store")
    except Exception as exc:  # rocksdict raises a bare Exception, e.g. for a held lock
        in_use = "lock" in str(exc).lower()
        log.error(
            "cannot open the store in %s: %s",
            settings.instance_dir,
            "another process uses it (is calculator "
            f"{settings.instance_id} already running? Give this one another "
            "CALCULATOR_PORT or CALCULATOR_INSTANCE_ID)"
            if in_use
            else exc,
        )
        return 2
    assignments = Assignments()
    stopping = _Stopping(assignments)
    routing = RoutingTable(InstanceInfo.of(settings))
    follower = RoutingFollower(
        routing, settings, on_failure=stopping.on_failure("the routing follower")
    )
    membership = GroupMembership(
        settings, assignments, on_failure=stopping.on_failure("the group membership")
    )
    loop = _AssignmentLoop()
    metrics = CalculatorMetrics()
    advertiser = Advertiser(settings, routing)
    standby = StandbyReplicas(
        settings,
        store,
        routing,
        advertiser,
        metrics,
        on_failure=stopping.on_failure("the standby replicas"),
    )
    results = ResultsFollower(
        settings.kafka_bootstrap_servers,
        settings.schema_registry_url,
        settings.topic_partitions,
        on_results=lambda read: _index_results(store, read),
        start=store.results_positions,
        client_id=f"{settings.instance_id}-results",
    )
    runtime = CalculatorRuntime(
        settings,
        store,
        Progress(store.positions()),
        routing,
        metrics,
        dataflow_running=lambda: loop.running,
        routing_following=lambda: follower.following,
        in_group=lambda: membership.in_group,
        member_id=lambda: membership.member_id,
        standby=standby,
        advertise=advertiser,
    )
    signal.signal(signal.SIGTERM, stopping.on_signal)
    signal.signal(signal.SIGINT, stopping.on_signal)
    return _run(runtime, follower, membership, assignments, stopping, loop, results)


def _index_results(store: SellableStore, read: Results) -> None:
    """Index decisions read from ``reservation_results``, so that this instance answers
    ``GET /inventory/reservations/{id}`` for every key, not only those it owns."""
    positions: dict[int, int] = {}
    for partition, offset, _ in read:
        positions[partition] = max(positions.get(partition, 0), offset + 1)
    store.add_results((result for _, _, result in read), positions)


class _AssignmentLoop:
    """Whether a dataflow runs (or has nothing to run): what readiness reports; and the
    partitions whose local state was checked against the broker."""

    def __init__(self) -> None:
        self.running = False
        self.checked: set[int] = set()


def _run(
    runtime: CalculatorRuntime,
    follower: RoutingFollower,
    membership: GroupMembership,
    assignments: Assignments,
    stopping: _Stopping,
    loop: _AssignmentLoop,
    results: ResultsFollower,
) -> int:
    """Follow the routing table, serve the API, join the group and run each assignment
    until the instance stops; then leave the group and the table, stop the API and close
    the store. The exit status."""
    settings = runtime.settings
    server: uvicorn.Server | None = None
    status = 0
    try:
        follower.start()
        results.start()
        if not follower.loaded.wait(ROUTING_LOAD_SECONDS):
            log.warning(
                "the routing table is not loaded after %g s: serving anyway (keys whose "
                "owner it does not know yet answer 503 owner_unknown)",
                ROUTING_LOAD_SECONDS,
            )
        runtime.advertise()
        server, api_thread = _start_api(runtime)
        tune_gc_for_serving()
        log.info(
            "%s listening on http://%s:%d (advertised as %s)",
            settings.instance_id,
            settings.calculator_host,
            settings.calculator_port,
            settings.advertised_url,
        )
        membership.start()
        if runtime.standby is not None:
            runtime.standby.start()
        while (assignment := assignments.next()) is not None:
            partitions, generation, stop = assignment
            run = Generation(partitions, {}, stop, generation, membership.still_member)
            try:
                _run_assignment(runtime, run, loop)
            finally:
                loop.running = False
                assignments.finished()
            if assignments.take_lost() or run.fenced.is_set():
                _forget(runtime, partitions)
        log.info("dataflow stopped")
        membership.stop()
        if stopping.failed.is_set():
            status = 1
        else:
            _withdraw(settings, runtime.routing.me)
    except Exception as exc:
        log.error("%s failed: %s", settings.instance_id, exc, exc_info=not isinstance(exc, OSError))
        status = 1
    finally:
        stopping.stop()
        membership.stop(timeout=5)
        if server is not None:
            server.should_exit = True
            api_thread.join(timeout=10)
        follower.stop()
        results.stop()  # before the store closes: it writes to it
        if runtime.standby is not None:
            runtime.standby.stop()  # before the store closes: it writes to it
        runtime.store.close()
        log.info("%s stopped", settings.instance_id)
    return status


def _forget(runtime: CalculatorRuntime, partitions: tuple[int, ...]) -> None:
    """The group gave ``partitions`` away while this instance was silent (frozen, or
    starved past the session timeout). Another instance may have published newer states
    meanwhile, and this one may have published and stored a batch after that: its store
    is no longer something a catch-up from the changelog can repair. So these partitions
    are no longer served from here, and their local state is deleted; if they come back,
    they are restored from the changelog alone."""
    given_up, runtime.owned = runtime.owned, frozenset()
    runtime.progress.give_up(given_up)
    runtime.routing.change_me(lambda me: me.assigned((), (), 0))
    keys = runtime.store.forget(partitions, runtime.partition_of)
    log.warning(
        "partitions %s were taken away while this instance was silent: deleted their "
        "local state (%d key(s)); they are restored from the changelog if they come back",
        list(partitions),
        keys,
    )


def _run_assignment(runtime: CalculatorRuntime, run: Generation, loop: _AssignmentLoop) -> None:
    """Restore the partitions of ``run`` and run their dataflow until ``run.stop`` is set."""
    partitions, generation, stop = run.partitions, run.generation, run.stop
    settings, routing, metrics = runtime.settings, runtime.routing, runtime.metrics
    metrics.rebalances.inc()
    kept = runtime.owned & frozenset(partitions)
    moved = runtime.owned - kept
    runtime.owned = kept  # partitions that moved away are not served from here any more
    runtime.progress.give_up(moved)
    if runtime.standby is not None:
        # Nothing follows them as a standby any more: their restore starts from the store.
        runtime.standby.exclude(partitions)
    restoring = tuple(p for p in partitions if p not in kept)
    member_id = runtime.member_id()
    routing.change_me(
        lambda me: replace(me.assigned(partitions, restoring, generation), member_id=member_id)
    )
    runtime.advertise()
    metrics.assigned_partitions.labels("restoring").set(len(restoring))
    metrics.assigned_partitions.labels("active").set(len(kept))
    runtime.health.expect_only((topic, p) for topic in INPUT_TOPICS for p in partitions)
    _discard_state_from_other_topics(runtime, partitions, loop.checked)
    states = restore(settings, runtime.store, partitions, stop, metrics)
    if states is None:
        log.info("assignment %s revoked while restoring", list(partitions))
        return
    run.states.update(states)
    for partition, state in states.items():
        for kind, offset in state.applied.items():
            runtime.progress.advance(INPUT_TOPICS[kind], partition, offset)
    runtime.end_offsets_at_start = _end_offsets(settings, partitions)
    runtime.catching_up = frozenset(partitions)  # until behind() says otherwise
    runtime.owned = frozenset(partitions)
    routing.change_me(lambda me: me.assigned(partitions, (), generation))
    runtime.advertise()
    if runtime.standby is not None:
        runtime.standby.activated()
    metrics.assigned_partitions.labels("restoring").set(0)
    metrics.assigned_partitions.labels("active").set(len(partitions))
    loop.running = True
    if not partitions:
        log.info("%s has no partitions in this assignment", settings.instance_id)
        stop.wait()
        return
    log.info("running partitions %s", list(partitions))
    flow = build_dataflow(settings, run, runtime.store, runtime.progress, metrics, runtime.health)
    cli_main(flow, workers_per_process=settings.calculator_workers)


if __name__ == "__main__":
    sys.exit(main())
