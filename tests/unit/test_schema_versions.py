"""Schema evolution and the two wire formats of the events topic.

- Every released version is readable by the current one, and the current one is backward
  compatible with the previous (Avro's own compatibility checker, then real bytes).
- Records written by the foundation's encoder (``tests/fixtures/avro``, captured from commit
  12ff45a) decode with the current codec, new fields at their defaults.
- The Confluent framing is read by confluent-kafka's own ``AvroDeserializer`` (with its
  ``mock://`` registry, the library's test double), and ours reads its ``AvroSerializer``.
"""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path
from typing import Any

import avro.compatibility
import avro.schema
import pytest
from confluent_kafka.schema_registry import Schema, SchemaRegistryClient
from confluent_kafka.schema_registry.avro import AvroDeserializer, AvroSerializer
from confluent_kafka.serialization import MessageField, SerializationContext
from fastavro import schemaless_reader

from schemas.email_event import (
    CONFLUENT_MAGIC,
    SINGLE_OBJECT_MAGIC,
    EmailEventCodec,
    SerializationError,
    UnknownWriterSchema,
    current_schema,
    schema_versions,
)
from schemas.event_fields import EVENT_FIELDS

ROOT = Path(__file__).resolve().parents[2]
FOUNDATION_RECORDS = ROOT / "tests" / "fixtures" / "avro" / "v1_records_from_foundation.json"
CODEC = EmailEventCodec()
DEFAULTS = {f.name: f.default for f in EVENT_FIELDS}
V2_FIELDS = [f.name for f in EVENT_FIELDS if f.since == 2]
TOPIC = "sgpipe.events"


def compatibility(reader_text: str, writer_text: str) -> Any:
    checker = avro.compatibility.ReaderWriterCompatibilityChecker()  # type: ignore[no-untyped-call]
    return checker.get_compatibility(avro.schema.parse(reader_text), avro.schema.parse(writer_text))


def is_compatible(reader_text: str, writer_text: str) -> bool:
    result = compatibility(reader_text, writer_text)
    return bool(result.compatibility is avro.compatibility.SchemaCompatibilityType.compatible)


@pytest.mark.parametrize("version", [v.version for v in schema_versions()])
def test_every_version_is_readable_by_the_current_one(version: int) -> None:
    writer = schema_versions()[version - 1]
    assert is_compatible(current_schema().text, writer.text)


def test_current_is_backward_compatible_with_the_previous() -> None:
    *_, previous, current = schema_versions()
    assert is_compatible(current.text, previous.text)


def test_the_checker_catches_an_incompatible_change() -> None:
    # The guard above must be able to fail: a field's type changed without a promotion path.
    document = json.loads(current_schema().text)
    for field in document["fields"]:
        if field["name"] == "attempt":
            field["type"], field["default"] = "boolean", False
    assert not is_compatible(json.dumps(document), current_schema().text)
    document = json.loads(current_schema().text)
    document["fields"].append({"name": "added_without_default", "type": "string"})
    assert not is_compatible(json.dumps(document), current_schema().text)


def foundation_records() -> list[dict[str, Any]]:
    records: list[dict[str, Any]] = json.loads(FOUNDATION_RECORDS.read_text())["records"]
    return records


def test_foundation_fixture_was_written_with_v1() -> None:
    document = json.loads(FOUNDATION_RECORDS.read_text())
    assert document["fingerprint"] == schema_versions()[0].fingerprint.hex()
    assert len(document["records"]) >= 12


@pytest.mark.parametrize("entry", foundation_records(), ids=lambda entry: entry["fixture"])
def test_records_written_by_the_foundation_decode_with_the_current_codec(
    entry: dict[str, Any],
) -> None:
    payload = base64.b64decode(entry["value"])
    v1 = schema_versions()[0]
    assert payload[:10] == SINGLE_OBJECT_MAGIC + v1.fingerprint
    as_written = schemaless_reader(io.BytesIO(payload[10:]), v1.schema, None)
    assert isinstance(as_written, dict)

    record = CODEC.decode(payload)

    assert {name: record[name] for name in as_written} == as_written
    assert {name: record[name] for name in V2_FIELDS} == {
        name: DEFAULTS[name] for name in V2_FIELDS
    }
    assert record["webhook"] == "main" and record["request_id"] == "req-v1"


def test_current_records_are_readable_by_a_v1_reader_too() -> None:
    # Not promised (upgrade consumers first), but true of v2: it only added fields.
    payload = CODEC.encode({"event": "open", "sg_event_id": "e", "raw": "{}", "attempt": 3})
    v1 = schema_versions()[0]
    record = schemaless_reader(io.BytesIO(payload[10:]), CODEC.current.schema, v1.schema)
    assert isinstance(record, dict)
    assert (record["event"], record["sg_event_id"]) == ("open", "e")
    assert "attempt" not in record


# --- Confluent wire format -------------------------------------------------------------------

SAMPLE: dict[str, Any] = {
    "webhook": "main",
    "event": "click",
    "sg_event_id": "c1",
    "event_time": 1_700_000_000_000,
    "email": "a@example.com",
    "request_id": "r",
    "raw": '{"event":"click"}',
    "url_offset": {"index": 2, "type": "html"},
    "tls": 1,
    "coercion_errors": ["attempt"],
    "from": "sender@example.com",
}


def registry() -> SchemaRegistryClient:
    return SchemaRegistryClient.new_client({"url": "mock://sgpipe-test"})


def test_confluent_framing_is_read_by_confluents_own_deserializer() -> None:
    client = registry()
    schema_id = client.register_schema(f"{TOPIC}-value", Schema(current_schema().text, "AVRO"))
    codec = EmailEventCodec(confluent_schema_id=schema_id)

    payload = codec.encode(SAMPLE)

    assert payload[:1] == CONFLUENT_MAGIC
    assert payload[1:5] == schema_id.to_bytes(4, "big")
    deserializer = AvroDeserializer(client)
    theirs = deserializer(payload, SerializationContext(TOPIC, MessageField.VALUE))
    assert theirs == codec.decode(payload)
    assert theirs["url_offset"] == {"index": 2, "type": "html"}
    assert theirs["from"] == "sender@example.com"
    # The same record in single-object framing differs only in the prefix.
    assert CODEC.encode(SAMPLE)[10:] == payload[5:]


def test_confluents_serializer_output_is_read_by_our_decoder() -> None:
    client = registry()
    serializer = AvroSerializer(client, current_schema().text, conf={"auto.register.schemas": True})
    full = {**DEFAULTS, **SAMPLE, "received_at": 1_700_000_001_000}
    payload = serializer(full, SerializationContext(TOPIC, MessageField.VALUE))
    assert payload is not None
    codec = EmailEventCodec()

    schema_id = int.from_bytes(payload[1:5], "big")
    assert codec.unknown_schema_ids([payload, None, b"\xc3\x01"]) == {schema_id}
    with pytest.raises(UnknownWriterSchema) as caught:
        codec.decode(payload)
    assert caught.value.schema_id == schema_id
    schema_text = client.get_schema(schema_id).schema_str
    assert schema_text is not None
    codec.add_registry_schema(schema_id, schema_text)

    assert codec.unknown_schema_ids([payload]) == set()
    assert codec.decode(payload) == CODEC.decode(CODEC.encode(full))


def test_a_registry_schema_equal_to_a_release_reuses_it() -> None:
    codec = EmailEventCodec()
    v1 = schema_versions()[0]
    # The registry may hand back the schema reformatted: same canonical form, same version.
    codec.add_registry_schema(7, json.dumps(json.loads(v1.text), indent=4))
    foundation = base64.b64decode(foundation_records()[0]["value"])
    assert codec.decode(b"\x00" + (7).to_bytes(4, "big") + foundation[10:]) == CODEC.decode(
        foundation
    )


def test_a_registry_schema_that_is_not_avro_is_refused() -> None:
    with pytest.raises(SerializationError, match="not Avro"):
        EmailEventCodec().add_registry_schema(3, "{not json")
