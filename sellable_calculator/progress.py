"""How far this instance's store has applied each input partition, and waiting for it.

The dataflow's sink calls :meth:`Progress.advance` (from a Bytewax worker thread) after
each store write; a read-your-writes GET awaits :meth:`Progress.wait_for` on the API's
event loop. Offsets here are *next offsets to apply*, Kafka's usual convention: a record
at offset ``o`` is applied once ``reached(...) > o``.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Mapping


class Progress:
    """Thread-safe applied positions with asyncio waiters."""

    def __init__(self, initial: Mapping[tuple[str, int], int] | None = None) -> None:
        self._lock = threading.Lock()
        self._next: dict[tuple[str, int], int] = dict(initial or {})
        self._waiters: dict[tuple[str, int], list[tuple[int, asyncio.Future[bool]]]] = {}

    def reached(self, topic: str, partition: int) -> int:
        """Next offset to apply for ``(topic, partition)``; 0 if nothing was applied yet."""
        with self._lock:
            return self._next.get((topic, partition), 0)

    def snapshot(self) -> dict[tuple[str, int], int]:
        """A copy of every partition's next offset."""
        with self._lock:
            return dict(self._next)

    def advance(self, topic: str, partition: int, next_offset: int) -> None:
        """Record that every offset below ``next_offset`` is applied; wake waiters it satisfies."""
        key = (topic, partition)
        with self._lock:
            if next_offset <= self._next.get(key, 0):
                return  # replays after a recovery never move progress backwards
            self._next[key] = next_offset
            waiting = self._waiters.get(key)
            if not waiting:
                return
            done = [fut for offset, fut in waiting if offset < next_offset]
            self._waiters[key] = [(o, f) for o, f in waiting if o >= next_offset]
        for fut in done:
            fut.get_loop().call_soon_threadsafe(_resolve, fut, True)

    def give_up(self, partitions: frozenset[int]) -> None:
        """Partitions this instance no longer runs: their waiters stop waiting at once
        (:meth:`wait_for` returns False), rather than at the end of their wait."""
        with self._lock:
            keys = [key for key in self._waiters if key[1] in partitions]
            futures = [fut for key in keys for _, fut in self._waiters.pop(key)]
        for fut in futures:
            fut.get_loop().call_soon_threadsafe(_resolve, fut, False)

    def forget(self, partitions: frozenset[int]) -> None:
        """Forget how far ``partitions`` got (their state was built from topics that are
        gone: positions of the topics now start again), and give up their waiters."""
        with self._lock:
            self._next = {key: o for key, o in self._next.items() if key[1] not in partitions}
        self.give_up(partitions)

    async def wait_for(self, topic: str, partition: int, offset: int, timeout: float) -> bool:
        """Wait until the record at ``offset`` is applied; ``False`` if ``timeout`` passed
        first, or the partition was given up (:meth:`give_up`)."""
        key = (topic, partition)
        fut: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        with self._lock:
            if self._next.get(key, 0) > offset:
                return True
            if timeout <= 0:
                return False
            self._waiters.setdefault(key, []).append((offset, fut))
        try:
            return await asyncio.wait_for(fut, timeout)
        except TimeoutError:
            with self._lock:
                waiting = self._waiters.get(key, [])
                self._waiters[key] = [(o, f) for o, f in waiting if f is not fut]
            return False


def _resolve(fut: asyncio.Future[bool], applied: bool) -> None:
    if not fut.done():
        fut.set_result(applied)
