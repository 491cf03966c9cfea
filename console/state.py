"""What the console shows, gathered from every backend while a browser is watching.

Example::

    collector = Collector(settings, client, control)
    collector.watch("STL", "123123")
    task = asyncio.create_task(collector.run())   # asks the backends while subscribed
    async with collector.subscribed():
        snapshot = collector.snapshot()           # JSON-ready: keys, topology, writes…

Every ``CONSOLE_INTERVAL_SECONDS`` (0.4 s) the collector asks each calculator for
``/metadata`` and every watched key, and the Cassandra service for every watched key;
about once a second it also reads every service's ``/metrics`` and ``/health/ready`` and
the control state. Each target is a :class:`~console.backends.Probe`: one request in
flight at a time, each bounded by ``CONSOLE_BACKEND_TIMEOUT_SECONDS``, so a backend that
hangs turns its own cells into errors and delays nothing else. Nobody watching, nothing
is asked.

A write posted through the console is *chased* (:meth:`Collector.chase`): each
calculator is asked for the key with the write's ``position`` (read-your-writes: the
answer comes once the owner has applied it) and the Cassandra service is polled every
10 ms until it shows the value the calculators answered, so the page can show in
milliseconds when the write reached each side.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from console.backends import Outcome, Probe, fetch, key_path
from console.control import Control
from console.settings import ConsoleSettings
from shared_schemas.partitioner import key_and_partition
from shared_schemas.topics import DEFAULT_PARTITIONS

log = logging.getLogger(__name__)

SLOW_EVERY_SECONDS = 1.0
"""How often metrics, readiness and the control state are read (while watched)."""
DISCOVERED_KEEP_SECONDS = 30.0
"""An instance found in a routing table stays a column this long after it was last listed."""
CHASE_SECONDS = 5.0
"""How long a chased write is followed on each side before it counts as not seen."""
CHASE_POLL_SECONDS = 0.01
"""How often the Cassandra service is asked while a write is chased."""


def _now() -> float:
    return time.time()


def _ms(seconds: float) -> int:
    return round(seconds * 1000)


@dataclass(frozen=True)
class Key:
    """A watched (location, sku)."""

    location: str
    sku: str


@dataclass
class KeyCell:
    """One reader's answer for one key, and since when its count has been what it is."""

    count: int | None = None
    found: bool = False
    error: str | None = None
    changed_at: float | None = None
    first_seen: bool = True
    checked_at: float | None = None
    served_by: str | None = None
    replica: str | None = None
    stale_reason: str | None = None
    behind: str | None = None
    last_count: int | None = None
    """The last count answered, kept while the reader answers with an error."""

    def update(self, outcome: Outcome) -> None:
        """Take a new answer for the key."""
        self.checked_at = outcome.at
        headers = {k.lower(): v for k, v in outcome.headers.items()}
        self.served_by = headers.get("x-served-by")
        self.replica = headers.get("x-replica")
        self.stale_reason = headers.get("x-stale-reason")
        self.behind = headers.get("x-behind")
        if outcome.status == 404 and outcome.error_code == "not_found":
            self._value(None, False, outcome.at)
            self.error = None
        elif outcome.ok and isinstance(outcome.body, dict):
            count = outcome.body.get("count")
            self._value(count if isinstance(count, int) else None, True, outcome.at)
            self.error = None
        else:
            self.error = outcome.error or f"unexpected answer: {outcome.body!r}"[:200]

    def _value(self, count: int | None, found: bool, at: float) -> None:
        if self.changed_at is None:
            self.changed_at = at
        elif (count, found) != (self.count, self.found):
            self.changed_at = at
            self.first_seen = False
        self.count, self.found, self.last_count = count, found, count

    def view(self, waiting: float) -> dict[str, Any]:
        """The cell as the page shows it."""
        return {
            "count": self.count if self.error is None else None,
            "found": self.found and self.error is None,
            "lastCount": self.last_count,
            "error": self.error,
            "changedAt": _ms(self.changed_at) if self.changed_at else None,
            "firstSeen": self.first_seen,
            "checkedAt": _ms(self.checked_at) if self.checked_at else None,
            "servedBy": self.served_by,
            "replica": self.replica,
            "staleReason": self.stale_reason,
            "behind": self.behind,
            "waitingSeconds": round(waiting, 1) if waiting >= 1 else None,
        }


class Rate:
    """Per-second rate of a counter read now and then (None until two readings)."""

    def __init__(self) -> None:
        self._last: tuple[float, float] | None = None
        self.value: float | None = None

    def add(self, total: float, at: float) -> None:
        if self._last is not None:
            then, before = self._last
            if total >= before and at > then:
                self.value = (total - before) / (at - then)
            else:  # the process restarted: its counters began again
                self.value = None
        self._last = (at, total)


def metric_samples(text: str) -> list[tuple[str, dict[str, str], float]]:
    """(sample name, labels, value) of Prometheus text."""
    return [
        (sample.name, dict(sample.labels), float(sample.value))
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    ]


def _sum(samples: Iterable[tuple[str, dict[str, str], float]], name: str) -> float | None:
    values = [value for sample, _, value in samples if sample == name]
    return sum(values) if values else None


def _by_partition(
    samples: Iterable[tuple[str, dict[str, str], float]], name: str
) -> dict[int, int]:
    lag: dict[int, int] = {}
    for sample, labels, value in samples:
        if sample == name and labels.get("partition", "").isdigit():
            partition = int(labels["partition"])
            lag[partition] = lag.get(partition, 0) + int(value)
    return lag


class Backend:
    """A service the console reads health and metrics of."""

    def __init__(self, kind: str, url: str, configured: bool = True) -> None:
        self.kind = kind
        self.url = url
        self.configured = configured
        self.ready = Probe()
        self.metrics = Probe()
        self.meta = Probe()  # calculators only
        self.rate = Rate()
        self.lag: dict[int, int] = {}
        self.last_listed = _now()
        self.instance_id: str | None = None
        self.answering: bool | None = None

    def take_metrics(self, outcome: Outcome, *, counter: str, lag_metric: str | None) -> None:
        if not outcome.ok or not isinstance(outcome.body, str):
            return
        try:
            samples = metric_samples(outcome.body)
        except ValueError:
            return
        total = _sum(samples, counter)
        if total is not None:
            self.rate.add(total, outcome.at)
        if lag_metric is not None:
            self.lag = _by_partition(samples, lag_metric)

    def health(self) -> dict[str, Any]:
        """Whether it answers and is ready, as the page shows it."""
        ready = self.ready.latest
        meta = self.meta.latest
        answered = meta if self.kind == "calculator" else ready
        error = None
        if answered is not None and answered.status is None:
            error = answered.error
        elif self.kind == "calculator" and meta is not None and not meta.ok:
            error = meta.error
        return {
            "url": self.url,
            "reachable": None if answered is None else answered.status is not None,
            "error": error,
            "ready": None if ready is None or ready.status is None else ready.ok,
            "readyError": None if ready is None or ready.ok else ready.error,
            "ratePerSecond": None if self.rate.value is None else round(self.rate.value, 1),
        }


@dataclass
class Write:
    """A write posted through the console and how it reached each side."""

    id: int
    kind: str
    location: str
    sku: str
    count: Any
    validate: bool
    at: float
    status: int | None
    answer: Any
    sides: dict[str, dict[str, Any]] = field(default_factory=dict)
    done: bool = False

    def view(self) -> dict[str, Any]:
        answer = self.answer if isinstance(self.answer, dict) else {}
        return {
            "id": self.id,
            "kind": self.kind,
            "locationId": self.location,
            "sku": self.sku,
            "count": self.count,
            "validate": self.validate,
            "at": _ms(self.at),
            "status": self.status,
            "decision": answer.get("status"),
            "mutationId": answer.get("mutationId"),
            "position": answer.get("position"),
            "error": answer.get("error") if self.status != 200 else None,
            "message": answer.get("message"),
            "sides": self.sides,
            "done": self.done,
        }


class Collector:
    """The console's view of the system, refreshed while subscribed (see the module)."""

    def __init__(
        self, settings: ConsoleSettings, client: httpx.AsyncClient, control: Control
    ) -> None:
        self.settings = settings
        self.client = client
        self.control = control
        self.watched: list[Key] = []
        self.cells: dict[tuple[str, Key], KeyCell] = {}
        self.key_probes: dict[tuple[str, Key], Probe] = {}
        self.calculators: dict[str, Backend] = {
            url.rstrip("/"): Backend("calculator", url.rstrip("/"))
            for url in settings.console_calculator_urls
        }
        self.service = Backend("cassandra", settings.console_service_url.rstrip("/"))
        self.mutator = Backend("mutator", settings.console_mutator_url.rstrip("/"))
        self.writes: deque[Write] = deque(maxlen=15)
        self.events: deque[dict[str, Any]] = deque(maxlen=40)
        self.control_state: dict[str, Any] = {
            "allowed": control.allowed,
            "mode": control.mode,
            "reason": control.reason,
            "services": [],
        }
        self.control_probe = Probe()
        self._control_busy: dict[str, str] = {}
        self._subscribers = 0
        self._active = asyncio.Event()
        self._write_ids = itertools.count(1)
        self._tasks: set[asyncio.Task[Any]] = set()
        self._last_slow = 0.0
        self._owned: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {}

    # --- watching ---------------------------------------------------------------------

    @property
    def subscribers(self) -> int:
        """Browsers (event streams) watching now."""
        return self._subscribers

    @contextlib.asynccontextmanager
    async def subscribed(self) -> AsyncIterator[None]:
        """While inside, the backends are asked every interval."""
        self._subscribers += 1
        self._active.set()
        try:
            yield
        finally:
            self._subscribers -= 1
            if self._subscribers == 0:
                self._active.clear()

    def watch(self, location: str, sku: str) -> None:
        """Watch a key (first in the table); the oldest goes beyond the limit."""
        key = Key(location, sku)
        if key in self.watched:
            self.watched.remove(key)
        self.watched.insert(0, key)
        for dropped in self.watched[self.settings.console_max_watched_keys :]:
            self.unwatch(dropped.location, dropped.sku)

    def unwatch(self, location: str, sku: str) -> bool:
        """Stop watching a key; whether it was watched."""
        key = Key(location, sku)
        if key not in self.watched:
            return False
        self.watched.remove(key)
        for reader_key in [rk for rk in self.key_probes if rk[1] == key]:
            self.key_probes.pop(reader_key).cancel()
            self.cells.pop(reader_key, None)
        return True

    # --- polling ----------------------------------------------------------------------

    async def run(self) -> None:
        """Ask the backends every interval while subscribed, until cancelled."""
        while True:
            await self._active.wait()
            try:
                self.tick()
            except Exception:  # never let one bad answer end the console's polling
                log.exception("gathering the state failed")
            await asyncio.sleep(self.settings.console_interval_seconds)

    async def gather_once(self) -> None:
        """One round of asking, waited for (an idle console's one-off snapshot)."""
        self.tick(slow=True)
        probes = [
            *self.key_probes.values(),
            *(p for b in self._backends() for p in (b.meta, b.ready, b.metrics)),
            self.control_probe,
        ]
        deadline = time.monotonic() + self.settings.console_backend_timeout_seconds + 1
        while any(p.busy() for p in probes) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)

    def _backends(self) -> list[Backend]:
        return [*self.calculators.values(), self.service, self.mutator]

    def readers(self) -> list[Backend]:
        """Every GET endpoint shown as a column: the calculators, then the Cassandra service."""
        now = _now()
        for url, backend in list(self.calculators.items()):
            if not backend.configured and now - backend.last_listed > DISCOVERED_KEEP_SECONDS:
                del self.calculators[url]
        return [*self.calculators.values(), self.service]

    def tick(self, slow: bool | None = None) -> None:
        """Send every request that is due (each probe skips if its last is in flight)."""
        readers = self.readers()
        for calculator in self.calculators.values():
            calculator.meta.poll(
                partial(self._get, calculator.url + "/metadata"),
                partial(self._take_metadata, calculator),
            )
        for key in self.watched:
            for reader in readers:
                probe = self.key_probes.setdefault((reader.url, key), Probe())
                cell = self.cells.setdefault((reader.url, key), KeyCell())
                probe.poll(
                    partial(self._get, reader.url + key_path(key.location, key.sku)), cell.update
                )
        now = time.monotonic()
        if slow is None:
            slow = now - self._last_slow >= SLOW_EVERY_SECONDS
        if not slow:
            return
        self._last_slow = now
        metrics = {
            "calculator": ("calculator_records_total", "calculator_lag_records"),
            "cassandra": ("service_rows_written_total", "service_lag_records"),
            "mutator": ("mutator_requests_total", None),
        }
        for backend in self._backends():
            backend.ready.poll(
                partial(self._get, backend.url + "/health/ready"),
                partial(self._take_health, backend),
            )
            counter, lag = metrics[backend.kind]
            backend.metrics.poll(
                partial(self._get, backend.url + "/metrics"),
                partial(backend.take_metrics, counter=counter, lag_metric=lag),
            )
        if self.control.allowed:
            self.control_probe.poll(self._control_status)

    async def _get(self, url: str) -> Outcome:
        return await fetch(self.client, url, self.settings.console_backend_timeout_seconds)

    async def _control_status(self) -> Outcome:
        state = await self.control.status()
        self.control_state = state
        return Outcome(200, state)

    def _take_health(self, backend: Backend, outcome: Outcome) -> None:
        if backend.kind != "calculator":
            self._note_answering(backend, outcome)

    def _note_answering(self, backend: Backend, outcome: Outcome) -> None:
        answering = outcome.status is not None
        if backend.answering is not None and answering != backend.answering:
            name = backend.instance_id or f"{backend.kind} {backend.url}"
            if answering:
                self.event(f"{name} answers again", "good")
            else:
                self.event(f"{name} does not answer: {outcome.error}", "bad")
                # Whatever it held, a process that comes back starts from nothing.
                self._owned.pop(backend.instance_id or "", None)
        backend.answering = answering

    def _take_metadata(self, calculator: Backend, outcome: Outcome) -> None:
        self._note_answering(calculator, outcome)
        if not outcome.ok or not isinstance(outcome.body, dict):
            return
        now = _now()
        for instance in outcome.body.get("instances", []):
            url = str(instance.get("url", "")).rstrip("/")
            if not url:
                continue
            if instance.get("self") and instance.get("instanceId"):
                calculator.instance_id = str(instance["instanceId"])
                self._note_ownership(calculator.instance_id, instance)
            known = self.calculators.get(url)
            if known is None:
                known = self.calculators[url] = Backend("calculator", url, configured=False)
                self.event(f"{instance.get('instanceId')} joined the routing table ({url})")
            known.last_listed = now

    def _note_ownership(self, instance_id: str, instance: dict[str, Any]) -> None:
        owned = tuple(sorted(instance.get("partitions", [])))
        restoring = tuple(sorted(instance.get("restoring", [])))
        before = self._owned.get(instance_id)
        self._owned[instance_id] = (owned, restoring)
        if before is None:
            self.event(f"{instance_id} holds partitions {_list(owned) or 'none'}")
            return
        if before == (owned, restoring):
            return
        took = sorted(set(owned) - set(before[0]))
        gave = sorted(set(before[0]) - set(owned))
        parts = []
        if took:
            parts.append(f"took partitions {_list(took)}")
        if gave:
            parts.append(f"gave up partitions {_list(gave)}")
        if restoring:
            parts.append(f"restoring {_list(restoring)}")
        elif before[1]:
            parts.append(f"restored {_list(before[1])}")
        if parts:
            self.event(f"{instance_id} " + ", ".join(parts))

    def event(self, text: str, tone: str = "info") -> None:
        """Note something that happened, for the page's event list."""
        self.events.appendleft({"at": _ms(_now()), "text": text, "tone": tone})
        log.info("%s", text)

    # --- writes -----------------------------------------------------------------------

    def record_write(
        self,
        kind: str,
        location: str,
        sku: str,
        count: Any,
        validate: bool,
        status: int | None,
        answer: Any,
    ) -> Write:
        """Remember a write posted through the console; chase it if it counts."""
        write = Write(
            next(self._write_ids), kind, location, sku, count, validate, _now(), status, answer
        )
        self.writes.appendleft(write)
        position = answer.get("position") if isinstance(answer, dict) else None
        if status == 200 and isinstance(position, str):
            task = asyncio.create_task(self.chase(write, position))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        else:
            write.done = True
        return write

    async def chase(self, write: Write, position: str) -> None:
        """Time the write's arrival on every side (see the module docstring)."""
        started = time.monotonic()
        path = key_path(write.location, write.sku)
        target: asyncio.Future[int | None] = asyncio.get_running_loop().create_future()
        before = self.cells.get((self.service.url, Key(write.location, write.sku)))
        baseline = None if before is None else (before.count, before.found)
        calculators = list(self.calculators.values())

        async def on_calculator(calculator: Backend) -> None:
            outcome = await fetch(
                self.client,
                calculator.url + path,
                CHASE_SECONDS + 1,
                params={"position": position, "timeout": f"{CHASE_SECONDS:g}"},
            )
            side = _side(outcome, started)
            write.sides[calculator.url] = side
            if side["count"] is not None and not target.done():
                target.set_result(side["count"])

        async def on_service() -> None:
            deadline = started + CHASE_SECONDS
            seen: list[tuple[float, Outcome]] = []
            while time.monotonic() < deadline:
                outcome = await fetch(self.client, self.service.url + path, 1.0)
                seen.append((time.monotonic(), outcome))
                wanted = target.result() if target.done() else None
                for at, answer in seen:
                    count = _count(answer)
                    reached = (
                        count == wanted
                        if wanted is not None
                        else target.done() and (count, count is not None) != baseline
                    )
                    if count is not None and reached:
                        write.sides[self.service.url] = _side(answer, started, at)
                        return
                write.sides[self.service.url] = {
                    "ms": None,
                    "count": _count(outcome),
                    "error": outcome.error if outcome.status != 404 else None,
                    "pending": True,
                }
                await asyncio.sleep(CHASE_POLL_SECONDS)
            write.sides[self.service.url] = {
                "ms": None,
                "count": _count(seen[-1][1]) if seen else None,
                "error": f"not seen within {CHASE_SECONDS:g} s (changed again since?)",
            }

        async def calculators_done() -> None:
            await asyncio.gather(*(on_calculator(c) for c in calculators))
            if not target.done():
                target.set_result(None)

        try:
            await asyncio.gather(calculators_done(), on_service())
        finally:
            write.done = True

    # --- the snapshot -----------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """Everything the page shows, JSON-ready."""
        readers = self.readers()
        try:
            topology = self._topology()
        except Exception as exc:  # an answer of an unexpected shape: say so, show the rest
            log.exception("the routing tables could not be read")
            topology = {
                "partitionCount": DEFAULT_PARTITIONS,
                "owners": {},
                "instances": [],
                "partitions": [],
                "service": self.service.health(),
                "mutator": self.mutator.health(),
                "error": f"the routing tables could not be read: {type(exc).__name__}: {exc}",
            }
        partitions = topology["partitionCount"]
        keys = []
        for key in self.watched:
            cells = {}
            for reader in readers:
                cell = self.cells.get((reader.url, key))
                probe = self.key_probes.get((reader.url, key))
                waiting = probe.waiting_for() if probe else 0.0
                cells[reader.url] = None if cell is None else cell.view(waiting)
            answers = [c for c in cells.values() if c is not None and c["error"] is None]
            agree = (
                len(answers) == len(readers)
                and len({(c["count"], c["found"]) for c in answers}) == 1
            )
            _, partition = key_and_partition(key.location, key.sku, partitions)
            keys.append(
                {
                    "locationId": key.location,
                    "sku": key.sku,
                    "partition": partition,
                    "owner": topology["owners"].get(partition),
                    "cells": cells,
                    "agree": agree,
                }
            )
        return {
            "now": _ms(_now()),
            "interval": self.settings.console_interval_seconds,
            "readers": [
                {
                    "url": r.url,
                    "kind": r.kind,
                    "label": r.instance_id
                    or ("Cassandra service" if r.kind == "cassandra" else r.url),
                    "configured": r.configured,
                }
                for r in readers
            ],
            "keys": keys,
            "topology": topology,
            "writes": [w.view() for w in self.writes],
            "events": list(self.events),
            "control": {**self.control_state, "busy": dict(self._control_busy)},
            "watching": self._subscribers,
        }

    def _topology(self) -> dict[str, Any]:
        views: list[tuple[Backend, dict[str, Any]]] = []
        for answering in self.calculators.values():
            meta = answering.meta.latest
            if meta is not None and meta.ok and isinstance(meta.body, dict):
                views.append((answering, meta.body))
        count = next(
            (int(v["partitionCount"]) for _, v in views if "partitionCount" in v),
            DEFAULT_PARTITIONS,
        )
        # Each instance as it says itself; one that does not answer, as others list it.
        instances: dict[str, dict[str, Any]] = {}
        for _, view in views:
            for entry in view.get("instances", []):
                if entry.get("self"):
                    instances[str(entry["instanceId"])] = {**entry, "selfReported": True}
        for _, view in views:
            for entry in view.get("instances", []):
                instances.setdefault(str(entry["instanceId"]), {**entry, "selfReported": False})
        # Owner of a partition: the instance that holds it by its own account (the newest
        # assignment if two do for a moment), else what a routing table says.
        owners: dict[int, str] = {}
        states: dict[int, str] = {}
        for instance_id, entry in sorted(
            instances.items(), key=lambda item: int(item[1].get("generation", 0))
        ):
            if not entry["selfReported"]:
                continue
            for p in entry.get("partitions", []):
                owners[int(p)] = instance_id
                states[int(p)] = "restoring" if p in entry.get("restoring", []) else "active"
        standbys: dict[int, list[dict[str, Any]]] = {}
        for _, view in views:
            for item in view.get("partitions", []):
                p = int(item["partition"])
                if p not in owners and item.get("owner"):
                    owners[p] = str(item["owner"])
                    states[p] = str(item.get("state", "active"))
                for standby in item.get("standbys", []):
                    holder = standbys.setdefault(p, [])
                    if all(s["instanceId"] != standby["instanceId"] for s in holder):
                        holder.append(standby)
        by_id = {c.instance_id: c for c in self.calculators.values() if c.instance_id}
        by_port = {int(s["port"]): s for s in self.control_state.get("services", []) if "port" in s}
        rows = []
        listed = set()
        for instance_id, entry in sorted(instances.items()):
            calculator: Backend | None = by_id.get(instance_id) or self.calculators.get(
                str(entry.get("url", "")).rstrip("/")
            )
            listed.add(calculator.url if calculator else entry.get("url"))
            rows.append(self._instance_row(instance_id, entry, calculator, by_port))
        for backend in self.calculators.values():
            if backend.url not in listed:
                rows.append(self._instance_row(backend.instance_id, None, backend, by_port))
        lag: dict[int, int] = {}
        for calculator in self.calculators.values():
            if calculator.instance_id is None:
                continue
            for p, records in calculator.lag.items():
                if owners.get(p) == calculator.instance_id:
                    lag[p] = records
        partition_rows = [
            {
                "partition": p,
                "owner": owners.get(p),
                "state": states.get(p, "unowned"),
                "standbys": standbys.get(p, []),
                "lag": lag.get(p),
                "serviceLag": self.service.lag.get(p),
            }
            for p in range(count)
        ]
        return {
            "partitionCount": count,
            "owners": owners,
            "instances": rows,
            "partitions": partition_rows,
            "service": self.service.health(),
            "mutator": self.mutator.health(),
            "error": None,
        }

    def _instance_row(
        self,
        instance_id: str | None,
        entry: dict[str, Any] | None,
        calculator: Backend | None,
        by_port: dict[int, dict[str, Any]],
    ) -> dict[str, Any]:
        url = calculator.url if calculator else str((entry or {}).get("url", ""))
        health = calculator.health() if calculator else {"url": url, "reachable": None}
        entry = entry or {}
        standby_lag: dict[str, int] = {}
        if calculator is not None and calculator.meta.latest is not None:
            body = calculator.meta.latest.body
            if calculator.meta.latest.ok and isinstance(body, dict):
                for item in body.get("partitions", []):
                    for standby in item.get("standbys", []):
                        if standby.get("instanceId") == instance_id:
                            standby_lag[str(item["partition"])] = int(standby.get("lag", 0))
        port = _port(url)
        service = by_port.get(port) if port is not None else None
        return {
            **health,
            "instanceId": instance_id,
            "selfReported": bool(entry.get("selfReported")),
            "partitions": entry.get("partitions", []),
            "restoring": entry.get("restoring", []),
            "standby": entry.get("standby", []),
            "standbyLag": standby_lag,
            "generation": entry.get("generation"),
            "configured": calculator.configured if calculator else False,
            "control": service,
            "busy": self._control_busy.get(service["name"]) if service else None,
        }

    # --- control ----------------------------------------------------------------------

    async def act(self, name: str, action: str, kill: bool) -> tuple[int, dict[str, Any]]:
        """Stop or start a calculator through the control, noting it in the events."""
        what = {"start": "start", "stop": "kill -9" if kill else "stop (SIGTERM)"}[action]
        if not self.control.allowed:
            return await self.control.act(name, action, kill)
        if name in self._control_busy:
            return 409, {
                "error": "conflict",
                "message": f"{name}: {self._control_busy[name]} is under way",
            }
        self._control_busy[name] = what
        self.event(f"{what} {name} requested", "bad" if action == "stop" else "good")
        started = time.monotonic()
        try:
            status, body = await self.control.act(name, action, kill)
        finally:
            del self._control_busy[name]
        took = time.monotonic() - started
        if status == 200:
            self.event(f"{what} {name}: done in {took:.1f} s", "info")
        else:
            self.event(f"{what} {name} failed: {body.get('message')}", "bad")
        if self.control.allowed:
            self.control_state = await self.control.status()
        return status, body

    async def aclose(self) -> None:
        """Cancel every request in flight and every chase."""
        for probe in [*self.key_probes.values(), self.control_probe]:
            probe.cancel()
        for backend in self._backends():
            for probe in (backend.meta, backend.ready, backend.metrics):
                probe.cancel()
        for task in list(self._tasks):
            task.cancel()


def _list(partitions: Iterable[int]) -> str:
    return ", ".join(str(p) for p in partitions)


def _count(outcome: Outcome) -> int | None:
    if outcome.ok and isinstance(outcome.body, dict):
        count = outcome.body.get("count")
        return count if isinstance(count, int) else None
    return None


def _side(outcome: Outcome, started: float, at: float | None = None) -> dict[str, Any]:
    """How one side answered a chased write: milliseconds after the mutator's answer."""
    count = _count(outcome)
    arrived = at if at is not None else time.monotonic()
    return {
        "ms": round((arrived - started) * 1000, 1) if count is not None else None,
        "count": count,
        "error": outcome.error,
        "servedBy": {k.lower(): v for k, v in outcome.headers.items()}.get("x-served-by"),
        "replica": {k.lower(): v for k, v in outcome.headers.items()}.get("x-replica"),
    }


def _port(url: str) -> int | None:
    from urllib.parse import urlsplit

    try:
        return urlsplit(url).port
    except ValueError:
        return None
