"""The failover of ``make bench-failover`` with one standby replica: how long after a kill -9
every key of the dead instance is answered fresh by its new owner.

Run by :mod:`benchmarks.calculator_failover` (``--sections standby``), on the changelog it
built. Per trial:

* two calculators (``CALCULATOR_STANDBY_REPLICAS=1``, the session timeout of
  ``--session-timeout``) start on empty state directories; each restores its three
  partitions and follows the other's three as a standby;
* once each owns three partitions and the survivor's ``/metadata`` lists it, with lag 0,
  in the ``standbys`` of every partition of the victim (warm), the victim is killed with
  SIGKILL; from then on, concurrently, every ``--poll-ms``:

  - the survivor's ``/metadata``: **detection** is the kill -> the dead one's partitions
    shown as the survivor's (as in the restore section), and the kill -> all six active;
  - ``GET ...?fresh=true`` of every sampled key (``--fresh-sample`` keys spread over the
    dead one's partitions) not answered fresh yet: a key counts as answered at the first
    200 without ``X-Replica`` whose count is the expected one. **kill -> fresh** is the
    moment the last sampled key was;
  - a plain ``GET`` of some of the sampled keys, until every sampled key is fresh: how many
    were answered by the standby (200, ``X-Replica: standby``) and how many were 503;

* the changelog records the survivor restored over the failover
  (``calculator_changelog_records_restored_total``, and its log's ``restored R changelog
  record(s) from offset O`` per moved partition), against the records of those partitions'
  changelog (what a restore without a standby reads);
* verified, untimed, once all six are active: every key through the listings, as in the
  restore section. Any wrong answer (a wrong count, a stale answer to ``fresh=true``, a
  standby value that differs although nothing changed) is printed; the run exits 1.

``BENCH_DEBUG=1`` prints every polling round (its duration and the answers so far).
"""

from __future__ import annotations

import asyncio
import os
import random
import re
import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import aiohttp
import httpx

from benchmarks.calculator_failover import (
    Key,
    _changelog,
    raw_consume,
    row,
    start_pair,
    stop_all,
    verify,
)
from local_stack.testing import wait_until
from sellable_calculator.tests.support import PARTITIONS, Calculator, wait_for_assignment

FRESH_TARGET_SECONDS = 3.0
DEBUG = bool(os.environ.get("BENCH_DEBUG"))
_RESTORED = re.compile(r"partition (\d+): restored (\d+) changelog record\(s\) from offset (\d+)")
_CURRENT = re.compile(r"partition (\d+): local state is current")


@dataclass
class Window:
    """What the pollers saw from the kill on."""

    detection: float | None = None
    first_fresh: float | None = None
    fresh: float | None = None
    last_round: float = 0.0
    """How long the round took that saw the last sampled key fresh (the resolution)."""
    active: float | None = None
    stale_200: int = 0
    unavailable_503: int = 0
    owner_200: int = 0
    other: int = 0
    errors: int = 0
    fresh_refused: int = 0
    wrong: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class StandbyTrial:
    detection: float
    first_fresh: float
    fresh: float
    active: float
    records_restored: int
    restored_by_partition: dict[int, tuple[int, int]]
    changelog_records: int
    keys_moved: int
    sampled: int
    window: Window
    wrong: int


_SIZES: dict[tuple[str, tuple[int, ...]], int] = {}


def changelog_records(bootstrap: str, topic: str, partitions: list[int]) -> int:
    """Records in ``partitions`` of the changelog, counted by a bare consumer (the
    embedded broker's watermarks were not reliable for this)."""
    key = (topic, tuple(sorted(partitions)))
    if key not in _SIZES:
        _SIZES[key] = raw_consume(bootstrap, topic, list(key[1]))[0]
    return _SIZES[key]


def standby_warm(survivor: Calculator, moved: list[int]) -> bool:
    """Whether ``survivor``'s /metadata lists it as a standby, lag 0, of every ``moved``."""
    try:
        partitions = survivor.get("/metadata").json()["partitions"]
    except (httpx.HTTPError, ValueError, KeyError):
        return False
    warm = {
        p["partition"]
        for p in partitions
        for s in p.get("standbys", [])
        if s["instanceId"] == survivor.instance_id and s["lag"] == 0
    }
    return set(moved) <= warm


class _Answer(NamedTuple):
    """One HTTP answer, read in full."""

    status: int
    headers: Mapping[str, str]
    """Case-insensitive (aiohttp's)."""
    body: Any


def _path(key: Key) -> str:
    return f"/inventory/locations/{key.location}/skus/{key.sku}"


async def watch(
    survivor: Calculator,
    kill: Callable[[], None],
    moved: list[int],
    sample: list[Key],
    plain: list[Key],
    expected: dict[Key, int],
    poll: float,
    timeout: float,
) -> Window:
    """Kill, then poll until every sampled key is fresh and every partition active."""
    window = Window()
    pending = set(sample)
    by_partition: dict[int, list[Key]] = {}
    for key in sample:
        by_partition.setdefault(key.partition, []).append(key)
    # aiohttp, not httpx: a round of ~180 GETs through httpx took about 1 s of the load
    # generator's own time, as long as the takeover it was to time.
    connector = aiohttp.TCPConnector(limit=64)
    timeout_5s = aiohttp.ClientTimeout(total=5)
    async with aiohttp.ClientSession(
        survivor.url, connector=connector, timeout=timeout_5s
    ) as session:

        async def get(path: str, params: dict[str, str] | None = None) -> _Answer:
            async with session.get(path, params=params) as response:
                body = await response.json(content_type=None)
                return _Answer(response.status, response.headers, body)

        async def metadata(started: float) -> None:
            try:
                partitions = (await get("/metadata")).body["partitions"]
            except (aiohttp.ClientError, TimeoutError, ValueError, KeyError, TypeError):
                return
            elapsed = time.perf_counter() - started
            mine = {
                p["partition"]: p["state"] for p in partitions if p["owner"] == survivor.instance_id
            }
            if window.detection is None and set(moved) <= mine.keys():
                window.detection = elapsed
            if len(mine) == PARTITIONS and all(s == "active" for s in mine.values()):
                window.active = elapsed

        async def fresh_get(key: Key) -> None:
            try:
                answer = await get(_path(key), {"fresh": "true"})
            except (aiohttp.ClientError, TimeoutError, ValueError):
                window.errors += 1
                return
            if answer.status == 503:
                window.fresh_refused += 1
                return
            got = answer.body.get("count") if answer.status == 200 else None
            if answer.status != 200 or "x-replica" in answer.headers:
                window.wrong.append(
                    f"GET {key.location}/{key.sku}?fresh=true: {answer.status} "
                    f"X-Replica={answer.headers.get('x-replica')} count={got}"
                )
            elif got != expected[key]:
                window.wrong.append(
                    f"GET {key.location}/{key.sku}?fresh=true: {got}, expected {expected[key]}"
                )
            if key in pending:
                # When this answer arrived, not when its round ended: a round of a few
                # hundred GETs through one client takes longer than the takeover.
                answered.append(time.perf_counter())
            pending.discard(key)

        async def plain_get(key: Key) -> None:
            try:
                answer = await get(_path(key))
            except (aiohttp.ClientError, TimeoutError, ValueError):
                window.errors += 1
                return
            got = answer.body.get("count") if answer.status == 200 else None
            if answer.status == 503:
                window.unavailable_503 += 1
            elif answer.status == 200 and answer.headers.get("x-replica") == "standby":
                window.stale_200 += 1
            elif answer.status == 200:
                window.owner_200 += 1
            else:
                window.other += 1
            if answer.status == 200 and got != expected[key]:
                window.wrong.append(
                    f"GET {key.location}/{key.sku}: {got} "
                    f"(X-Replica={answer.headers.get('x-replica')}), expected {expected[key]}"
                )

        answered: list[float] = []
        """When each sampled key's first fresh answer arrived."""
        # Open the connections before the kill, so that the first round is not slower.
        await asyncio.gather(*(get("/health/live") for _ in range(16)))
        kill()
        started = time.perf_counter()
        rounds = 0
        while window.fresh is None or window.active is None:
            rounds += 1
            round_started = time.perf_counter()
            calls = [metadata(started)]
            if pending:
                # Until the group has given the survivor the partitions (or any sampled key
                # answered fresh), a fresh answer cannot come: one key a partition a round
                # keeps the rounds short; then every key not answered fresh yet.
                if window.detection is None and len(pending) == len(sample):
                    probe = [by_partition[p][rounds % len(by_partition[p])] for p in by_partition]
                else:
                    probe = list(pending)
                calls += [fresh_get(k) for k in probe]
                calls += [plain_get(k) for k in plain]
            await asyncio.gather(*calls)
            if DEBUG:
                print(
                    f"    round at {round_started - started:.2f} s took "
                    f"{time.perf_counter() - round_started:.2f} s: pending {len(pending)}, "
                    f"refused {window.fresh_refused}, stale {window.stale_200}, "
                    f"503 {window.unavailable_503}, owner {window.owner_200}, "
                    f"errors {window.errors}, detection {window.detection}"
                )
            now = time.perf_counter()
            if window.first_fresh is None and answered:
                window.first_fresh = min(answered) - started
            if not pending and window.fresh is None:
                window.fresh = max(answered) - started
                window.last_round = now - round_started
            if time.perf_counter() - started > timeout:
                raise TimeoutError(
                    f"after {timeout:g} s: {len(pending)} sampled key(s) not fresh, "
                    f"active={window.active}; log: {survivor.process and survivor.process.log_path}"
                )
            await asyncio.sleep(max(0.0, poll - (time.perf_counter() - round_started)))
    return window


def restored_in_log(
    survivor: Calculator, offset: int, moved: list[int]
) -> dict[int, tuple[int, int]]:
    """(records, from offset) per ``moved`` partition, from the survivor's log after
    byte ``offset``."""
    assert survivor.process is not None
    with survivor.process.log_path.open("rb") as log:
        log.seek(offset)
        text = log.read().decode(errors="replace")
    found: dict[int, tuple[int, int]] = {}
    for partition, records, start in _RESTORED.findall(text):
        if int(partition) in moved:
            found[int(partition)] = (int(records), int(start))
    for partition in _CURRENT.findall(text):
        if int(partition) in moved:
            found.setdefault(int(partition), (0, -1))
    return found


def sample_keys(expected: dict[Key, int], moved: list[int], count: int, seed: int) -> list[Key]:
    """``count`` keys spread evenly over the ``moved`` partitions."""
    rng = random.Random(seed)
    per = max(1, count // len(moved))
    sample: list[Key] = []
    for p in moved:
        keys = [k for k in expected if k.partition == p]
        sample += rng.sample(keys, min(per, len(keys)))
    return sample


def trial(
    bootstrap: str,
    state: Path,
    run: str,
    number: int,
    expected: dict[Key, int],
    *,
    session_timeout: float,
    fresh_sample: int,
    plain_sample: int,
    verify_sample: int,
    poll: float,
) -> StandbyTrial:
    """One kill -9 of one of two fresh calculators with one standby replica each."""
    calculators = start_pair(
        bootstrap,
        state,
        run,
        f"s{number}",
        CALCULATOR_STANDBY_REPLICAS="1",
        CALCULATOR_SESSION_TIMEOUT_SECONDS=f"{session_timeout:g}",
    )
    try:
        wait_for_assignment(calculators, timeout=180)
        owned = {c.instance_id: c.partitions() for c in calculators}
        if sorted(len(p) for p in owned.values()) != [PARTITIONS // 2] * 2:
            raise RuntimeError(f"not three partitions each: {owned}")
        victim = calculators[number % 2]
        survivor = calculators[1 - number % 2]
        moved = owned[victim.instance_id]
        warm_started = time.perf_counter()
        wait_until(lambda: standby_warm(survivor, moved), timeout=300, interval=0.1)
        warm_wait = time.perf_counter() - warm_started
        records_before = survivor.metric("calculator_changelog_records_restored_total")
        assert survivor.process is not None and victim.process is not None
        log_offset = survivor.process.log_path.stat().st_size
        sample = sample_keys(expected, moved, fresh_sample, seed=number)
        plain = random.Random(-number).sample(sample, min(plain_sample, len(sample)))
        window = asyncio.run(
            watch(survivor, victim.process.kill, moved, sample, plain, expected, poll, 120)
        )
        assert window.detection is not None and window.fresh is not None
        assert window.active is not None
        restored = round(
            survivor.metric("calculator_changelog_records_restored_total") - records_before
        )
        by_partition = restored_in_log(survivor, log_offset, moved)
        keys_moved = sum(1 for key in expected if key.partition in moved)
        for line in window.wrong[:10]:
            print(f"    WRONG {line}")
        wrong = len(window.wrong) + verify(survivor, expected, moved, verify_sample, seed=number)
        assert window.first_fresh is not None
        result = StandbyTrial(
            window.detection,
            window.first_fresh,
            window.fresh,
            window.active,
            restored,
            by_partition,
            changelog_records(bootstrap, _changelog(run), moved),
            keys_moved,
            len(sample),
            window,
            wrong,
        )
        tails = ", ".join(
            f"p{p}: {r:,} from {o:,}" if o >= 0 else f"p{p}: current"
            for p, (r, o) in sorted(by_partition.items())
        )
        print(
            f"  standby trial {number}: standby warm {warm_wait:.1f} s after the assignment; "
            f"killed {victim.instance_id} (partitions {moved}); reassigned after "
            f"{window.detection:.2f} s, the first sampled key fresh after "
            f"{window.first_fresh:.2f} s, all {len(sample)} after {window.fresh:.2f} s (that "
            f"round took {window.last_round:.2f} s), all active after {window.active:.2f} s; "
            f"restored "
            f"{restored:,} changelog records ({tails}) of the {result.changelog_records:,} "
            f"in those partitions; plain GETs meanwhile: {window.stale_200:,} standby 200, "
            f"{window.unavailable_503:,} 503, {window.owner_200:,} owner 200"
            + (f", {window.other} other" if window.other else "")
            + (f", {window.errors} errors" if window.errors else "")
            + "; "
            + (
                f"{len(expected):,} keys listed: exact"
                if wrong == 0
                else f"{wrong} WRONG answer(s)"
            ),
            flush=True,
        )
        return result
    finally:
        stop_all(calculators)


def _row(name: str, values: list[float], fmt: str, target: str = "") -> str:
    return row(name, values, fmt, target, width=52)


def report(trials: list[StandbyTrial], session_timeout: float, poll: float) -> None:
    """The table: median, min and max over the trials, and the target."""
    fresh = statistics.median(t.fresh for t in trials)
    verdict = "met" if fresh <= FRESH_TARGET_SECONDS else "NOT met"
    print(
        f"\none standby replica (CALCULATOR_STANDBY_REPLICAS=1): {len(trials)} trial(s); "
        f"session timeout {session_timeout:g} s (CALCULATOR_SESSION_TIMEOUT_SECONDS); "
        f"{trials[0].sampled} keys of the dead one polled every {poll * 1000:.0f} ms"
    )
    print(f"{'':<52}{'median':>11}{'min':>11}{'max':>11}  target")
    print(_row("detection: kill -> reassigned (s)", [t.detection for t in trials], ".2f"))
    print(
        _row(
            "kill -> dead one's keys answered fresh (s)",
            [t.fresh for t in trials],
            ".2f",
            f"<= {FRESH_TARGET_SECONDS:g} s: {verdict}",
        )
    )
    print(
        _row("kill -> first sampled key answered fresh (s)", [t.first_fresh for t in trials], ".2f")
    )
    print(
        _row(
            "  the round that saw the last one fresh took (s)",
            [t.window.last_round for t in trials],
            ".2f",
        )
    )
    print(
        _row(
            "  all fresh minus detection (s)",
            [t.fresh - t.detection for t in trials],
            ".2f",
        )
    )
    print(_row("kill -> 6 partitions active (s)", [t.active for t in trials], ".2f"))
    print(
        _row(
            "changelog records restored by the new owner",
            [t.records_restored for t in trials],
            ",.0f",
        )
    )
    print(
        _row(
            "  records in the moved partitions' changelog",
            [t.changelog_records for t in trials],
            ",.0f",
        )
    )
    print(
        _row(
            "plain GETs answered by the standby (200)", [t.window.stale_200 for t in trials], ",.0f"
        )
    )
    print(_row("plain GETs answered 503", [t.window.unavailable_503 for t in trials], ",.0f"))
    wrong = sum(t.wrong for t in trials)
    print(f"verification: {'every answer exact' if wrong == 0 else f'{wrong} WRONG answer(s)'}")
