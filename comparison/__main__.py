"""``make compare``: measure both query sides on a running system and write a report.

    .venv/bin/python -m comparison [--duration 30] [--keys 200] [--locations 10]
        [--write-rate 100] [--read-concurrency 16] [--seed 1] [--results DIR]
        [--mutator URL --service URL --calculators URL,URL]

Without URLs it starts the system the way ``make up`` does (on free ports, in a
temporary home) and stops it afterwards. The results directory gets ``report.html``
(charts inline), ``report.json`` (summary and raw samples) and the charts as PNGs.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TextIO

from tqdm import tqdm

from comparison.report import summarize, terminal_table, write_results
from comparison.workload import Endpoints, Options, Workload
from local_stack.system import started_system


@contextmanager
def started_endpoints() -> Iterator[Endpoints]:
    """A system started the way ``make up`` does, in a temporary home; stopped on exit."""
    with tempfile.TemporaryDirectory(prefix="compare-") as tmp:
        print("starting the system (as make up does)…", flush=True)
        with started_system(Path(tmp)) as running:
            yield Endpoints(running.mutator, running.service, running.calculators)


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
    args = parser.parse_args(argv)
    options = Options(
        keys=args.keys,
        locations=args.locations,
        write_rate=args.write_rate,
        read_concurrency=args.read_concurrency,
        duration=args.duration,
        seed=args.seed,
        probes=args.probes,
    )
    results = args.results or Path("results") / time.strftime("compare-%Y%m%d-%H%M%S")
    given = [args.mutator, args.service, args.calculators]
    if any(given) and not all(given):
        parser.error("--mutator, --service and --calculators go together")

    def run(endpoints: Endpoints) -> int:
        progress = Progress()
        try:
            workload = Workload(endpoints, options, progress)
        except ValueError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        measurements = asyncio.run(workload.run())
        progress.close()
        summary = summarize(measurements)
        files = write_results(summary, measurements, results)
        print()
        print(terminal_table(summary))
        print(f"\nreport: {files['report.html']}  (raw data: {files['report.json']})")
        return 0 if summary["correctness"]["all_agree"] else 1

    if all(given):
        return run(Endpoints(args.mutator, args.service, args.calculators.split(",")))
    with started_endpoints() as endpoints:
        return run(endpoints)


if __name__ == "__main__":
    sys.exit(main())
