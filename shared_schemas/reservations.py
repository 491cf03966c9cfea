"""Validated reservations: the rule that decides them, the decision, and how it is answered.

Example::

    decision = decide(count=3, on_hand=10, reserved=8, exists=True)
    # Decision(status='FAILED', available=2, reason='3 unit(s) asked for, 2 sellable')
    result = ReservationResult(mutation_id, "STL", "123123", 3, decision.status,
                               decision.available, decision.reason, 41, 1_700_000_000_000)
    value = value_serde(RESERVATION_RESULT, RESERVATION_RESULTS.name).serialize(result.record())
    result.answer()   # the JSON every service answers GET /inventory/reservations/{id} with

A reservation sent with ``?validate=true`` is decided by the calculator that owns its key,
in the order of the key's partition (:func:`decide`): confirmed and counted if it asks for
no more than is sellable at that point of the stream, else failed and not counted. A
release (a negative count) is always confirmed. Every decision is published to
``reservation_results``; the mutator, the calculators and the Cassandra service all answer
``GET /inventory/reservations/{mutationId}`` from it, with :class:`ReservationAnswer`.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

from pydantic import BaseModel, Field

from shared_schemas.ids import END
from shared_schemas.schemas import RESERVATION_RESULT
from shared_schemas.serde import SingleObjectSerde

CONFIRMED = "CONFIRMED"
FAILED = "FAILED"
PENDING = "PENDING"
"""Accepted and written, not decided yet (only the mutator that accepted it knows)."""

Status = Literal["CONFIRMED", "FAILED", "PENDING"]

_SINGLE_OBJECT = SingleObjectSerde(RESERVATION_RESULT)


class Decision(NamedTuple):
    """What :func:`decide` says of one validated reservation."""

    status: str
    """CONFIRMED or FAILED."""
    available: int
    """Sellable units just before the decision."""
    reason: str
    """Why, in words; empty for a confirmation."""


def decide(count: int, on_hand: int, reserved: int, exists: bool) -> Decision:
    """Decide a validated reservation of ``count`` units against a key's state.

    Sellable is on hand minus reserved, and 0 for a key that has no adjustment (it does
    not exist yet). A reservation is confirmed if ``count`` is at most that; a release
    (``count`` < 0) always is, since it only gives units back.
    """
    available = on_hand - reserved if exists else 0
    if count <= 0 or count <= available:
        return Decision(CONFIRMED, available, "")
    if not exists:
        return Decision(FAILED, available, f"{count} unit(s) asked for; the sku has no stock here")
    return Decision(FAILED, available, f"{count} unit(s) asked for, {available} sellable")


@dataclass(frozen=True, slots=True)
class ReservationResult:
    """The decision on one validated reservation, as ``reservation_results`` carries it."""

    mutation_id: str
    location: str
    sku: str
    count: int
    status: str
    available: int
    reason: str
    reservation_offset: int
    """Offset of the reservation in its partition of inventory_reservations."""
    event_time: int
    """When the mutator accepted the reservation (epoch ms)."""

    def record(self) -> dict[str, Any]:
        """The Avro record (``RESERVATION_RESULT``)."""
        return {
            "mutation_id": self.mutation_id,
            "location": self.location,
            "sku": self.sku,
            "count": self.count,
            "status": self.status,
            "available": self.available,
            "reason": self.reason,
            "reservation_offset": self.reservation_offset,
            "event_time": self.event_time,
        }

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> ReservationResult:
        """Inverse of :meth:`record`."""
        return cls(
            record["mutation_id"],
            record["location"],
            record["sku"],
            record["count"],
            record["status"],
            record["available"],
            record["reason"],
            record["reservation_offset"],
            record["event_time"],
        )

    def to_bytes(self) -> bytes:
        """Self-describing bytes (Avro single-object encoding), for stores and the
        calculator's changelog, whatever framing the topic uses."""
        return _SINGLE_OBJECT.serialize(self.record())

    @classmethod
    def from_bytes(cls, data: bytes) -> ReservationResult:
        """Inverse of :meth:`to_bytes`; raises :class:`~shared_schemas.serde.SerdeError`."""
        return cls.from_record(_SINGLE_OBJECT.deserialize(data))

    def answer(self) -> dict[str, Any]:
        """The JSON of :class:`ReservationAnswer`."""
        return {
            "mutationId": self.mutation_id,
            "status": self.status,
            "locationId": self.location,
            "sku": self.sku,
            "count": self.count,
            "available": self.available,
            "reason": self.reason,
        }


class ReservationAnswer(BaseModel):
    """The status of one validated reservation (``GET /inventory/reservations/{mutationId}``)."""

    mutationId: str = Field(examples=["9b2f8c1e-3d4a-4a7e-8f60-0c1d2e3f4a5b"])
    status: Status = Field(
        description="CONFIRMED: counted as reserved. FAILED: not counted. PENDING: written, "
        "not decided yet (only the mutator that accepted it answers PENDING).",
        examples=[CONFIRMED],
    )
    locationId: str = Field(examples=["STL"])
    sku: str = Field(examples=["123123"])
    count: int = Field(description="Units asked for (negative: a release).", examples=[1])
    available: int | None = Field(
        description="Sellable units just before the decision (null while PENDING).",
        examples=[9],
    )
    reason: str = Field("", description="Why it failed, in words; empty otherwise.")


MUTATION_ID_PATTERN = "^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}" + END
"""What :func:`mutation_id_problem` accepts, for the OpenAPI documents (checked by hand:
the 422 words the problem)."""


def mutation_id_problem(text: str) -> str | None:
    """None if ``text`` is a mutation id (a UUID in its canonical text), else what is wrong."""
    try:
        parsed = uuid.UUID(text)
    except ValueError:
        return "must be a UUID such as 9b2f8c1e-3d4a-4a7e-8f60-0c1d2e3f4a5b"
    if str(parsed) != text:
        return f"must be a UUID in lower-case canonical form ({parsed})"
    return None
