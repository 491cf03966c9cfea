"""The calculator group with real processes on the real broker: instances killed, added,
replaced and restarted while mutations keep coming, and what a restart restores.

Every test runs a group of its own (its own group id, instance ids, state directories
and location) and a writer thread that keeps writing to ~30 keys, counting what the
broker acknowledged: whatever happens to the instances, every acknowledged mutation must
count exactly once in the end.
"""

from __future__ import annotations

import random
import re
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from local_stack.process import free_port
from local_stack.testing import WaitTimeout, wait_until
from sellable_calculator.tests.support import (
    PARTITIONS,
    Calculator,
    Mutations,
    calculator_env,
    unique_location,
    wait_for_assignment,
)
from shared_schemas import encode_key, partition_for
from shared_schemas.topics import INVENTORY_ADJUSTMENTS, INVENTORY_RESERVATIONS

KEYS = 30
"""Keys the writer writes to: five per partition on average."""

ALL_PARTITIONS = list(range(PARTITIONS))

TAKEOVER_BOUND_SECONDS = 30.0
"""How long a survivor may take to own a killed instance's partitions: the session
timeout (3 s), the rebalance and the restore, with room for a loaded 2-core machine."""

SETTLE_SECONDS = 60.0
"""How long a group may take to settle (every partition active, every instance ready)."""

EXACT_SECONDS = 30.0
"""How long the instances may take to apply the last acknowledged writes."""

RESTORED = "calculator_changelog_records_restored_total"

MOVING_503 = {"owner_unknown", "owner_unavailable", "partition_restoring", "not_owner"}
"""The 503s of a GET for a key whose partition is moving."""


@dataclass
class Group:
    """The calculators of one test: a calculator group of their own."""

    bootstrap: str
    root: Path
    group_id: str = field(default_factory=lambda: f"group-test-{uuid.uuid4().hex[:8]}")
    run: str = field(default_factory=lambda: uuid.uuid4().hex[:6])
    calculators: list[Calculator] = field(default_factory=list)
    extra: dict[str, str] = field(default_factory=dict)
    """Settings of every instance of the group."""

    def new(
        self, name: str, state: str = "state", instance_id: str | None = None, **extra: str
    ) -> Calculator:
        """A calculator (not started) of this group on a free port, its store under
        ``root/state/<instance id>``, its instance id ``<run>-<name>`` unless given, with
        the ``extra`` settings."""
        port = free_port()
        env = calculator_env(
            self.bootstrap,
            self.root / state,
            self.group_id,
            instance_id or f"{self.run}-{name}",
            port,
            CALCULATOR_FORWARD_TIMEOUT_SECONDS="1.0",
            **{**self.extra, **extra},
        )
        calculator = Calculator(len(self.calculators), port, env, self.root / "logs")
        self.calculators.append(calculator)
        return calculator

    def started(self, *names: str) -> list[Calculator]:
        """New calculators named ``names``, started, once the group has settled."""
        calculators = [self.new(name) for name in names]
        for calculator in calculators:
            calculator.start()
        settle(calculators)
        return calculators

    def stop_all(self) -> None:
        """Stop every process still running."""
        for calculator in self.calculators:
            if calculator.process is not None:
                calculator.process.stop(grace=5)


@pytest.fixture
def group(kafka_bootstrap: str, mutations: Mutations, tmp_path: Path) -> Iterator[Group]:
    """A calculator group of this test's own (the topics exist: ``mutations`` made them)."""
    created = Group(kafka_bootstrap, tmp_path)
    yield created
    created.stop_all()


class LoadWriter:
    """A thread that writes one mutation to every key, round after round, until stopped.

    The first round adjusts every key (a key is served once it has an adjustment);
    later rounds mix adjustments and reservations, or with ``increments_only`` adjust
    every key by +1. :attr:`acked` is the sum each key must end with: only rounds the
    broker acknowledged count. :attr:`sent` also counts the round in flight.
    """

    def __init__(
        self,
        bootstrap: str,
        location: str,
        skus: list[str],
        increments_only: bool = False,
        pause: float = 0.05,
    ) -> None:
        self.location = location
        self.skus = skus
        self.acked = dict.fromkeys(skus, 0)
        self.sent = dict.fromkeys(skus, 0)
        self.rounds = 0
        self.error: BaseException | None = None
        self._bootstrap = bootstrap
        self._increments_only = increments_only
        self._pause = pause
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._quiet = threading.Event()
        self._quiet_reached = threading.Event()
        self._random = random.Random(location)
        self._thread = threading.Thread(target=self._run, name="load-writer", daemon=True)

    def start(self) -> None:
        """Start writing, and wait for the first round's acknowledgement."""
        self._thread.start()
        self.wait_rounds(1)

    def wait_rounds(self, more: int, timeout: float = 30) -> None:
        """Wait until ``more`` rounds after the ones done already are acknowledged."""
        target = self.rounds + more
        wait_until(lambda: self.rounds >= target or self.error is not None, timeout)
        self.check()

    def check(self) -> None:
        """Raise if the writer failed."""
        if self.error is not None:
            raise AssertionError(f"the writer failed: {self.error!r}") from self.error

    def stop(self) -> dict[str, int]:
        """Stop after the round in flight; the sums every key must end with."""
        self._stop.set()
        self._thread.join(60)
        assert not self._thread.is_alive(), "the writer did not stop"
        self.check()
        return dict(self.acked)

    @contextmanager
    def quiet(self) -> Iterator[dict[str, int]]:
        """No writes inside the block: the sums every key must have now."""
        self._quiet.set()
        try:
            wait_until(lambda: self._quiet_reached.is_set() or self.error is not None, 60)
            self.check()
            yield dict(self.acked)
        finally:
            self._quiet_reached.clear()
            self._quiet.clear()

    def sent_of(self, sku: str) -> int:
        """The sum of everything sent to ``sku`` so far, acknowledged or not."""
        with self._lock:
            return self.sent[sku]

    def _mutation(self, first: bool) -> tuple[str, int, int]:
        """(topic, count, change of the sellable count) of the next mutation."""
        if first or self._increments_only:
            return INVENTORY_ADJUSTMENTS.name, 1, 1
        if self._random.random() < 0.3:
            count = self._random.randint(1, 3)
            return INVENTORY_RESERVATIONS.name, count, -count
        count = self._random.randint(1, 9)
        return INVENTORY_ADJUSTMENTS.name, count, count

    def _run(self) -> None:
        mutations = Mutations(self._bootstrap)
        try:
            while not self._stop.is_set():
                if self._quiet.is_set():
                    self._quiet_reached.set()
                    self._stop.wait(0.02)
                    continue
                changes = {}
                for sku in self.skus:
                    topic, count, change = self._mutation(self.rounds == 0)
                    with self._lock:
                        self.sent[sku] += change
                    mutations.send(topic, self.location, sku, count)
                    changes[sku] = change
                mutations.flush()
                with self._lock:
                    for sku, change in changes.items():
                        self.acked[sku] += change
                    self.rounds += 1
                self._stop.wait(self._pause)
            mutations.close()
        except BaseException as exc:
            self.error = exc


def settle(calculators: list[Calculator], timeout: float = SETTLE_SECONDS) -> None:
    """Wait until ``calculators`` own every partition between them, all agreeing and
    ready; the failure names their logs."""
    try:
        wait_for_assignment(calculators, timeout)
    except WaitTimeout as exc:
        views = {c.instance_id: _metadata(c) for c in calculators}
        raise AssertionError(
            f"the group did not settle: {exc}\n{views}{logs(calculators)}"
        ) from None


def _metadata(calculator: Calculator) -> object:
    try:
        return calculator.get("/metadata").json()["partitions"]
    except (httpx.HTTPError, ValueError, KeyError) as exc:
        return repr(exc)


def logs(calculators: list[Calculator], lines: int = 25) -> str:
    """The end of each calculator's log, for a failure message."""
    return "".join(
        f"\n--- {c.process.log_path}:\n{c.process.log_tail(lines)}"
        for c in calculators
        if c.process is not None
    )


def last_run_log(calculator: Calculator) -> str:
    """The log of the calculator's current (or last) process only."""
    assert calculator.process is not None
    text = calculator.process.log_path.read_text(errors="replace")
    return text.rsplit("--- starting ", 1)[-1]


def count_or_none(calculator: Calculator, location: str, sku: str) -> int | None:
    """The count ``calculator`` answers for the key; None for anything but a 200."""
    try:
        return calculator.count_of(location, sku)
    except httpx.HTTPError:
        return None


def wrong_counts(
    calculator: Calculator, location: str, expected: dict[str, int]
) -> dict[str, tuple[int | None, int]]:
    """``{sku: (answered, expected)}`` for every key ``calculator`` does not answer exactly."""
    answers = {sku: count_or_none(calculator, location, sku) for sku in expected}
    return {sku: (answers[sku], want) for sku, want in expected.items() if answers[sku] != want}


def wait_exact(
    calculators: list[Calculator],
    location: str,
    expected: dict[str, int],
    timeout: float = EXACT_SECONDS,
) -> None:
    """Wait until every one of ``calculators`` answers every key with its expected count;
    the failure lists the keys each still answers wrong."""
    try:
        wait_until(
            lambda: not any(wrong_counts(c, location, expected) for c in calculators), timeout
        )
    except WaitTimeout:
        wrong = {c.instance_id: wrong_counts(c, location, expected) for c in calculators}
        raise AssertionError(
            f"(answered, expected) per instance after {timeout:g} s: {wrong}{logs(calculators)}"
        ) from None


def partition_of(location: str, sku: str) -> int:
    """The partition of the key."""
    return partition_for(encode_key(location, sku), PARTITIONS)


def keys_in(location: str, skus: list[str], partitions: list[int]) -> list[str]:
    """The skus of ``skus`` whose key lives in one of ``partitions``."""
    return [sku for sku in skus if partition_of(location, sku) in partitions]


def test_a_third_instance_takes_partitions_under_load_and_hands_them_back_on_stop(
    group: Group,
) -> None:
    """A third instance started under load owns some partitions and every key is exact on
    all three; stopped (SIGTERM), it exits 0 and the other two own everything, exact."""
    first, second = group.started("a", "b")
    location = unique_location("THIRD")
    skus = [f"sku-{n}" for n in range(KEYS)]
    writer = LoadWriter(group.bootstrap, location, skus)
    writer.start()
    writer.wait_rounds(5)
    third = group.new("c")
    third.start()
    settle([first, second, third])
    owned = [c.partitions() for c in (first, second, third)]
    assert sorted(p for ps in owned for p in ps) == ALL_PARTITIONS, owned
    assert all(owned), f"an instance owns nothing: {owned}"
    writer.wait_rounds(5)
    with writer.quiet() as expected:
        wait_exact([first, second, third], location, expected)
    writer.wait_rounds(5)
    assert third.process is not None
    assert third.process.stop() == 0, logs([third])
    settle([first, second])
    assert sorted(first.partitions() + second.partitions()) == ALL_PARTITIONS
    writer.wait_rounds(5)
    expected = writer.stop()
    wait_exact([first, second], location, expected)


def test_an_instance_killed_and_replaced_by_one_on_an_empty_disk_is_exact(group: Group) -> None:
    """A killed instance replaced by a new one (another id, an empty state directory):
    the newcomer restores its partitions from the changelog alone, and is exact."""
    group.extra["CALCULATOR_STANDBY_REPLICAS"] = "0"  # no head start from a standby
    victim, survivor = group.started("a", "b")
    location = unique_location("REPLACE")
    skus = [f"sku-{n}" for n in range(KEYS)]
    writer = LoadWriter(group.bootstrap, location, skus)
    writer.start()
    writer.wait_rounds(10)
    assert victim.process is not None
    victim.process.kill()
    replacement = group.new("c", state="other-disk")
    replacement.start()
    settle([survivor, replacement])
    assert replacement.partitions(), "the replacement owns nothing"
    restores = re.findall(
        r"partition \d+: restored \d+ changelog record\(s\) from offset (\d+) .* "
        r"into an empty store",
        last_run_log(replacement),
    )
    assert restores, logs([replacement])
    assert all(start == "0" for start in restores), restores
    writer.wait_rounds(10)
    expected = writer.stop()
    wait_exact([survivor, replacement], location, expected)


@dataclass
class Reader:
    """A thread that GETs every key from one instance, again and again, and keeps every
    answer that no correct instance could give."""

    calculator: Calculator
    writer: LoadWriter
    down: threading.Event
    """Set while the instance is being stopped or started: no answer is then fine."""
    statuses: Counter[str] = field(default_factory=Counter)
    impossible: list[str] = field(default_factory=list)
    decreases: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> None:
        """Start reading."""
        self._thread = threading.Thread(target=self._run, name="reader", daemon=True)
        self._thread.start()

    def wait_answers(self, more: int, timeout: float = 10) -> None:
        """Wait for ``more`` 200 answers than there are now."""
        target = self.statuses["200"] + more
        wait_until(lambda: self.statuses["200"] >= target, timeout)

    def stop(self) -> None:
        """Stop reading, after the GET in flight."""
        self._stop.set()
        assert self._thread is not None
        self._thread.join(30)

    def _run(self) -> None:
        location, last = self.writer.location, dict.fromkeys(self.writer.skus, 0)
        with httpx.Client(timeout=5) as client:
            while not self._stop.is_set():
                for sku in self.writer.skus:
                    down_before = self.down.is_set()
                    try:
                        response = client.get(
                            f"{self.calculator.url}/inventory/locations/{location}/skus/{sku}"
                        )
                    except httpx.HTTPError as exc:
                        self.statuses["no answer"] += 1
                        if not (down_before or self.down.is_set()):
                            self.impossible.append(f"{sku}: no answer while up: {exc!r}")
                        self._stop.wait(0.02)  # refused at once while down: no busy loop
                        continue
                    self._judge(sku, response, self.writer.sent_of(sku), last)

    def _judge(self, sku: str, response: httpx.Response, sent: int, last: dict[str, int]) -> None:
        """Keep ``response`` if it is impossible, ``sent`` being how many +1 were sent to
        ``sku`` by the time it came."""
        if response.status_code == 200:
            count = response.json()["count"]
            self.statuses["200"] += 1
            if not 1 <= count <= sent:
                self.impossible.append(f"{sku}: 200 with {count}, {sent} increment(s) sent")
            if count < last[sku]:
                self.decreases += 1
            last[sku] = count
            return
        error = response.json().get("error") if response.status_code in (404, 503) else None
        self.statuses[f"{response.status_code} {error}"] += 1
        if response.status_code != 503 or error not in MOVING_503:
            self.impossible.append(f"{sku}: {response.status_code} {response.text[:200]}")


def test_rolling_restart_under_load_answers_only_possible_values_and_ends_exact(
    group: Group,
) -> None:
    """Both instances stopped (SIGTERM) and started again one after the other while every
    key gets +1 after +1: no GET ever answers a count that was not written (or a 404, or
    an error other than the 503 of a moving partition), and every key ends exact."""
    calculators = group.started("a", "b")
    location = unique_location("ROLL")
    skus = [f"sku-{n}" for n in range(KEYS)]
    writer = LoadWriter(group.bootstrap, location, skus, increments_only=True)
    writer.start()
    with writer.quiet() as expected:  # every key exists before the readers look
        wait_exact(calculators, location, expected)
    readers = [Reader(c, writer, threading.Event()) for c in calculators]
    for reader in readers:
        reader.start()
    for calculator, reader in zip(calculators, readers, strict=True):
        writer.wait_rounds(5)
        reader.down.set()
        assert calculator.process is not None
        assert calculator.process.stop() == 0, logs([calculator])
        settle([c for c in calculators if c is not calculator])
        writer.wait_rounds(5)
        calculator.start()
        reader.down.clear()
        settle(calculators)
        reader.wait_answers(KEYS)  # the restarted instance answers again
    writer.wait_rounds(5)
    for reader in readers:
        reader.stop()
    expected = writer.stop()
    wait_exact(calculators, location, expected)
    answers = {r.calculator.instance_id: (dict(r.statuses), r.decreases) for r in readers}
    print(f"answers (statuses, decreasing counts) per instance during the restarts: {answers}")
    impossible = {r.calculator.instance_id: r.impossible[:20] for r in readers if r.impossible}
    assert not impossible, f"impossible answers: {impossible}{logs(calculators)}"


def _restored_per_partition(calculator: Calculator) -> dict[int, tuple[int, int]]:
    """``{partition: (records restored, from changelog offset)}`` from the log of the
    calculator's current process (the last restore of each partition); the offset is
    where the local store was (0: it was empty)."""
    text = last_run_log(calculator)
    restored: dict[int, tuple[int, int]] = {}
    for match in re.finditer(
        r"partition (\d+): restored (\d+) changelog record\(s\) from offset (\d+) ", text
    ):
        partition, records, start = (int(g) for g in match.groups())
        restored[partition] = (records, start)
    for match in re.finditer(
        r"partition (\d+): local state is current \(changelog offset (\d+)\)", text
    ):
        partition, start = (int(g) for g in match.groups())
        restored[partition] = (0, start)
    return restored


def test_a_restart_on_its_own_disk_restores_less_than_a_takeover_on_an_empty_one(
    group: Group, mutations: Mutations
) -> None:
    """An instance restarted on its own disk restores only the changelog records written
    while it was down; the same instance on an empty disk restores the whole changelog of
    the same partitions."""
    group.extra["CALCULATOR_STANDBY_REPLICAS"] = "0"  # restores only, no standby catching up
    restarted, other = group.started("a", "b")
    location = unique_location("RESTORE")
    skus = [f"sku-{n}" for n in range(KEYS)]
    writer = LoadWriter(group.bootstrap, location, skus)
    writer.start()
    writer.wait_rounds(15)
    expected = writer.stop()
    wait_exact([restarted, other], location, expected)
    partitions = restarted.partitions()
    assert restarted.process is not None
    assert restarted.process.stop() == 0, logs([restarted])
    settle([other])
    # While it is down: one more adjustment to each of its keys, applied by the other.
    written_meanwhile = keys_in(location, skus, partitions)
    assert written_meanwhile, "the restarted instance owns none of the keys"
    for sku in written_meanwhile:
        mutations.send(INVENTORY_ADJUSTMENTS.name, location, sku, 1)
        expected[sku] += 1
    mutations.flush()
    wait_exact([other], location, expected)

    restarted.start()
    settle([restarted, other])
    assert restarted.partitions() == partitions, "the group moved other partitions"
    wait_exact([restarted, other], location, expected)
    from_local = restarted.metric(RESTORED)
    local_restores = _restored_per_partition(restarted)
    assert restarted.process.stop() == 0, logs([restarted])
    settle([other])

    # The same instance id (the same place in the group's range assignment) on an empty disk.
    fresh = group.new("fresh", state="empty-disk", instance_id=restarted.instance_id)
    fresh.start()
    settle([fresh, other])
    assert fresh.partitions() == partitions, "the group moved other partitions"
    wait_exact([fresh, other], location, expected)
    from_changelog = fresh.metric(RESTORED)
    fresh_restores = _restored_per_partition(fresh)

    print(f"restored {from_local:g} record(s) on its own disk, {from_changelog:g} on an empty one")
    assert set(local_restores) == set(fresh_restores) == set(partitions)
    # On its own disk: only what the other instance published meanwhile (one record per
    # key at most), on top of the keys it had.
    assert 1 <= from_local <= len(written_meanwhile), local_restores
    with_keys = {partition_of(location, sku) for sku in skus} & set(partitions)
    assert all(local_restores[p][1] > 0 for p in with_keys), local_restores
    # On an empty disk: the whole changelog of the partitions, at least a record per key.
    assert from_changelog >= len(written_meanwhile), fresh_restores
    assert all(start == 0 for _, start in fresh_restores.values())
    assert from_local < from_changelog


def _standbys(calculator: Calculator) -> dict[int, list[str]]:
    """``{partition: [standby instance ids]}`` as ``calculator``'s /metadata lists them."""
    return {
        p["partition"]: [h["instanceId"] for h in p["standbys"]]
        for p in calculator.get("/metadata").json()["partitions"]
    }


def _owners(calculator: Calculator) -> dict[int, str | None]:
    return {p["partition"]: p["owner"] for p in calculator.get("/metadata").json()["partitions"]}


def test_standbys_answer_honestly_while_the_owner_is_down_and_take_its_partitions_over(
    group: Group,
) -> None:
    """Three instances, one standby per partition. kill -9 of one under +1 writes: while
    it is down the others answer its keys from their standby replica (200 marked
    `X-Replica: standby`, never a count that was not written), `fresh=true` refuses
    with a 503 and Retry-After; each of its partitions goes to the instance that kept it
    as a standby, which restores only the tail; then every answer is fresh and exact."""
    calculators = group.started("a", "b", "c")
    victim, survivors = calculators[1], [calculators[0], calculators[2]]
    location = unique_location("STANDBY")
    skus = [f"sku-{n}" for n in range(KEYS)]
    writer = LoadWriter(group.bootstrap, location, skus, increments_only=True)
    writer.start()
    with writer.quiet() as expected:
        wait_exact(calculators, location, expected)
    victim_partitions = victim.partitions()
    owners = _owners(survivors[0])
    # Every partition has exactly one warm standby, never its owner, the same in every
    # instance's table (the lags are advertised every few seconds).
    wait_until(lambda: all(len(h) == 1 for h in _standbys(survivors[0]).values()), 30)
    standbys = _standbys(survivors[0])
    assert all(standbys[p][0] != owners[p] for p in ALL_PARTITIONS), (standbys, owners)
    victim_keys = keys_in(location, skus, victim_partitions)
    assert victim_keys, "the victim owns none of the keys"
    asked_of = {sku: survivors[partition_of(location, sku) % 2] for sku in victim_keys}

    writer.wait_rounds(5)
    assert victim.process is not None
    victim.process.kill()
    stale, fresh_refused, impossible = Counter[str](), Counter[str](), []
    deadline = time.monotonic() + TAKEOVER_BOUND_SECONDS
    while time.monotonic() < deadline:
        for sku, calculator in asked_of.items():
            response = calculator.sellable(location, sku)
            sent = writer.sent_of(sku)
            if response.status_code == 200:
                count = response.json()["count"]
                if not 1 <= count <= sent:
                    impossible.append(f"{sku}: {count} with {sent} sent")
                if response.headers.get("x-replica") == "standby":
                    stale[response.headers["x-stale-reason"]] += 1
                    assert int(response.headers["x-standby-lag"]) >= 0
                    assert response.headers["x-reflects"].startswith("inventory_adjustments:")
            elif response.status_code != 503:
                impossible.append(f"{sku}: {response.status_code} {response.text[:200]}")
            refused = calculator.sellable(location, sku, fresh="true")
            if refused.status_code == 503:
                assert refused.headers["retry-after"] == "1"
                fresh_refused[refused.json()["error"]] += 1
            else:
                assert refused.status_code == 200, refused.text
                assert "x-replica" not in refused.headers
        if sorted(survivors[0].partitions() + survivors[1].partitions()) == ALL_PARTITIONS:
            break
    settle(survivors)
    assert not impossible, impossible[:20]
    print(f"while the owner was down: stale {dict(stale)}, fresh=true {dict(fresh_refused)}")
    assert sum(stale.values()) > 0, "no standby answered while the owner was down"
    assert sum(fresh_refused.values()) > 0, "fresh=true was never refused"

    # Each of the victim's partitions went to its standby, which restored only the tail.
    new_owners = _owners(survivors[0])
    assert {p: new_owners[p] for p in victim_partitions} == {
        p: standbys[p][0] for p in victim_partitions
    }, (standbys, new_owners)
    for survivor in survivors:
        taken = [p for p in victim_partitions if new_owners[p] == survivor.instance_id]
        restores = _restored_per_partition(survivor)
        for partition in taken:
            records, start = restores[partition]
            assert start > 0, f"partition {partition} was restored from offset 0: {restores}"
            print(f"partition {partition}: {records} record(s) restored from offset {start}")

    writer.wait_rounds(5)
    expected = writer.stop()
    wait_exact(survivors, location, expected)
    for sku in victim_keys:
        response = asked_of[sku].sellable(location, sku)
        assert "x-replica" not in response.headers and "x-behind" not in response.headers
        assert response.json()["count"] == expected[sku]
