"""Validated reservations in the comparison's workload, and what each answer means for the
model of acknowledged writes (``Workload.expected``).

A reservation sent with ``?validate=true`` is decided by the calculator that owns its key:
only a CONFIRMED one is counted (it reserves its units); a FAILED one is written but never
counted. So the model takes in a validated reservation by its decision, not by the 2xx:

* 200 with ``status`` CONFIRMED: counted at once;
* 409 with ``status`` FAILED: not counted;
* 202 with ``status`` PENDING: not decided within the mutator's wait; its mutation id is
  kept until ``GET /inventory/reservations/{id}`` says CONFIRMED (then counted) or FAILED;
* anything else (another status, a body that does not say the same, no answer): an
  error, not counted, as a failed plain write is not.

Example::

    tally = ValidatedReservations()
    outcome, units = tally.answered(200, {"status": "CONFIRMED", "mutationId": i}, key, 1)
    expected[key] -= units                   # 1: counted
    tally.answered(202, {"status": "PENDING", "mutationId": j}, key, 1)   # ("pending", 0)
    tally.decided(j, "CONFIRMED")            # (key, 1) once decided; None while PENDING
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from shared_schemas.reservations import CONFIRMED, FAILED, PENDING

Key = tuple[str, str]
"""(location, sku)"""

OUTCOMES = ("confirmed", "failed", "pending", "error")
"""What the POST's answer said: 200 CONFIRMED, 409 FAILED, 202 PENDING, or an error."""

_ANSWERS = {200: (CONFIRMED, "confirmed"), 409: (FAILED, "failed"), 202: (PENDING, "pending")}


def outcome(status: int | None, body: Any) -> str:
    """The :data:`OUTCOMES` entry of a validated POST's answer: its HTTP ``status`` (None:
    no answer) and its JSON ``body`` must say the same, and a 202 must carry the id to ask
    with later."""
    expected = _ANSWERS.get(status) if status is not None else None
    if expected is None or not isinstance(body, dict) or body.get("status") != expected[0]:
        return "error"
    if not isinstance(body.get("mutationId"), str):
        return "error"
    return expected[1]


@dataclass
class ValidatedReservations:
    """The validated reservations a run sent: their answers, and the 202s until decided."""

    answers: Counter[str] = field(default_factory=Counter)
    """By :data:`OUTCOMES`."""
    decided_later: Counter[str] = field(default_factory=Counter)
    """How the 202s were decided afterwards: ``confirmed``, ``failed``."""
    waiting: dict[str, tuple[Key, int]] = field(default_factory=dict)
    """Answered 202 and not known decided yet: mutation id -> (key, units asked)."""
    undecided: int = 0
    """202s still not decided when the run stopped asking (their keys may disagree)."""

    def answered(self, status: int | None, body: Any, key: Key, count: int) -> tuple[str, int]:
        """Take one answer in: its outcome, and the units it reserves for sure now
        (``count`` if CONFIRMED, else 0; a 202's come through :meth:`decided`)."""
        said = outcome(status, body)
        self.answers[said] += 1
        if said == "pending":
            self.waiting[body["mutationId"]] = (key, count)
        return said, count if said == "confirmed" else 0

    def decided(self, mutation_id: str, status: str | None) -> tuple[Key, int] | None:
        """A waiting reservation's status as the mutator now answers it: its key and the
        units it reserves (``count`` if CONFIRMED, 0 if FAILED) once decided; None while
        still PENDING (or for an id that is not waiting, or a status that is no decision)."""
        if mutation_id not in self.waiting or status not in (CONFIRMED, FAILED):
            return None
        key, count = self.waiting.pop(mutation_id)
        if status == CONFIRMED:
            self.decided_later["confirmed"] += 1
            return key, count
        self.decided_later["failed"] += 1
        return key, 0

    def give_up(self) -> None:
        """Stop waiting: what is still waiting stays out of the model, as undecided."""
        self.undecided += len(self.waiting)
        self.waiting.clear()

    def summary(self) -> dict[str, Any]:
        """The counts as plain JSON-able data."""
        return {
            "sent": sum(self.answers.values()),
            "answers": {name: self.answers[name] for name in OUTCOMES},
            "decided_later": {
                "confirmed": self.decided_later["confirmed"],
                "failed": self.decided_later["failed"],
            },
            "undecided": self.undecided,
        }
