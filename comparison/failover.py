"""The failover phase: kill -9 one calculator while writes and reads flow on every path.

Every answer is classified (:data:`KINDS`) and, when it carries a value, compared with a
model of the acknowledged writes to get its *staleness*:

* each key has one writer, which sends the key's next write only after the mutator
  acknowledged the previous one, so the order of a key's writes in its partition is
  the order they were sent, and every write adds a positive count: a key's value after
  its n-th write is known and no two prefixes give the same value;
* an answer sent at time ``t`` with value ``v`` includes exactly the writes whose prefix
  sum is ``v``; its staleness is ``t`` minus the acknowledgement time of the oldest
  write acknowledged before ``t`` that ``v`` does not include (0 when it includes all of
  them: a value may also include writes still in flight).

An answer is *exact* when it is a 200 whose staleness is at most ``stale_threshold_ms``
(the normal lag of a path is not an outage). A key is exact again on a path from its
first exact answer after its last answer that was not; a path has recovered when every
key has.

Example::

    phase = FailoverPhase(workload, keys, kill=kill_calculator)
    result = await phase.run()          # a plain dict: buckets, per-path summary
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import aiohttp

if TYPE_CHECKING:
    from comparison.workload import Key, Workload

KINDS = ("fresh", "stale", "503", "504", "other")
"""fresh: a 200 without ``X-Replica: standby`` or ``X-Behind``; stale: an answer of a
standby replica (200, or 404 for a key it does not have yet), or of an owner still
catching up after a takeover (``X-Behind``); 503, 504: those statuses; other: any other
status, a refused connection, a client time-out."""

BEFORE_KILL_SECONDS = 3.0
"""Load before the kill: the baseline of each path in the timeline."""
QUIET_SECONDS = 2.0
"""The phase ends this long after the last answer that was not exact, on every path."""
READ_TIMEOUT_SECONDS = 5.0
PAUSE_AFTER_FAILURE_SECONDS = 0.1
"""A reader whose answer was not a 200 waits this long before its next read (a client
backing off a little), so a refused connection does not turn into a busy loop."""


@dataclass
class Answer:
    """One read during the phase; ``t`` is when it was sent, in seconds since the kill."""

    path: str
    key: int
    t: float
    kind: str
    latency_ms: float
    staleness_ms: float | None
    """None: no value (not a 200), or the key's model is unknown (a write failed)."""
    detail: str | None = None
    """The 503's error code, the standby's stale reason, or what went wrong."""


@dataclass
class KeyModel:
    """The writes sent to one key during the phase, in order."""

    base: int
    values: list[int] = field(default_factory=list)
    """The key's value after each write."""
    acked: list[float | None] = field(default_factory=list)
    """When the mutator acknowledged each write (monotonic), None while in flight."""
    unknown: bool = False
    """A write failed (it may or may not have been written): no staleness from now on."""
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    def staleness(self, value: int | None, sent: float, since: float) -> float | None:
        """Seconds ``value`` is behind at ``sent``; ``since`` is the phase's start, used
        when the value misses even the writes before the phase (a lower bound then)."""
        if self.unknown:
            return None
        if value is None or value < self.base:
            return max(0.0, sent - since)
        included = 0
        if value != self.base:
            try:
                included = self.values.index(value) + 1
            except ValueError:
                return None  # no prefix of the writes gives this value: counted as wrong
        if included == len(self.values):
            return 0.0
        acked = self.acked[included]
        return 0.0 if acked is None or acked > sent else sent - acked


class FailoverPhase:
    """Writes and reads on every path of ``workload``; kills one calculator with ``kill``
    (given the calculator's URL, returns once the process is gone) after
    :data:`BEFORE_KILL_SECONDS`."""

    def __init__(
        self,
        workload: Workload,
        keys: list[Key],
        kill: Callable[[str], Awaitable[None]],
    ) -> None:
        self.workload = workload
        self.keys = keys
        self.kill = kill
        self.options = workload.options
        self.paths = workload.paths
        self.models: list[KeyModel] = []
        self.answers: list[Answer] = []
        self.writes: list[tuple[float, bool]] = []
        self.killed_at = 0.0
        self.started = 0.0
        self.victim_back: float | None = None
        self.rng = random.Random(f"{self.options.seed}-failover")

    async def run(self) -> dict[str, Any]:
        session = self.workload.session
        victim_index, victim_id = await self._victim()
        victim = self.workload.endpoints.calculators[victim_index]
        self.models = [KeyModel(self.workload.expected[(k.location, k.sku)]) for k in self.keys]
        self.started = time.monotonic()
        self.killed_at = self.started + BEFORE_KILL_SECONDS  # until the kill happens
        stop = asyncio.Event()
        per_path = max(2, self.options.read_concurrency // len(self.paths))
        tasks = [asyncio.create_task(self._write(stop))]
        for path in self.paths:
            tasks += [asyncio.create_task(self._read(path, n, stop)) for n in range(per_path)]
        self.workload.progress("failover: load before the kill", 0, BEFORE_KILL_SECONDS)
        await asyncio.sleep(BEFORE_KILL_SECONDS)
        self.workload.progress(
            "failover: load before the kill", BEFORE_KILL_SECONDS, BEFORE_KILL_SECONDS
        )
        shift = time.monotonic() - self.killed_at
        self.killed_at += shift  # times so far were relative to the planned kill
        for answer in self.answers:
            answer.t -= shift
        self.writes = [(t - shift, ok) for t, ok in self.writes]
        try:
            await self.kill(victim)
        except BaseException:
            stop.set()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise
        self.workload.progress(f"failover: kill -9 of {victim_id}", 1, 1)
        recovered = await self._until_recovered(session, victim)
        stop.set()
        await asyncio.gather(*tasks)
        return self._result(victim, victim_id, recovered)

    # --- the load -----------------------------------------------------------------------

    async def _victim(self) -> tuple[int, str]:
        """The calculator to kill: the last one given that owns partitions."""
        ids = self.workload.instance_ids
        async with self.workload.session.get(
            f"{self.workload.endpoints.calculators[0]}/metadata"
        ) as response:
            metadata = await response.json()
        owning = {i["instanceId"] for i in metadata["instances"] if i["partitions"]}
        for index in reversed(range(len(ids))):
            if ids[index] in owning:
                return index, ids[index]
        raise RuntimeError("no calculator owns partitions: nothing to fail over")

    async def _write(self, stop: asyncio.Event) -> None:
        """Adjustments at ``write_rate``, one writer per key (a key's writes in order)."""
        interval = 1.0 / self.options.write_rate
        next_at = time.monotonic()
        in_flight: set[asyncio.Task[None]] = set()
        while not stop.is_set():
            index = self.rng.randrange(len(self.keys))
            task = asyncio.create_task(self._write_one(index, self.rng.choice([1, 2, 5])))
            in_flight.add(task)
            task.add_done_callback(in_flight.discard)
            next_at += interval
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))
        await asyncio.gather(*in_flight)

    async def _write_one(self, index: int, count: int) -> None:
        model = self.models[index]
        async with model.lock:  # FIFO: the key's next write waits for this one's answer
            model.values.append((model.values[-1] if model.values else model.base) + count)
            model.acked.append(None)
            acked = await self.workload._post("adjustment", self.keys[index], count)
            if acked is None:
                model.unknown = True
            else:
                model.acked[-1] = acked
            self.writes.append((time.monotonic() - self.killed_at, acked is not None))

    async def _read(self, path: str, n: int, stop: asyncio.Event) -> None:
        rng = random.Random(f"{self.options.seed}-failover-{path}-{n}")
        timeout = aiohttp.ClientTimeout(total=READ_TIMEOUT_SECONDS)
        while not stop.is_set():
            index = rng.randrange(len(self.keys))
            url = self.workload._url(path, self.keys[index])
            sent = time.monotonic()
            value: int | None = None
            detail: str | None = None
            try:
                async with self.workload.session.get(url, timeout=timeout) as response:
                    standby = response.headers.get("X-Replica") == "standby"
                    catching_up = "X-Behind" in response.headers
                    status = response.status
                    body = await response.json(content_type=None)
                if status == 200:
                    marked = standby or catching_up
                    kind, value = ("stale" if marked else "fresh"), int(body["count"])
                    if standby:
                        detail = response.headers.get("X-Stale-Reason", "standby")
                    elif catching_up:
                        detail = "catching_up"
                elif status == 404 and standby:
                    kind, detail = "stale", response.headers.get("X-Stale-Reason", "standby")
                elif status == 503:
                    error = body.get("error") if isinstance(body, dict) else None
                    kind, detail = "503", str(error or "no error code")
                elif status == 504:
                    kind, detail = "504", None
                else:
                    kind, detail = "other", f"HTTP {status}"
            except TimeoutError:
                kind, detail = "other", "client time-out"
            except aiohttp.ClientConnectorError:
                kind, detail = "other", "connection failed"
            except aiohttp.ClientError as exc:
                kind, detail = "other", type(exc).__name__
            except ValueError:  # not JSON
                kind, detail = "other", "unreadable body"
            received = time.monotonic()
            staleness = None
            if kind == "fresh" or kind == "stale":
                seconds = self.models[index].staleness(value, sent, self.started)
                staleness = None if seconds is None else seconds * 1000
            self.answers.append(
                Answer(
                    path,
                    index,
                    sent - self.killed_at,
                    kind,
                    (received - sent) * 1000,
                    staleness,
                    detail,
                )
            )
            if kind not in ("fresh", "stale"):
                await asyncio.sleep(PAUSE_AFTER_FAILURE_SECONDS)

    # --- the end ------------------------------------------------------------------------

    def _exact(self, answer: Answer) -> bool:
        return (
            answer.kind in ("fresh", "stale")
            and answer.staleness_ms is not None
            and answer.staleness_ms <= self.options.stale_threshold_ms
        ) or (answer.kind in ("fresh", "stale") and self.models[answer.key].unknown)

    async def _until_recovered(self, session: aiohttp.ClientSession, victim: str) -> bool:
        """Wait until every path has been exact for :data:`QUIET_SECONDS`, every key's
        latest answer is exact and every calculator serves all partitions; False after
        ``failover_timeout`` seconds."""
        deadline = self.killed_at + self.options.failover_timeout
        seen = 0
        last_bad = 0.0
        latest: dict[tuple[str, int], bool] = {}
        while time.monotonic() < deadline:
            await asyncio.sleep(0.5)
            now = time.monotonic() - self.killed_at
            self.workload.progress("failover: waiting for recovery", now, 60.0)
            for answer in self.answers[seen:]:
                if answer.t < 0:
                    continue
                exact = self._exact(answer)
                latest[(answer.path, answer.key)] = exact
                if not exact:
                    last_bad = max(last_bad, answer.t)
            seen = len(self.answers)
            if self.victim_back is None and await self._answers(session, victim):
                self.victim_back = now
            if now - last_bad < QUIET_SECONDS:
                continue
            if len(latest) < len(self.paths) * len(self.keys) or not all(latest.values()):
                continue
            if await self._all_partitions_active(session):
                return True
        return False

    async def _answers(self, session: aiohttp.ClientSession, base: str) -> bool:
        try:
            async with session.get(f"{base}/metadata", timeout=aiohttp.ClientTimeout(2)) as r:
                return r.status == 200
        except (aiohttp.ClientError, TimeoutError):
            return False

    async def _all_partitions_active(self, session: aiohttp.ClientSession) -> bool:
        for base in self.workload.endpoints.calculators:
            try:
                async with session.get(
                    f"{base}/metadata", timeout=aiohttp.ClientTimeout(2)
                ) as response:
                    metadata = await response.json()
            except (aiohttp.ClientError, TimeoutError, ValueError):
                return False
            if any(p["owner"] is None or p["state"] != "active" for p in metadata["partitions"]):
                return False
        return True

    # --- the numbers --------------------------------------------------------------------

    def _result(self, victim: str, victim_id: str, recovered: bool) -> dict[str, Any]:
        end = max((a.t for a in self.answers), default=0.0)
        return {
            "ran": True,
            "victim": {"url": victim, "instanceId": victim_id},
            "before_kill_s": BEFORE_KILL_SECONDS,
            "victim_back_s": self.victim_back,
            "recovered": recovered,
            "measured_until_s": end,
            "stale_threshold_ms": self.options.stale_threshold_ms,
            "writes": {
                "accepted": sum(ok for _, ok in self.writes),
                "failed": sum(not ok for _, ok in self.writes),
                "unmodelled_keys": sum(m.unknown for m in self.models),
            },
            "paths": {path: self._path_summary(path) for path in self.paths},
            "buckets": {path: self._buckets(path) for path in self.paths},
        }

    def _path_summary(self, path: str) -> dict[str, Any]:
        mine = [a for a in self.answers if a.path == path]
        after = [a for a in mine if a.t >= 0]
        bad = [a for a in after if a.kind not in ("fresh", "stale")]
        late = [
            a
            for a in after
            if a.kind == "stale"
            or (a.staleness_ms is not None and a.staleness_ms > self.options.stale_threshold_ms)
        ]
        staleness = [a.staleness_ms for a in after if a.staleness_ms is not None]
        before = [a.staleness_ms for a in mine if a.t < 0 and a.staleness_ms is not None]
        latencies = sorted(a.latency_ms for a in after)
        return {
            "answers_after_kill": len(after),
            "latency_after_kill_ms": {
                "p50": _nearest(latencies, 0.5),
                "p99": _nearest(latencies, 0.99),
                "max": latencies[-1] if latencies else None,
            },
            "kinds_after_kill": {kind: sum(a.kind == kind for a in after) for kind in KINDS},
            "errors_503": dict(Counter(a.detail for a in after if a.kind == "503")),
            "other_errors": dict(Counter(a.detail for a in after if a.kind == "other")),
            "stale_reasons": dict(Counter(a.detail for a in after if a.kind == "stale")),
            "wrong_values": sum(
                a.kind in ("fresh", "stale")
                and a.staleness_ms is None
                and not self.models[a.key].unknown
                for a in after
            ),
            "unavailable_s": _window(bad),
            "stale_s": _window(late),
            "max_staleness_ms": max(staleness, default=None),
            "max_staleness_before_kill_ms": max(before, default=None),
            "exact_again_s": self._exact_again(after),
        }

    def _exact_again(self, after: list[Answer]) -> float | None:
        """Seconds from the kill until every key's answers on the path stayed exact; None
        when some key's last answer was not exact (not recovered)."""
        by_key: dict[int, list[Answer]] = defaultdict(list)
        for answer in after:
            by_key[answer.key].append(answer)
        latest = 0.0
        for answers in by_key.values():
            answers.sort(key=lambda a: a.t)
            if not self._exact(answers[-1]):
                return None
            last_bad = max((i for i, a in enumerate(answers) if not self._exact(a)), default=-1)
            if last_bad >= 0:
                latest = max(latest, answers[last_bad + 1].t)
        return latest

    def _buckets(self, path: str) -> list[dict[str, Any]]:
        """One entry per second (``t``: seconds since the kill, the bucket's start)."""
        grouped: dict[int, list[Answer]] = defaultdict(list)
        for answer in self.answers:
            if answer.path == path:
                grouped[int(answer.t // 1)].append(answer)
        buckets = []
        for second in range(min(grouped, default=0), max(grouped, default=-1) + 1):
            answers = grouped.get(second, [])
            latencies = sorted(a.latency_ms for a in answers)
            staleness = sorted(a.staleness_ms for a in answers if a.staleness_ms is not None)
            buckets.append(
                {
                    "t": second,
                    "answers": len(answers),
                    **{kind: sum(a.kind == kind for a in answers) for kind in KINDS},
                    "errors_503": dict(Counter(a.detail for a in answers if a.kind == "503")),
                    "not_exact": sum(not self._exact(a) for a in answers),
                    "latency_ms": {
                        "p50": _nearest(latencies, 0.5),
                        "p95": _nearest(latencies, 0.95),
                        "max": latencies[-1] if latencies else None,
                    },
                    "staleness_ms": {
                        "p50": _nearest(staleness, 0.5),
                        "max": staleness[-1] if staleness else None,
                    },
                }
            )
        return buckets


def _window(answers: list[Answer]) -> dict[str, float] | None:
    """First and last send time (seconds since the kill) of ``answers``; None if none."""
    if not answers:
        return None
    first, last = min(a.t for a in answers), max(a.t for a in answers)
    return {"first": first, "last": last, "length": last - first}


def _nearest(ordered: list[float], q: float) -> float | None:
    if not ordered:
        return None
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def skipped(reason: str) -> dict[str, Any]:
    """The phase's result when it did not run."""
    return {"ran": False, "skipped": reason}
