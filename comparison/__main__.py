"""``make compare``: measure both query sides on a running system and write a report.

    .venv/bin/python -m comparison [--duration 30] [--keys 200] [--locations 10]
        [--write-rate 100] [--read-concurrency 16] [--seed 1] [--results DIR]
        [--no-failover] [--scale 1,2,3] [--validated-share 0.3]
        [--mutator URL --service URL --calculators URL,URL [--allow-kill]]

Without URLs it starts the system the way ``make up`` does (on free ports, in a
temporary home, its processes restarted when they die) and stops it afterwards. The
failover phase kills one calculator with kill -9: on a system given by URLs only with
``--allow-kill`` (something must start it again, as ``make up``'s supervisor does).
``--scale`` runs the workload again on systems with that many calculators (started
here, one after the other). ``--validated-share F`` sends that share of the measured
phase's reservations with ``?validate=true`` (counted in the expected values only if
CONFIRMED; never in the failover phase) and reports their answers and latency. The
results directory gets ``report.html`` (charts inline), ``report.json`` (summary and raw
samples) and the charts as PNGs.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import urlsplit

from tqdm import tqdm

from comparison.report import LOAD_GENERATOR, summarize, terminal_table, write_results
from comparison.workload import Endpoints, Measurements, Options, Workload
from local_stack.process import ProcessFailed
from local_stack.system import RunningSystem, calculator_process, started_system

START_ATTEMPTS = 3


@contextmanager
def started(calculators: int = 2) -> Iterator[RunningSystem]:
    """A system started the way ``make up`` does (supervised: a killed process is started
    again after about a second), in a temporary home; stopped on exit.

    A start that fails is tried again (twice): the free ports are picked before the
    services bind them, and on a busy machine another process (an outgoing connection's
    ephemeral port, another system starting) sometimes takes one in between.
    """
    for attempt in range(1, START_ATTEMPTS + 1):
        print(f"starting the system with {calculators} calculator(s), as make up does…", flush=True)
        with ExitStack() as stack:
            tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="compare-"))
            try:
                running = stack.enter_context(
                    started_system(Path(tmp), calculators=calculators, supervise=True)
                )
            except ProcessFailed as exc:
                if attempt == START_ATTEMPTS:
                    raise
                reason = next((line for line in str(exc).splitlines() if "ERROR" in line), "")
                print(f"the system did not start: {reason.strip()}; trying again", flush=True)
                continue
            yield running
            return


def endpoints_of(running: RunningSystem) -> Endpoints:
    return Endpoints(running.mutator, running.service, running.calculators)


async def kill_calculator(url: str) -> None:
    """kill -9 the calculator process listening on ``url``'s port (on this machine)."""
    port = urlsplit(url).port
    if port is None:
        raise ValueError(f"no port in {url}")
    await asyncio.to_thread(calculator_process(port).kill)


def scale_run(n: int, options: Options) -> dict[str, Any]:
    """The workload (no failover) on a fresh system with ``n`` calculators: throughput,
    latency and CPU per path."""
    with started(n) as running:
        pids = {name: process.pid for name, process in running.services.items()}
        pids[LOAD_GENERATOR] = os.getpid()  # the readers and writers share the cores too
        progress = Progress()
        workload = Workload(endpoints_of(running), options, progress, watch_pids=pids)
        measurements = asyncio.run(workload.run())
        progress.close()
    summary = summarize(measurements)
    return {
        "calculators": n,
        "paths": {
            path: {
                "throughput_per_s": numbers["throughput_per_s"],
                "latency_ms": numbers["latency_ms"],
                "errors": numbers["errors"],
            }
            for path, numbers in summary["paths"].items()
        },
        "cpu": measurements.cpu,
        "all_agree": summary["correctness"]["all_agree"],
    }


class Progress:
    """One progress bar per phase on a terminal; anywhere else (a pipe, a log file) one
    line per phase once it is over, instead of a redraw for every update."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self._stream = stream if stream is not None else sys.stderr
        self._live = self._stream.isatty()
        self._bar: tqdm | None = None
        self._phase: str | None = None
        self._started = 0.0
        self._done = self._total = 0.0

    def __call__(self, phase: str, done: float, total: float) -> None:
        if phase != self._phase:
            self.close()
            self._phase, self._started = phase, time.monotonic()
            if self._live:
                self._bar = tqdm(total=round(total, 1), desc=f"{phase:<34}", file=self._stream)
        self._done, self._total = round(min(done, total), 1), round(total, 1)
        if self._bar is not None:
            self._bar.n = self._done
            self._bar.update(0)  # redraws at most every mininterval (0.1 s)

    def close(self) -> None:
        """End the current phase: the bar's final state, or its one line."""
        if self._bar is not None:
            self._bar.n = self._done
            self._bar.close()
            self._bar = None
        elif self._phase is not None:
            seconds = time.monotonic() - self._started
            print(
                f"{self._phase:<34} {self._done:g}/{self._total:g} in {seconds:.1f} s",
                file=self._stream,
                flush=True,
            )
        self._phase = None


def main(argv: list[str] | None = None) -> int:
    """Run the comparison; exit 1 if the paths disagree at the end."""
    parser = argparse.ArgumentParser(prog="python -m comparison", description=__doc__)
    defaults = Options()
    parser.add_argument("--keys", type=int, default=defaults.keys)
    parser.add_argument("--locations", type=int, default=defaults.locations)
    parser.add_argument("--write-rate", type=float, default=defaults.write_rate)
    parser.add_argument("--read-concurrency", type=int, default=defaults.read_concurrency)
    parser.add_argument("--duration", type=float, default=defaults.duration)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--probes", type=int, default=defaults.probes)
    parser.add_argument("--results", type=Path, help="directory (default results/<time>)")
    parser.add_argument("--mutator", help="mutator URL of a running system")
    parser.add_argument("--service", help="sellable_service URL")
    parser.add_argument("--calculators", help="calculator URLs, comma-separated")
    parser.add_argument(
        "--failover",
        action=argparse.BooleanOptionalAction,
        default=defaults.failover,
        help="kill -9 one calculator under load and measure every path until it recovers",
    )
    parser.add_argument(
        "--allow-kill",
        action="store_true",
        help="with URLs: the failover phase may kill -9 a calculator of that system",
    )
    parser.add_argument("--stale-threshold-ms", type=float, default=defaults.stale_threshold_ms)
    parser.add_argument("--failover-timeout", type=float, default=defaults.failover_timeout)
    parser.add_argument(
        "--scale",
        help="comma-separated calculator counts (e.g. 1,2,3): the workload again on a "
        "system started with each (not with URLs)",
    )
    parser.add_argument(
        "--validated-share",
        type=float,
        default=defaults.validated_share,
        help="share (0 to 1) of the reservations sent with ?validate=true",
    )
    args = parser.parse_args(argv)
    if not 0 <= args.validated_share <= 1:
        parser.error("--validated-share: a share between 0 and 1")
    options = Options(
        keys=args.keys,
        locations=args.locations,
        write_rate=args.write_rate,
        read_concurrency=args.read_concurrency,
        duration=args.duration,
        seed=args.seed,
        probes=args.probes,
        failover=args.failover,
        stale_threshold_ms=args.stale_threshold_ms,
        failover_timeout=args.failover_timeout,
        validated_share=args.validated_share,
    )
    results = args.results or Path("results") / time.strftime("compare-%Y%m%d-%H%M%S")
    given = [args.mutator, args.service, args.calculators]
    if any(given) and not all(given):
        parser.error("--mutator, --service and --calculators go together")
    scale: list[int] = []
    if args.scale:
        if all(given):
            parser.error("--scale starts its own systems: not with URLs")
        try:
            scale = [int(n) for n in args.scale.split(",")]
        except ValueError:
            parser.error("--scale takes calculator counts, e.g. 1,2,3")
        if any(n < 1 or n > 8 for n in scale):
            parser.error("--scale: between 1 and 8 calculators")

    def measure(endpoints: Endpoints, may_kill: bool) -> Measurements | None:
        progress = Progress()
        reason = (
            "the system was given by URLs: pass --allow-kill to let the failover phase "
            "kill -9 one of its calculators"
        )
        try:
            workload = Workload(
                endpoints,
                options,
                progress,
                kill=kill_calculator if may_kill else None,
                no_kill_reason=reason,
            )
        except ValueError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return None
        measurements = asyncio.run(workload.run())
        progress.close()
        if not measurements.failover["ran"] and options.failover:
            print(f"failover phase skipped: {measurements.failover['skipped']}", flush=True)
        return measurements

    if all(given):
        endpoints = Endpoints(args.mutator, args.service, args.calculators.split(","))
        measurements = measure(endpoints, args.allow_kill)
    else:
        with started() as running:
            measurements = measure(endpoints_of(running), True)
    if measurements is None:
        return 2
    # One system at a time: each scale run starts (and stops) its own.
    scaling = [scale_run(n, dataclasses.replace(options, failover=False)) for n in scale]
    summary = summarize(measurements, scaling)
    files = write_results(summary, measurements, results)
    print()
    print(terminal_table(summary))
    print(f"\nreport: {files['report.html']}  (raw data: {files['report.json']})")
    ok = summary["correctness"]["all_agree"] and all(run["all_agree"] for run in scaling)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
