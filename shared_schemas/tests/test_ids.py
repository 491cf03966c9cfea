"""The id rule: what it accepts and refuses, and its regular expression agrees with it."""

from __future__ import annotations

import random
import re
import sys

import pytest

from local_stack.testing import ODD_VALID_IDS, REFUSED_IDS
from shared_schemas.ids import ID_JSON_SCHEMA, ID_PATTERN, MAX_ID_LENGTH, id_problem


@pytest.mark.parametrize("value", ODD_VALID_IDS)
def test_odd_ids_are_valid(value: str) -> None:
    assert id_problem(value) is None


@pytest.mark.parametrize(("value", "problem"), REFUSED_IDS)
def test_invalid_ids_are_refused_naming_the_rule(value: object, problem: str) -> None:
    found = id_problem(value)
    assert found is not None and problem in found


def test_every_python_whitespace_is_refused_at_the_edges_and_allowed_inside() -> None:
    spaces = [chr(c) for c in range(sys.maxunicode + 1) if chr(c).isspace()]
    for space in spaces:
        assert id_problem(f"a{space}") is not None, hex(ord(space))
        assert id_problem(f"{space}a") is not None, hex(ord(space))
        control = ord(space) < 0x20 or 0x7F <= ord(space) <= 0x9F  # refused anywhere
        assert (id_problem(f"a{space}b") is None) == (not control), hex(ord(space))


def test_the_pattern_and_the_function_agree() -> None:
    """The OpenAPI documents publish ID_PATTERN: it must refuse exactly what id_problem does."""
    rng = random.Random(12)
    alphabet = ["a", "Z", "0", ".", "/", " ", "\n", "\x7f", "\x9f", "\u00a0", "\u2028", "é", "😀"]
    pattern = re.compile(ID_PATTERN)
    for _ in range(20_000):
        value = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 5)))
        # search, as a JSON Schema tool does: the pattern anchors itself at both ends.
        assert (pattern.search(value) is not None) == (id_problem(value) is None), repr(value)
    assert ID_JSON_SCHEMA["maxLength"] == MAX_ID_LENGTH
