"""Serdes: both framings, schema evolution, key bytes, and bad input."""

from __future__ import annotations

import copy
import uuid

import pytest
from confluent_kafka.schema_registry import SchemaRegistryClient

from shared_schemas.schemas import (
    INVENTORY_MUTATION,
    INVENTORY_MUTATION_V1,
    RESERVATION_RESULT,
    SELLABLE_INVENTORY,
    AvroSchema,
)
from shared_schemas.serde import (
    ConfluentSerde,
    InventoryKey,
    SerdeError,
    SingleObjectSerde,
    decode_key,
    encode_key,
    value_serde,
)

MUTATION = {
    "mutation_id": str(uuid.uuid4()),
    "count": -7,
    "event_time": 1_732_000_000_123,
    "validate": False,
}


def _evolved_mutation_schema() -> AvroSchema:
    """Today's mutation schema plus a defaulted field, as a later release might add."""
    definition = copy.deepcopy(INVENTORY_MUTATION.definition)
    definition["fields"].append({"name": "reason", "type": "string", "default": "unspecified"})
    return AvroSchema.from_definition(definition)


@pytest.fixture
def registry() -> SchemaRegistryClient:
    # A fresh in-memory registry per test: mock:// URLs never leave the process.
    return SchemaRegistryClient.new_client({"url": f"mock://{uuid.uuid4()}"})


def test_single_object_round_trip_and_framing() -> None:
    serde = SingleObjectSerde(INVENTORY_MUTATION)
    data = serde.serialize(MUTATION)
    assert data[:2] == b"\xc3\x01"
    assert data[2:10] == INVENTORY_MUTATION.fingerprint
    assert serde.deserialize(data) == MUTATION


def test_confluent_round_trip_and_framing(registry: SchemaRegistryClient) -> None:
    serde = ConfluentSerde(SELLABLE_INVENTORY, registry, "sellable_inventory-value")
    record = {"count": 90, "on_hand": 100, "reserved": 10, "updated_at": 1_732_000_000_000}
    data = serde.serialize(record)
    schema_id = registry.get_latest_version("sellable_inventory-value").schema_id
    assert data[0] == 0
    assert int.from_bytes(data[1:5], "big") == schema_id
    # A second serde (another process, say) resolves the writer through the registry.
    reader = ConfluentSerde(SELLABLE_INVENTORY, registry, "sellable_inventory-value")
    assert reader.deserialize(data) == record


def test_value_serde_picks_framing_from_registry_url() -> None:
    assert isinstance(value_serde(INVENTORY_MUTATION, "t"), SingleObjectSerde)
    serde = value_serde(INVENTORY_MUTATION, "t", f"mock://{uuid.uuid4()}")
    assert isinstance(serde, ConfluentSerde)
    assert serde.serialize(MUTATION)[0] == 0


def test_fingerprints_match_the_avro_specification_vectors() -> None:
    # Values from Apache Avro's share/test/data/schema-tests.txt (Java's signed longs).
    assert AvroSchema.from_definition('"null"').fingerprint64 == 7195948357588979594
    assert AvroSchema.from_definition('"int"').fingerprint64 == 8247732601305521295


def test_logical_types_do_not_change_the_fingerprint() -> None:
    # The canonical form drops logicalType, so readers with or without them interoperate.
    assert '"logicalType"' not in INVENTORY_MUTATION.canonical_form
    assert INVENTORY_MUTATION.definition["fields"][2]["type"]["logicalType"] == "timestamp-millis"


def test_evolution_single_object_reader_with_defaulted_field() -> None:
    written = SingleObjectSerde(INVENTORY_MUTATION).serialize(MUTATION)
    evolved = _evolved_mutation_schema()
    reader = SingleObjectSerde(evolved, writer_schemas=[INVENTORY_MUTATION])
    assert reader.deserialize(written) == {**MUTATION, "reason": "unspecified"}


def test_evolution_confluent_reader_with_defaulted_field(registry: SchemaRegistryClient) -> None:
    written = ConfluentSerde(INVENTORY_MUTATION, registry, "m-value").serialize(MUTATION)
    reader = ConfluentSerde(_evolved_mutation_schema(), registry, "m-value")
    assert reader.deserialize(written) == {**MUTATION, "reason": "unspecified"}


@pytest.mark.parametrize(
    ("location", "sku"), [("STL", "123123"), ("", ""), ("Zürich", "ß" * 70), ("x" * 300, "y")]
)
def test_key_bytes_equal_fastavros_encoding_of_the_key_schema(location: str, sku: str) -> None:
    import io

    import fastavro

    from shared_schemas.schemas import INVENTORY_KEY

    expected = io.BytesIO()
    fastavro.schemaless_writer(expected, INVENTORY_KEY.parsed, {"location": location, "sku": sku})
    assert encode_key(location, sku) == expected.getvalue()
    assert decode_key(encode_key(location, sku)) == InventoryKey(location, sku)


def test_key_bytes_are_plain_avro_and_deterministic() -> None:
    # Zig-zag length prefixes (3 -> 0x06, 6 -> 0x0c) then UTF-8: no header, no registry id.
    assert encode_key("STL", "123123") == b"\x06STL\x0c123123"
    assert decode_key(encode_key("Zürich", "sku-1")).location == "Zürich"
    assert encode_key("A", "BC") != encode_key("AB", "C")


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "expected marker c301, got nothing"),
        (b"\x00\x01\x02", "expected marker c301"),
        (b"\xc3\x01\x01\x02", "header truncated"),
        (b"\xc3\x01" + b"\x00" * 8 + b"\x02", "unknown writer schema fingerprint"),
    ],
)
def test_single_object_bad_bytes(data: bytes, message: str) -> None:
    with pytest.raises(SerdeError, match=message):
        SingleObjectSerde(INVENTORY_MUTATION).deserialize(data)


def test_single_object_truncated_and_trailing_body() -> None:
    serde = SingleObjectSerde(INVENTORY_MUTATION)
    data = serde.serialize(MUTATION)
    for cut in (11, len(data) // 2, len(data) - 1):
        with pytest.raises(SerdeError, match="cannot decode InventoryMutation"):
            serde.deserialize(data[:cut])
    with pytest.raises(SerdeError, match="trailing bytes"):
        serde.deserialize(data + b"\x00")


def test_single_object_record_of_another_known_schema_is_rejected() -> None:
    # A SellableInventory record where a mutation is expected cannot be resolved.
    record = {"count": 1, "on_hand": 1, "reserved": 0, "updated_at": 0}
    data = SingleObjectSerde(SELLABLE_INVENTORY).serialize(record)
    with pytest.raises(SerdeError):
        SingleObjectSerde(INVENTORY_MUTATION).deserialize(data)


def test_confluent_bad_bytes(registry: SchemaRegistryClient) -> None:
    serde = ConfluentSerde(INVENTORY_MUTATION, registry, "m-value")
    with pytest.raises(SerdeError, match="header truncated"):
        serde.deserialize(b"\x00\x00")
    with pytest.raises(SerdeError, match="magic byte 0xc3"):
        serde.deserialize(SingleObjectSerde(INVENTORY_MUTATION).serialize(MUTATION))
    with pytest.raises(SerdeError, match="unknown schema id 4242"):
        serde.deserialize(b"\x00" + (4242).to_bytes(4, "big") + b"\x02")
    data = serde.serialize(MUTATION)
    with pytest.raises(SerdeError, match="cannot decode"):
        serde.deserialize(data[:-3])


def test_serialize_rejects_records_that_do_not_fit() -> None:
    with pytest.raises(SerdeError, match="does not fit InventoryMutation"):
        SingleObjectSerde(INVENTORY_MUTATION).serialize({"count": 1})
    with pytest.raises(SerdeError):
        SingleObjectSerde(INVENTORY_MUTATION).serialize({**MUTATION, "count": 2**40})


@pytest.mark.parametrize("data", [b"", b"\x06ST", b"\x06STL\x0c123123\x00", b"\x01"])
def test_decode_key_bad_bytes(data: bytes) -> None:
    with pytest.raises(SerdeError):
        decode_key(data)


def test_position_round_trip_and_errors() -> None:
    from shared_schemas.positions import Position

    position = Position.parse("inventory_adjustments:2:41")
    assert position == Position("inventory_adjustments", 2, 41)
    assert Position.parse(str(position)) == position
    for bad in ("", "x", "t:1", "t:a:1", "t:1:b", ":1:2", "t:-1:2"):
        with pytest.raises(ValueError):
            Position.parse(bad)


def test_location_prefix_starts_every_key_of_the_location_only() -> None:
    from shared_schemas.serde import location_prefix

    prefix = location_prefix("STL")
    assert encode_key("STL", "123123").startswith(prefix)
    assert encode_key("STL", "").startswith(prefix)
    assert not encode_key("STLX", "1").startswith(prefix)
    assert not encode_key("ST", "L1").startswith(prefix)


def test_records_written_before_validate_existed_read_as_unvalidated() -> None:
    # The input topics keep every record forever: those written with the first
    # InventoryMutation schema must still decode, as mutations nobody asked to validate.
    v1 = {"mutation_id": str(uuid.uuid4()), "count": 10, "event_time": 1_700_000_000_000}
    written = SingleObjectSerde(INVENTORY_MUTATION_V1).serialize(v1)
    assert SingleObjectSerde(INVENTORY_MUTATION).deserialize(written) == {**v1, "validate": False}
    validated = SingleObjectSerde(INVENTORY_MUTATION).serialize({**v1, "validate": True})
    assert SingleObjectSerde(INVENTORY_MUTATION).deserialize(validated)["validate"] is True


def test_reservation_result_round_trips() -> None:
    result = {
        "mutation_id": str(uuid.uuid4()),
        "location": "STL",
        "sku": "123123",
        "count": 3,
        "status": "FAILED",
        "available": 2,
        "reason": "3 asked, 2 sellable",
        "reservation_offset": 41,
        "event_time": 1_700_000_000_000,
    }
    serde = SingleObjectSerde(RESERVATION_RESULT)
    assert serde.deserialize(serde.serialize(result)) == result
