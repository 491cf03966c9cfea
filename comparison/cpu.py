"""CPU time of processes and of the whole machine, from Linux's ``/proc`` (no psutil).

Example::

    before = sample({"calculator-0": 4242})
    ...                                   # the load
    cores_used(before, sample({"calculator-0": 4242}))
    # {"calculator-0": 0.93, "machine": 1.97, "machine_cores": 2.0}
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

TICKS = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Sample:
    """CPU seconds so far: per process (None once it is gone) and busy for the machine."""

    at: float
    processes: dict[str, float | None]
    machine_busy: float | None


def process_seconds(pid: int) -> float | None:
    """utime + stime of ``pid`` in seconds; None if there is no such process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) "
    return (int(fields[11]) + int(fields[12])) / TICKS  # fields 14 and 15 of stat(5)


def machine_busy_seconds() -> float | None:
    """CPU seconds the machine spent not idle (all cores), from ``/proc/stat``."""
    try:
        first = Path("/proc/stat").read_text().splitlines()[0].split()
    except OSError:
        return None
    values = [int(v) for v in first[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
    return (sum(values[:8]) - idle) / TICKS  # guest time is already in user


def sample(pids: dict[str, int]) -> Sample:
    return Sample(
        time.monotonic(),
        {name: process_seconds(pid) for name, pid in pids.items()},
        machine_busy_seconds(),
    )


def cores_used(before: Sample, after: Sample) -> dict[str, float]:
    """Average cores each process (and the machine) used between the two samples."""
    wall = after.at - before.at
    used: dict[str, float] = {}
    if wall <= 0:
        return used
    for name, start in before.processes.items():
        end = after.processes.get(name)
        if start is not None and end is not None:
            used[name] = (end - start) / wall
    if before.machine_busy is not None and after.machine_busy is not None:
        used["machine"] = (after.machine_busy - before.machine_busy) / wall
    used["machine_cores"] = float(os.cpu_count() or 1)
    return used
