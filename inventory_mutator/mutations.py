"""What a client may send the mutator, and what it answers: the request bodies with their
rules, and the shape of the 200.

Both mutations carry a location, a sku (the id rule of :mod:`shared_schemas.ids`) and a
count; :func:`parse_count` is the count rule, and each model's JSON Schema states exactly
what it accepts, so ``/docs`` is the truth.

Example::

    Adjustment.model_validate_json(b'{"locationId": "STL", "sku": "123123", "count": "100"}')
    # Adjustment(locationId='STL', sku='123123', count=100)
"""

from __future__ import annotations

import re
from typing import Annotated, Any

from pydantic import (
    AliasChoices,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    WithJsonSchema,
    field_validator,
)

from shared_schemas.ids import END, ID_DESCRIPTION, ID_JSON_SCHEMA, id_problem
from shared_schemas.reservations import ReservationAnswer

INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1

_COUNT_TEXT = re.compile(r"[+-]?[0-9]+")
"""A count sent as a string: ASCII digits only (``[0-9]``, unlike ``int()``, which also
reads Arabic-Indic or full-width digits), an optional sign, nothing around them."""
_INT32_DIGITS = len(str(INT32_MAX))
WHOLE_NUMBER = "must be a whole number: a JSON integer or a string of ASCII digits"


def parse_count(value: Any, minimum: int) -> int:
    """``value`` as a count in [``minimum``, INT32_MAX], never zero, or ValueError saying why.

    Accepts a JSON integer (``100``, and ``100.0`` or ``1e2``, the same number to JSON) or
    a numeric string ("100", as the original example sends).
    """
    if isinstance(value, bool):
        raise ValueError(f"{WHOLE_NUMBER}, not a boolean")
    if type(value) is int:
        number = value
    elif isinstance(value, str) and (
        (value.isascii() and value.isdigit()) or _COUNT_TEXT.fullmatch(value)
    ):
        # More than 10 significant digits is out of range whatever they are; checked
        # first so int() never reads a huge string (slow, and refused beyond 4,300 digits).
        if len(value) > _INT32_DIGITS and len(value.lstrip("+-").lstrip("0")) > _INT32_DIGITS:
            raise ValueError(f"must be between {minimum} and {INT32_MAX}")
        number = int(value)
    elif isinstance(value, float):
        # JSON does not tell 100.0 from 100, nor does JSON Schema's "integer": a whole
        # number written with a fraction or exponent is that number.
        if not value.is_integer():
            raise ValueError(f"{WHOLE_NUMBER}, not a fraction")
        if not INT32_MIN <= value <= INT32_MAX:
            raise ValueError(f"must be between {minimum} and {INT32_MAX}")
        number = int(value)
    else:
        raise ValueError(WHOLE_NUMBER)
    if minimum > 0 and number < minimum:
        raise ValueError("must be positive")
    if number == 0:
        raise ValueError("must not be zero")
    if not INT32_MIN <= number <= INT32_MAX:
        raise ValueError(f"must be between {minimum} and {INT32_MAX}")
    return number


def _up_to(limit: int) -> str:
    """A regular expression for the decimal numbers 1 to ``limit`` (no sign, no leading 0)."""
    digits = str(limit)
    alternatives = [f"[1-9][0-9]{{0,{len(digits) - 2}}}"] if len(digits) > 1 else []
    for i, digit in enumerate(digits):
        low, high = (1 if i == 0 else 0), int(digit) - 1
        if high >= low:
            rest = len(digits) - i - 1
            choice = str(low) if low == high else f"[{low}-{high}]"
            alternatives.append(f"{digits[:i]}{choice}" + (f"[0-9]{{{rest}}}" if rest else ""))
    alternatives.append(digits)
    return "(?:" + "|".join(alternatives) + ")"


def _count_schema(minimum: int, description: str) -> dict[str, Any]:
    """The JSON Schema of a count: exactly what :func:`parse_count` accepts, for ``/docs``."""
    positive = rf"\+?0*{_up_to(INT32_MAX)}"
    pattern = positive if minimum > 0 else rf"{positive}|-0*{_up_to(-INT32_MIN)}"
    return {
        "description": description,
        "anyOf": [
            {"type": "integer", "minimum": minimum, "maximum": INT32_MAX, "not": {"const": 0}},
            {"type": "string", "pattern": f"^(?:{pattern}){END}"},
        ],
    }


def _identifier(value: Any) -> str:
    """``value`` if it is a valid id, else ValueError with the rule it breaks."""
    problem = id_problem(value)
    if problem is not None:
        raise ValueError(problem)
    return str(value)  # id_problem accepts only a str


class _Mutation(BaseModel):
    """What every mutation names: where, and which sku."""

    model_config = ConfigDict(populate_by_name=True)

    locationId: str = Field(
        validation_alias=AliasChoices("locationId", "location"),
        description=f"Location id (`location` is accepted too): {ID_DESCRIPTION}",
        examples=["STL"],
        json_schema_extra=ID_JSON_SCHEMA,
    )
    sku: str = Field(
        description=f"Sku id: {ID_DESCRIPTION}",
        examples=["123123"],
        json_schema_extra=ID_JSON_SCHEMA,
    )

    @field_validator("locationId", "sku", mode="before")
    @classmethod
    def _identifiers(cls, value: Any) -> str:
        return _identifier(value)


def _count(minimum: int, description: str) -> tuple[BeforeValidator, WithJsonSchema]:
    """The validation and the JSON Schema of a count that is at least ``minimum``."""
    return (
        BeforeValidator(lambda value: parse_count(value, minimum)),
        WithJsonSchema(_count_schema(minimum, description)),
    )


_ADJUSTMENT_COUNT = _count(
    INT32_MIN,
    "Non-zero 32-bit integer: a JSON integer, or a string of ASCII digits with an optional "
    'sign ("100", as the original example sends).',
)
_RESERVATION_COUNT = _count(
    INT32_MIN,
    "Non-zero 32-bit integer, negative to release reserved units: a JSON integer, or a "
    'string of ASCII digits with an optional sign ("10", as the original example sends).',
)


class Adjustment(_Mutation):
    """A change of the on-hand quantity: positive for receipts, negative for shrinkage."""

    count: Annotated[int, _ADJUSTMENT_COUNT[0], _ADJUSTMENT_COUNT[1]] = Field(examples=[100])


class Reservation(_Mutation):
    """Units promised to an order: they stop being sellable. A negative count releases
    units reserved before (a cancelled order): they are sellable again."""

    count: Annotated[int, _RESERVATION_COUNT[0], _RESERVATION_COUNT[1]] = Field(examples=[10])


class MutationAccepted(BaseModel):
    """Where the event landed."""

    message: str = Field(examples=["Updated Inventory [inventory_adjustments-2@41]"])
    topic: str = Field(examples=["inventory_adjustments"])
    partition: int = Field(examples=[2])
    offset: int = Field(examples=[41])
    position: str = Field(
        description="Pass it to a calculator GET as `?position=` to read your write.",
        examples=["inventory_adjustments:2:41"],
    )
    mutationId: str = Field(examples=["9b2f8c1e-3d4a-4a7e-8f60-0c1d2e3f4a5b"])


class ValidatedReservation(ReservationAnswer):
    """The answer to ``POST /inventory/reservation?validate=true``: the decision (or
    PENDING), where the event landed, and where to ask for the decision later."""

    message: str = Field(examples=["Updated Inventory [inventory_reservations-2@41]"])
    topic: str = Field(examples=["inventory_reservations"])
    partition: int = Field(examples=[2])
    offset: int = Field(examples=[41])
    position: str = Field(examples=["inventory_reservations:2:41"])
    url: str = Field(
        description="Where the decision can be asked for: GET it on the mutator, any "
        "calculator or the Cassandra service.",
        examples=["/inventory/reservations/9b2f8c1e-3d4a-4a7e-8f60-0c1d2e3f4a5b"],
    )
    error: str | None = Field(None, description="`insufficient_stock` on a 409 FAILED.")


Mutation = Adjustment | Reservation
"""Either mutation, once validated."""
