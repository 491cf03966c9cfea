"""The retry primitive: its backoff, its stop event, what it retries and when it gives up."""

from __future__ import annotations

import logging
import textwrap
import threading
import time
from collections.abc import Callable

import pytest

from service_runtime import retry as retry_module
from service_runtime.retry import Backoff, RetryStopped, describe, retrying


class RecordingEvent(threading.Event):
    """A stop event whose waits return at once, remembering how long they were asked for
    (the tests check the delays without spending them)."""

    def __init__(self) -> None:
        super().__init__()
        self.waits: list[float] = []

    def wait(self, timeout: float | None = None) -> bool:
        assert timeout is not None
        self.waits.append(timeout)
        return self.is_set()


def failing(errors: list[BaseException], result: str = "done") -> Callable[[], str]:
    """A function that raises ``errors`` one per call, then returns ``result``."""
    pending = iter(errors)

    def attempt() -> str:
        error = next(pending, None)
        if error is not None:
            raise error
        return result

    return attempt


def test_backoff_doubles_up_to_its_cap() -> None:
    backoff = Backoff(0.5, 5.0)
    assert [backoff.delay(n) for n in range(1, 8)] == [0.5, 1.0, 2.0, 4.0, 5.0, 5.0, 5.0]


def test_backoff_can_grow_linearly_or_stay_constant() -> None:
    linear = Backoff(0.5, 2.0, factor=1, step=0.5)
    assert [linear.delay(n) for n in range(1, 6)] == [0.5, 1.0, 1.5, 2.0, 2.0]
    assert [Backoff(1.0, 1.0).delay(n) for n in (1, 2, 50)] == [1.0, 1.0, 1.0]


def test_backoff_after_very_many_failures_is_the_cap() -> None:
    assert Backoff(0.2, 2.0).delay(1_000_000) == 2.0  # no overflow, no long loop


@pytest.mark.parametrize(
    "make",
    [
        lambda: Backoff(2.0, 1.0),
        lambda: Backoff(-1.0, 1.0),
        lambda: Backoff(0.5, 1.0, factor=0.5),
        lambda: Backoff(0.5, 1.0, step=-0.1),
    ],
)
def test_a_shrinking_or_negative_backoff_is_refused(make: Callable[[], Backoff]) -> None:
    with pytest.raises(ValueError):
        make()


def test_backoff_counts_failures_from_one() -> None:
    with pytest.raises(ValueError, match="from 1"):
        Backoff(1.0, 2.0).delay(0)


def test_retries_wait_by_the_backoff_and_log_each_retry(
    caplog: pytest.LogCaptureFixture,
) -> None:
    stop = RecordingEvent()
    errors: list[BaseException] = [ConnectionError("refused")] * 4
    retry = retrying("connecting to X", Backoff(0.5, 2.0), stop=stop)
    with caplog.at_level(logging.WARNING, logger="service_runtime.retry"):
        assert retry(failing(errors)) == "done"
    assert stop.waits == [0.5, 1.0, 2.0, 2.0]
    assert caplog.messages == [
        "connecting to X: attempt 1 failed (ConnectionError: refused); retrying in 0.5 s",
        "connecting to X: attempt 2 failed (ConnectionError: refused); retrying in 1 s",
        "connecting to X: attempt 3 failed (ConnectionError: refused); retrying in 2 s",
        "connecting to X: attempt 4 failed (ConnectionError: refused); retrying in 2 s",
    ]


def test_the_log_goes_to_the_callers_logger_at_its_level_with_the_traceback(
    caplog: pytest.LogCaptureFixture,
) -> None:
    logger = logging.getLogger("test_retry.caller")
    retry = retrying(
        "the writer",
        Backoff(1.0, 1.0),
        stop=RecordingEvent(),
        logger=logger,
        level=logging.ERROR,
        exc_info=True,
    )
    with caplog.at_level(logging.ERROR, logger="test_retry.caller"):
        retry(failing([RuntimeError("boom")]))
    [record] = caplog.records
    assert record.name == "test_retry.caller" and record.levelno == logging.ERROR
    assert record.exc_info is not None and record.exc_info[1] is not None
    assert str(record.exc_info[1]) == "boom"


def test_on_retry_sees_each_error_and_its_delay() -> None:
    seen: list[tuple[str, float]] = []
    errors: list[BaseException] = [OSError("one"), OSError("two")]
    retry = retrying(
        "x",
        Backoff(0.1, 1.0),
        stop=RecordingEvent(),
        on_retry=lambda error, delay: seen.append((str(error), delay)),
    )
    retry(failing(errors))
    assert seen == [("one", 0.1), ("two", 0.2)]


def test_an_error_not_retried_propagates_at_once_unchanged() -> None:
    stop = RecordingEvent()
    calls: list[int] = []

    def attempt() -> None:
        calls.append(1)
        raise KeyError("not a connection problem")

    with pytest.raises(KeyError, match="not a connection problem"):
        retrying("x", Backoff(1.0, 1.0), retry_on=OSError, stop=stop)(attempt)
    assert calls == [1] and stop.waits == []


def test_retry_on_can_be_a_predicate() -> None:
    transient = lambda error: "transient" in str(error)  # noqa: E731
    retry = retrying("x", Backoff(0.1, 0.1), retry_on=transient, stop=RecordingEvent())
    assert retry(failing([ValueError("transient")])) == "done"
    with pytest.raises(ValueError, match="permanent"):
        retry(failing([ValueError("permanent")]))


def test_a_set_stop_event_starts_no_attempt() -> None:
    stop = RecordingEvent()
    stop.set()
    calls: list[int] = []
    with pytest.raises(RetryStopped):
        retrying("x", Backoff(1.0, 1.0), stop=stop)(lambda: calls.append(1))
    assert calls == []


def test_a_failure_after_the_stop_is_final_without_waiting() -> None:
    stop = RecordingEvent()

    def attempt() -> None:
        stop.set()  # asked to stop while this attempt ran
        raise ConnectionError("refused")

    with pytest.raises(RetryStopped) as raised:
        retrying("x", Backoff(1.0, 1.0), stop=stop)(attempt)
    assert isinstance(raised.value.__cause__, ConnectionError)
    assert stop.waits == []


def test_setting_the_event_ends_a_long_wait_at_once() -> None:
    stop = threading.Event()
    calls: list[float] = []

    def attempt() -> None:
        calls.append(time.monotonic())
        raise ConnectionError("refused")

    threading.Timer(0.2, stop.set).start()
    started = time.monotonic()
    with pytest.raises(RetryStopped):
        retrying("x", Backoff(30.0, 30.0), stop=stop)(attempt)
    assert time.monotonic() - started < 2  # not 30 s
    assert len(calls) == 1  # and no attempt after the wait the event ended


def test_a_deadline_ends_the_retries_with_the_last_error() -> None:
    attempts: list[int] = []

    def attempt() -> None:
        attempts.append(1)
        raise TimeoutError(f"attempt {len(attempts)}")

    started = time.monotonic()
    with pytest.raises(TimeoutError, match=r"attempt \d+"):
        retrying("x", Backoff(0.05, 0.05), deadline=0.3)(attempt)
    assert 0.3 <= time.monotonic() - started < 2
    assert 3 <= len(attempts) <= 8


def test_without_an_event_it_sleeps(monkeypatch: pytest.MonkeyPatch) -> None:
    slept: list[float] = []
    monkeypatch.setattr(time, "sleep", slept.append)
    retrying("x", Backoff(0.5, 5.0, factor=1, step=0.5))(failing([OSError()] * 3))
    assert slept == [0.5, 1.0, 1.5]


def test_an_attempt_that_ran_long_starts_the_backoff_over(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = [1000.0]
    monkeypatch.setattr(time, "monotonic", lambda: clock[0])
    stop = RecordingEvent()
    ran_for = iter([1.0, 1.0, 1.0, 100.0, 1.0, 1.0])

    def attempt() -> None:  # fails after running each of these times, then succeeds
        seconds = next(ran_for, None)
        if seconds is not None:
            clock[0] += seconds
            raise RuntimeError("crashed")

    retrying("x", Backoff(1.0, 30.0), stop=stop, fresh_after=50.0)(attempt)
    # the 4th attempt ran 100 s: its failure waits the first delay again, and doubles on.
    assert stop.waits == [1.0, 2.0, 4.0, 1.0, 2.0, 4.0]


def test_one_retrying_object_serves_calls_one_after_another_from_the_start() -> None:
    stop = RecordingEvent()
    retry = retrying("x", Backoff(1.0, 8.0), stop=stop, fresh_after=60.0)
    retry(failing([OSError()] * 2))
    retry(failing([OSError()] * 2))
    assert stop.waits == [1.0, 2.0, 1.0, 2.0]


def test_the_iterator_form_retries_the_block() -> None:
    stop = RecordingEvent()
    attempt_once = failing([OSError("refused")])
    results = []
    for attempt in retrying("x", Backoff(0.1, 0.1), stop=stop):
        with attempt:
            results.append(attempt_once())
    assert results == ["done"] and stop.waits == [0.1]


def test_describe_cuts_long_messages() -> None:
    assert describe(OSError()) == "OSError"
    assert describe(ValueError("x" * 500), limit=10) == "ValueError: xxxxxxxxxx"


def test_the_module_docstring_example_runs() -> None:
    doc = retry_module.__doc__
    assert doc is not None
    example = textwrap.dedent(doc.split("Example::\n", 1)[1].split("\n\n:func:", 1)[0])
    exec(compile(example, "service_runtime/retry.py docstring", "exec"), {})
