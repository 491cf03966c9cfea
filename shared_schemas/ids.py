"""What a valid id (a location or a sku) is: the one rule every service applies.

Example::

    from shared_schemas.ids import id_problem

    id_problem("STL")        # None: valid
    id_problem("  P  ")      # 'must not start or end with whitespace'
    id_problem("a/b")        # "must not contain '/'"

An id is written by the mutator and read back through URL paths
(``/inventory/locations/{location}/skus/{sku}``) on the calculators and the Cassandra
service, so the rule admits exactly the ids every GET can carry and answer:

* 1 to :data:`MAX_ID_LENGTH` characters (Unicode code points, as JSON Schema's
  ``maxLength`` counts them, so the OpenAPI documents can state the limit exactly; at
  most 4 UTF-8 bytes each, far below Cassandra's 65,535-byte key limit);
* no control characters (U+0000-U+001F, U+007F-U+009F: CR/LF and friends break logs
  and HTTP clients);
* no ``/``: routers split paths on it, even when it is sent percent-encoded;
* not ``.`` or ``..``: clients resolve those path segments away before sending;
* no whitespace at either end: ``"  P  "`` and ``"P"`` would look the same everywhere
  but be two keys in two partitions. The mutator refuses such an id instead of
  trimming it silently.

Everything else is allowed, including inner spaces, ``%``, ``+``, ``?``, ``#``,
quotes and any non-ASCII letter: a client percent-encodes them in the path and the
services decode them back to the same id.

:data:`ID_PATTERN` states the same rule as a regular expression that means the same
in Python and in ECMA-262 (JSON Schema's dialect), so the OpenAPI documents carry it
as is; :func:`id_problem` checks with it first and words the first broken rule.
"""

from __future__ import annotations

import re
from typing import Any

MAX_ID_LENGTH = 256
"""Most characters (code points) in a location or sku id."""

_CONTROL = r"\x00-\x1f\x7f-\x9f"
_EDGE_SPACE = r" \u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000\ufeff"
"""Whitespace that may not start or end an id: every character Python's ``str.isspace``
calls whitespace (besides the control characters, refused anywhere) and ECMA-262's
``\\s`` adds (U+FEFF)."""

_ANY = rf"[^{_CONTROL}/]"
_EDGE = rf"[^{_CONTROL}/{_EDGE_SPACE}]"
_EDGE_NOT_DOT = rf"[^{_CONTROL}/{_EDGE_SPACE}.]"

END = r"(?![\s\S])"
"""The end of the value, for patterns published in OpenAPI documents.

Not ``$``: in Python, and so in the JSON Schema tools written in it (schemathesis and
hypothesis generate ``"a\\n"`` for ``^a$``), it also matches before a final newline,
which ECMA-262's (JSON Schema's dialect) does not. "Nothing follows" reads the same in both."""

# One character that is not ".", two that are not "..", or three and more; edges never
# whitespace. One lookahead, the end (not every JSON Schema tool has lookarounds; the
# ones this project meets do).
ID_PATTERN = (
    rf"^(?:{_EDGE_NOT_DOT}|{_EDGE_NOT_DOT}{_EDGE}|\.{_EDGE_NOT_DOT}|{_EDGE}{_ANY}+{_EDGE}){END}"
)
"""The id rule (all but the length) as a regular expression, for Python and JSON Schema."""

_VALID = re.compile(ID_PATTERN)
_CONTROL_CHAR = re.compile(rf"[{_CONTROL}]")
_EDGE_SPACE_CHARS = re.compile(rf"^[{_EDGE_SPACE}]|[{_EDGE_SPACE}]$")

ID_DESCRIPTION = (
    f"1 to {MAX_ID_LENGTH} characters; no control characters (U+0000-U+001F, "
    "U+007F-U+009F), no `/`, no whitespace at either end, not `.` or `..`."
)
"""The rule in words, for the OpenAPI documents."""

ID_JSON_SCHEMA: dict[str, Any] = {
    "type": "string",
    "minLength": 1,
    "maxLength": MAX_ID_LENGTH,
    "pattern": ID_PATTERN,
}
"""The rule as JSON Schema, for the OpenAPI documents."""


def id_problem(value: Any) -> str | None:
    """None if ``value`` is a valid id, else the rule it breaks, in words for a client."""
    # Letters and digits only (most ids) are valid if not empty, and isalnum() says that
    # too, at a third of the regular expression's cost (this is on every request).
    if (
        type(value) is str
        and len(value) <= MAX_ID_LENGTH
        and (value.isalnum() or _VALID.fullmatch(value))
    ):
        return None
    if not isinstance(value, str):
        return "must be a string"
    if not value:
        return "must not be empty"
    if len(value) > MAX_ID_LENGTH:
        return f"must be at most {MAX_ID_LENGTH} characters, not {len(value)}"
    control = _CONTROL_CHAR.search(value)
    if control:
        return (
            f"must not contain control characters (found U+{ord(control.group()):04X} "
            f"at index {control.start()})"
        )
    if "/" in value:
        return "must not contain '/' (a URL path cannot carry it)"
    if value in (".", ".."):
        return "must not be '.' or '..' (a URL path cannot carry them)"
    if _EDGE_SPACE_CHARS.search(value):
        return "must not start or end with whitespace"
    # Unreachable while the checks above cover ID_PATTERN (a test holds them together).
    return f"must match {ID_PATTERN}"
