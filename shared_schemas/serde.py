"""Avro serialisation of keys and values, in the two framings the project supports.

Example::

    from shared_schemas.schemas import INVENTORY_MUTATION
    from shared_schemas.serde import encode_key, value_serde

    serde = value_serde(INVENTORY_MUTATION, topic="inventory_adjustments")
    payload = serde.serialize({"mutation_id": "…", "count": 100, "event_time": 1_700_000_000_000})
    assert serde.deserialize(payload)["count"] == 100
    key = encode_key("STL", "123123")  # same bytes in every deployment

Values:

* **Avro single-object encoding** (Avro specification): ``C3 01`` + the writer schema's
  8-byte CRC-64-AVRO fingerprint + the binary body. Used when no schema registry is
  configured; writer schemas are resolved among the schemas this code base knows.
* **Confluent wire format**: ``00`` + 4-byte big-endian schema id + the binary body, with
  ids registered in / looked up from a schema registry through confluent-kafka's client
  (``mock://`` URLs give its in-memory registry, for tests).

Keys are the plain Avro binary body of :data:`~shared_schemas.schemas.INVENTORY_KEY`,
with no header at all: a registry id in the key would change key bytes, and therefore
partitions, from one deployment to the next.

Decoding never lets a library exception escape: anything that is not a valid record of a
known schema raises :class:`SerdeError`.
"""

from __future__ import annotations

import io
import struct
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import fastavro
from confluent_kafka.schema_registry import Schema, SchemaRegistryClient
from fastavro.validation import ValidationError, validate

from shared_schemas.schemas import INVENTORY_KEY, KNOWN_SCHEMAS, AvroSchema

SINGLE_OBJECT_MARKER = b"\xc3\x01"
CONFLUENT_MAGIC = b"\x00"
_CONFLUENT_HEADER = struct.Struct(">BI")


class SerdeError(ValueError):
    """Bytes that are not a valid record of a known schema, or a record that does not fit."""


def _read_body(data: bytes, offset: int, writer: AvroSchema, reader: AvroSchema) -> dict[str, Any]:
    """Decode the Avro body at ``data[offset:]``, resolving ``writer`` to ``reader``."""
    buffer = io.BytesIO(data)
    buffer.seek(offset)
    try:
        record = fastavro.schemaless_reader(
            buffer, writer.parsed, None if reader is writer else reader.parsed
        )
    except Exception as exc:  # fastavro raises EOFError, ValueError, IndexError, …
        raise SerdeError(f"cannot decode {writer.name} body: {type(exc).__name__}: {exc}") from exc
    if buffer.tell() != len(data):
        raise SerdeError(
            f"{len(data) - buffer.tell()} unexpected trailing bytes after a {writer.name} body"
        )
    if not isinstance(record, dict):  # every schema here is a record
        raise SerdeError(f"a {writer.name} body decoded to {type(record).__name__}, not a record")
    return record


def _write_body(schema: AvroSchema, record: Mapping[str, Any], header: bytes = b"") -> bytes:
    try:
        # fastavro's writer alone would happily write 2**40 into an Avro int, producing
        # bytes other readers reject; validating first is cheap next to encoding.
        validate(record, schema.parsed, raise_errors=True)
        buffer = io.BytesIO()
        buffer.write(header)
        fastavro.schemaless_writer(buffer, schema.parsed, record)
    except Exception as exc:  # a missing field, a wrong type, a value out of range
        reason = "; ".join(map(str, exc.errors)) if isinstance(exc, ValidationError) else str(exc)
        raise SerdeError(f"record does not fit {schema.name}: {reason}") from exc
    return buffer.getvalue()


class ValueSerde(ABC):
    """Turns records (dicts of Avro wire types) into framed bytes and back."""

    schema: AvroSchema
    """The schema records are written with and read as."""

    @abstractmethod
    def serialize(self, record: Mapping[str, Any]) -> bytes:
        """Encode ``record``; raises :class:`SerdeError` if it does not fit the schema."""

    @abstractmethod
    def deserialize(self, data: bytes) -> dict[str, Any]:
        """Decode ``data``; raises :class:`SerdeError` for anything but a valid record."""


class SingleObjectSerde(ValueSerde):
    """Avro single-object encoding: ``C3 01`` + CRC-64-AVRO fingerprint + body."""

    def __init__(self, schema: AvroSchema, writer_schemas: Iterable[AvroSchema] = KNOWN_SCHEMAS):
        self.schema = schema
        self._header = SINGLE_OBJECT_MARKER + schema.fingerprint
        self._writers = {w.fingerprint: w for w in writer_schemas}
        self._writers[schema.fingerprint] = schema

    def serialize(self, record: Mapping[str, Any]) -> bytes:
        return _write_body(self.schema, record, self._header)

    def deserialize(self, data: bytes) -> dict[str, Any]:
        if data[:2] != SINGLE_OBJECT_MARKER:
            found = data[:2].hex() or "nothing"
            raise SerdeError(f"not Avro single-object encoding: expected marker c301, got {found}")
        if len(data) < 10:
            raise SerdeError(f"single-object header truncated: {len(data)} bytes")
        fingerprint = data[2:10]
        writer = self._writers.get(fingerprint)
        if writer is None:
            number = int.from_bytes(fingerprint, "little", signed=True)
            raise SerdeError(f"unknown writer schema fingerprint {number}")
        return _read_body(data, 10, writer, self.schema)


class ConfluentSerde(ValueSerde):
    """Confluent wire format: ``00`` + schema id (big-endian int32) + body.

    The schema is registered under ``subject`` on first use (TopicNameStrategy:
    ``<topic>-value``); writer schemas of incoming records are fetched by id and cached.
    """

    def __init__(self, schema: AvroSchema, registry: SchemaRegistryClient, subject: str):
        self.schema = schema
        self._registry = registry
        self._subject = subject
        self._header: bytes | None = None
        self._writers: dict[int, AvroSchema] = {}

    def serialize(self, record: Mapping[str, Any]) -> bytes:
        if self._header is None:
            try:
                schema_id = self._registry.register_schema(
                    self._subject, Schema(self.schema.schema_str, "AVRO")
                )
            except Exception as exc:
                raise SerdeError(f"cannot register {self._subject}: {exc}") from exc
            self._header = _CONFLUENT_HEADER.pack(0, schema_id)
            self._writers[schema_id] = self.schema
        return _write_body(self.schema, record, self._header)

    def deserialize(self, data: bytes) -> dict[str, Any]:
        if len(data) < _CONFLUENT_HEADER.size:
            raise SerdeError(f"Confluent header truncated: {len(data)} bytes")
        magic, schema_id = _CONFLUENT_HEADER.unpack_from(data)
        if magic != 0:
            raise SerdeError(f"not Confluent wire format: magic byte {magic:#04x}, expected 0x00")
        writer = self._writers.get(schema_id)
        if writer is None:
            writer = self._writers[schema_id] = self._lookup(schema_id)
        return _read_body(data, _CONFLUENT_HEADER.size, writer, self.schema)

    def _lookup(self, schema_id: int) -> AvroSchema:
        try:
            registered = self._registry.get_schema(schema_id)
            if registered.schema_str is None:
                raise ValueError("the registry returned no schema text")
            return AvroSchema.from_definition(registered.schema_str)
        except Exception as exc:
            raise SerdeError(f"unknown schema id {schema_id}: {exc}") from exc


def value_serde(
    schema: AvroSchema, topic: str, schema_registry_url: str | None = None
) -> ValueSerde:
    """The value serde for ``topic``: Confluent framing with a registry, single-object without."""
    if not schema_registry_url:
        return SingleObjectSerde(schema)
    registry = SchemaRegistryClient.new_client({"url": schema_registry_url})
    return ConfluentSerde(schema, registry, f"{topic}-value")


@dataclass(frozen=True, slots=True)
class InventoryKey:
    """The key of every inventory topic: one sku at one location."""

    location: str
    sku: str


def _avro_string(text: str) -> bytes:
    data = text.encode()
    # Avro writes a string as its length (a zig-zag varint) followed by the UTF-8 bytes.
    n = len(data) << 1  # zig-zag of a non-negative length
    prefix = bytearray()
    while n > 0x7F:
        prefix.append((n & 0x7F) | 0x80)
        n >>= 7
    prefix.append(n)
    return bytes(prefix) + data


def encode_key(location: str, sku: str) -> bytes:
    """Deterministic key bytes for (location, sku): the plain Avro body, no header.

    Written by hand rather than through fastavro: it is on every request's path (the
    mutator's produce, the calculator's and the service's GET), and the record is just
    two strings. A test pins it to fastavro's encoding of the key schema.
    """
    if not isinstance(location, str) or not isinstance(sku, str):
        raise SerdeError("location and sku must be strings")
    return _avro_string(location) + _avro_string(sku)


def decode_key(data: bytes) -> InventoryKey:
    """Inverse of :func:`encode_key`; raises :class:`SerdeError` for anything else."""
    record = _read_body(data, 0, INVENTORY_KEY, INVENTORY_KEY)
    return InventoryKey(record["location"], record["sku"])


def location_prefix(location: str) -> bytes:
    """The bytes every key of ``location`` starts with.

    The key's Avro body writes the location first (length, then UTF-8), so a byte-ordered
    store such as RocksDB finds all skus of one location with a prefix scan.
    """
    return encode_key(location, "")[:-1]  # drop the empty sku's zero length
