"""The Idempotency-Key cache on its own: what is remembered, for how long, and what not."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import pytest

from inventory_mutator import idempotency
from inventory_mutator.idempotency import IdempotencyCache, IdempotencyConflict
from inventory_mutator.tests.support import run


class Action:
    """An action that counts its runs and answers ``answer-<run>`` once ``gate`` is open."""

    def __init__(self, fails: bool = False) -> None:
        self.runs = 0
        self.fails = fails
        self.gate = asyncio.Event()
        self.gate.set()

    async def __call__(self) -> str:
        self.runs += 1
        number = self.runs
        await self.gate.wait()
        if self.fails:
            raise RuntimeError(f"refused-{number}")
        return f"answer-{number}"


def _cache(max_keys: int = 10) -> IdempotencyCache[str]:
    return IdempotencyCache(window=600, max_keys=max_keys)


async def _in_flight(cache: IdempotencyCache[str], action: Action, count: int) -> list[Any]:
    """``count`` requests with one key and fingerprint, the action held at its gate."""
    action.gate.clear()
    requests = [asyncio.ensure_future(cache.run("k", "f", action)) for _ in range(count)]
    await asyncio.sleep(0.01)
    assert not any(r.done() for r in requests)
    return requests


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """The cache's clock, set by the test (``clock[0]``, seconds)."""
    now = [1_000.0]
    monkeypatch.setattr(idempotency, "time", SimpleNamespace(monotonic=lambda: now[0]))
    return now


def test_a_retry_gets_the_first_answer_and_the_action_runs_once() -> None:
    async def scenario() -> None:
        cache = _cache()
        action = Action()
        assert await cache.run("adjustment:k", "STL/1/+5", action) == "answer-1"
        assert await cache.run("adjustment:k", "STL/1/+5", action) == "answer-1"
        assert action.runs == 1
        assert await cache.run("adjustment:other", "STL/1/+5", action) == "answer-2"
        assert len(cache) == 2

    run(scenario)


def test_the_same_key_for_another_request_is_a_conflict_and_writes_nothing() -> None:
    async def scenario() -> None:
        cache = _cache()
        action = Action()
        await cache.run("adjustment:k", "STL/1/+5", action)
        with pytest.raises(IdempotencyConflict, match="already used for a different request"):
            await cache.run("adjustment:k", "STL/1/+6", action)
        assert action.runs == 1
        # The first request's answer is still there for its own retries.
        assert await cache.run("adjustment:k", "STL/1/+5", action) == "answer-1"

    run(scenario)


def test_a_retry_while_the_first_is_in_flight_waits_for_its_answer() -> None:
    async def scenario() -> None:
        cache = _cache()
        action = Action()
        requests = await _in_flight(cache, action, 4)
        action.gate.set()
        assert await asyncio.gather(*requests) == ["answer-1"] * 4
        assert action.runs == 1

    run(scenario)


def test_a_failure_is_not_remembered_and_in_flight_retries_get_it_too() -> None:
    async def scenario() -> None:
        cache = _cache()
        action = Action(fails=True)
        requests = await _in_flight(cache, action, 2)
        action.gate.set()
        outcomes = await asyncio.gather(*requests, return_exceptions=True)
        assert [str(o) for o in outcomes] == ["refused-1", "refused-1"]
        assert len(cache) == 0
        # A later retry with the key runs the action again (after a 503, it writes).
        action.fails = False
        assert await cache.run("k", "f", action) == "answer-2"

    run(scenario)


def test_a_cancelled_first_request_cancels_its_waiting_retries_and_is_forgotten() -> None:
    async def scenario() -> None:
        cache = _cache()
        action = Action()
        first, retry = await _in_flight(cache, action, 2)
        first.cancel()
        await asyncio.gather(first, retry, return_exceptions=True)
        assert first.cancelled() and retry.cancelled()
        assert len(cache) == 0
        action.gate.set()
        assert await cache.run("k", "f", action) == "answer-2"

    run(scenario)


def test_keys_are_forgotten_once_the_window_has_passed(clock: list[float]) -> None:
    async def scenario() -> None:
        cache = _cache()
        action = Action()
        await cache.run("old", "f", action)  # expires at 1,600
        clock[0] = 1_300.0
        await cache.run("newer", "f", action)  # expires at 1,900
        clock[0] = 1_599.0
        assert await cache.run("old", "f", action) == "answer-1"  # still inside its window
        clock[0] = 1_600.0
        assert await cache.run("old", "f", action) == "answer-3"  # forgotten: runs again
        assert await cache.run("newer", "f", action) == "answer-2"
        assert len(cache) == 2

    run(scenario)


def test_beyond_max_keys_the_oldest_key_is_forgotten_first() -> None:
    async def scenario() -> None:
        cache = _cache(max_keys=3)
        action = Action()
        for key in ("a", "b", "c", "d"):
            await cache.run(key, "f", action)
        assert len(cache) == 3
        # A full cache: retries of every remembered key are answered, evicting nothing.
        for key, answer in (("b", "answer-2"), ("c", "answer-3"), ("d", "answer-4")):
            assert await cache.run(key, "f", action) == answer
        assert action.runs == 4
        assert await cache.run("a", "f", action) == "answer-5"  # the oldest went for d
        assert action.runs == 5

    run(scenario)
