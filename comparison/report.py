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

from comparison.failover import KINDS
from comparison.workload import Measurements


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


def summarize(m: Measurements, scaling: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """Every number the report shows, as plain JSON-able data; ``scaling``: one entry per
    ``--scale`` run, as :func:`comparison.__main__.scale_run` returns it."""
    paths = {}
    for path in m.paths:
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
        "validated_reservations": validated_summary(m),
        "failover": m.failover,
        "scaling": scaling or [],
    }


def validated_summary(m: Measurements) -> dict[str, Any]:
    """Validated reservations: their answers, and the latency of reservation POSTs with
    and without ``?validate=true`` (the measured phase's)."""
    latency = {
        kind: _distribution(m.reservation_latency_ms.get(kind, []))
        for kind in ("unvalidated", "validated")
    }
    plain, validated = latency["unvalidated"]["p50"], latency["validated"]["p50"]
    return {
        "share": m.options.validated_share,
        **m.validated.summary(),
        "latency_ms": latency,
        "p50_ratio": validated / plain if plain and validated is not None else None,
        "in_failover_phase": False,
    }


def _latency_cdf(m: Measurements, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 4))
    for name in m.paths:
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
    fig, axes = plt.subplots(1, len(m.paths), figsize=(10, 3.5), sharey=True)
    for ax, name in zip(axes, m.paths, strict=True):
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
    for name in m.paths:
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

KIND_COLOURS = {
    "fresh": "tab:green",
    "stale": "tab:orange",
    "503": "tab:red",
    "504": "tab:purple",
    "other": "tab:gray",
}


def _timeline(failover: dict[str, Any], path: Path) -> None:
    """Per path: answers by kind per second (bars) and the worst staleness (line), with
    the kill, the killed process answering again and the path's recovery marked."""
    paths = list(failover["buckets"])
    fig, axes = plt.subplots(len(paths), 1, figsize=(10, 2.8 * len(paths)), sharex=True)
    threshold_s = failover["stale_threshold_ms"] / 1000
    twins = []
    for ax, name in zip(axes, paths, strict=True):
        buckets = failover["buckets"][name]
        seconds = [b["t"] for b in buckets]
        bottom = [0] * len(buckets)
        for kind in KINDS:
            counts = [b[kind] for b in buckets]
            label = {"fresh": "fresh 200", "stale": "stale 200"}.get(kind, kind)
            ax.bar(
                seconds, counts, 0.9, bottom, align="edge", color=KIND_COLOURS[kind], label=label
            )
            bottom = [x + y for x, y in zip(bottom, counts, strict=True)]
        ax.set_ylabel("answers / s")
        ax.set_title(name, fontsize=10, loc="left")
        stale = ax.twinx()
        worst = [_div(b["staleness_ms"]["max"], 1000) for b in buckets]
        stale.plot(
            [t + 0.5 for t in seconds], worst, color="black", marker=".", label="max staleness"
        )
        stale.axhline(threshold_s, color="black", linestyle=":", linewidth=0.8)
        stale.set_ylabel("max staleness (s)")
        stale.set_ylim(bottom=0)
        ax.axvline(0, color="red", linewidth=2, label="kill -9")
        if failover["victim_back_s"] is not None:
            ax.axvline(failover["victim_back_s"], color="tab:blue", linestyle="--",
                       label="killed instance answers again")  # fmt: skip
        again = failover["paths"][name]["exact_again_s"]
        if again is not None:
            ax.axvline(
                again, color="tab:green", linestyle="-.", linewidth=2, label="every key exact again"
            )
        ax.grid(True, alpha=0.3)
        twins.append(stale)
    handles, labels = axes[0].get_legend_handles_labels()
    line_handles, line_labels = twins[0].get_legend_handles_labels()
    fig.legend(handles + line_handles, labels + line_labels, loc="upper center", ncol=5,
               fontsize=8)  # fmt: skip
    axes[-1].set_xlabel("seconds since the kill (answers by when they were sent)")
    fig.tight_layout(rect=(0, 0, 1, 0.94))
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _div(value: float | None, by: float) -> float | None:
    return None if value is None else value / by


LOAD_GENERATOR = "load generator"
"""The name of ``python -m comparison``'s own process in the CPU figures."""


def _scaling_chart(scaling: list[dict[str, Any]], path: Path) -> None:
    """Throughput and p95 latency per path against the number of calculators, and the
    cores the calculators and the whole machine used."""
    fig, (through, latency, cores) = plt.subplots(1, 3, figsize=(12, 3.8))
    counts = [run["calculators"] for run in scaling]
    names = sorted({name for run in scaling for name in run["paths"]})
    for name in names:
        runs = [run for run in scaling if name in run["paths"]]
        xs = [run["calculators"] for run in runs]
        through.plot(xs, [run["paths"][name]["throughput_per_s"] for run in runs], marker="o",
                     label=name)  # fmt: skip
        latency.plot(xs, [run["paths"][name]["latency_ms"]["p95"] for run in runs], marker="o",
                     label=name)  # fmt: skip
    through.set_title("reads/s")
    latency.set_title("p95 latency (ms)")
    machine = [_peak(run, "machine") for run in scaling]
    calculators = [_peak(run, "calculators") for run in scaling]
    cores.plot(counts, machine, marker="o", label="whole machine")
    cores.plot(counts, calculators, marker="o", label="all calculators")
    cores.plot(counts, [_peak(run, LOAD_GENERATOR) for run in scaling], marker="o",
               label="load generator (python -m comparison)")  # fmt: skip
    if scaling and scaling[0]["cpu"]:
        available = next(iter(scaling[0]["cpu"].values())).get("machine_cores")
        if available:
            cores.axhline(available, color="red", linestyle=":", label="cores available")
    cores.set_title("cores used (busiest path)")
    for ax in (through, latency, cores):
        ax.set_xlabel("calculator instances")
        ax.set_xticks(counts)
        ax.set_ylim(bottom=0)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _peak(run: dict[str, Any], what: str) -> float | None:
    """Most cores used while one path was read: by the machine, or all calculators."""
    values = []
    for used in run["cpu"].values():
        if what != "calculators":
            values.append(used.get(what))
        else:
            values.append(sum(v for k, v in used.items() if k.startswith("calculator")))
    present = [v for v in values if v is not None]
    return max(present) if present else None


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


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f} s"


def _window_text(window: dict[str, float] | None) -> str:
    if window is None:
        return "none"
    first, last = window["first"], window["last"]
    return f"{window['length']:.1f} s ({first:.1f} to {last:.1f} s after the kill)"


def _counts_text(counts: dict[str, int]) -> str:
    return ", ".join(f"{n} x {name}" for name, n in sorted(counts.items(), key=lambda i: -i[1]))


def failover_rows(failover: dict[str, Any]) -> list[list[Any]]:
    """One row per path: answers after the kill by kind, windows, staleness, recovery."""
    rows = []
    for name, p in failover["paths"].items():
        kinds = p["kinds_after_kill"]
        rows.append(
            [
                name,
                p["answers_after_kill"],
                *(kinds[kind] for kind in KINDS),
                _window_text(p["unavailable_s"]),
                _window_text(p["stale_s"]),
                p["max_staleness_ms"],
                "not recovered" if p["exact_again_s"] is None else _seconds(p["exact_again_s"]),
            ]
        )
    return rows


FAILOVER_HEADERS = [
    "path", "answers", "fresh 200", "stale 200", "503", "504", "other",
    "unavailable (first to last non-200)", "stale (over threshold or standby)",
    "max staleness ms", "every key exact after",
]  # fmt: skip


CODE_HEADERS = [
    "path", "503 by error code", "other errors", "standby reasons", "wrong values",
    "latency p50 ms", "latency p99 ms",
]  # fmt: skip
"""After the kill, per path."""


def failover_story(failover: dict[str, Any]) -> str:
    """What each design cost during the failure, in plain words, from the numbers."""
    if not failover["ran"]:
        return f"The failover phase did not run: {failover['skipped']}."
    victim = failover["victim"]["instanceId"]
    threshold = failover["stale_threshold_ms"]
    parts = [
        f"One calculator ({victim}) was killed with kill -9 while writes and reads went on. "
        f"A value counts as stale when it is missing a write the mutator acknowledged more "
        f"than {threshold:.0f} ms before the read was sent."
    ]
    back = failover["victim_back_s"]
    if back is not None:
        parts.append(f"The killed process answered again {back:.1f} s after the kill.")
    for name, p in failover["paths"].items():
        kinds = p["kinds_after_kill"]
        errors = kinds["503"] + kinds["504"] + kinds["other"]
        text = f"<b>{name}</b>: {p['answers_after_kill']} answers after the kill, "
        if errors:
            text += f"{errors} of them not a 200 within {_window_text(p['unavailable_s'])}"
            detail = {f"503 {code}": n for code, n in p["errors_503"].items()}
            if kinds["504"]:
                detail["504"] = kinds["504"]
            detail.update(p["other_errors"])
            text += f" ({html.escape(_counts_text(detail))})"
        else:
            text += "every one of them a 200"
        if kinds["stale"]:
            text += f"; {kinds['stale']} served by a standby replica"
        text += ". "
        worst, before = p["max_staleness_ms"], p["max_staleness_before_kill_ms"]
        if worst is not None:
            text += f"The oldest value it returned was {worst / 1000:.1f} s behind"
            if before is not None:
                text += f" (at most {before / 1000:.2f} s before the kill)"
            text += (
                f", stale answers for {_window_text(p['stale_s'])}. "
                if p["stale_s"]
                else ", never beyond the threshold. "
            )
        again = p["exact_again_s"]
        text += (
            f"Every key was exact again {again:.1f} s after the kill."
            if again is not None
            else "Not every key was exact again when the phase ended: <b>not recovered</b>."
        )
        parts.append(text)
    calculators = [p for name, p in failover["paths"].items() if name.startswith("calculator")]
    service = failover["paths"].get("cassandra-service")
    unavailable = max((p["unavailable_s"]["length"] for p in calculators if p["unavailable_s"]),
                      default=None)  # fmt: skip
    if service is not None:
        service_errors = sum(service["kinds_after_kill"][k] for k in ("503", "504", "other"))
        stale = service["stale_s"]["length"] if service["stale_s"] else None
        cost = "In short: "
        calc_stale = max(
            (p["max_staleness_ms"] or 0.0 for p in calculators if p["stale_s"]), default=None
        )
        if unavailable is not None:
            cost += (
                f"the stream processor's state paid for the failure in availability "
                f"(errors for up to {unavailable:.1f} s, first to last, while the instance "
                f"was down and its partitions moved)"
            )
        else:
            cost += "the calculator paths kept answering 200 through the failure"
        if calc_stale:
            cost += f" and in freshness too (values up to {calc_stale / 1000:.1f} s old)"
        cost += ", "
        if service_errors == 0 and stale is not None:
            paid = "only in freshness" if calc_stale else "in freshness instead"
            worst = service["max_staleness_ms"] / 1000
            cost += (
                f"while the Cassandra read model kept answering 200 and paid {paid}: values "
                f"up to {worst:.1f} s old for {stale:.1f} s, until the new owner published them."
            )
        elif service_errors == 0:
            cost += "and the Cassandra read model kept answering 200 without falling behind."
        else:
            cost += f"and the Cassandra read model answered {service_errors} reads with errors."
        parts.append(cost)
    return "".join(f"<p>{part}</p>" for part in parts)


def scaling_rows(scaling: list[dict[str, Any]]) -> list[list[Any]]:
    rows = []
    for run in scaling:
        for name, p in run["paths"].items():
            used = run["cpu"].get(name, {})
            calculators = {k: v for k, v in used.items() if k.startswith("calculator")}
            rows.append(
                [
                    run["calculators"],
                    name,
                    p["throughput_per_s"],
                    p["latency_ms"]["p50"],
                    p["latency_ms"]["p95"],
                    " ".join(f"{v:.2f}" for _, v in sorted(calculators.items())) or "-",
                    _cores(used.get(LOAD_GENERATOR)),
                    _cores(used.get("machine")),
                ]
            )
    return rows


def _cores(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def scaling_story(scaling: list[dict[str, Any]]) -> str:
    if not scaling:
        return ""
    available = next((u["machine_cores"] for run in scaling for u in run["cpu"].values()), None)
    busiest = max((_peak(run, "machine") or 0.0) for run in scaling)
    local = [
        (run["calculators"], run["paths"]["calculator-local"]["throughput_per_s"])
        for run in scaling
        if "calculator-local" in run["paths"]
    ]
    text = (
        "The same workload ran on a fresh system with "
        + ", ".join(str(run["calculators"]) for run in scaling)
        + " calculator instance(s). calculator-local served "
        + ", ".join(f"{reads:,.0f} reads/s with {n}" for n, reads in local)
        + ". "
    )
    if available:
        text += (
            f"Everything (broker, Cassandra, mutator, service, calculators and this load "
            f"generator) shares this machine's {available:.0f} cores; while one path was read "
            f"the whole machine (these and anything else running on it) used up to "
            f"{busiest:.2f} of them, this load generator "
            f"up to {max((_peak(run, LOAD_GENERATOR) or 0.0) for run in scaling):.2f}. "
        )
        if busiest >= 0.85 * available:
            text += (
                "The machine was saturated, so another instance only splits the same cores "
                "among more processes: the curve flattens (or falls) for lack of CPU, not "
                "because the design cannot scale out. On separate machines each instance "
                "would bring its own cores."
            )
        else:
            text += (
                "The machine was not saturated: the limit lies elsewhere (the load "
                "generator's concurrency, or one process's single-threaded event loop)."
            )
    return f"<p>{text}</p>"


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
        f"All {correctness['keys_checked']} keys agree on all {len(paths)} paths."
        if correctness["all_agree"]
        else f"{len(correctness['disagreements'])} of {correctness['keys_checked']} keys "
        f"disagree: {html.escape(json.dumps(correctness['disagreements'][:20]))}"
    )
    charts = "".join(_figure(name, data) for name, data in images.items() if name in CHARTS)
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
{_validated_html(summary["validated_reservations"])}
<h2>Correctness</h2>
<p>{verdict}</p>
<h2>Location listing</h2>
{_table(["side", "listings", "p50 ms", "p95 ms", "max ms"], listing_rows)}
<p>Mismatched listings: {len(summary["listings"]["mismatches"])}</p>
<h2>Charts</h2>
{charts}
{_failover_html(summary["failover"], images)}
{_scaling_html(summary["scaling"], images)}
{EXPLANATION}
</body></html>
"""


def validated_text(v: dict[str, Any]) -> str:
    """The validated reservations' counts in words (HTML-safe)."""
    if not v["sent"]:
        return f"No validated reservations were sent (--validated-share {v['share']:g})."
    answers, later = v["answers"], v["decided_later"]
    text = (
        f"{v['sent']} reservations of the measured phase were sent with ?validate=true "
        f"(share {v['share']:g}): {answers['confirmed']} confirmed (200), "
        f"{answers['failed']} failed (409, not counted), {answers['pending']} pending (202, "
        f"not decided within the mutator's wait"
    )
    if answers["pending"]:
        text += (
            f"; decided afterwards: {later['confirmed']} confirmed, {later['failed']} failed, "
            f"{v['undecided']} never"
        )
    return text + f"), {answers['error']} errors."


VALIDATED_NOTE = """A validated reservation is decided by the calculator that owns its key, in
the order of its partition: confirmed and counted if it asks for no more than is sellable,
else failed and not counted. The expected values the correctness check compares with count
a validated reservation only if it was confirmed: answered 200 CONFIRMED, or answered 202
and then CONFIRMED by the mutator's GET /inventory/reservations/{id}, asked until decided
before the check. The failover phase writes adjustments only: no validated reservations
there (its staleness model needs writes that all count)."""


def _validated_html(v: dict[str, Any]) -> str:
    rows = [
        [name, d["count"], d["p50"], d["p95"], d["p99"], d["max"]]
        for name, d in (
            ("reservation POST", v["latency_ms"]["unvalidated"]),
            ("reservation POST ?validate=true", v["latency_ms"]["validated"]),
        )
    ]
    ratio = v["p50_ratio"]
    ratio_text = "" if ratio is None else f"<p>p50 validated / p50 unvalidated: {ratio:.2f}.</p>"
    return f"""<h2>Validated reservations</h2>
<p>{html.escape(validated_text(v))}</p>
{_table(["reservations", "answers", "p50 ms", "p95 ms", "p99 ms", "max ms"], rows)}
{ratio_text}
<p>{html.escape(VALIDATED_NOTE)} Latency: from the POST sent to its answer (200, 409 or 202
for a validated one, 200 for a plain one), at the measured phase's write rate.</p>
"""


def _figure(name: str, data: bytes) -> str:
    return (
        f'<figure><img alt="{name}" src="data:image/png;base64,'
        f'{base64.b64encode(data).decode()}"></figure>'
    )


def _failover_html(failover: dict[str, Any], images: dict[str, bytes]) -> str:
    if not failover["ran"]:
        return f"<h2>Failover</h2><p>{html.escape(failover_story(failover))}</p>"
    rows = failover_rows(failover)
    codes = [
        [name, _counts_text(p["errors_503"]) or "-", _counts_text(p["other_errors"]) or "-",
         _counts_text(p["stale_reasons"]) or "-", p["wrong_values"],
         p["latency_after_kill_ms"]["p50"], p["latency_after_kill_ms"]["p99"]]
        for name, p in failover["paths"].items()
    ]  # fmt: skip
    writes = failover["writes"]
    chart = _figure("failover_timeline.png", images["failover_timeline.png"])
    return f"""<h2>Failover: kill -9 of one calculator under load</h2>
{failover_story(failover)}
{_table(FAILOVER_HEADERS, rows)}
{_table(CODE_HEADERS, codes)}
<p>Writes during the phase: {writes["accepted"]} acknowledged, {writes["failed"]} failed
({writes["unmodelled_keys"]} key(s) whose staleness could not be modelled after a failed write).
Windows and times are in seconds since the kill, by when each read was sent; the phase
ended {failover["measured_until_s"]:.1f} s after the kill
({"recovered" if failover["recovered"] else "<b>not recovered</b> within the time-out"}).
Staleness of an answer: how long before the read the mutator acknowledged the oldest
write of that key the answer does not include (0 when it includes every acknowledged one);
each key has one writer at a time, in order, so this is exact. report.json holds the
per-second buckets.</p>
{chart}
"""


def _scaling_html(scaling: list[dict[str, Any]], images: dict[str, bytes]) -> str:
    if not scaling:
        return ""
    headers = ["calculators", "path", "reads/s", "p50 ms", "p95 ms",
               "cores per calculator", "cores, load generator", "cores, whole machine"]  # fmt: skip
    chart = _figure("scaling.png", images["scaling.png"])
    return f"""<h2>Scaling: the same workload with more calculator instances</h2>
{scaling_story(scaling)}
{_table(headers, scaling_rows(scaling))}
<p>Cores: CPU time (user + system, from /proc) used while that path was read, divided
by the seconds it was read.</p>
{chart}
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
    extra: list[tuple[str, Any]] = []
    if summary["failover"]["ran"]:
        extra.append(("failover_timeline.png", lambda p: _timeline(summary["failover"], p)))
    if summary["scaling"]:
        extra.append(("scaling.png", lambda p: _scaling_chart(summary["scaling"], p)))
    for name, draw_extra in extra:
        path = directory / name
        draw_extra(path)
        images[name] = path.read_bytes()
        written[name] = path
    raw = {
        "summary": summary,
        "raw": {
            "latencies_ms": dict(m.latencies_ms),
            "freshness_ms": dict(m.freshness_ms),
            "reads_per_second": dict(m.reads_per_second),
            "writes_per_second": m.writes_per_second,
            "reservation_latency_ms": m.reservation_latency_ms,
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
    lines += _validated_lines(summary["validated_reservations"])
    correctness = summary["correctness"]
    lines.append(
        "correctness: all keys agree on all paths"
        if correctness["all_agree"]
        else f"correctness: {len(correctness['disagreements'])} keys DISAGREE"
    )
    for name, d in summary["listings"]["latency_ms"].items():
        lines.append(f"listing {name}: p50 {_fmt(d['p50'])} ms over {d['count']} locations")
    lines += ["", *_failover_lines(summary["failover"])]
    scaling = _scaling_lines(summary["scaling"])
    if scaling:
        lines += ["", *scaling]
    return "\n".join(lines)


def _validated_lines(v: dict[str, Any]) -> list[str]:
    latency = v["latency_ms"]
    plain, validated = latency["unvalidated"], latency["validated"]
    if not v["sent"]:
        return [f"validated reservations: none (--validated-share {v['share']:g})"]
    answers, later = v["answers"], v["decided_later"]
    lines = [
        f"validated reservations: {v['sent']} sent (share {v['share']:g}): "
        f"{answers['confirmed']} confirmed, {answers['failed']} failed (409), "
        f"{answers['pending']} pending (202; decided later: {later['confirmed']} confirmed, "
        f"{later['failed']} failed, {v['undecided']} never), {answers['error']} errors"
    ]
    lines.append(
        f"reservation POST latency p50/p99 ms: unvalidated {_fmt(plain['p50'])}/"
        f"{_fmt(plain['p99'])} ({plain['count']}), validated {_fmt(validated['p50'])}/"
        f"{_fmt(validated['p99'])} ({validated['count']})"
        + ("" if v["p50_ratio"] is None else f"; p50 ratio {v['p50_ratio']:.2f}")
    )
    lines.append("(validated only in the measured phase; the failover phase writes adjustments)")
    return lines


def _failover_lines(failover: dict[str, Any]) -> list[str]:
    if not failover["ran"]:
        return [f"failover: skipped ({failover['skipped']})"]
    back = failover["victim_back_s"]
    lines = [
        f"failover: kill -9 of {failover['victim']['instanceId']}"
        + (f", answering again after {back:.1f} s" if back is not None else "")
        + ("" if failover["recovered"] else " -- NOT RECOVERED"),
        f"{'path':<22}{'answers':>8}{'fresh':>7}{'stale':>7}{'503':>6}{'504':>6}{'other':>6}"
        f"{'unavail s':>10}{'stale s':>9}{'max stale':>10}{'exact after':>12}",
    ]
    for name, p in failover["paths"].items():
        kinds = p["kinds_after_kill"]
        unavailable = p["unavailable_s"]["length"] if p["unavailable_s"] else 0.0
        stale = p["stale_s"]["length"] if p["stale_s"] else 0.0
        worst = p["max_staleness_ms"]
        again = p["exact_again_s"]
        lines.append(
            f"{name:<22}{p['answers_after_kill']:>8}"
            + "".join(f"{kinds[k]:>{w}}" for k, w in zip(KINDS, (7, 7, 6, 6, 6), strict=True))
            + f"{unavailable:>10.1f}{stale:>9.1f}"
            + f"{'-' if worst is None else f'{worst / 1000:.1f} s':>10}"
            + f"{'not recovered' if again is None else f'{again:.1f} s':>12}"
        )
        errors = {f"503 {code}": n for code, n in p["errors_503"].items()}
        errors.update(p["other_errors"])
        if errors:
            lines.append(f"{'':<22}errors: {_counts_text(errors)}")
    lines.append(
        f"(after the kill; windows first to last answer; stale = behind by more than "
        f"{failover['stale_threshold_ms']:.0f} ms or from a standby)"
    )
    return lines


def _scaling_lines(scaling: list[dict[str, Any]]) -> list[str]:
    if not scaling:
        return []
    lines = [
        f"{'scale':<7}{'path':<22}{'reads/s':>9}{'p50':>8}{'p95':>8}"
        "  cores (calculators; load generator; machine)"
    ]
    for run in scaling:
        for name, p in run["paths"].items():
            used = run["cpu"].get(name, {})
            calculators = " ".join(
                f"{v:.2f}" for k, v in sorted(used.items()) if k.startswith("calculator")
            )
            machine, load = used.get("machine"), used.get(LOAD_GENERATOR)
            lines.append(
                f"{run['calculators']:<7}{name:<22}{p['throughput_per_s']:>9.0f}"
                f"{_fmt(p['latency_ms']['p50']):>8}{_fmt(p['latency_ms']['p95']):>8}  "
                f"{calculators or '-'}; {'-' if load is None else f'{load:.2f}'}; "
                f"{'-' if machine is None else f'{machine:.2f}'}"
                f" of {used.get('machine_cores', 0):.0f}"
            )
    return lines
