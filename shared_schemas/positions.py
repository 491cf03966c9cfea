"""Positions in the event log, as the mutator returns them and read-your-writes GETs take them.

A position names one record: ``<topic>:<partition>:<offset>``, e.g.
``inventory_adjustments:2:41``. The mutator answers every accepted request with the
position of the record it wrote; a calculator GET given ``?position=…`` waits until the
owning instance has applied that record.

Example::

    from shared_schemas.positions import Position

    position = Position.parse("inventory_adjustments:2:41")
    assert str(position) == "inventory_adjustments:2:41"
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Position:
    """One record's place in a topic."""

    topic: str
    partition: int
    offset: int

    def __str__(self) -> str:
        return f"{self.topic}:{self.partition}:{self.offset}"

    @classmethod
    def parse(cls, text: str) -> Position:
        """Parse ``topic:partition:offset``; raises ``ValueError`` with a readable reason."""
        topic, sep, rest = text.strip().rpartition(":")
        topic, sep2, partition = topic.rpartition(":")
        if not (sep and sep2 and topic):
            raise ValueError(f"expected <topic>:<partition>:<offset>, got {text!r}")
        try:
            result = cls(topic, int(partition), int(rest))
        except ValueError:
            raise ValueError(f"partition and offset must be integers in {text!r}") from None
        if result.partition < 0 or result.offset < 0:
            raise ValueError(f"partition and offset must not be negative in {text!r}")
        return result
