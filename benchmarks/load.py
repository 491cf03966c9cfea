"""HTTP load for the benchmarks: ``wrk`` at a fixed concurrency, and a bare FastAPI baseline.

Example::

    from benchmarks.load import Target, bare_fastapi, measure_in_rounds, print_ratios

    with bare_fastapi() as baseline_url:
        baseline = Target("bare FastAPI (baseline)", baseline_url + "/inventory/…")
        measured = Target("service", service_url + "/inventory/…")
        results = measure_in_rounds([baseline, measured], rounds=3, seconds=10)
    print_ratios(results, baseline, {measured: 0.6})

``wrk`` (Debian package ``wrk``; ``make bench-…`` installs it) drives the load from its
own process, so the Python server under test is what is measured, not the client. Every
benchmark runs its baseline in the same run, on the same machine, and prints the ratio.

A shared two-core machine drifts by ±10 % from one ten-second run to the next, so a
single baseline run followed by a single measured run can tilt a ratio either way. Hence
:func:`measure_in_rounds`: every target is warmed up first, then the baseline and the
targets take turns for several rounds, and the ratio printed is the median of the
per-round ratios (each round's are shown too).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

from local_stack.process import ManagedProcess, free_port
from service_runtime.server import EVENT_LOOP, HTTP_IMPLEMENTATION

_LUA_REPORT = """
done = function(summary, latency, requests)
  io.write(string.format("RESULT %d %d %d %d %.3f %.3f %.3f %.3f\\n",
    summary.requests, summary.duration,
    summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout,
    summary.errors.status,
    latency:percentile(50) / 1000, latency:percentile(95) / 1000,
    latency:percentile(99) / 1000, latency.max / 1000))
  if report_more ~= nil then report_more() end
end
"""


@dataclass(frozen=True)
class LoadResult:
    """What one ``wrk`` run measured."""

    requests: int
    seconds: float
    errors: int
    """Socket errors and timeouts."""
    non_2xx: int
    p50_ms: float
    p95_ms: float
    p99_ms: float
    max_ms: float

    @property
    def requests_per_second(self) -> float:
        return self.requests / self.seconds

    def row(self, name: str) -> str:
        """One line of a results table."""
        return (
            f"{name:<34}{self.requests_per_second:>10,.0f}{self.p50_ms:>9.2f}"
            f"{self.p95_ms:>9.2f}{self.p99_ms:>9.2f}{self.errors + self.non_2xx:>8}"
        )


TABLE_HEADER = f"{'':<34}{'req/s':>10}{'p50 ms':>9}{'p95 ms':>9}{'p99 ms':>9}{'errors':>8}"


def wrk_binary() -> str:
    """Path of ``wrk``, or a clear exit if it is not installed."""
    path = shutil.which("wrk")
    if path is None:
        sys.exit("error: wrk not found: apt-get install -y wrk (make bench-… does this)")
    return path


def run_wrk(
    url: str,
    concurrency: int = 32,
    seconds: float = 10.0,
    method: str = "GET",
    body: str | None = None,
    threads: int = 1,
) -> LoadResult:
    """Load ``url`` with ``concurrency`` open connections for ``seconds``."""
    script = _LUA_REPORT
    if method != "GET":
        script = (
            f'wrk.method = "{method}"\n'
            f"wrk.body = [[{body or ''}]]\n"
            'wrk.headers["Content-Type"] = "application/json"\n' + script
        )
    return run_wrk_script(url, script, concurrency, seconds, threads)[0]


def run_wrk_script(
    url: str,
    script: str,
    concurrency: int = 32,
    seconds: float = 10.0,
    threads: int = 1,
    timeout: float = 5.0,
) -> tuple[LoadResult, str]:
    """Run ``wrk`` with the Lua ``script``, which must end with :data:`_LUA_REPORT` (or
    :func:`lua_script`'s result); return what it measured and its whole output.

    ``timeout``: seconds after which ``wrk`` gives up on an answer (a socket error).
    """
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as lua:
        lua.write(textwrap.dedent(script))
    try:
        output = subprocess.run(
            [
                wrk_binary(),
                f"-t{threads}",
                f"-c{concurrency}",
                f"-d{max(1, round(seconds))}s",
                "--timeout",
                f"{max(1, round(timeout))}s",
                "-s",
                lua.name,
                url,
            ],
            capture_output=True,
            text=True,
            check=True,
            timeout=seconds + timeout + 60,
        ).stdout
    finally:
        os.unlink(lua.name)
    match = re.search(r"^RESULT (.*)$", output, re.MULTILINE)
    if match is None:
        raise RuntimeError(f"unexpected wrk output:\n{output}")
    requests, micros, errors, non_2xx, p50, p95, p99, worst = match.group(1).split()
    result = LoadResult(
        int(requests),
        int(micros) / 1e6,
        int(errors),
        int(non_2xx),
        float(p50),
        float(p95),
        float(p99),
        float(worst),
    )
    return result, output


def lua_script(body: str) -> str:
    """``body`` (Lua: ``request()``, ``response()``… hooks) followed by the report that
    :func:`run_wrk_script` reads; a global function ``report_more()`` defined in ``body``
    runs after it, in wrk's main Lua state, to write more lines."""
    return textwrap.dedent(body) + _LUA_REPORT


def load_arguments(description: str) -> argparse.ArgumentParser:
    """A parser with the options every HTTP benchmark takes: --seconds, --concurrency, --rounds."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--seconds", type=float, default=10.0, help="length of each run")
    parser.add_argument("--concurrency", type=int, default=32, help="open connections")
    parser.add_argument("--rounds", type=int, default=3, help="turns each server takes")
    return parser


@dataclass(frozen=True)
class Target:
    """One URL to load, under a display name."""

    name: str
    url: str
    method: str = "GET"
    body: str | None = None


def measure_in_rounds(
    targets: Sequence[Target],
    rounds: int = 3,
    seconds: float = 10.0,
    concurrency: int = 32,
    warmup_seconds: float = 2.0,
    after_each_round: Callable[[int], None] | None = None,
) -> dict[Target, list[LoadResult]]:
    """Warm every target up, then load them in turn, ``rounds`` times; print each row.

    ``after_each_round`` (given the round number) measures something else in turn with
    the servers, so that it sees the same drift of the machine as they do.
    """
    for target in targets:
        run_wrk(target.url, concurrency, warmup_seconds, target.method, target.body)
    print(
        f"wrk, {concurrency} connections, {seconds:g} s a run, {rounds} round(s), "
        f"after a {warmup_seconds:g} s warm-up each; every server on uvicorn with "
        f"{HTTP_IMPLEMENTATION} + {EVENT_LOOP}, one worker unless its name says otherwise"
    )
    print(TABLE_HEADER)
    results: dict[Target, list[LoadResult]] = {target: [] for target in targets}
    for round_number in range(1, rounds + 1):
        for target in targets:
            result = run_wrk(target.url, concurrency, seconds, target.method, target.body)
            results[target].append(result)
            print(result.row(f"{target.name} #{round_number}"), flush=True)
        if after_each_round is not None:
            after_each_round(round_number)
    return results


def print_ratios(
    results: Mapping[Target, list[LoadResult]],
    baseline: Target,
    targets: Mapping[Target, float | None],
) -> dict[Target, float]:
    """Print, for each target, the median of its per-round ratios to the baseline.

    ``targets`` maps each measured target to the ratio the issue asks for (None: no
    target against this baseline). Returns the medians.
    """
    medians = {}
    for target, wanted in targets.items():
        ratios = [
            mine.requests_per_second / base.requests_per_second
            for mine, base in zip(results[target], results[baseline], strict=True)
        ]
        medians[target] = median = statistics.median(ratios)
        rates = statistics.median(r.requests_per_second for r in results[target])
        verdict = ""
        if wanted is not None:
            verdict = f"; target >= {wanted:g}: {'met' if median >= wanted else 'NOT met'}"
        print(
            f"{target.name}: median {rates:,.0f} req/s; ratio to {baseline.name}: "
            f"median {median:.2f} (rounds: {' '.join(f'{r:.2f}' for r in ratios)}){verdict}"
        )
    return medians


_BARE_APP = '''
"""The baseline: FastAPI and uvicorn doing nothing but answering."""
from fastapi import FastAPI
from fastapi.responses import Response
import json

app = FastAPI()


@app.get("/inventory/locations/{location}/skus/{sku}")
async def get(location: str, sku: str) -> Response:
    body = json.dumps({"locationId": location, "sku": sku, "count": 90})
    return Response(body, media_type="application/json")


@app.post("/inventory/adjustment")
async def post(body: dict) -> dict:
    return {"message": "ok", **body}
'''


@contextmanager
def bare_fastapi(log_dir: Path | None = None) -> Iterator[str]:
    """Run the baseline app (one uvicorn worker on httptools + uvloop, like the services)
    and yield its URL."""
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        Path(tmp, "bare_app.py").write_text(_BARE_APP)
        process = ManagedProcess(
            "bare-fastapi",
            [
                sys.executable,
                "-m",
                "uvicorn",
                "bare_app:app",
                "--port",
                str(port),
                # The stack the services run on (service_runtime.server), named explicitly
                # like theirs: what a user deploying FastAPI gets from uvicorn[standard].
                "--http",
                HTTP_IMPLEMENTATION,
                "--loop",
                EVENT_LOOP,
                "--no-access-log",
                "--log-level",
                "warning",
            ],
            cwd=Path(tmp),
            log_dir=log_dir,
        )
        url = f"http://127.0.0.1:{port}"
        with process:
            process.start()
            process.wait_ready(lambda: httpx.get(url + "/docs").status_code == 200, 30)
            yield url
