"""Helpers for tests and benchmarks that drive real processes, and :func:`wait_until`,
the one polling wait they and local_stack use."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any
from urllib.parse import quote

from shared_schemas.ids import MAX_ID_LENGTH


class WaitTimeout(AssertionError):
    """What :func:`wait_until` waited for did not come within its timeout.

    An AssertionError, so that a test reads it as a failed expectation.
    """


def wait_until(check: Callable[[], Any], timeout: float = 30.0, interval: float = 0.05) -> Any:
    """Poll ``check`` every ``interval`` seconds until it returns something truthy, and
    return that.

    An exception from ``check`` (connection refused while a server starts…) counts as
    "not yet". ``check`` runs at least once, the last time at the deadline; then a
    :class:`WaitTimeout` shows its last result.
    """
    deadline = time.monotonic() + timeout
    while True:
        try:
            last = check()
        except Exception as exc:
            last = exc
        if last and not isinstance(last, Exception):
            return last
        left = deadline - time.monotonic()
        if left <= 0:
            raise WaitTimeout(f"condition not met within {timeout} s; last result: {last!r}")
        time.sleep(min(interval, left))  # so that the last check falls on the deadline


# Ids for tests of the id rule (shared_schemas.ids). Odd but valid: each must read back
# through every GET, one key at a time and in its location's listing.
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


def odd_ids(run: str) -> list[str]:
    """Every odd valid id, made unique to ``run`` (so a listing holds one test's keys only)."""
    return [f"{i}~{run}" for i in ODD_VALID_IDS if len(i) < 200] + ["y" * 250 + run]


def inventory_path(location: str, sku: str | None = None) -> str:
    """``/inventory/locations/{location}/skus[/{sku}]`` with every character of the ids
    percent-encoded, dots too (a client would resolve a literal "." segment away)."""
    path = f"/inventory/locations/{_encoded(location)}/skus"
    return path if sku is None else f"{path}/{_encoded(sku)}"


def _encoded(text: str) -> str:
    return quote(text, safe="").replace(".", "%2E")
