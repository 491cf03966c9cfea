"""The comparison's workload: writes through the mutator, reads and freshness probes on every path.

Three read paths answer the same question for the same keys:

* ``calculator-local``: a calculator asked for a key it owns (one RocksDB read);
* ``calculator-forwarded``: a calculator asked for a key another instance owns (a hop);
* ``cassandra-service``: the Cassandra read model.

Everything is seeded: the same ``seed`` gives the same writes in the same order and the
same read keys (the key names get a fresh run prefix, and timings of course differ).
"""

from __future__ import annotations

import asyncio
import json
import random
import time
import uuid
from collections import defaultdict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from comparison import cpu
from comparison.failover import FailoverPhase, skipped
from comparison.validated import ValidatedReservations

PATHS = ("calculator-local", "calculator-forwarded", "cassandra-service")
"""Every read path; with one calculator instance there is no calculator-forwarded."""


@dataclass(frozen=True)
class Options:
    """What to run."""

    keys: int = 200
    locations: int = 10
    write_rate: float = 100.0
    """Mutations per second sent to the mutator during the measured phase."""
    read_concurrency: int = 16
    duration: float = 30.0
    """Seconds of the measured phase; each read path gets a third of it."""
    seed: int = 1
    probes: int = 30
    """Freshness probes per path."""
    failover: bool = True
    """Run the failover phase (it also needs a way to kill a calculator)."""
    stale_threshold_ms: float = 1000.0
    """In the failover phase, an answer further behind the acknowledged writes than this
    is stale (less is a path's normal lag)."""
    failover_timeout: float = 60.0
    """Seconds after the kill to wait for every key to be exact again on every path."""
    validated_share: float = 0.0
    """Share (0..1) of the measured phase's reservations sent with ``?validate=true``
    (decided by the owner calculator: only a CONFIRMED one is counted). The failover
    phase writes adjustments only, validated reservations none."""


@dataclass
class Endpoints:
    """Base URLs of the running system."""

    mutator: str
    service: str
    calculators: list[str]


@dataclass
class Key:
    """One (location, sku) and which calculator owns it."""

    location: str
    sku: str
    owner: int


@dataclass
class Measurements:
    """Raw results; :mod:`comparison.report` turns them into numbers and charts."""

    options: Options
    paths: tuple[str, ...] = PATHS
    latencies_ms: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    errors: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    read_seconds: dict[str, float] = field(default_factory=dict)
    reads_per_second: dict[str, list[int]] = field(default_factory=lambda: defaultdict(list))
    freshness_ms: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    freshness_timeouts: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    writes_per_second: list[int] = field(default_factory=list)
    writes: int = 0
    write_errors: int = 0
    disagreements: list[dict[str, Any]] = field(default_factory=list)
    keys_checked: int = 0
    listing_ms: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    listing_mismatches: list[dict[str, Any]] = field(default_factory=list)
    cpu: dict[str, dict[str, float]] = field(default_factory=dict)
    """Per read path: cores used by each watched process and by the whole machine."""
    failover: dict[str, Any] = field(default_factory=lambda: skipped("not run"))
    reservation_latency_ms: dict[str, list[float]] = field(
        default_factory=lambda: {"unvalidated": [], "validated": []}
    )
    """Reservation POSTs of the measured phase, from sent to answered: ``unvalidated``
    (answered 200), ``validated`` (answered with a decision or 202)."""
    validated: ValidatedReservations = field(default_factory=ValidatedReservations)


def _split(keys: list[Key]) -> tuple[list[Key], list[Key]]:
    """(probe keys, written only by the freshness probes; keys the steady writes use)."""
    probes = max(3, len(keys) // 10)
    return keys[:probes], keys[probes:]


class Workload:
    """Runs the phases against ``endpoints``; ``progress`` gets (phase, done, total)."""

    def __init__(
        self,
        endpoints: Endpoints,
        options: Options,
        progress: Callable[[str, float, float], None] = lambda *_: None,
        kill: Callable[[str], Awaitable[None]] | None = None,
        no_kill_reason: str = "no way to kill a calculator was given",
        watch_pids: dict[str, int] | None = None,
    ) -> None:
        """``kill`` kills the calculator at a URL (the failover phase runs only with it;
        otherwise its result says ``no_kill_reason``); ``watch_pids``: processes whose
        CPU use is measured while each path is read, by name."""
        if not endpoints.calculators:
            raise ValueError("need at least one calculator instance")
        if options.keys < 10 or options.locations < 1 or options.locations > options.keys:
            raise ValueError("need at least 10 keys and between 1 and --keys locations")
        self.endpoints = endpoints
        self.options = options
        self.progress = progress
        if not 0 <= options.validated_share <= 1:
            raise ValueError("the validated share is between 0 and 1")
        self.rng = random.Random(options.seed)
        # Its own generator: the workload's writes are the same, share or not.
        self.validated_rng = random.Random(f"{options.seed}-validated")
        self.expected: dict[tuple[str, str], int] = {}
        self.paths = PATHS if len(endpoints.calculators) > 1 else (PATHS[0], PATHS[2])
        self.measurements = Measurements(options, self.paths)
        self.kill = kill
        self.no_kill_reason = no_kill_reason
        self.watch_pids = watch_pids or {}
        self.instance_ids: list[str] = []
        self._session: aiohttp.ClientSession | None = None

    @property
    def session(self) -> aiohttp.ClientSession:
        assert self._session is not None
        return self._session

    async def run(self) -> Measurements:
        """Set up the keys, measure every path while writing, then check correctness."""
        connector = aiohttp.TCPConnector(limit=500)
        timeout = aiohttp.ClientTimeout(total=30)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
            self._session = session
            keys = await self._make_keys()
            await self._seed_keys(keys)
            await self._measure(keys)
            await self._failover(keys)
            await self._check(keys)
        return self.measurements

    # --- set-up -------------------------------------------------------------------------

    async def _make_keys(self) -> list[Key]:
        # Fresh key names per run (not from the seed): against a long-running system a
        # second run with the same seed must not find the first run's values.
        run = f"{self.options.seed}-{uuid.uuid4().hex[:6]}"
        # Owners are matched by instance id, which each endpoint states itself: behind
        # docker compose the advertised URLs (container host names) are not the ones the
        # benchmark reaches the instances at.
        instance_ids = [await self._instance_id(url) for url in self.endpoints.calculators]
        self.instance_ids = instance_ids
        await self._wait_settled()
        keys = []
        for i in range(self.options.keys):
            location = f"CMP-{run}-L{i % self.options.locations}"
            sku = f"sku-{i}"
            owner = await self._owner(location, sku)
            if owner not in instance_ids:
                raise RuntimeError(
                    f"{owner} owns {location}/{sku} but is not one of the calculators given "
                    f"({', '.join(instance_ids)}): give every instance's URL"
                )
            keys.append(Key(location, sku, instance_ids.index(owner)))
        return keys

    async def _wait_settled(self, seconds: float = 60) -> None:
        """Wait until every calculator's routing table shows every partition active, all
        tables the same: a calculator just
        started may own everything for a moment, until the others join its group, and
        keys matched to owners then would be read from the wrong instance."""
        deadline = time.monotonic() + seconds
        while True:
            views = []
            for base in self.endpoints.calculators:
                try:
                    async with self.session.get(f"{base}/metadata") as response:
                        partitions = (await response.json())["partitions"]
                    views.append([(p["owner"], p["state"]) for p in partitions])
                except (aiohttp.ClientError, ValueError, KeyError):
                    views.append([])
            first = views[0]
            if (
                first
                and all(view == first for view in views)
                and all(owner is not None and state == "active" for owner, state in first)
            ):
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"the calculators did not settle within {seconds:g} s")
            await asyncio.sleep(0.2)

    async def _instance_id(self, base: str) -> str:
        async with self.session.get(f"{base}/metadata") as response:
            instances = (await response.json())["instances"]
        return str(next(i["instanceId"] for i in instances if i["self"]))

    async def _owner(self, location: str, sku: str) -> str:
        """The instance id that owns the key, waiting (30 s at most) while it moves."""
        url = f"{self.endpoints.calculators[0]}/metadata/locations/{location}/skus/{sku}"
        deadline = time.monotonic() + 30
        while True:
            async with self.session.get(url) as response:
                body = await response.json()
            if body["owner"] is not None and body["state"] == "active":
                return str(body["owner"]["instanceId"])
            if time.monotonic() > deadline:
                raise RuntimeError(f"no instance serves {location}/{sku} (partition moving)")
            await asyncio.sleep(0.5)

    async def _post(self, kind: str, key: Key, count: int, validated: bool = False) -> float | None:
        """Write one mutation; return when the mutator answered 200 (monotonic), or None.

        ``validated`` (a reservation): sent with ``?validate=true``; accepted when
        answered with a decision (200 CONFIRMED, 409 FAILED) or 202 PENDING, and counted
        in the model only if CONFIRMED (a 202 once decided: :meth:`_settle_validated`).
        """
        body = {"locationId": key.location, "sku": key.sku, "count": count}
        url = f"{self.endpoints.mutator}/inventory/{kind}"
        if validated:
            url += "?validate=true"
        status: int | None = None
        raw = b""
        sent = time.perf_counter()
        try:
            async with self.session.post(url, json=body) as response:
                raw = await response.read()
                status = response.status
        except (aiohttp.ClientError, TimeoutError):
            status = None
        latency_ms = (time.perf_counter() - sent) * 1000
        if validated:
            return self._validated_answer(key, count, status, raw, latency_ms)
        if status != 200:
            self.measurements.write_errors += 1
            return None
        self.measurements.writes += 1
        if kind == "reservation":
            self.measurements.reservation_latency_ms["unvalidated"].append(latency_ms)
        delta = count if kind == "adjustment" else -count
        self.expected[(key.location, key.sku)] = (
            self.expected.get((key.location, key.sku), 0) + delta
        )
        return time.monotonic()

    def _validated_answer(
        self, key: Key, count: int, status: int | None, raw: bytes, latency_ms: float
    ) -> float | None:
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = None
        said, units = self.measurements.validated.answered(
            status, body, (key.location, key.sku), count
        )
        if said == "error":
            self.measurements.write_errors += 1
            return None
        self.measurements.writes += 1
        self.measurements.reservation_latency_ms["validated"].append(latency_ms)
        self.expected[(key.location, key.sku)] = (
            self.expected.get((key.location, key.sku), 0) - units
        )
        return time.monotonic()

    async def _settle_validated(self, seconds: float = 60) -> None:
        """Ask the mutator for the decision of every validated reservation answered 202
        until each is decided (``seconds`` at most) and count the CONFIRMED ones in."""
        tally = self.measurements.validated
        total = len(tally.waiting)
        deadline = time.monotonic() + seconds
        while tally.waiting and time.monotonic() < deadline:
            for mutation_id in list(tally.waiting):
                url = f"{self.endpoints.mutator}/inventory/reservations/{mutation_id}"
                try:
                    async with self.session.get(url) as response:
                        answer = await response.json() if response.status == 200 else None
                except (aiohttp.ClientError, TimeoutError, ValueError):
                    answer = None
                if not isinstance(answer, dict):
                    continue
                decided = tally.decided(mutation_id, answer.get("status"))
                if decided is not None:
                    key, units = decided
                    self.expected[key] = self.expected.get(key, 0) - units
            self.progress("deciding 202 reservations", total - len(tally.waiting), total)
            if tally.waiting:
                await asyncio.sleep(0.2)
        tally.give_up()

    async def _seed_keys(self, keys: list[Key]) -> None:
        semaphore = asyncio.Semaphore(32)
        done = 0

        async def seed(key: Key) -> None:
            nonlocal done
            async with semaphore:
                await self._post("adjustment", key, 1_000)
            done += 1
            self.progress("writing initial stock", done, len(keys))

        await asyncio.gather(*(seed(k) for k in keys))
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            pending = [k for k in keys if not await self._all_paths_agree(k)]
            self.progress("waiting for every path", len(keys) - len(pending), len(keys))
            if not pending:
                return
            keys = pending
            await asyncio.sleep(0.2)
        raise RuntimeError(f"{len(keys)} keys never became visible on every path")

    def _url(self, path: str, key: Key) -> str:
        calculators = self.endpoints.calculators
        if path == "cassandra-service":
            base = self.endpoints.service
        elif path == "calculator-local":
            base = calculators[key.owner]
        else:  # forwarded: ask an instance that does not own the key
            base = calculators[(key.owner + 1) % len(calculators)]
        return f"{base}/inventory/locations/{key.location}/skus/{key.sku}"

    async def _read(self, path: str, key: Key) -> int | None:
        async with self.session.get(self._url(path, key)) as response:
            if response.status != 200:
                await response.read()
                return None
            return int((await response.json())["count"])

    async def _all_paths_agree(self, key: Key) -> bool:
        want = self.expected[(key.location, key.sku)]
        try:
            values = [await self._read(path, key) for path in self.paths]
        except (aiohttp.ClientError, TimeoutError):
            return False
        return all(v == want for v in values)

    # --- the measured phase ------------------------------------------------------------

    async def _measure(self, keys: list[Key]) -> None:
        stop = asyncio.Event()
        writer = asyncio.create_task(self._write_steadily(keys, stop))
        probe_keys, write_keys = _split(keys)
        slot = self.options.duration / len(self.paths)
        for path in self.paths:
            before = cpu.sample(self.watch_pids)
            await self._read_load(path, write_keys, slot)
            if self.watch_pids:
                self.measurements.cpu[path] = cpu.cores_used(before, cpu.sample(self.watch_pids))
        stop.set()
        await writer
        await self._settle_validated()
        for path in self.paths:
            await self._probe_freshness(path, probe_keys)

    async def _write_steadily(self, keys: list[Key], stop: asyncio.Event) -> None:
        interval = 1.0 / self.options.write_rate
        second, count = int(time.monotonic()), 0
        next_at = time.monotonic()
        in_flight: set[asyncio.Task[Any]] = set()
        _, write_keys = _split(keys)
        while not stop.is_set():
            key = self.rng.choice(write_keys)
            if self.rng.random() < 0.5:
                task = asyncio.create_task(
                    self._post("adjustment", key, self.rng.choice([1, 2, 5]))
                )
            else:
                share = self.options.validated_share
                validated = share > 0 and self.validated_rng.random() < share
                task = asyncio.create_task(self._post("reservation", key, 1, validated))
            in_flight.add(task)
            task.add_done_callback(in_flight.discard)
            count += 1
            now_second = int(time.monotonic())
            if now_second != second:
                self.measurements.writes_per_second.append(count)
                second, count = now_second, 0
            next_at += interval
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))
        await asyncio.gather(*in_flight)

    async def _read_load(self, path: str, keys: list[Key], seconds: float) -> None:
        latencies = self.measurements.latencies_ms[path]
        per_second = self.measurements.reads_per_second[path]
        started = time.monotonic()
        deadline = started + seconds
        counts: dict[int, int] = defaultdict(int)
        rng = random.Random(f"{self.options.seed}-{path}")

        async def reader() -> None:
            while time.monotonic() < deadline:
                key = rng.choice(keys)
                t0 = time.perf_counter()
                try:
                    value = await self._read(path, key)
                except (aiohttp.ClientError, TimeoutError):
                    value = None
                if value is None:
                    self.measurements.errors[path] += 1
                    continue
                latencies.append((time.perf_counter() - t0) * 1000)
                counts[int(time.monotonic() - started)] += 1
                self.progress(f"reading {path}", min(seconds, time.monotonic() - started), seconds)

        await asyncio.gather(*(reader() for _ in range(self.options.read_concurrency)))
        self.measurements.read_seconds[path] = time.monotonic() - started
        per_second.extend(counts[s] for s in range(int(seconds)))

    async def _probe_freshness(self, path: str, keys: list[Key]) -> None:
        """Write +1 to a probe key, then time until ``path`` shows it."""
        for n in range(self.options.probes):
            key = keys[n % len(keys)]
            accepted = await self._post("adjustment", key, 1)
            self.progress(f"freshness {path}", n + 1, self.options.probes)
            if accepted is None:
                continue
            want = self.expected[(key.location, key.sku)]
            deadline = accepted + 10
            while True:
                try:
                    seen = await self._read(path, key)
                except (aiohttp.ClientError, TimeoutError):
                    seen = None
                now = time.monotonic()
                if seen == want:
                    self.measurements.freshness_ms[path].append((now - accepted) * 1000)
                    break
                if now > deadline:
                    self.measurements.freshness_timeouts[path] += 1
                    break
                await asyncio.sleep(0.001)
            # Bring the other paths up to date before the next probe of this key.
            while not await self._all_paths_agree(key):
                await asyncio.sleep(0.01)

    # --- failover -----------------------------------------------------------------------

    async def _failover(self, keys: list[Key]) -> None:
        if not self.options.failover:
            self.measurements.failover = skipped("--no-failover")
            return
        if len(self.endpoints.calculators) < 2:
            self.measurements.failover = skipped("one calculator instance: nothing to fail over to")
            return
        if self.kill is None:
            self.measurements.failover = skipped(self.no_kill_reason)
            return
        # Every key exact on every path first: the phase's model starts from there. And
        # the owners as they are now: calculator-local must ask the instance that owns
        # each key when the kill comes.
        await self._wait_agree(keys, "failover: settling", 60)
        await self._wait_settled()
        for key in keys:
            key.owner = self.instance_ids.index(await self._owner(key.location, key.sku))
        phase = FailoverPhase(self, keys, self.kill)
        try:
            self.measurements.failover = await phase.run()
        except (LookupError, OSError, TimeoutError) as exc:  # no such process, not ours…
            self.measurements.failover = skipped(f"could not kill the calculator: {exc}")

    async def _wait_agree(self, keys: list[Key], phase: str, seconds: float) -> list[Key]:
        """Wait (``seconds`` at most) until every key agrees on every path; the rest."""
        deadline = time.monotonic() + seconds
        wrong: list[Key] = keys
        while wrong and time.monotonic() < deadline:
            wrong = [k for k in wrong if not await self._all_paths_agree(k)]
            self.progress(phase, len(keys) - len(wrong), len(keys))
            if wrong:
                await asyncio.sleep(0.5)
        return wrong

    # --- correctness and listings -------------------------------------------------------

    async def _check(self, keys: list[Key]) -> None:
        wrong = await self._wait_agree(keys, "checking every key", 60)
        self.measurements.keys_checked = len(keys)
        for key in wrong:
            entry: dict[str, Any] = {
                "location": key.location,
                "sku": key.sku,
                "expected": self.expected[(key.location, key.sku)],
            }
            for path in self.paths:
                entry[path] = await self._read(path, key)
            self.measurements.disagreements.append(entry)
        await self._check_listings(keys)

    async def _check_listings(self, keys: list[Key]) -> None:
        by_location: dict[str, dict[str, int]] = defaultdict(dict)
        for key in keys:
            by_location[key.location][key.sku] = self.expected[(key.location, key.sku)]
        for location, expected in by_location.items():
            for name, fetch in (
                ("calculator fan-out", self._calculator_listing),
                ("cassandra-service pages", self._service_listing),
            ):
                t0 = time.perf_counter()
                listed = await fetch(location)
                self.measurements.listing_ms[name].append((time.perf_counter() - t0) * 1000)
                if listed != expected:
                    self.measurements.listing_mismatches.append(
                        {"location": location, "side": name}
                    )

    async def _calculator_listing(self, location: str) -> dict[str, int]:
        url = f"{self.endpoints.calculators[0]}/inventory/locations/{location}/skus"
        async with self.session.get(url) as response:
            body = await response.json()
        return {item["sku"]: item["count"] for item in body["skus"]}

    async def _service_listing(self, location: str) -> dict[str, int]:
        listed: dict[str, int] = {}
        after = ""
        while True:
            url = f"{self.endpoints.service}/inventory/locations/{location}/skus"
            async with self.session.get(url, params={"limit": 100, "after": after}) as response:
                body = await response.json()
            listed.update({item["sku"]: item["count"] for item in body["skus"]})
            if body["next"] is None:
                return listed
            after = body["next"]
