"""Helpers shared by the local_stack tests: is a process gone, what did it start."""

from __future__ import annotations

from pathlib import Path


def gone(pid: int | None) -> bool:
    """Whether no process ``pid`` exists any more (a zombie counts as still there)."""
    assert pid is not None
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    # An unreaped child still answers os.kill(pid, 0); its state letter says "Z".
    return stat.rsplit(")", 1)[1].split()[0] == "Z"


def children(pid: int) -> list[int]:
    """The pids whose parent is ``pid`` (from /proc, so it sees grandchildren's parents)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:  # exited while we looked
            continue
        # The command name in parentheses may contain spaces: parse after the last ")".
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            found.append(int(entry.name))
    return found


def command_name(pid: int) -> str:
    """The short command name of ``pid`` ("tansu", "java"…)."""
    return Path(f"/proc/{pid}/comm").read_text().strip()
