"""The decisions on validated reservations, as the mutator learns them from
``reservation_results``: what a validated POST waits for, and what
``GET /inventory/reservations/{mutationId}`` answers on the mutator.

Example::

    decisions = Decisions(max_results=1_000_000)
    follower = decisions.follow(settings)          # a thread reading reservation_results
    decisions.accepted(mutation_id, "STL", "123123", 1)
    result = await decisions.wait(mutation_id, 5.0)  # ReservationResult, or None: pending
    decisions.status(mutation_id)   # the decision, a pending answer, or None (unknown)

The follower reads the topic from the beginning when the mutator starts, so the mutator
answers for reservations decided before it started too, up to ``max_results`` (the
oldest are forgotten first; the calculators and the Cassandra service keep them all).
Pending reservations are those this process accepted and has not seen decided.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from typing import Any

from inventory_mutator.settings import MutatorSettings
from service_runtime.results import Results, ResultsFollower
from shared_schemas.reservations import PENDING, ReservationResult


class Decisions:
    """Decisions by mutation id, the reservations still pending, and who waits for which."""

    def __init__(self, max_results: int) -> None:
        self._max = max_results
        self._decided: OrderedDict[str, ReservationResult] = OrderedDict()
        self._pending: OrderedDict[str, tuple[str, str, int]] = OrderedDict()
        self._waiters: dict[str, list[asyncio.Future[ReservationResult]]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self.follower: ResultsFollower | None = None

    def follow(self, settings: MutatorSettings) -> ResultsFollower:
        """Start following ``reservation_results`` (call on the event loop's thread)."""
        self._loop = asyncio.get_running_loop()
        self.follower = ResultsFollower(
            settings.kafka_bootstrap_servers,
            settings.schema_registry_url,
            settings.topic_partitions,
            on_results=self._from_thread,
            client_id="inventory-mutator-results",
        )
        self.follower.start()
        return self.follower

    def stop(self) -> None:
        """Stop following."""
        if self.follower is not None:
            self.follower.stop()

    def _from_thread(self, read: Results) -> None:
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self.add, [result for _, _, result in read])

    def add(self, results: list[ReservationResult]) -> None:
        """Take decisions in (on the event loop): remember them and wake their waiters."""
        decided, pending, waiters = self._decided, self._pending, self._waiters
        for result in results:
            mutation_id = result.mutation_id
            decided[mutation_id] = result
            decided.move_to_end(mutation_id)
            pending.pop(mutation_id, None)
            for future in waiters.pop(mutation_id, ()):
                if not future.done():
                    future.set_result(result)
        while len(decided) > self._max:
            decided.popitem(last=False)

    def accepted(self, mutation_id: str, location: str, sku: str, count: int) -> None:
        """A validated reservation this process wrote: pending until its decision comes."""
        if mutation_id in self._decided:
            return
        self._pending[mutation_id] = (location, sku, count)
        while len(self._pending) > self._max:
            self._pending.popitem(last=False)

    async def wait(self, mutation_id: str, timeout: float) -> ReservationResult | None:
        """The decision on ``mutation_id``, waiting up to ``timeout`` seconds; None if it
        has not come by then."""
        result = self._decided.get(mutation_id)
        if result is not None or timeout <= 0:
            return result
        future: asyncio.Future[ReservationResult] = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(mutation_id, []).append(future)
        try:
            return await asyncio.wait_for(future, timeout)
        except TimeoutError:
            return None
        finally:
            waiting = self._waiters.get(mutation_id)
            if waiting is not None:
                if future in waiting:
                    waiting.remove(future)
                if not waiting:
                    del self._waiters[mutation_id]

    def status(self, mutation_id: str) -> dict[str, Any] | None:
        """The answer of ``GET /inventory/reservations/{mutation_id}``: the decision, a
        PENDING answer for one accepted here and not decided yet, or None: unknown."""
        result = self._decided.get(mutation_id)
        if result is not None:
            return result.answer()
        pending = self._pending.get(mutation_id)
        if pending is None:
            return None
        return pending_answer(mutation_id, *pending)

    @property
    def loaded(self) -> bool:
        """Whether every decision published before the follower started has been read."""
        return self.follower is not None and self.follower.loaded.is_set()


def pending_answer(mutation_id: str, location: str, sku: str, count: int) -> dict[str, Any]:
    """The answer for a validated reservation written but not decided yet."""
    return {
        "mutationId": mutation_id,
        "status": PENDING,
        "locationId": location,
        "sku": sku,
        "count": count,
        "available": None,
        "reason": "",
    }
