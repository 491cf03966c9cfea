"""Idempotency-Key handling: a retried request is answered, not written again.

Where it lives and its limits: in the memory of one mutator process. A retry that
reaches the same process within the window (``MUTATOR_IDEMPOTENCY_WINDOW_SECONDS``,
default 10 minutes) gets the first answer again, and a retry that arrives while the first
is still in flight waits for its outcome. Only successful answers are remembered: after a
503 the same key may be retried, and that retry writes. A restart forgets every key, and
several mutator processes do not share keys; a deployment that needs more puts a shared
store (or a de-duplicating consumer keyed by mutation id) behind this interface.

Example::

    cache = IdempotencyCache(window=600, max_keys=100_000)
    answer = await cache.run("adjustment:key-1", fingerprint, produce_it)
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

T = TypeVar("T")


class IdempotencyConflict(Exception):
    """The key was used before for a different request."""


@dataclass
class _Entry(Generic[T]):
    fingerprint: str
    future: asyncio.Future[T]
    expires: float


class IdempotencyCache(Generic[T]):
    """Remembers the outcome of each key for ``window`` seconds, ``max_keys`` at most."""

    def __init__(self, window: float, max_keys: int) -> None:
        self._window = window
        self._max_keys = max_keys
        self._entries: OrderedDict[str, _Entry[T]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def _expire(self, now: float) -> None:
        while self._entries:
            oldest = next(iter(self._entries.values()))
            if oldest.expires > now:
                break
            self._entries.popitem(last=False)

    def _make_room(self) -> None:
        # Only a new key makes room: a retry that finds its key evicts nothing.
        while len(self._entries) >= self._max_keys:
            self._entries.popitem(last=False)

    async def run(self, key: str, fingerprint: str, action: Callable[[], Awaitable[T]]) -> T:
        """Run ``action`` once per key; later calls with the key get its result.

        Raises :class:`IdempotencyConflict` when ``fingerprint`` (what the request says)
        differs from the first request's.
        """
        now = time.monotonic()
        self._expire(now)
        entry = self._entries.get(key)
        if entry is not None:
            if entry.fingerprint != fingerprint:
                raise IdempotencyConflict(
                    "this Idempotency-Key was already used for a different request"
                )
            return await asyncio.shield(entry.future)
        self._make_room()
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._entries[key] = _Entry(fingerprint, future, now + self._window)
        try:
            result = await action()
        except Exception as exc:
            # Failures are not remembered: the client may retry with the same key.
            self._entries.pop(key, None)
            future.set_exception(exc)
            future.exception()  # mark retrieved; waiting duplicates get it re-raised
            raise
        except BaseException:  # cancelled: the duplicates are cancelled too
            self._entries.pop(key, None)
            future.cancel()
            raise
        future.set_result(result)
        return result
