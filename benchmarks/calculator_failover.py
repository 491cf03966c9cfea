"""How fast the calculator group recovers from a kill -9, and how fast a partition restores.

    .venv/bin/python -m benchmarks.calculator_failover [--keys 100000] [--trials 5]
    .venv/bin/python -m benchmarks.calculator_failover --quick      # 5,000 keys, 2 trials
    .venv/bin/python -m benchmarks.calculator_failover --sections standby --session-timeout 3

Two sections (``--sections``, both by default), each ``--trials`` kill -9 trials:

* ``restore``: without standby replicas (``CALCULATOR_STANDBY_REPLICAS=0``), the survivor
  restores the dead one's partitions from the changelog alone; the calculator's default
  session timeout. Described below.
* ``standby``: with one standby replica, how long until every key of the dead one is
  answered fresh by its new owner, with ``--session-timeout`` (default 1 s); see
  :mod:`benchmarks.calculator_standby`. It runs in a group of its own, with a changelog
  built in it with that timeout: the embedded broker keeps the session timeout the
  group's first members joined with (members asking 1 s in a group first joined with 3 s
  were dropped after 3 s).

On a fresh embedded broker (or ``KAFKA_BOOTSTRAP_SERVERS``), once per run:

1. writes ``--per-key`` adjustments to each of ``--keys`` keys, round after round over
   the keys (so each key changes in several calculator batches);
2. builds the changelog: one calculator of the run's group drains the inputs (its
   batches publish every changed key's state to the group's changelog topic) and
   stops. Every trial restores from this same changelog, and no trial writes to it (the
   inputs do not change), so every trial has the same work to do.

Then, ``--trials`` times, in the same group (a changelog is the group's own):

* two calculator processes (``CALCULATOR_STANDBY_REPLICAS=0``, own instance ids, own empty
  state directories) start; on their first assignment they restore their partitions from
  the changelog; once each owns three partitions, active and ready, one of them is killed
  with SIGKILL. The one killed is chosen so that the survivor never held its partitions (a
  survivor that once did, e.g. because it was alone in the group for a moment, would catch
  up from its local store and restore next to nothing);
* **detection**: from the kill to the survivor's ``/metadata`` showing the dead one's
  partitions as its own (restoring or active), polled every 20 ms;
* **failover**: from the kill to all six partitions ``active`` on the survivor;
* **restore**: the survivor's ``calculator_changelog_records_restored_total`` and
  ``calculator_restore_seconds_sum`` over the failover (the dead one's partitions, read
  from the changelog's start, plus its own, already current), in records/s, and in
  keys/s (keys of those partitions / the same seconds);
* **baseline**: a bare confluent-kafka consumer reading the same changelog partitions
  from their start to their end, records/s (the three at once; the restore reads them
  one after the other, decodes and writes RocksDB);
* verified, not timed: ``/inventory/count?scope=local`` on the survivor equals the key
  count; every key's value, through each location's listing (``scope=local``), and
  ``--sample`` keys of the dead one's partitions through the GET of one key, equal what
  was written. A trial with a wrong answer is printed, and the run exits 1.

Prints each trial, then median/min/max, and the ratio restore/raw (median of the
trials' ratios). The issue's targets: failover <= 10 s; restore >= 0.5 of the raw
consume.
"""

from __future__ import annotations

import argparse
import random
import re
import statistics
import sys
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import httpx
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, Producer, TopicPartition
from confluent_kafka.admin import AdminClient

from benchmarks import infra
from local_stack.paths import logs_dir
from local_stack.process import free_port
from local_stack.testing import wait_until
from sellable_calculator.settings import CalculatorSettings
from sellable_calculator.tests.support import (
    PARTITIONS,
    Calculator,
    calculator_env,
    wait_for_assignment,
)
from shared_schemas import encode_key, partition_for, value_serde
from shared_schemas.schemas import INVENTORY_MUTATION
from shared_schemas.topics import INVENTORY_ADJUSTMENTS, changelog_topic, ensure_topics

LOCATIONS = 50
FAILOVER_TARGET_SECONDS = 10.0
RESTORE_RATIO_TARGET = 0.5
_ASSIGNED = re.compile(r"the group assigned partitions \[([\d, ]*)\] to (\S+)")


@dataclass(frozen=True)
class Key:
    location: str
    sku: str
    partition: int


@dataclass(frozen=True)
class Trial:
    """What one kill -9 measured."""

    detection: float
    failover: float
    records_restored: int
    restore_seconds: float
    keys_moved: int
    raw_records: int
    raw_seconds: float
    wrong: int

    @property
    def restore_rate(self) -> float:
        return self.records_restored / self.restore_seconds

    @property
    def restore_keys_rate(self) -> float:
        return self.keys_moved / self.restore_seconds

    @property
    def raw_rate(self) -> float:
        return self.raw_records / self.raw_seconds

    @property
    def ratio(self) -> float:
        return self.restore_rate / self.raw_rate


def the_keys(count: int) -> list[Key]:
    """``count`` keys over :data:`LOCATIONS` locations, with their partitions."""
    keys = []
    for n in range(count):
        location, sku = f"LOC{n % LOCATIONS}", f"sku-{n}"
        keys.append(Key(location, sku, partition_for(encode_key(location, sku), PARTITIONS)))
    return keys


def fill(bootstrap: str, keys: list[Key], per_key: int) -> dict[Key, int]:
    """Write ``per_key`` adjustments to every key, round after round over the keys;
    return every key's expected sellable count."""
    producer = Producer(
        {
            "bootstrap.servers": bootstrap,
            "linger.ms": 20,
            "batch.num.messages": 10_000,
            "queue.buffering.max.messages": 1_000_000,
        }
    )
    serde = value_serde(INVENTORY_MUTATION, INVENTORY_ADJUSTMENTS.name)
    key_bytes = [encode_key(k.location, k.sku) for k in keys]
    expected = dict.fromkeys(keys, 0)
    now = int(time.time() * 1000)
    records, started = len(keys) * per_key, time.perf_counter()
    for i in range(records):
        n, count = i % len(keys), 1 + i % 7
        value = serde.serialize(
            {"mutation_id": str(uuid.uuid4()), "count": count, "event_time": now}
        )
        while True:
            try:
                producer.produce(
                    INVENTORY_ADJUSTMENTS.name,
                    value,
                    key_bytes[n],
                    partition=keys[n].partition,
                )
                break
            except BufferError:
                producer.poll(0.01)
        expected[keys[n]] += count
        if i % 20_000 == 0:
            producer.poll(0)
            print(f"\r  filling: {i:,}/{records:,}", end="", flush=True)
    assert producer.flush(120) == 0, "not every adjustment was delivered"
    print(f"\r  wrote {records:,} adjustments in {time.perf_counter() - started:.1f} s")
    return expected


def build_changelog(bootstrap: str, state: Path, records: int, group: str, **extra: str) -> None:
    """One calculator (alone in ``group``) drains the inputs into the changelog, stops."""
    env = calculator_env(
        bootstrap, state, group, f"{group}-build", free_port(), LOG_LEVEL="INFO", **extra
    )
    calculator = Calculator(0, int(env["CALCULATOR_PORT"]), env, state / "logs")
    started = time.perf_counter()
    try:
        calculator.start()
        # Every record applied, not just ready: readiness compares with the end offsets
        # the broker reports, and Tansu's lag its last produce batch.
        wait_until(
            lambda: calculator.metric("calculator_records_total") >= records and calculator.ready(),
            timeout=600,
            interval=0.2,
        )
    finally:
        if calculator.process is not None:
            calculator.process.stop()
        calculator.client.close()
    print(
        f"  one calculator drained the {records:,} adjustments into the changelog in "
        f"{time.perf_counter() - started:.1f} s (start-up included)"
    )


def raw_consume(bootstrap: str, topic: str, partitions: list[int]) -> tuple[int, float]:
    """Records and seconds of a bare consumer reading ``partitions`` of the changelog from
    their start to their end (the baseline)."""
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": "bench-failover-raw",
            "enable.auto.commit": False,
            "enable.partition.eof": True,
            "fetch.wait.max.ms": 50,  # as the restore's consumer (Tansu waits it out)
        }
    )
    try:
        started = time.perf_counter()
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in partitions])
        seen, at_end = 0, set[int]()
        deadline = time.monotonic() + 300
        while len(at_end) < len(partitions):
            if time.monotonic() > deadline:
                raise TimeoutError("the raw consumer did not reach the changelog's end")
            # A short timeout: consume() waits it out whenever fewer than 10,000 records
            # are left, end of partition or not.
            for message in consumer.consume(10_000, 0.05):
                error = message.error()
                if error is None:
                    seen += 1
                elif error.code() == KafkaError._PARTITION_EOF:
                    at_end.add(message.partition())
        return seen, time.perf_counter() - started
    finally:
        consumer.close()


def ever_assigned(calculator: Calculator) -> set[int]:
    """Every partition the group ever assigned ``calculator`` (from its log)."""
    assert calculator.process is not None
    text = calculator.process.log_path.read_text(errors="replace")
    return {
        int(p)
        for listed, instance in _ASSIGNED.findall(text)
        if instance == calculator.instance_id
        for p in listed.replace(" ", "").split(",")
        if p
    }


def restore_totals(calculator: Calculator) -> tuple[float, float]:
    """(changelog records restored, seconds spent restoring) so far."""
    return (
        calculator.metric("calculator_changelog_records_restored_total"),
        calculator.metric("calculator_restore_seconds_sum"),
    )


def wait_for_takeover(
    survivor: Calculator, moved: list[int], timeout: float
) -> tuple[float, float]:
    """Seconds from now until ``survivor``'s /metadata shows the ``moved`` partitions as
    its own (detection), and until it shows every partition active on it (failover)."""
    started = time.perf_counter()
    detection = None
    while True:
        try:
            partitions = survivor.get("/metadata").json()["partitions"]
        except (httpx.HTTPError, ValueError, KeyError):
            partitions = []
        elapsed = time.perf_counter() - started
        mine = {
            p["partition"]: p["state"] for p in partitions if p["owner"] == survivor.instance_id
        }
        if detection is None and set(moved) <= mine.keys():
            detection = elapsed
        if len(mine) == PARTITIONS and all(state == "active" for state in mine.values()):
            assert detection is not None
            return detection, elapsed
        if elapsed > timeout:
            raise TimeoutError(
                f"{survivor.instance_id} did not take every partition over within {timeout:g} s "
                f"(it shows {mine}); its log: {survivor.process and survivor.process.log_path}"
            )
        time.sleep(0.02)


def verify(
    survivor: Calculator, expected: dict[Key, int], moved: list[int], sample: int, seed: int
) -> int:
    """How many answers of ``survivor`` differ from ``expected`` (printing a few): the key
    count, every location's listing, and ``sample`` GETs of keys of the ``moved``
    partitions."""
    wrong: list[str] = []
    count = survivor.get("/inventory/count", scope="local").json()["count"]
    if count != len(expected):
        wrong.append(f"/inventory/count?scope=local: {count}, expected {len(expected)}")
    by_location: dict[str, dict[str, int]] = {}
    for key, value in expected.items():
        by_location.setdefault(key.location, {})[key.sku] = value
    for location, skus in by_location.items():
        answer = survivor.get(f"/inventory/locations/{location}/skus", scope="local")
        listed = {item["sku"]: item["count"] for item in answer.json()["skus"]}
        for sku in skus.keys() | listed.keys():
            if listed.get(sku) != skus.get(sku):
                wrong.append(f"{location}/{sku} listed {listed.get(sku)}, expected {skus.get(sku)}")
    candidates = [key for key in expected if key.partition in moved]
    for key in random.Random(seed).sample(candidates, min(sample, len(candidates))):
        answer = survivor.sellable(key.location, key.sku)
        got = answer.json().get("count") if answer.status_code == 200 else answer.status_code
        if got != expected[key]:
            wrong.append(f"GET {key.location}/{key.sku}: {got}, expected {expected[key]}")
    for line in wrong[:10]:
        print(f"    WRONG {line}")
    return len(wrong)


def _group(run: str) -> str:
    return f"bench-failover-{run}"


def _changelog(run: str) -> str:
    return changelog_topic(_group(run)).name


def start_pair(
    bootstrap: str, state: Path, run: str, number: int | str, **extra: str
) -> list[Calculator]:
    """Two calculators of the run's group, started at once (so that they most likely join
    the group's rebalance together), with the settings ``extra`` on top."""
    group = _group(run)
    log_dir = logs_dir() / "calculator_failover"
    calculators = []
    for index, letter in enumerate("ab"):
        name, port = f"failover-{run}-{number}{letter}", free_port()
        env = calculator_env(
            bootstrap, state / letter, group, name, port, LOG_LEVEL="INFO", **extra
        )
        calculators.append(Calculator(index, port, env, log_dir / f"{run}-{number}{letter}"))
    with ThreadPoolExecutor(2) as pool:
        for started in [pool.submit(c.start) for c in calculators]:
            started.result()
    return calculators


def trial(
    bootstrap: str, state: Path, run: str, number: int, expected: dict[Key, int], sample: int
) -> Trial:
    """One kill -9 of one of two fresh calculators; its figures (verification untimed)."""
    # Without standby replicas: the survivor restores the dead one's partitions from the
    # changelog alone (with one, it would have followed them all along).
    calculators = start_pair(bootstrap, state, run, number, CALCULATOR_STANDBY_REPLICAS="0")
    try:
        wait_for_assignment(calculators, timeout=180)
        owned = {c.instance_id: c.partitions() for c in calculators}
        if sorted(len(p) for p in owned.values()) != [PARTITIONS // 2] * 2:
            raise RuntimeError(f"not three partitions each: {owned}")
        # Turns by trial, unless the survivor once held the victim's partitions.
        order = calculators[number % 2 :] + calculators[: number % 2]
        fresh = [
            victim
            for victim, survivor in (order, order[::-1])
            if not ever_assigned(survivor) & set(owned[victim.instance_id])
        ]
        victim = (fresh or order)[0]
        survivor = next(c for c in calculators if c is not victim)
        moved = owned[victim.instance_id]
        records_before, seconds_before = restore_totals(survivor)
        assert victim.process is not None
        victim.process.kill()  # SIGKILL; what follows is timed from here
        detection, failover = wait_for_takeover(survivor, moved, timeout=120)
        records_after, seconds_after = restore_totals(survivor)
        keys_moved = sum(1 for key in expected if key.partition in moved)
        wrong = verify(survivor, expected, moved, sample, seed=number)
        raw_records, raw_seconds = raw_consume(bootstrap, _changelog(run), moved)
        result = Trial(
            detection,
            failover,
            round(records_after - records_before),
            seconds_after - seconds_before,
            keys_moved,
            raw_records,
            raw_seconds,
            wrong,
        )
        note = "" if fresh else " (the survivor once held them: restored from its store)"
        print(
            f"  trial {number}: killed {victim.instance_id} (partitions {moved}){note}; "
            f"reassigned after {detection:.2f} s, all active after {failover:.2f} s; "
            f"restored {result.records_restored:,} records in {result.restore_seconds:.2f} s "
            f"({result.restore_rate:,.0f}/s); raw {raw_records:,} in {raw_seconds:.2f} s "
            f"({result.raw_rate:,.0f}/s); "
            + (
                f"{len(expected):,} keys listed, {min(sample, keys_moved):,} GETs: exact"
                if wrong == 0
                else f"{wrong} WRONG answer(s)"
            ),
            flush=True,
        )
        return result
    finally:
        stop_all(calculators)


def stop_all(calculators: list[Calculator]) -> None:
    """Stop a trial's calculators and close their clients."""
    for calculator in calculators:
        if calculator.process is not None:
            calculator.process.stop()
        calculator.client.close()


def row(name: str, values: list[float], fmt: str, target: str = "", width: int = 44) -> str:
    """One line of a report table: ``name``, then the median, min and max of ``values``
    formatted with ``fmt`` (``".2f"``, ``",.0f"``), then ``target``."""
    cells = "".join(f"{v:>11{fmt}}" for v in (statistics.median(values), min(values), max(values)))
    return f"{name:<{width}}{cells}  {target}"


def report(trials: list[Trial], session_timeout: float) -> None:
    """The table: median, min and max over the trials, and the targets."""
    failover = statistics.median(t.failover for t in trials)
    ratio = statistics.median(t.ratio for t in trials)
    failover_verdict = "met" if failover <= FAILOVER_TARGET_SECONDS else "NOT met"
    ratio_verdict = "met" if ratio >= RESTORE_RATIO_TARGET else "NOT met"
    print(
        f"\nrestore from the changelog alone (CALCULATOR_STANDBY_REPLICAS=0): "
        f"{len(trials)} trial(s); session timeout {session_timeout:g} s "
        f"(CALCULATOR_SESSION_TIMEOUT_SECONDS, the default)"
    )
    print(f"{'':<44}{'median':>11}{'min':>11}{'max':>11}  target")
    print(row("detection: kill -> reassigned (s)", [t.detection for t in trials], ".2f"))
    print(
        row(
            "failover: kill -> 6 partitions active (s)",
            [t.failover for t in trials],
            ".2f",
            f"<= {FAILOVER_TARGET_SECONDS:g} s: {failover_verdict}",
        )
    )
    print(row("restore from the changelog (records/s)", [t.restore_rate for t in trials], ",.0f"))
    print(row("restore from the changelog (keys/s)", [t.restore_keys_rate for t in trials], ",.0f"))
    print(row("raw consume, same partitions (records/s)", [t.raw_rate for t in trials], ",.0f"))
    print(
        row(
            "ratio restore/raw (records/s)",
            [t.ratio for t in trials],
            ".2f",
            f">= {RESTORE_RATIO_TARGET:g}: {ratio_verdict}",
        )
    )
    wrong = sum(t.wrong for t in trials)
    print(f"verification: {'every answer exact' if wrong == 0 else f'{wrong} WRONG answer(s)'}")


def main() -> None:
    """Fill, build the changelog, run the trials of each section, print the tables."""
    from benchmarks import calculator_standby  # it imports this module's helpers

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keys", type=int, help="keys written (default 100,000; quick 5,000)")
    parser.add_argument("--per-key", type=int, default=3, help="adjustments per key")
    parser.add_argument("--trials", type=int, help="kill -9 trials a section (default 5; quick 2)")
    parser.add_argument(
        "--sample", type=int, default=2_000, help="keys of the moved partitions read by GET"
    )
    parser.add_argument(
        "--sections",
        default="restore,standby",
        help="restore (no standby replica), standby (one), or both (the default)",
    )
    parser.add_argument(
        "--session-timeout",
        type=float,
        default=1.0,
        help="CALCULATOR_SESSION_TIMEOUT_SECONDS of the standby section (default 1; "
        "the restore section keeps the calculator's default)",
    )
    parser.add_argument(
        "--fresh-sample",
        type=int,
        default=150,
        help="keys of the dead one polled with fresh=true in the standby section",
    )
    parser.add_argument(
        "--plain-sample", type=int, default=30, help="of those, also polled by a plain GET"
    )
    parser.add_argument("--poll-ms", type=float, default=30, help="polling interval (ms)")
    parser.add_argument("--quick", action="store_true", help="a small, short run")
    args = parser.parse_args()
    sections = {s.strip() for s in args.sections.split(",") if s.strip()}
    if not sections <= {"restore", "standby"}:
        parser.error(f"unknown section(s): {sorted(sections - {'restore', 'standby'})}")
    keys = args.keys or (5_000 if args.quick else 100_000)
    trials = args.trials or (2 if args.quick else 5)
    sample = min(args.sample, 200) if args.quick else args.sample
    run = uuid.uuid4().hex[:6]
    results: list[Trial] = []
    standby_results: list[calculator_standby.StandbyTrial] = []
    with ExitStack() as stack:
        bootstrap = infra.kafka(stack)
        ensure_topics(AdminClient({"bootstrap.servers": bootstrap}), PARTITIONS)
        state = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        expected = fill(bootstrap, the_keys(keys), args.per_key)
        if "restore" in sections:
            build_changelog(bootstrap, state / "build", keys * args.per_key, _group(run))
            records, _ = raw_consume(bootstrap, _changelog(run), list(range(PARTITIONS)))
            print(
                f"  the changelog holds {records:,} records for {keys:,} keys "
                f"({records / keys:.1f} a key)"
            )
            print("restore from the changelog alone (CALCULATOR_STANDBY_REPLICAS=0):", flush=True)
            results = [
                trial(bootstrap, state / f"trial-{n}", run, n, expected, sample)
                for n in range(1, trials + 1)
            ]
        if "standby" in sections:
            print(
                f"one standby replica (CALCULATOR_STANDBY_REPLICAS=1), session timeout "
                f"{args.session_timeout:g} s:",
                flush=True,
            )
            # A group of its own, which no member ever joined with another session
            # timeout: the embedded broker keeps the session timeout of a group's first
            # members (later members asking 1 s were still dropped after 3 s), so the
            # changelog is built again in this group, with this section's timeout.
            standby_run = f"{run}-sb"
            timeout = {"CALCULATOR_SESSION_TIMEOUT_SECONDS": f"{args.session_timeout:g}"}
            build_changelog(
                bootstrap, state / "build-sb", keys * args.per_key, _group(standby_run), **timeout
            )
            standby_results = [
                calculator_standby.trial(
                    bootstrap,
                    state / f"standby-{n}",
                    standby_run,
                    n,
                    expected,
                    session_timeout=args.session_timeout,
                    fresh_sample=args.fresh_sample,
                    plain_sample=args.plain_sample,
                    verify_sample=sample,
                    poll=args.poll_ms / 1000,
                )
                for n in range(1, trials + 1)
            ]
    if results:
        report(results, CalculatorSettings().calculator_session_timeout_seconds)
    if standby_results:
        calculator_standby.report(standby_results, args.session_timeout, args.poll_ms / 1000)
    if any(t.wrong for t in results) or any(t.wrong for t in standby_results):
        sys.exit(1)


if __name__ == "__main__":
    main()
