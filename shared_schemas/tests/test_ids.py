"""The id rule: what it accepts and refuses, and its regular expression agrees with it."""

from __future__ import annotations

import random
import re
import sys

import pytest

from shared_schemas.ids import ID_JSON_SCHEMA, ID_PATTERN, MAX_ID_LENGTH, id_problem

# Odd but valid: each must round-trip through every GET (integration_tests check that).
ODD_VALID_IDS = [
    "a b",
    "a%20b",
    "a%2520b",
    "a%2Fb",
    "100%",
    "a+b",
    "a?b=c",
    "a#b",
    "a;b",
    "a\\b",
    "'\"<>",
    "...",
    ".a",
    "a.",
    "Zürich City",
    "東京",
    "😀",
    "x\u00a0y\u3000z",
    "x" * MAX_ID_LENGTH,
    "😀" * MAX_ID_LENGTH,
]

REFUSED_IDS = [
    ("", "must not be empty"),
    ("x" * (MAX_ID_LENGTH + 1), f"at most {MAX_ID_LENGTH}"),
    ("L" * 65_536, f"at most {MAX_ID_LENGTH}"),
    ("  P  ", "whitespace"),
    (" P", "whitespace"),
    ("P ", "whitespace"),
    ("\u3000P", "whitespace"),
    ("P\ufeff", "whitespace"),
    ("a\nb", "control characters"),
    ("a\r\nb", "control characters"),
    ("\tP", "control characters"),
    ("a\x00b", "control characters"),
    ("a\x85b", "control characters"),
    ("a/b", "'/'"),
    ("<script>x</script>", "'/'"),
    (".", "'.' or '..'"),
    ("..", "'.' or '..'"),
    (7, "must be a string"),
    (None, "must be a string"),
]


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
        # fullmatch: ECMA-262's "$" (JSON Schema's dialect) never matches before a final "\n".
        assert (pattern.fullmatch(value) is not None) == (id_problem(value) is None), repr(value)
    assert ID_JSON_SCHEMA["maxLength"] == MAX_ID_LENGTH
