"""Repeated kill -9 (or SIGSTOP) trials of a calculator on the whole system, with counts.

    make chaos                                   # 20 trials
    .venv/bin/python -m benchmarks.chaos --trials 50 --keys 24
    .venv/bin/python -m benchmarks.chaos --fault both        # kill -9 and SIGSTOP in turns

Starts the system as ``make up`` does (on free ports, state in a temporary home), then
per trial, on a location of its own:

1. adjusts every key by +100 through the mutator and waits until the victim answers 100
   (its store and the changelog have them);
2. starts a stream of writes on other keys of the location (+2 and -1 in turns) that
   runs until the victim is back, and kills one calculator with SIGKILL mid-stream
   (the instances take turns);
3. while it is down, reserves 7 of every key and adjusts every other key by +1: the
   shapes that once left a restarted instance with wrong values for good;
4. starts it again with the same command, environment and state directory (with
   ``--fault freeze``: SIGSTOP instead of the kill, SIGCONT after 2-8 s); meanwhile the
   group may hand its partitions to the other instance and back;
5. waits until every key reads its expected value on every reader and every part answers
   ``/health/ready`` with 200.

A trial is *exact* when step 5 is reached within ``--timeout`` seconds, *wrong* when a
reader still disagrees then (the differing answers are printed). Exits 1 if any was wrong.
"""

from __future__ import annotations

import argparse
import itertools
import os
import random
import signal
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import httpx

from local_stack.process import ManagedProcess
from local_stack.system import RunningSystem, calculator_process, started_system
from local_stack.testing import wait_until


def _post(
    client: httpx.Client, system: RunningSystem, kind: str, key: tuple[str, str], count: int
) -> None:
    location, sku = key
    answer = client.post(
        f"{system.mutator}/inventory/{kind}",
        json={"locationId": location, "sku": sku, "count": count},
    )
    answer.raise_for_status()


def _wrong(
    client: httpx.Client,
    readers: list[str],
    location: str,
    expected: dict[str, int],
    service: str = "",
) -> dict[str, tuple[int | None, int]]:
    """``{"reader sku": (actual, expected)}`` for every answer of ``readers`` that differs.
    Calculators (every reader but ``service``) are asked with ``fresh=true``: a standby
    replica's answer, right as it may be, does not show that the owner is."""
    wrong: dict[str, tuple[int | None, int]] = {}
    for reader in readers:
        fresh = {} if reader == service else {"fresh": "true"}
        for sku, count in expected.items():
            answer = client.get(f"{reader}/inventory/locations/{location}/skus/{sku}", params=fresh)
            actual = answer.json()["count"] if answer.status_code == 200 else None
            if actual != count:
                wrong[f"{reader} {sku}"] = (actual, count)
    return wrong


def _all_ready(client: httpx.Client, system: RunningSystem) -> bool:
    parts = [system.mutator, system.service, *system.calculators]
    return all(client.get(f"{part}/health/ready").status_code == 200 for part in parts)


class _Load:
    """Writes on keys of their own in the background, so a kill lands mid-stream.

    Only answers of 200 count into ``expected``; anything else (there should be none:
    the broker is healthy) makes the key ambiguous, and it is left out of the check.
    """

    def __init__(self, system: RunningSystem, location: str, keys: int) -> None:
        self._system = system
        self._location = location
        self.expected = {f"load-{n}": 100 for n in range(keys)}  # adjusted +100 first
        self.ambiguous: set[str] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="load")

    def __enter__(self) -> _Load:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()

    def checked(self) -> dict[str, int]:
        """The load keys' expected values, ambiguous ones left out."""
        with self._lock:
            return {k: v for k, v in self.expected.items() if k not in self.ambiguous}

    def _run(self) -> None:
        with httpx.Client(timeout=15) as client:
            for n in itertools.count():
                if self._stop.is_set():
                    return
                sku = f"load-{n % len(self.expected)}"
                kind, delta = (
                    ("adjustment", 2) if n // len(self.expected) % 2 else ("reservation", -1)
                )
                try:
                    _post(client, self._system, kind, (self._location, sku), abs(delta))
                except httpx.HTTPError:
                    with self._lock:
                        self.ambiguous.add(sku)
                    continue
                with self._lock:
                    self.expected[sku] += delta
                time.sleep(0.002)


def trial(
    client: httpx.Client,
    system: RunningSystem,
    victim: str,
    keys: int,
    timeout: float,
    restarted: list[ManagedProcess],
    freeze: bool = False,
) -> dict[str, tuple[int | None, int]]:
    """One trial (kill -9 and restart, or with ``freeze`` SIGSTOP for a few seconds and
    SIGCONT); the answers still wrong after ``timeout`` (empty: exact)."""
    location = f"CHAOS-{uuid.uuid4().hex[:8]}"
    expected = {f"sku-{n}": 100 for n in range(keys)}
    load = _Load(system, location, keys)
    for sku in [*expected, *load.expected]:  # every key exists before the kill
        _post(client, system, "adjustment", (location, sku), 100)
    # The victim has them in its store and its changelog before the fault.
    wait_until(lambda: not _wrong(client, [victim], location, expected), timeout=timeout)
    process = calculator_process(int(victim.rsplit(":", 1)[1]))
    with load:
        time.sleep(random.uniform(0.05, 0.5))  # the fault lands mid-stream, at no fixed point
        if freeze:
            os.kill(process.pid, signal.SIGSTOP)
        else:
            process.kill()
        for n, sku in enumerate(expected):
            _post(client, system, "reservation", (location, sku), 7)
            expected[sku] -= 7
            if n % 2:
                _post(client, system, "adjustment", (location, sku), 1)
                expected[sku] += 1
        if freeze:
            time.sleep(random.uniform(2.0, 8.0))
            os.kill(process.pid, signal.SIGCONT)
        else:
            logs = system.process.log_path.parent
            restarted.append(process.restarted(f"calculator-{victim.rsplit(':', 1)[1]}", logs))
        time.sleep(random.uniform(0.5, 3.0))  # writes go on while it restarts and replays
    expected.update(load.checked())
    if load.ambiguous:
        print(f"  {len(load.ambiguous)} load key(s) left out: a write was not answered 200")
    readers = [system.service, *system.calculators]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if not _wrong(client, readers, location, expected, system.service) and _all_ready(
                client, system
            ):
                return {}
        except httpx.HTTPError:
            pass  # the restarted instance is not listening yet
        time.sleep(0.25)
    return _wrong(client, readers, location, expected, system.service)


def _interrupt(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    """Run the trials and print the counts."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.chaos", description=__doc__)
    parser.add_argument("--trials", type=int, default=20, help="trials (default 20)")
    parser.add_argument(
        "--fault",
        choices=["kill", "freeze", "both"],
        default="kill",
        help="kill -9 and restart, SIGSTOP for 2-8 s then SIGCONT, or both in turns",
    )
    parser.add_argument("--keys", type=int, default=24, help="keys per trial (default 24)")
    parser.add_argument(
        "--timeout", type=float, default=120, help="seconds a trial may take to end exact"
    )
    args = parser.parse_args(argv)
    exact = wrong = 0
    restarted: list[ManagedProcess] = []
    # SIGTERM stops everything started here, as Ctrl-C does.
    signal.signal(signal.SIGTERM, _interrupt)
    with tempfile.TemporaryDirectory() as home, started_system(Path(home)) as system:
        logs = system.process.log_path.parent
        print(
            f"system up (logs in {logs}); {args.trials} trials of {args.keys} keys",
            flush=True,
        )
        try:
            with httpx.Client(timeout=15) as client:
                for n in range(args.trials):
                    victim = system.calculators[n % len(system.calculators)]
                    started = time.monotonic()
                    freeze = args.fault == "freeze" or (args.fault == "both" and n % 4 >= 2)
                    differing = trial(
                        client, system, victim, args.keys, args.timeout, restarted, freeze
                    )
                    took = time.monotonic() - started
                    if differing:
                        wrong += 1
                        sample = dict(list(differing.items())[:6])
                        print(f"trial {n + 1}: WRONG after {took:.0f} s: {sample}", flush=True)
                    else:
                        exact += 1
                        fault = "frozen" if freeze else "killed"
                        print(f"trial {n + 1}: exact ({victim} {fault}, {took:.1f} s)", flush=True)
        finally:
            counts = f"{exact} exact, {wrong} wrong of {exact + wrong} trials ({args.fault})"
            print(counts, flush=True)
            # Restarted instances are not children of the system: stop them with it.
            for process in restarted:
                process.stop()
    return 1 if wrong else 0


if __name__ == "__main__":
    sys.exit(main())
