"""The project's Avro schemas, loaded once from the ``avro/*.avsc`` files beside this module.

Each :class:`AvroSchema` carries its definition as written (with logical types, for
registries and humans), a parsed copy *without* logical types (what our serdes read and
write with: timestamps stay epoch milliseconds and UUIDs stay strings, which is several
times faster to decode than building ``datetime``/``UUID`` objects), its parsing
canonical form and its CRC-64-AVRO fingerprint. The canonical form drops logical types,
so both copies share one fingerprint and one wire format.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import fastavro
from fastavro.schema import fingerprint as _fingerprint
from fastavro.schema import to_parsing_canonical_form

SCHEMA_DIR = Path(__file__).with_name("avro")


@dataclass(frozen=True)
class AvroSchema:
    """One Avro schema with what the serdes need precomputed."""

    name: str
    definition: dict[str, Any] | str = field(repr=False)
    parsed: Any = field(repr=False, compare=False)
    canonical_form: str = field(repr=False)
    fingerprint: bytes
    """8 bytes, little-endian, as Avro single-object encoding writes it."""

    @property
    def schema_str(self) -> str:
        """The definition as JSON text, as a schema registry stores it."""
        return json.dumps(self.definition)

    @property
    def fingerprint64(self) -> int:
        """The fingerprint as the signed 64-bit number Java's ``SchemaNormalization`` returns."""
        return int.from_bytes(self.fingerprint, "little", signed=True)

    @classmethod
    def from_definition(cls, definition: dict[str, Any] | str) -> AvroSchema:
        """Build from a JSON definition (a dict, or its text).

        Raises ``fastavro.schema.SchemaParseException`` (or ``UnknownType``) for an invalid schema.
        """
        if isinstance(definition, str):
            # A JSON object, or a JSON string naming a primitive type ('"null"').
            definition = json.loads(definition)
        canonical = to_parsing_canonical_form(copy.deepcopy(definition))
        # fastavro returns the CRC-64-AVRO as hex of the little-endian bytes.
        fp = bytes.fromhex(_fingerprint(canonical, "CRC-64-AVRO"))
        parsed = fastavro.parse_schema(_without_logical_types(copy.deepcopy(definition)))
        name = definition["name"] if isinstance(definition, dict) else str(definition)
        return cls(name, definition, parsed, canonical, fp)


def _without_logical_types(node: Any) -> Any:
    """Strip ``logicalType`` everywhere so fastavro reads and writes the underlying types."""
    if isinstance(node, dict):
        node.pop("logicalType", None)
        for value in node.values():
            _without_logical_types(value)
    elif isinstance(node, list):
        for item in node:
            _without_logical_types(item)
    return node


@cache
def load_schema(file_stem: str) -> AvroSchema:
    """Load ``avro/<file_stem>.avsc`` (cached)."""
    path = SCHEMA_DIR / f"{file_stem}.avsc"
    return AvroSchema.from_definition(json.loads(path.read_text(encoding="utf-8")))


INVENTORY_KEY = load_schema("inventory_key")
INVENTORY_MUTATION = load_schema("inventory_mutation")
INVENTORY_MUTATION_V1 = load_schema("inventory_mutation_v1")
"""InventoryMutation before ``validate`` was added: never written any more, but records
written with it stay in the input topics forever and read as unvalidated mutations."""
SELLABLE_INVENTORY = load_schema("sellable_inventory")
RESERVATION_RESULT = load_schema("reservation_result")

KNOWN_SCHEMAS: tuple[AvroSchema, ...] = (
    INVENTORY_KEY,
    INVENTORY_MUTATION,
    INVENTORY_MUTATION_V1,
    SELLABLE_INVENTORY,
    RESERVATION_RESULT,
)
"""Every schema this code base writes or wrote; single-object decoding resolves writers
among these."""
