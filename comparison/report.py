"""Turn :class:`~comparison.workload.Measurements` into numbers, charts, JSON and HTML.

Example::

    summary = summarize(measurements)
    write_results(summary, measurements, Path("results/run-1"))   # report.json/.html, *.png
    print(terminal_table(summary))
"""

from __future__ import annotations

import base64
import html
import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # after use(): the backend must be chosen first

from comparison.workload import PATHS, Measurements


def percentile(values: list[float], q: float) -> float | None:
    """The ``q`` quantile (0..1) by nearest rank; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[index]


def _distribution(values: list[float]) -> dict[str, Any]:
    return {
        "count": len(values),
        "p50": percentile(values, 0.50),
        "p95": percentile(values, 0.95),
        "p99": percentile(values, 0.99),
        "max": max(values) if values else None,
    }


def summarize(m: Measurements) -> dict[str, Any]:
    """Every number the report shows, as plain JSON-able data."""
    paths = {}
    for path in PATHS:
        latencies = m.latencies_ms.get(path, [])
        seconds = m.read_seconds.get(path, 0.0)
        paths[path] = {
            "latency_ms": _distribution(latencies),
            "reads": len(latencies),
            "errors": m.errors.get(path, 0),
            "throughput_per_s": len(latencies) / seconds if seconds else 0.0,
            "freshness_ms": _distribution(m.freshness_ms.get(path, [])),
            "freshness_timeouts": m.freshness_timeouts.get(path, 0),
        }
    writes_seconds = len(m.writes_per_second)
    return {
        "options": asdict(m.options),
        "paths": paths,
        "writes": {
            "accepted": m.writes,
            "errors": m.write_errors,
            "throughput_per_s": sum(m.writes_per_second) / writes_seconds if writes_seconds else 0,
        },
        "correctness": {
            "keys_checked": m.keys_checked,
            "all_agree": not m.disagreements,
            "disagreements": m.disagreements,
        },
        "listings": {
            "latency_ms": {name: _distribution(v) for name, v in m.listing_ms.items()},
            "mismatches": m.listing_mismatches,
        },
    }


def _latency_cdf(m: Measurements, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 4))
    for name in PATHS:
        values = sorted(m.latencies_ms.get(name, []))
        if values:
            ax.plot(values, [(i + 1) / len(values) for i in range(len(values))], label=name)
    ax.set_xscale("log")
    ax.set_xlabel("read latency (ms, log scale)")
    ax.set_ylabel("fraction of reads")
    ax.set_title("Read latency CDF per path")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _freshness_hist(m: Measurements, path: Path) -> None:
    fig, axes = plt.subplots(1, len(PATHS), figsize=(10, 3.5), sharey=True)
    for ax, name in zip(axes, PATHS, strict=True):
        values = m.freshness_ms.get(name, [])
        if values:
            ax.hist(values, bins=20)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("ms from mutator 200 to visible")
    axes[0].set_ylabel("probes")
    fig.suptitle("Freshness per path")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _throughput(m: Measurements, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 4))
    offset = 0
    for name in PATHS:
        series = m.reads_per_second.get(name, [])
        ax.plot(range(offset, offset + len(series)), series, label=f"reads: {name}")
        offset += len(series)
    ax.plot(range(len(m.writes_per_second)), m.writes_per_second, label="writes (mutator)")
    ax.set_xlabel("second of the measured phase")
    ax.set_ylabel("requests per second")
    ax.set_title("Throughput over time")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


CHARTS = {
    "latency_cdf.png": _latency_cdf,
    "freshness_hist.png": _freshness_hist,
    "throughput.png": _throughput,
}

EXPLANATION = """
<h2>What the numbers mean</h2>
<p><b>calculator-local</b> reads the stream processor's own RocksDB store: no extra
datastore, and the value is there as soon as the dataflow applied the event, which is
why its freshness is the best. The price is state: when an instance dies or joins, its
partitions move, and their new owner must restore them from the changelog topic before
it answers for them; and the data is only queryable through the instances.</p>
<p><b>calculator-forwarded</b> is the same store reached through another instance: the
extra network hop (and the second process's work) is the cost of partitioned state when
the client does not know which instance owns the key.</p>
<p><b>cassandra-service</b> is the classic CQRS read model: an independent, queryable
database that survives the stream processor and scales reads on its own. The price is
one more write path (calculator &rarr; topic &rarr; consumer &rarr; Cassandra) and its
lag, visible in the freshness chart, plus one more system to run.</p>
<p>The location listing shows the same trade-off: the calculators fan out to every
instance and merge, while Cassandra reads one partition, a page at a time.</p>
"""


def _table(headers: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(_fmt(c))}</td>" for c in row) + "</tr>" for row in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.1f}"
    return str(value)


def _read_rows(paths: dict[str, Any]) -> list[list[Any]]:
    """One row per read path: reads, throughput, latency percentiles, errors."""
    return [
        [
            name,
            p["reads"],
            p["throughput_per_s"],
            p["latency_ms"]["p50"],
            p["latency_ms"]["p95"],
            p["latency_ms"]["p99"],
            p["latency_ms"]["max"],
            p["errors"],
        ]
        for name, p in paths.items()
    ]


def _freshness_rows(paths: dict[str, Any]) -> list[list[Any]]:
    """One row per read path: how long until a written value was visible there."""
    return [
        [
            name,
            p["freshness_ms"]["count"],
            p["freshness_ms"]["p50"],
            p["freshness_ms"]["p95"],
            p["freshness_ms"]["max"],
            p["freshness_timeouts"],
        ]
        for name, p in paths.items()
    ]


def _html(summary: dict[str, Any], images: dict[str, bytes]) -> str:
    paths = summary["paths"]
    read_rows, fresh_rows = _read_rows(paths), _freshness_rows(paths)
    listing_rows = [
        [name, d["count"], d["p50"], d["p95"], d["max"]]
        for name, d in summary["listings"]["latency_ms"].items()
    ]
    correctness = summary["correctness"]
    verdict = (
        f"All {correctness['keys_checked']} keys agree on all three paths."
        if correctness["all_agree"]
        else f"{len(correctness['disagreements'])} of {correctness['keys_checked']} keys "
        f"disagree: {html.escape(json.dumps(correctness['disagreements'][:20]))}"
    )
    charts = "".join(
        f'<figure><img alt="{name}" src="data:image/png;base64,'
        f'{base64.b64encode(data).decode()}"></figure>'
        for name, data in images.items()
    )
    writes = summary["writes"]
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>Query sides compared</title>
<style>
body {{ font-family: sans-serif; max-width: 60em; margin: 2em auto; color: #222; }}
table {{ border-collapse: collapse; margin: 1em 0; }}
td, th {{ border: 1px solid #ccc; padding: 0.3em 0.6em; text-align: right; }}
th {{ background: #f3f3f3; }} td:first-child {{ text-align: left; }}
img {{ max-width: 100%; }}
</style></head><body>
<h1>Stream-processor state versus a Cassandra read model</h1>
<p>Options: {html.escape(json.dumps(summary["options"]))}</p>
<h2>Reads at {summary["options"]["read_concurrency"]} concurrent requests</h2>
{_table(["path", "reads", "reads/s", "p50 ms", "p95 ms", "p99 ms", "max ms", "errors"], read_rows)}
<h2>Freshness: mutator 200 &rarr; new value visible</h2>
{_table(["path", "probes", "p50 ms", "p95 ms", "max ms", "timeouts"], fresh_rows)}
<h2>Writes</h2>
<p>{writes["accepted"]} mutations accepted ({writes["throughput_per_s"]:.1f}/s on average),
{writes["errors"]} refused or failed.</p>
<h2>Correctness</h2>
<p>{verdict}</p>
<h2>Location listing</h2>
{_table(["side", "listings", "p50 ms", "p95 ms", "max ms"], listing_rows)}
<p>Mismatched listings: {len(summary["listings"]["mismatches"])}</p>
<h2>Charts</h2>
{charts}
{EXPLANATION}
</body></html>
"""


def write_results(summary: dict[str, Any], m: Measurements, directory: Path) -> dict[str, Path]:
    """Write report.json, report.html (charts inline) and the PNGs; return their paths."""
    directory.mkdir(parents=True, exist_ok=True)
    images: dict[str, bytes] = {}
    written: dict[str, Path] = {}
    for name, draw in CHARTS.items():
        path = directory / name
        draw(m, path)
        images[name] = path.read_bytes()
        written[name] = path
    raw = {
        "summary": summary,
        "raw": {
            "latencies_ms": dict(m.latencies_ms),
            "freshness_ms": dict(m.freshness_ms),
            "reads_per_second": dict(m.reads_per_second),
            "writes_per_second": m.writes_per_second,
        },
    }
    written["report.json"] = directory / "report.json"
    written["report.json"].write_text(json.dumps(raw, indent=1))
    written["report.html"] = directory / "report.html"
    written["report.html"].write_text(_html(summary, images))
    return written


def terminal_table(summary: dict[str, Any]) -> str:
    """The summary as text for the terminal."""
    lines = [
        f"{'path':<22}{'reads/s':>9}{'p50':>8}{'p95':>8}{'p99':>8}{'max':>8}"
        f"{'fresh p50':>11}{'fresh p95':>11}",
    ]
    for name, p in summary["paths"].items():
        lat, fresh = p["latency_ms"], p["freshness_ms"]
        lines.append(
            f"{name:<22}{p['throughput_per_s']:>9.0f}"
            + "".join(f"{_fmt(lat[q]):>8}" for q in ("p50", "p95", "p99", "max"))
            + f"{_fmt(fresh['p50']):>11}{_fmt(fresh['p95']):>11}"
        )
    lines.append("(latencies and freshness in ms)")
    writes = summary["writes"]
    lines.append(
        f"writes: {writes['accepted']} accepted, {writes['throughput_per_s']:.1f}/s, "
        f"{writes['errors']} failed"
    )
    correctness = summary["correctness"]
    lines.append(
        "correctness: all keys agree on all paths"
        if correctness["all_agree"]
        else f"correctness: {len(correctness['disagreements'])} keys DISAGREE"
    )
    for name, d in summary["listings"]["latency_ms"].items():
        lines.append(f"listing {name}: p50 {_fmt(d['p50'])} ms over {d['count']} locations")
    return "\n".join(lines)
