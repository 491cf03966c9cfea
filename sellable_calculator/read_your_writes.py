"""Read-your-writes: a GET that names the positions of writes waits until they are applied.

The mutator answers every write with its position (``topic:partition:offset``). A GET
that passes it back as ``position`` is answered once the owner's store has applied that
record (and so everything before it in its topic partition), or 504 after ``timeout``::

    GET /inventory/locations/STL/skus/123?position=inventory_adjustments:2:41&timeout=5

:func:`read_your_writes_query` reads the two parameters, :func:`first_not_applied` waits.
"""

from __future__ import annotations

import re
import time
from typing import Any, NamedTuple

from fastapi import Request
from fastapi.responses import JSONResponse

from sellable_calculator.changelog import INPUT_TOPICS
from sellable_calculator.progress import Progress
from sellable_calculator.settings import CalculatorSettings
from service_runtime.http import error_response
from shared_schemas.ids import END
from shared_schemas.positions import Position

MAX_PARTITION_DIGITS = 9
MAX_OFFSET_DIGITS = 19
POSITION_PATTERN = (
    rf"^(?:{'|'.join(INPUT_TOPICS)})"
    rf":[0-9]{{1,{MAX_PARTITION_DIGITS}}}:[0-9]{{1,{MAX_OFFSET_DIGITS}}}{END}"
)
"""A position a GET takes: ``topic:partition:offset`` of an input topic, ASCII digits
(ending with :data:`shared_schemas.ids.END`, not ``$``)."""
_POSITION = re.compile(POSITION_PATTERN)
POSITION_PROBLEM = (
    f"must be <topic>:<partition>:<offset> with the topic {' or '.join(INPUT_TOPICS)}, "
    f"the partition at most {MAX_PARTITION_DIGITS} and the offset at most "
    f"{MAX_OFFSET_DIGITS} ASCII digits"
)
_SECONDS = re.compile(r"(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?")
"""A ``timeout``: a non-negative JSON number (``float()`` alone would also read ``inf``,
``1_0`` or surrounding spaces)."""
_BOOLEANS = {"true": True, "false": False}
"""The values ``fresh`` takes (JSON's, as OpenAPI's boolean)."""


def get_query_parameters(max_wait: float) -> list[dict[str, Any]]:
    """The OpenAPI declaration of the inventory GET's query (read by hand on the hot path)."""
    return [
        {
            "name": "position",
            "in": "query",
            "required": False,
            "schema": {"type": "array", "items": {"type": "string", "pattern": POSITION_PATTERN}},
            "style": "form",
            "explode": True,
            "description": "Read-your-writes: a position the mutator returned "
            "(`topic:partition:offset`, the topic an input topic); the answer includes that "
            "mutation and everything before it in the same topic partition. Repeat the "
            "parameter to include writes to both topics (an adjustment and a reservation). "
            "A position in another partition than the key's is answered 409.",
            "example": ["inventory_adjustments:2:41"],
        },
        {
            "name": "timeout",
            "in": "query",
            "required": False,
            "schema": {"type": "number", "exclusiveMinimum": 0, "maximum": max_wait},
            "description": "Seconds to wait for `position` (default "
            "CALCULATOR_WAIT_TIMEOUT_SECONDS; at most CALCULATOR_MAX_WAIT_SECONDS).",
        },
        {
            "name": "fresh",
            "in": "query",
            "required": False,
            "schema": {"type": "boolean", "default": False},
            "description": "`true`: only the key's owner may answer. By default, while the "
            "owner is unavailable (killed, frozen, the partition moving), a standby "
            "replica answers with the value it holds, marked `X-Replica: standby` (see the "
            "response headers); with `fresh=true` that is a 503 with `Retry-After` "
            "instead. A GET with `position` is never answered by a standby.",
        },
    ]


class ReadYourWrites(NamedTuple):
    """What one GET asks to see: the positions of its writes, and how long to wait."""

    positions: tuple[Position, ...]
    """All in the key's partition; none for a plain read (the usual GET)."""
    wait: float
    """Seconds to wait for all of them together."""
    fresh: bool = False
    """Only the owner may answer (``fresh=true``): never a standby replica."""

    @property
    def standby_allowed(self) -> bool:
        """Whether a standby replica may answer while the owner cannot."""
        return not (self.fresh or self.positions)


PLAIN_READ = ReadYourWrites((), 0.0)
"""A GET that names no position: nothing to wait for."""


def read_your_writes_query(
    request: Request, settings: CalculatorSettings, location: str, sku: str, partition: int
) -> ReadYourWrites | JSONResponse:
    """The GET's ``position`` and ``timeout``, or the 422 or 409 answer to a bad one.

    ``partition`` is the key's: a position in another one is 409. ``timeout`` is checked
    first, then each position in turn; the first bad one is answered. Read by hand, not
    by FastAPI (:func:`get_query_parameters` declares them): its parameter machinery
    costs measurable time on the hot GET, and a GET with no query string at all, the
    usual one, skips even the parsing.
    """
    if not request.scope["query_string"]:
        return PLAIN_READ
    query = request.query_params
    fresh = False
    if "fresh" in query:
        fresh_text = query["fresh"]
        if fresh_text not in _BOOLEANS:
            return error_response(
                422,
                "invalid_request",
                f"fresh: must be true or false, not {fresh_text!r}",
                [{"field": "fresh", "problem": "must be true or false"}],
            )
        fresh = _BOOLEANS[fresh_text]
    timeout: float | None = None
    if "timeout" in query:
        timeout = _seconds(query["timeout"], settings.calculator_max_wait_seconds)
        if timeout is None:
            return _invalid_timeout(settings.calculator_max_wait_seconds)
    positions: list[Position] = []
    for text in query.getlist("position"):
        position = _position_in(text, location, sku, partition)
        if isinstance(position, JSONResponse):
            return position
        positions.append(position)
    # The maximum caps the default too: the two are configured separately.
    wait = min(
        timeout or settings.calculator_wait_timeout_seconds, settings.calculator_max_wait_seconds
    )
    return ReadYourWrites(tuple(positions), wait, fresh)


def _seconds(text: str, max_wait: float) -> float | None:
    """The seconds ``text`` says, if it is a JSON number above 0 and at most ``max_wait``."""
    timeout = float(text) if _SECONDS.fullmatch(text) else None
    if timeout is None or not 0 < timeout <= max_wait:
        return None
    return timeout


def _invalid_timeout(max_wait: float) -> JSONResponse:
    problem = f"must be a number of seconds greater than 0 and at most {max_wait:g}"
    return error_response(
        422, "invalid_request", f"timeout: {problem}", [{"field": "timeout", "problem": problem}]
    )


def _position_in(text: str, location: str, sku: str, partition: int) -> Position | JSONResponse:
    """The position ``text`` names, if it is one and in ``partition``; else the 422 or 409."""
    if not _POSITION.match(text):
        return error_response(
            422,
            "invalid_request",
            f"position: {POSITION_PROBLEM}, not {text!r}",
            [{"field": "position", "problem": POSITION_PROBLEM}],
        )
    topic, partition_text, offset_text = text.rsplit(":", 2)
    position = Position(topic, int(partition_text), int(offset_text))
    if position.partition != partition:
        # 409, not 422: the position is well formed; which partition a key lives in
        # depends on the deployment (TOPIC_PARTITIONS), not on the request.
        problem = (
            f"{location}/{sku} lives in partition {partition}, "
            f"the position is in partition {position.partition}"
        )
        return error_response(
            409,
            "position_elsewhere",
            f"position: {problem}",
            [{"field": "position", "problem": problem}],
        )
    return position


async def first_not_applied(progress: Progress, asked: ReadYourWrites) -> Position | None:
    """Wait until this store has applied every position ``asked`` names, within its wait
    for all of them together; the first one it had not applied by then, or None."""
    deadline = time.monotonic() + asked.wait
    for position in asked.positions:
        applied = await progress.wait_for(
            position.topic, position.partition, position.offset, deadline - time.monotonic()
        )
        if not applied:
            return position
    return None
