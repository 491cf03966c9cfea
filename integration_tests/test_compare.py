"""`make compare`, run briefly against the running system: every section filled, consistent."""

from __future__ import annotations

import io
import json
from pathlib import Path

from comparison.__main__ import Progress, main
from comparison.workload import PATHS
from integration_tests.support import System

PROBES = 5
KEYS = 20
LOCATIONS = 2


def test_a_short_comparison_writes_a_complete_consistent_report(
    system: System, tmp_path: Path
) -> None:
    status = main(
        [
            "--mutator", system.mutator,
            "--service", system.service,
            "--calculators", ",".join(system.calculators),
            "--duration", "3",
            "--keys", str(KEYS),
            "--locations", str(LOCATIONS),
            "--write-rate", "50",
            "--read-concurrency", "4",
            "--probes", str(PROBES),
            "--seed", "7",
            "--results", str(tmp_path),
        ]
    )  # fmt: skip
    assert status == 0  # 0 only when every key agrees on every path
    report = json.loads((tmp_path / "report.json").read_text())
    summary, raw = report["summary"], report["raw"]

    for path in PATHS:
        numbers = summary["paths"][path]
        latency = numbers["latency_ms"]
        assert numbers["reads"] > 0
        assert latency["count"] == numbers["reads"] == len(raw["latencies_ms"][path])
        assert 0 < latency["p50"] <= latency["p95"] <= latency["p99"] <= latency["max"]
        assert numbers["throughput_per_s"] > 0
        freshness = numbers["freshness_ms"]
        assert freshness["count"] + numbers["freshness_timeouts"] == PROBES
        assert freshness["count"] == len(raw["freshness_ms"][path])
        assert freshness["p50"] <= freshness["p95"] <= freshness["max"]

    writes = summary["writes"]
    assert writes["accepted"] > 0 and writes["throughput_per_s"] > 0
    assert summary["correctness"] == {"keys_checked": KEYS, "all_agree": True, "disagreements": []}
    listings = summary["listings"]
    assert listings["mismatches"] == []
    assert {name: d["count"] for name, d in listings["latency_ms"].items()} == {
        "calculator fan-out": LOCATIONS,
        "cassandra-service pages": LOCATIONS,
    }

    page = (tmp_path / "report.html").read_text()
    for section in ("Reads at 4 concurrent", "Freshness", "Writes", "Correctness",
                    "Location listing", "What the numbers mean"):  # fmt: skip
        assert section in page
    assert page.count('src="data:image/png;base64,') == 3
    for chart in ("latency_cdf.png", "freshness_hist.png", "throughput.png"):
        assert (tmp_path / chart).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _phases(progress: Progress) -> None:
    """Updates as the workload sends them: thousands for a reading phase."""
    for n in range(1, 5_001):
        progress("reading calculator-local", n / 500, 10.0)
    for n in range(1, 6):
        progress("freshness calculator-local", n, 5)
    progress.close()


def test_progress_piped_to_a_file_is_one_line_per_phase() -> None:
    log = io.StringIO()
    _phases(Progress(log))
    lines = log.getvalue().splitlines()
    assert [line.split()[:3] for line in lines] == [
        ["reading", "calculator-local", "10/10"],
        ["freshness", "calculator-local", "5/5"],
    ]
    assert "\r" not in log.getvalue()


def test_progress_on_a_terminal_redraws_its_bars_a_few_times_a_second() -> None:
    terminal = _Terminal()
    _phases(Progress(terminal))
    # Without the rate limit every update was a redraw: 5,005 of them here.
    assert terminal.getvalue().count("\r") < 100
    assert terminal.getvalue().count("100%|") == 2  # each bar's final state is drawn
