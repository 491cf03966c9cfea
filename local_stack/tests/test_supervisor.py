"""The supervisor of ``make up``'s service processes, with real processes."""

from __future__ import annotations

import itertools
import os
import signal
import sys
import time
from pathlib import Path

from local_stack.process import ManagedProcess
from local_stack.supervisor import Supervised
from local_stack.testing import wait_until
from service_runtime.retry import Backoff

SLEEPER = [sys.executable, "-c", "import time; time.sleep(120)"]


def test_a_killed_process_is_started_again_and_a_stopped_one_is_not(tmp_path: Path) -> None:
    new_pids: list[int] = []
    process = ManagedProcess("sleeper", SLEEPER, log_dir=tmp_path)
    supervised = Supervised(process, new_pids.append, Backoff(0.1, 0.2))
    supervised.start()
    try:
        first = process.pid
        assert first is not None
        os.kill(first, signal.SIGKILL)
        wait_until(lambda: supervised.restarts == 1 and process.is_running(), timeout=10)
        assert new_pids == [process.pid] and process.pid != first
        # The console shows it: the log file says each start.
        assert process.log_path.read_text().count("--- starting sleeper") == 2
    finally:
        supervised.stop()
    time.sleep(0.5)  # longer than the backoff: a restart would have happened by now
    assert not process.is_running() and supervised.restarts == 1


def test_a_process_that_keeps_dying_is_started_again_with_growing_waits(
    tmp_path: Path,
) -> None:
    process = ManagedProcess(
        "crasher", [sys.executable, "-c", "raise SystemExit(3)"], log_dir=tmp_path
    )
    restarted_at: list[float] = []
    supervised = Supervised(
        process, lambda _pid: restarted_at.append(time.monotonic()), Backoff(0.1, 0.8)
    )
    supervised.start()
    try:
        wait_until(lambda: len(restarted_at) >= 4, timeout=20)
    finally:
        supervised.stop()
    gaps = [later - earlier for earlier, later in itertools.pairwise(restarted_at)]
    # Waits of 0.2, 0.4 and 0.8 s between the restarts (plus start-up): not a tight loop.
    assert gaps[-1] >= 0.8 and gaps[-1] > gaps[0], gaps
