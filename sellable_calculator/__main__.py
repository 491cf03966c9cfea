"""Run one calculator instance: the Bytewax dataflow plus its REST API, in one process.

    python -m sellable_calculator                      # instance 0 of 2, port 9094
    CALCULATOR_INSTANCE_INDEX=1 CALCULATOR_PORT=9095 python -m sellable_calculator
    python -m sellable_calculator --workers 2          # two Bytewax workers

The dataflow runs on the main thread (Bytewax wants it there for signal handling); the
API runs on a uvicorn server thread and reads the same RocksDB store. SIGTERM or SIGINT
stops the sources, lets Bytewax close the epoch and the sinks flush, then stops the API.
A second signal exits at once; Bytewax recovery makes even that (or kill -9) safe.
If the routing follower fails and cannot recover, the instance stops the same way and
exits with status 1, so that a supervisor restarts it.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path
from types import FrameType

import uvicorn
from bytewax.recovery import RecoveryConfig, init_db_dir
from bytewax.run import cli_main
from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition

from sellable_calculator.app import create_app
from sellable_calculator.dataflow import INPUT_TOPICS, build_dataflow
from sellable_calculator.health import DataflowHealth
from sellable_calculator.metrics import CalculatorMetrics
from sellable_calculator.progress import Progress
from sellable_calculator.routing import (
    InstanceInfo,
    RoutingFollower,
    RoutingTable,
    advertise,
    withdraw,
)
from sellable_calculator.runtime import CalculatorRuntime
from sellable_calculator.settings import CalculatorSettings
from sellable_calculator.store import SellableStore
from service_runtime.kafka import ensure_topics_when_available
from service_runtime.server import (
    load_settings,
    server_config,
    start_in_thread,
    tune_gc_for_serving,
)
from shared_schemas.topics import (
    TopicAdminError,
    TopicMismatchError,
)

log = logging.getLogger("sellable_calculator")


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m sellable_calculator", description=__doc__)
    parser.add_argument("--workers", type=int, help="Bytewax workers (CALCULATOR_WORKERS)")
    parser.add_argument("--index", type=int, help="instance index (CALCULATOR_INSTANCE_INDEX)")
    parser.add_argument("--port", type=int, help="REST port (CALCULATOR_PORT)")
    return parser.parse_args(argv)


def _end_offsets(settings: CalculatorSettings) -> dict[tuple[str, int], int]:
    """High watermarks of the owned input partitions: what 'caught up' means at start."""
    consumer = Consumer(
        {"bootstrap.servers": settings.kafka_bootstrap_servers, "group.id": "unused"}
    )
    try:
        return {
            (topic, p): consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1]
            for topic in INPUT_TOPICS
            for p in settings.owned_partitions
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


def _warn_if_state_is_from_other_topics(
    settings: CalculatorSettings,
    store: SellableStore,
    end_offsets: dict[tuple[str, int], int],
) -> None:
    """Warn when the store applied records the broker does not have (a reset broker).

    The embedded broker reports end offsets a few records behind what consumers already
    read, so an end offset below the store's position means nothing by itself: only a
    record that is really missing does.
    """
    ahead = {
        (topic, partition): applied
        for (topic, partition), applied in store.positions().items()
        if (topic, partition) in end_offsets and applied > end_offsets[(topic, partition)]
    }
    if not ahead:
        return
    missing = _missing_records(settings, ahead)
    if not missing:
        log.info(
            "the broker's end offsets lag the store's positions %s, but it has those records",
            {f"{t}:{p}": (o, end_offsets[(t, p)]) for (t, p), o in ahead.items()},
        )
        return
    log.warning(
        "the state in %s was built from records the broker does not have "
        "(partition: offset already applied %s). Was the broker reset or were the topics "
        "recreated? Those partitions stay not ready until the topics reach that offset. "
        "If the topics really are new, stop this instance, delete that directory (or set "
        "CALCULATOR_STATE_DIR elsewhere) and start again.",
        settings.instance_dir,
        missing,
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
    """Why the instance stops: a signal, or a routing table nobody keeps current any more.

    ``requested`` is the event the dataflow's sources watch; setting it stops them, and
    Bytewax then closes the epoch and lets the sinks flush.
    """

    def __init__(self) -> None:
        self.requested = threading.Event()
        self.routing_lost = threading.Event()

    def on_routing_lost(self, exc: BaseException) -> None:
        """The routing follower gave up: stop, and exit 1 afterwards."""
        # Serving with a routing table nobody keeps current would send requests to
        # instances that moved or died: stop (cleanly, so the state stays consistent)
        # and exit non-zero, so that a supervisor restarts this instance.
        log.error(
            "the routing table can no longer be kept current (%s): stopping the instance", exc
        )
        self.routing_lost.set()
        self.requested.set()

    def on_signal(self, signum: int, _frame: FrameType | None) -> None:
        """SIGTERM or SIGINT: stop cleanly; a second one exits at once."""
        if self.requested.is_set():
            log.warning("second %s: exiting now", signal.Signals(signum).name)
            os._exit(130)
        log.info("%s received: stopping the dataflow", signal.Signals(signum).name)
        self.requested.set()


def _settings(argv: list[str] | None) -> CalculatorSettings | None:
    """The settings from the environment and the command line, logging set up at their
    level; None (said on stderr) when they are invalid."""
    args = _parse_args(argv)
    overrides = {
        "calculator_workers": args.workers,
        "calculator_instance_index": args.index,
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
        "starting %s: partitions %s of %d, %d worker(s), Kafka %s",
        settings.instance_id,
        list(settings.owned_partitions),
        settings.topic_partitions,
        settings.calculator_workers,
        settings.kafka_bootstrap_servers,
    )


def _recovery_dir(settings: CalculatorSettings) -> Path:
    """Bytewax's recovery partitions of this instance, created on its first start."""
    recovery_dir = settings.instance_dir / "recovery"
    if not recovery_dir.exists():
        recovery_dir.mkdir(parents=True)
        init_db_dir(recovery_dir, max(1, settings.calculator_workers))
        log.info("created recovery partitions in %s", recovery_dir)
    return recovery_dir


def _expecting_every_input(settings: CalculatorSettings) -> DataflowHealth:
    """Dataflow health that is not ready until every owned input partition reads."""
    health = DataflowHealth()
    for topic in INPUT_TOPICS:
        for partition in settings.owned_partitions:
            health.expect_input(topic, partition)
    return health


def main(argv: list[str] | None = None) -> int:
    """Run until the dataflow stops; the exit status says whether it stopped cleanly."""
    settings = _settings(argv)
    if settings is None:
        return 2
    _configure_process(settings)
    try:
        ensure_topics_when_available(
            settings.kafka_bootstrap_servers,
            settings.topic_partitions,
            settings.topic_replication_factor,
        )
        end_offsets = _end_offsets(settings)
    except (TopicMismatchError, TopicAdminError, KafkaException) as exc:
        log.error("cannot start: %s", exc)
        return 2

    recovery_dir = _recovery_dir(settings)
    store = SellableStore(settings.instance_dir / "store")
    _warn_if_state_is_from_other_topics(settings, store, end_offsets)
    stopping = _Stopping()
    routing = RoutingTable(InstanceInfo.of(settings))
    follower = RoutingFollower(routing, settings, on_failure=stopping.on_routing_lost)
    dataflow_done = threading.Event()
    runtime = CalculatorRuntime(
        settings,
        store,
        Progress(store.positions()),
        routing,
        CalculatorMetrics(),
        dataflow_running=lambda: not dataflow_done.is_set(),
        end_offsets_at_start=end_offsets,
        health=_expecting_every_input(settings),
        routing_following=lambda: follower.following,
    )
    signal.signal(signal.SIGTERM, stopping.on_signal)
    signal.signal(signal.SIGINT, stopping.on_signal)
    return _run(runtime, follower, recovery_dir, stopping, dataflow_done)


def _run(
    runtime: CalculatorRuntime,
    follower: RoutingFollower,
    recovery_dir: Path,
    stopping: _Stopping,
    dataflow_done: threading.Event,
) -> int:
    """Follow the routing table, advertise, serve the API and run the dataflow until it
    stops; then stop the rest and close the store. The exit status."""
    settings, me = runtime.settings, runtime.routing.me
    server: uvicorn.Server | None = None
    status = 0
    try:
        follower.start()
        advertise(settings, me)
        server, api_thread = _start_api(runtime)
        tune_gc_for_serving()
        log.info(
            "%s listening on http://%s:%d (advertised as %s)",
            settings.instance_id,
            settings.calculator_host,
            settings.calculator_port,
            settings.advertised_url,
        )
        flow = build_dataflow(
            settings,
            runtime.store,
            runtime.progress,
            runtime.metrics,
            stopping.requested,
            runtime.health,
        )
        cli_main(
            flow,
            workers_per_process=settings.calculator_workers,
            epoch_interval=timedelta(seconds=settings.calculator_epoch_seconds),
            recovery_config=RecoveryConfig(str(recovery_dir)),
        )
        log.info("dataflow stopped")
        if stopping.routing_lost.is_set():
            status = 1
        else:
            _withdraw(settings, me)
    except Exception as exc:
        log.error("%s failed: %s", settings.instance_id, exc, exc_info=not isinstance(exc, OSError))
        status = 1
    finally:
        dataflow_done.set()
        if server is not None:
            server.should_exit = True
            api_thread.join(timeout=10)
        follower.stop()
        runtime.store.close()
        log.info("%s stopped", settings.instance_id)
    return status


if __name__ == "__main__":
    sys.exit(main())
