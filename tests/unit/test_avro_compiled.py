"""The compiled Avro writer and reader against fastavro's: the same bytes, and the same values
read back, for any record of every released EmailEvent schema; the spec's varint vectors; errors
for values of the wrong type and for malformed bytes."""

from __future__ import annotations

import io
import json
from typing import Any

import pytest
from fastavro import parse_schema, schemaless_reader, schemaless_writer
from hypothesis import given, settings
from hypothesis import strategies as st

from schemas.avro_compiled import (
    UnsupportedSchema,
    compile_reader,
    compile_writer,
    zigzag_varint,
)
from schemas.email_event import schema_versions

LONGS = st.integers(min_value=-(2**63), max_value=2**63 - 1)
TEXT = st.text(alphabet=st.characters(exclude_categories=["Cs"]), max_size=80)


# Timestamps fastavro can turn into datetimes (years 1 to 9999) when reading back.
TIMESTAMPS = st.integers(min_value=-62_135_596_800_000, max_value=253_402_300_799_999)


def values_for(schema: Any, timestamps: bool = False) -> st.SearchStrategy[Any]:
    """Valid values of an Avro type (the subset the EmailEvent schemas use)."""
    if isinstance(schema, list):
        return st.one_of([values_for(branch, timestamps) for branch in schema])
    kind = schema if isinstance(schema, str) else schema["type"]
    if timestamps and isinstance(schema, dict) and schema.get("logicalType"):
        return TIMESTAMPS
    if isinstance(kind, dict | list):
        return values_for(kind, timestamps)
    strategies: dict[str, Any] = {
        "null": st.none(),
        "boolean": st.booleans(),
        "long": LONGS,
        "string": TEXT,
    }
    if kind in strategies:
        return strategies[kind]  # type: ignore[no-any-return]
    if kind == "array":
        return st.lists(values_for(schema["items"], timestamps), max_size=70)
    if kind == "map":
        return st.dictionaries(TEXT, values_for(schema["values"], timestamps), max_size=70)
    if kind == "record":
        return records_for(schema, timestamps)
    raise AssertionError(f"no strategy for {schema!r}")


def records_for(
    schema: dict[str, Any], timestamps: bool = False
) -> st.SearchStrategy[dict[str, Any]]:
    fields = schema["fields"]
    required = {f["name"]: values_for(f["type"], timestamps) for f in fields if "default" not in f}
    optional = {f["name"]: values_for(f["type"], timestamps) for f in fields if "default" in f}
    return st.fixed_dictionaries(required, optional=optional)


def fastavro_bytes(schema: dict[str, Any], record: dict[str, Any]) -> bytes:
    buffer = io.BytesIO()
    schemaless_writer(buffer, parse_schema(schema, named_schemas={}), record)
    return buffer.getvalue()


@pytest.mark.parametrize("version", [v.version for v in schema_versions()])
@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_compiled_writer_writes_what_fastavro_writes(version: int, data: st.DataObject) -> None:
    schema = json.loads(schema_versions()[version - 1].text)
    record = data.draw(records_for(schema))
    assert compile_writer(schema)(record) == fastavro_bytes(schema, record)


def test_absent_fields_take_their_defaults() -> None:
    schema = json.loads(schema_versions()[-1].text)
    assert compile_writer(schema)({}) == fastavro_bytes(schema, {})


@pytest.mark.parametrize(
    ("value", "encoded"),
    [
        (0, "00"),
        (-1, "01"),
        (1, "02"),
        (63, "7e"),
        (64, "8001"),
        (-64, "7f"),
        (-65, "8101"),
        (2**63 - 1, "feffffffffffffffff01"),
        (-(2**63), "ffffffffffffffffff01"),
    ],
)
def test_zigzag_varint_matches_the_spec(value: int, encoded: str) -> None:
    assert zigzag_varint(value).hex() == encoded


SCHEMA: dict[str, Any] = {
    "type": "record",
    "name": "R",
    "fields": [
        {"name": "s", "type": "string"},
        {"name": "n", "type": ["null", "long"], "default": None},
        {"name": "b", "type": "boolean", "default": False},
        {"name": "a", "type": {"type": "array", "items": "string"}, "default": []},
    ],
}


@pytest.mark.parametrize(
    ("record", "error"),
    [
        pytest.param({}, TypeError, id="missing-required"),
        pytest.param({"s": 5}, TypeError, id="int-for-string"),
        pytest.param({"s": "x", "n": "5"}, TypeError, id="string-for-long"),
        pytest.param({"s": "x", "n": True}, TypeError, id="bool-for-long"),
        pytest.param({"s": "x", "n": 2**63}, OverflowError, id="long-overflow"),
        pytest.param({"s": "x", "b": 1}, TypeError, id="int-for-boolean"),
        pytest.param({"s": "x", "a": [1]}, TypeError, id="int-in-string-array"),
        pytest.param({"s": "\ud800"}, UnicodeEncodeError, id="lone-surrogate"),
    ],
)
def test_wrong_values_raise(record: dict[str, Any], error: type[Exception]) -> None:
    with pytest.raises(error):
        compile_writer(SCHEMA)(record)


@pytest.mark.parametrize(
    "field_type",
    [
        {"type": "enum", "name": "E", "symbols": ["A"]},
        {"type": "fixed", "name": "F", "size": 2},
        ["null", "string", "long"],
        "double",
        {"type": "int", "logicalType": "date"},
    ],
    ids=["enum", "fixed", "three-branch-union", "double", "date"],
)
def test_unsupported_types_are_refused_at_compile_time(field_type: Any) -> None:
    schema = {"type": "record", "name": "U", "fields": [{"name": "x", "type": field_type}]}
    with pytest.raises(UnsupportedSchema):
        compile_writer(schema)


# --- the reader --------------------------------------------------------------------------------


def fastavro_record(schema: dict[str, Any], data: bytes) -> Any:
    return schemaless_reader(io.BytesIO(data), parse_schema(schema, named_schemas={}), None)


@pytest.mark.parametrize("version", [v.version for v in schema_versions()])
@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_compiled_reader_reads_what_fastavro_reads(version: int, data: st.DataObject) -> None:
    schema = json.loads(schema_versions()[version - 1].text)
    record = data.draw(records_for(schema, timestamps=True))
    encoded = fastavro_bytes(schema, record)
    assert compile_reader(schema)(encoded) == fastavro_record(schema, encoded)


def test_compiled_reader_reads_blocks_with_a_byte_size() -> None:
    # Other writers may write array and map blocks with a negative count and a byte size.
    schema = {
        "type": "record",
        "name": "B",
        "fields": [
            {"name": "a", "type": {"type": "array", "items": "string"}},
            {"name": "m", "type": {"type": "map", "values": "long"}},
        ],
    }
    # a: one block of -2 items (4 bytes) "x", "y", then 0; m: one block of 1 pair, then 0.
    data = bytes.fromhex("0308027802790002026b0600")
    assert compile_reader(schema)(data) == {"a": ["x", "y"], "m": {"k": 3}}


@pytest.mark.parametrize(
    ("data", "error"),
    [
        pytest.param(b"", IndexError, id="empty"),
        pytest.param(b"\x08ab", EOFError, id="string-cut"),
        pytest.param(b"\x02a\x04", ValueError, id="bad-union-branch"),
        pytest.param(b"\x02a\x02", IndexError, id="long-cut"),
        pytest.param(b"\x02a\x00\x05", ValueError, id="bad-boolean"),
        pytest.param(b"\x02\xff", UnicodeDecodeError, id="not-utf8"),
        pytest.param(b"\x02a\x02" + b"\xff" * 11, ValueError, id="long-too-long"),
    ],
)
def test_compiled_reader_refuses_malformed_bytes(data: bytes, error: type[Exception]) -> None:
    with pytest.raises(error):
        compile_reader(SCHEMA)(data)


def test_reader_refuses_unsupported_types() -> None:
    schema = {"type": "record", "name": "U", "fields": [{"name": "x", "type": "float"}]}
    with pytest.raises(UnsupportedSchema):
        compile_reader(schema)
