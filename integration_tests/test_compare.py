"""`make compare`, run briefly: every section filled, consistent; the failover phase on a
system of its own (it kills a calculator, which the shared system's other tests need)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from comparison.__main__ import Progress, main
from comparison.failover import KINDS, KeyModel
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
    # Given by URLs without --allow-kill: nothing is killed, and the report says why.
    assert summary["failover"]["ran"] is False
    assert "--allow-kill" in summary["failover"]["skipped"]
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


def test_the_failover_phase_kills_a_calculator_and_measures_every_path_until_it_recovers(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # No URLs: compare starts a system of its own, supervised as make up's is.
    status = main(
        [
            "--duration", "1.5",
            "--keys", "12",
            "--locations", "2",
            "--write-rate", "30",
            "--read-concurrency", "6",
            "--probes", "1",
            "--seed", "5",
            "--failover-timeout", "60",
            "--results", str(tmp_path),
        ]
    )  # fmt: skip
    assert status == 0  # every key agrees on every path after the failover too
    summary = json.loads((tmp_path / "report.json").read_text())["summary"]
    assert summary["correctness"]["all_agree"] is True
    failover = summary["failover"]
    assert failover["ran"] is True and failover["recovered"] is True
    assert failover["victim"]["instanceId"].startswith("calculator-")
    assert failover["writes"]["accepted"] > 0
    assert set(failover["paths"]) == set(failover["buckets"]) == set(PATHS)
    for path in PATHS:
        numbers, buckets = failover["paths"][path], failover["buckets"][path]
        seconds = [b["t"] for b in buckets]
        assert seconds == list(range(seconds[0], seconds[-1] + 1))  # one per second
        assert seconds[0] < 0 <= seconds[-1]  # load before the kill and after it
        for bucket in buckets:
            assert sum(bucket[kind] for kind in KINDS) == bucket["answers"]
            assert sum(bucket["errors_503"].values()) == bucket["503"]
            assert 0 <= bucket["not_exact"] <= bucket["answers"]
        after = [b for b in buckets if b["t"] >= 0]
        assert sum(b["answers"] for b in after) == numbers["answers_after_kill"] > 0
        for kind in KINDS:
            assert sum(b[kind] for b in after) == numbers["kinds_after_kill"][kind]
        assert sum(numbers["errors_503"].values()) == numbers["kinds_after_kill"]["503"]
        assert numbers["wrong_values"] == 0
        latency = numbers["latency_after_kill_ms"]
        assert 0 < latency["p50"] <= latency["p99"] <= latency["max"]
        assert 0 <= numbers["exact_again_s"] <= failover["measured_until_s"]
        for window in (numbers["unavailable_s"], numbers["stale_s"]):
            if window is not None:
                assert 0 <= window["first"] <= window["last"] <= failover["measured_until_s"]
    # The killed calculator's keys: its own URL refuses connections until it is back.
    local = failover["paths"]["calculator-local"]
    assert local["kinds_after_kill"]["other"] > 0 and local["unavailable_s"] is not None
    # The Cassandra service does not depend on that process to answer.
    service = failover["paths"]["cassandra-service"]
    assert service["kinds_after_kill"]["fresh"] > 0

    page = (tmp_path / "report.html").read_text()
    assert "Failover: kill -9 of one calculator" in page
    assert page.count('src="data:image/png;base64,') == 4
    assert (tmp_path / "failover_timeline.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    out = capsys.readouterr().out
    assert f"failover: kill -9 of {failover['victim']['instanceId']}" in out
    assert "NOT RECOVERED" not in out


def test_staleness_is_the_age_of_the_oldest_acknowledged_write_a_value_lacks() -> None:
    model = KeyModel(base=100, values=[101, 103, 108], acked=[10.0, 11.0, None])
    assert model.staleness(103, sent=12.0, since=0.0) == 0.0  # all acknowledged ones
    assert model.staleness(108, sent=12.0, since=0.0) == 0.0  # ahead: one in flight too
    assert model.staleness(101, sent=12.0, since=0.0) == 1.0  # lacks the one of 11.0
    assert model.staleness(101, sent=10.5, since=0.0) == 0.0  # not acknowledged yet then
    assert model.staleness(100, sent=12.0, since=0.0) == 2.0  # lacks both
    assert model.staleness(102, sent=12.0, since=0.0) is None  # no prefix sums to it
    assert model.staleness(None, sent=12.0, since=3.0) == 9.0  # none at all: since the start
    model.unknown = True  # a write failed: it may or may not be in the log
    assert model.staleness(103, sent=12.0, since=0.0) is None


def test_scale_starts_its_own_systems_so_not_with_urls() -> None:
    urls = ["--mutator", "http://m", "--service", "http://s", "--calculators", "http://c"]
    with pytest.raises(SystemExit):
        main([*urls, "--scale", "1,2"])


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
