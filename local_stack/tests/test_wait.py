"""wait_until: the one polling wait of the tests and of local_stack."""

from __future__ import annotations

import time

import pytest

from local_stack.testing import WaitTimeout, wait_until


def test_returns_the_first_truthy_result_and_an_exception_means_not_yet() -> None:
    answers = iter([ConnectionRefusedError(), None, 0, "ready"])

    def check() -> object:
        answer = next(answers)
        if isinstance(answer, Exception):
            raise answer
        return answer

    assert wait_until(check, timeout=5, interval=0.001) == "ready"


def test_a_timeout_is_an_assertion_showing_the_last_result() -> None:
    def check() -> None:
        raise ValueError("nope")

    with pytest.raises(WaitTimeout, match=r"within 0\.1 s; last result: ValueError\('nope'\)"):
        wait_until(check, timeout=0.1)
    assert issubclass(WaitTimeout, AssertionError)


def test_the_last_check_falls_on_the_deadline() -> None:
    started = time.monotonic()
    checked_at: list[float] = []

    def check() -> bool:
        checked_at.append(time.monotonic() - started)
        return False

    with pytest.raises(WaitTimeout):
        wait_until(check, timeout=0.3, interval=10)  # an interval longer than the timeout
    assert len(checked_at) == 2 and checked_at[0] < 0.1 and 0.3 <= checked_at[1] < 1
