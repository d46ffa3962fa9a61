"""The sink's rows without decoding: a record the scan vouches for goes to ClickHouse as its
Avro body, anything else is decoded as before. Whatever the bytes, the outcome must be the one
decoding gives (``EmailEventCodec.decode`` then ``out_of_range``): the same row, or the same
rejection with the same detail; and a body the scan passes must read back as that row."""

from __future__ import annotations

import asyncio
import base64
import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from schemas.avro_compiled import NotScanned, compile_reader
from schemas.email_event import (
    SINGLE_OBJECT_MAGIC,
    EmailEventCodec,
    SerializationError,
    UnknownWriterSchema,
    current_schema,
    schema_versions,
)
from sinks.row_binary import RowBinaryBody
from sinks.rows import (
    EventRows,
    UnwritableEvent,
    _scan_current,
    out_of_range,
    row_binary_body,
)
from tests.unit.test_avro_compiled import records_for

CODEC = EmailEventCodec()
ROWS = EventRows(CODEC)
SCHEMA = json.loads(current_schema().text)
READ = compile_reader(SCHEMA)
PREFIX = SINGLE_OBJECT_MAGIC + CODEC.fingerprint
FOUNDATION = Path(__file__).parents[1] / "fixtures/avro/v1_records_from_foundation.json"
EXAMPLES = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Records of the current schema with timestamps the decoder can represent.
RECORDS = records_for(SCHEMA, timestamps=True)


def decoded_outcome(payload: bytes) -> tuple[str, Any]:
    """What the sink made of a payload before: the decoded record, or the rejection."""
    try:
        record = CODEC.decode(payload)
    except (SerializationError, UnknownWriterSchema) as exc:
        return type(exc).__name__, str(exc)
    problem = out_of_range(record)
    if problem is not None:
        return "UnwritableEvent", problem
    return "row", record


def row_outcome(payload: bytes) -> tuple[str, Any]:
    try:
        row = ROWS.row(payload)
    except (SerializationError, UnknownWriterSchema, UnwritableEvent) as exc:
        return type(exc).__name__, str(exc)
    # What ClickHouse is sent must be the record decoding gives.
    assert READ(row.body) == dict(row)
    return "row", dict(row)


@EXAMPLES
@given(record=RECORDS)
def test_an_encoded_record_is_its_own_body_or_the_rejection_decoding_gives(
    record: dict[str, Any],
) -> None:
    payload = CODEC.encode(record)
    assert row_outcome(payload) == decoded_outcome(payload)
    if out_of_range(CODEC.decode(payload)) is None:
        # Canonical bytes of the current schema: taken as they are, never decoded.
        row = ROWS.row(payload)
        assert row.body == payload[len(PREFIX) :]
        assert row._record is None


@EXAMPLES
@given(
    record=RECORDS,
    cut=st.integers(0, 2_000),
    replace=st.binary(max_size=12),
    trailing=st.binary(max_size=4),
)
@example(record={"category": ["a"]}, cut=10, replace=b"\x03", trailing=b"")  # odd length byte
def test_whatever_the_bytes_the_outcome_is_the_one_decoding_gives(
    record: dict[str, Any], cut: int, replace: bytes, trailing: bytes
) -> None:
    payload = CODEC.encode(record)
    cut = min(cut, len(payload))
    damaged = payload[:cut] + replace + payload[cut + len(replace) :] + trailing
    assert row_outcome(damaged) == decoded_outcome(damaged)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("attempt", 2**32),
        ("asm_group_id", -1),
        ("tls", 7),
        ("pool", {"name": "p", "id": -5}),
        ("url_offset", {"index": 2**32, "type": None}),
        ("send_at", -(2**63)),
    ],
)
def test_integers_out_of_their_columns_range_are_unwritable_with_the_same_detail(
    field: str, value: Any
) -> None:
    payload = CODEC.encode({"sg_event_id": "e", field: value})
    assert row_outcome(payload) == decoded_outcome(payload)


def test_the_scan_declines_what_only_decoding_can_settle() -> None:
    body = CODEC.encode({"custom_args": {"k": "v"}})[len(PREFIX) :]
    _scan_current(body, 0)
    for why, damaged in [
        ("duplicate map key", CODEC.encode({"custom_args": {"k": "v", "j": "w"}}).replace(
            b"\x02j", b"\x02k")),
        ("not UTF-8", CODEC.encode({"webhook": "é"}).replace("é".encode(), b"\xc3\x28")),
        ("negative length", PREFIX + b"\x03x" + body[1:]),
    ]:  # fmt: skip
        with pytest.raises((NotScanned, ValueError)):
            _scan_current(damaged, len(PREFIX))
        assert row_outcome(damaged) == decoded_outcome(damaged), why


def test_a_record_of_an_older_version_is_decoded_and_re_encoded_in_the_current_one() -> None:
    foundation = json.loads(FOUNDATION.read_text())["records"]
    payloads = [base64.b64decode(record["value"]) for record in foundation]
    assert payloads and all(p[2:10] == schema_versions()[0].fingerprint for p in payloads)
    for payload in payloads:
        row = ROWS.row(payload)
        assert row._record is not None  # decoded, not scanned
        assert dict(row) == CODEC.decode(payload)
        assert READ(row.body) == CODEC.decode(payload)


def test_an_insert_body_is_the_same_every_time_it_is_sent() -> None:
    # Mutation caught: a body that is a single generator (a resend by the HTTP client would
    # send what is left of it: no rows, and the insert would succeed empty).
    rows = [ROWS.row(CODEC.encode({"sg_event_id": f"e{n}"})) for n in range(5)]
    body = row_binary_body(rows, chunk_rows=2)
    first = asyncio.run(sent(body))
    assert first and asyncio.run(sent(body)) == first
    # Decoded records (as tests and tools pass them) make the same body as their rows.
    assert asyncio.run(sent(row_binary_body([dict(row) for row in rows]))) == first


async def sent(body: RowBinaryBody) -> bytes:
    return b"".join([chunk async for chunk in body])
