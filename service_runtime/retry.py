"""Trying again after a failure: exponential backoff, logged, stoppable through an Event.

Example::

    import threading

    from service_runtime.retry import Backoff, retrying

    replies = iter([ConnectionRefusedError("refused"), ConnectionRefusedError("refused"), "up"])

    def connect() -> str:
        reply = next(replies)
        if isinstance(reply, Exception):
            raise reply
        return reply

    stop = threading.Event()  # set it (from another thread) to give up at once
    retry = retrying("connecting", Backoff(first=0.01, cap=0.05), retry_on=OSError, stop=stop)
    assert retry(connect) == "up"  # after two retries, 0.01 s and 0.02 s apart, each logged

:func:`retrying` builds a :class:`tenacity.Retrying` (the library every service retries
with), so the object it returns is used the way tenacity's are: ``retry(fn, *args)``,
``retry.wraps(fn)``, or ``for attempt in retry: with attempt: ...``.

A loop that cannot simply wait between attempts (the Cassandra writer keeps polling
Kafka while a batch waits, to stay in its consumer group) keeps its own loop and takes
its delays from a :class:`Backoff`, the same value :func:`retrying` waits by.
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NoReturn

import tenacity
from tenacity.nap import sleep as _sleep

log = logging.getLogger(__name__)

RetryOn = type[BaseException] | tuple[type[BaseException], ...] | Callable[[BaseException], bool]
"""Which errors are worth another attempt: exception types, or a predicate on the error."""


class RetryStopped(Exception):
    """The stop event was set: no attempt succeeded and none will start any more.

    Raised from the last failure when there was one (``__cause__``).
    """


@dataclass(frozen=True, slots=True)
class Backoff:
    """How long to wait after each failure in a row: ``first``, then each wait times
    ``factor`` plus ``step``, never more than ``cap`` (seconds).

    ``Backoff(0.5, 5.0)`` waits 0.5, 1, 2, 4, 5, 5… s; ``Backoff(0.5, 5.0, factor=1,
    step=0.5)`` grows linearly instead: 0.5, 1, 1.5 … 5 s; ``Backoff(1.0, 1.0)`` is a
    constant 1 s.
    """

    first: float
    cap: float
    factor: float = 2.0
    step: float = 0.0

    def __post_init__(self) -> None:
        if not 0 <= self.first <= self.cap:
            raise ValueError(f"need 0 <= first <= cap, got first={self.first} cap={self.cap}")
        if self.factor < 1 or self.step < 0:
            raise ValueError("a backoff never shrinks: factor >= 1 and step >= 0")

    def delay(self, failures: int) -> float:
        """The wait after ``failures`` failures in a row (1 for the first)."""
        if failures < 1:
            raise ValueError(f"failures counts from 1, got {failures}")
        delay = self.first
        # Step by step rather than first * factor ** n: no overflow after thousands of
        # failures, and the loop ends as soon as the delay stops growing.
        for _ in range(failures - 1):
            grown = min(delay * self.factor + self.step, self.cap)
            if grown == delay:
                break
            delay = grown
        return delay


def retrying(
    what: str,
    backoff: Backoff,
    *,
    retry_on: RetryOn = Exception,
    stop: threading.Event | None = None,
    deadline: float | None = None,
    fresh_after: float | None = None,
    on_retry: Callable[[BaseException, float], None] | None = None,
    logger: logging.Logger | None = None,
    level: int = logging.WARNING,
    exc_info: bool = False,
) -> tenacity.Retrying:
    """A tenacity retrying object: attempts until one succeeds, waiting by ``backoff``.

    * ``what`` names the operation in the log line of each retry: ``"<what>: attempt 2
      failed (OSError: refused); retrying in 1 s"``, at ``level`` on ``logger`` (this
      module's by default), with the traceback when ``exc_info``.
    * ``retry_on``: the errors worth another attempt; any other error propagates at once,
      unchanged.
    * ``stop``: once set, no attempt starts (not even the first), a wait in progress ends
      at once, and :class:`RetryStopped` is raised.
    * ``deadline``: seconds from the first attempt after which a failure is final: the
      last error is raised as it is.
    * ``fresh_after``: an attempt that ran longer than this before failing is a new
      incident, not the old one persisting: its wait is ``backoff.first`` again. For
      restarting something long-running, such as a consumer or a process.
    * ``on_retry(error, delay)`` runs before each wait (metrics, a health state).

    One object may serve any number of calls, on any threads.
    """
    policy = _Policy(
        what, backoff, stop, deadline, fresh_after, on_retry, logger or log, level, exc_info
    )
    if isinstance(retry_on, type | tuple):
        retry: tenacity.retry_base = tenacity.retry_if_exception_type(retry_on)
    else:
        retry = tenacity.retry_if_exception(retry_on)
    return tenacity.Retrying(
        retry=retry,
        wait=policy.wait,
        stop=policy.final,
        before=policy.before,
        before_sleep=policy.before_sleep,
        retry_error_callback=policy.give_up,
        sleep=policy.sleep,
    )


@dataclass(slots=True)
class _Streak:
    """Per call: when the attempt under way started, and which attempt began the incident."""

    attempt_started: float = 0.0
    first_failure: int = 1


@dataclass(frozen=True, slots=True)
class _Policy:
    """The callbacks :func:`retrying` hands tenacity."""

    what: str
    backoff: Backoff
    stop: threading.Event | None
    deadline: float | None
    fresh_after: float | None
    on_retry: Callable[[BaseException, float], None] | None
    logger: logging.Logger
    level: int
    exc_info: bool
    # Keyed by tenacity's per-call state, so that one retrying object can serve calls on
    # several threads at once; an entry goes with its call.
    streaks: weakref.WeakKeyDictionary[tenacity.RetryCallState, _Streak] = field(
        default_factory=weakref.WeakKeyDictionary
    )

    def before(self, state: tenacity.RetryCallState) -> None:
        if self.stop is not None and self.stop.is_set():
            raise RetryStopped(f"{self.what}: stopped")
        if self.fresh_after is not None:
            streak = self.streaks.setdefault(state, _Streak())
            streak.attempt_started = time.monotonic()

    def wait(self, state: tenacity.RetryCallState) -> float:
        failures = state.attempt_number
        if self.fresh_after is not None:
            streak = self.streaks[state]
            assert state.outcome_timestamp is not None
            if state.outcome_timestamp - streak.attempt_started > self.fresh_after:
                streak.first_failure = state.attempt_number
            failures = state.attempt_number - streak.first_failure + 1
        return self.backoff.delay(failures)

    def sleep(self, seconds: float) -> None:
        if self.stop is None:
            _sleep(seconds)
        else:  # returns as soon as the event is set; before() then starts no attempt
            self.stop.wait(seconds)

    def final(self, state: tenacity.RetryCallState) -> bool:
        if self.stop is not None and self.stop.is_set():
            return True
        elapsed = state.seconds_since_start
        return self.deadline is not None and elapsed is not None and elapsed >= self.deadline

    def before_sleep(self, state: tenacity.RetryCallState) -> None:
        error = _error(state)
        delay = state.upcoming_sleep
        self.logger.log(
            self.level,
            "%s: attempt %d failed (%s); retrying in %.3g s",
            self.what,
            state.attempt_number,
            describe(error),
            delay,
            exc_info=error if self.exc_info else None,
        )
        if self.on_retry is not None:
            self.on_retry(error, delay)

    def give_up(self, state: tenacity.RetryCallState) -> NoReturn:
        error = _error(state)
        if self.stop is not None and self.stop.is_set():
            raise RetryStopped(f"{self.what}: stopped") from error
        raise error  # past the deadline: the caller sees the error itself


def describe(error: BaseException, limit: int = 200) -> str:
    """``"Type: message"`` for a log line, the message cut at ``limit`` characters (a
    driver's error can list every host it tried)."""
    text = str(error)
    return type(error).__name__ + (f": {text[:limit]}" if text else "")


def _error(state: tenacity.RetryCallState) -> BaseException:
    assert state.outcome is not None
    error = state.outcome.exception()
    assert error is not None  # only errors are retried, never results
    return error
