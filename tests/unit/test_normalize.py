"""Golden tests of the typed event: one realistic SendGrid payload per event type and per known
quirk (``tests/fixtures/events``) against its expected typed record (``tests/fixtures/typed``),
every row of the coercion table in ``docs/event-contract.md``, the generated event id, and
hypothesis properties of the normalizer."""

from __future__ import annotations

import base64
import hashlib
import json
import re
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from processors.normalize import (
    RESERVED_FIELDS,
    BatchContext,
    generated_event_id,
    normalize_event,
)
from processors.pipeline import process_raw_record
from schemas.email_event import EmailEventCodec
from schemas.event_fields import EVENT_FIELDS, FIELD_NAMES, RecordType
from schemas.raw_batch import RawBatch, raw_batch_headers
from sgpipe.runtime.messages import Message
from tests.golden import (
    EVENT_FIXTURES,
    RECEIVED_AT_MS,
    REQUEST_ID,
    ROOT,
    TYPED_FIXTURES,
    WEBHOOK,
    expected_record,
    fixture_names,
    json_form,
    payload,
)

CONTRACT_DOC = ROOT / "docs" / "event-contract.md"
CODEC = EmailEventCodec()
CONTEXT = BatchContext(webhook=WEBHOOK, received_at_ms=RECEIVED_AT_MS, request_id=REQUEST_ID)

DOCUMENTED_EVENT_TYPES = {
    "processed", "dropped", "delivered", "deferred", "bounce", "open", "click", "spamreport",
    "unsubscribe", "group_unsubscribe", "group_resubscribe", "account_status_change",
}  # fmt: skip
# Every field ../shared/docs/sendgrid-event-webhook.md lists ("Event types and fields").
DOCUMENTED_SENDGRID_KEYS = {
    "email", "timestamp", "event", "sg_event_id", "sg_message_id", "smtp-id", "category",
    "sg_template_id", "sg_template_name", "marketing_campaign_id", "marketing_campaign_name",
    "asm_group_id", "pool", "ip", "tls", "cert_err", "useragent", "url", "url_offset", "reason",
    "status", "response", "attempt", "type", "bounce_classification", "sg_machine_open",
    "marketing_campaign_version", "marketing_campaign_split_id", "singlesend_id",
    "singlesend_name", "send_at", "phase_id", "mc_stats", "post_type", "sg_user_id",
    "sg_content_type", "domain", "from", "reseller_id",
}  # fmt: skip


def typed_through_the_pipeline(element: bytes) -> dict[str, Any]:
    """``element`` posted alone, processed, encoded to Avro and decoded again."""
    body = b"[" + element + b"]\r\n"
    batch = RawBatch(WEBHOOK, body, RECEIVED_AT_MS, REQUEST_ID, None, "signature")
    message = Message("raw", 0, 0, 0, None, body, raw_batch_headers(batch))
    result = process_raw_record(message, CODEC)
    assert result.rejections == []
    (encoded,) = result.events
    record = CODEC.decode(encoded.value)
    assert (encoded.sg_event_id, encoded.event) == (record["sg_event_id"], record["event"])
    assert encoded.coercion_errors == tuple(record["coercion_errors"])
    return record


# --- golden fixtures: every event type and every known quirk ---------------------------------


def test_every_payload_fixture_has_its_typed_record() -> None:
    assert fixture_names() == sorted(path.stem for path in TYPED_FIXTURES.glob("*.json"))


def test_fixtures_cover_every_documented_event_type_and_field() -> None:
    items = [json.loads((EVENT_FIXTURES / f"{name}.json").read_bytes()) for name in fixture_names()]
    assert {item.get("event") for item in items} >= DOCUMENTED_EVENT_TYPES
    assert {key for item in items for key in item} >= DOCUMENTED_SENDGRID_KEYS


def test_every_documented_sendgrid_field_has_a_typed_column() -> None:
    assert set(RESERVED_FIELDS) == DOCUMENTED_SENDGRID_KEYS


@pytest.mark.parametrize("name", fixture_names())
def test_payload_becomes_its_golden_typed_record(name: str) -> None:
    record = json_form(typed_through_the_pipeline(payload(name)))

    assert record == expected_record(name)
    assert record["received_at"] == "2023-11-14T22:15:00.000Z"
    assert list(record) == list(FIELD_NAMES)


# --- the coercion table, row by row ----------------------------------------------------------

BASE_EVENT = {"event": "delivered", "sg_event_id": "id-1", "timestamp": 1700000000}
_ROW = re.compile(r"^\| ([a-z ]+) \| `(.+)` \| `(\w+)` \| `(.+)` \| (no|yes|`[\w.]+`) \|$")


def coercion_rows() -> list[tuple[str, dict[str, Any], str, Any, list[str]]]:
    text = CONTRACT_DOC.read_text("utf-8")
    table = text.split("<!-- coercion-table:start -->")[1].split("<!-- coercion-table:end -->")[0]
    rows = []
    for line in table.strip().splitlines()[2:]:
        match = _ROW.match(line)
        assert match is not None, f"unparsable coercion row: {line}"
        kind, sent, column, typed, error = match.groups()
        errors = [] if error == "no" else [column] if error == "yes" else [error.strip("`")]
        rows.append((kind, json.loads(sent), column, json.loads(typed), errors))
    return rows


def test_coercion_table_covers_every_logical_type() -> None:
    kinds = {row[0] for row in coercion_rows()}
    assert kinds == {
        "text", "integer", "flag", "boolean", "timestamp", "text list", "record", "custom",
    }  # fmt: skip
    assert len(coercion_rows()) >= 60


@pytest.mark.parametrize(
    ("kind", "sent", "column", "typed", "errors"),
    coercion_rows(),
    ids=[f"{row[0]}:{json.dumps(row[1])[:60]}" for row in coercion_rows()],
)
def test_coercion_rule(
    kind: str, sent: dict[str, Any], column: str, typed: Any, errors: list[str]
) -> None:
    element = json.dumps({**BASE_EVENT, **sent}, ensure_ascii=False).encode()

    record = json_form(typed_through_the_pipeline(element))

    assert record[column] == typed
    assert record["coercion_errors"] == errors
    # Nothing typed ever leaks into custom_args, and raw keeps the value as sent.
    assert not set(record["custom_args"]) & RESERVED_FIELDS
    assert record["raw"] == element.decode()


# --- identity: the generated sg_event_id and the Kafka key -----------------------------------


def test_generated_id_is_the_sha256_of_the_canonical_json() -> None:
    item = {"event": "open", "timestamp": 1700000000, "email": "a@example.com", "n": [2, 1]}
    canonical = json.dumps(item, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    digest = base64.urlsafe_b64encode(hashlib.sha256(canonical.encode()).digest()).rstrip(b"=")
    assert generated_event_id(item) == "sgpipe-" + digest.decode()


def test_generated_id_ignores_key_order_and_spacing_but_not_content() -> None:
    first = typed_through_the_pipeline(b'{"event":"open","timestamp":1700000000,"email":"a@b.c"}')
    again = typed_through_the_pipeline(
        b'{ "email" : "a@b.c",\r\n "timestamp": 1700000000, "event": "open" }'
    )
    other = typed_through_the_pipeline(b'{"event":"open","timestamp":1700000001,"email":"a@b.c"}')
    assert first["sg_event_id"] == again["sg_event_id"] != other["sg_event_id"]
    assert first["sg_event_id_generated"] and other["sg_event_id_generated"]
    assert first["coercion_errors"] == []


@pytest.mark.parametrize(
    ("sg_event_id", "generated", "errors"),
    [
        pytest.param("", True, [], id="empty"),
        pytest.param("   ", True, [], id="blank"),
        pytest.param(None, True, [], id="null"),
        pytest.param(12345, False, [], id="number-as-text"),
        pytest.param({"id": "x"}, True, ["sg_event_id"], id="object"),
        pytest.param(True, True, ["sg_event_id"], id="boolean"),
    ],
)
def test_unusable_sg_event_id_is_generated(
    sg_event_id: Any, generated: bool, errors: list[str]
) -> None:
    item = {"event": "open", "timestamp": 1700000000, "sg_event_id": sg_event_id}
    normalized = normalize_event(item, json.dumps(item), CONTEXT)
    record = normalized.record
    assert record.get("sg_event_id_generated", False) is generated
    assert normalized.coercion_errors == tuple(errors)
    if generated:
        assert normalized.sg_event_id == generated_event_id(item)
    else:
        assert normalized.sg_event_id == "12345"


@pytest.mark.parametrize(
    ("item", "key"),
    [
        pytest.param({"sg_event_id": "e", "sg_message_id": " m.filter "}, "m.filter", id="message"),
        pytest.param({"sg_event_id": "e"}, "e", id="no-message-id"),
        pytest.param({"sg_event_id": "e", "sg_message_id": ""}, "e", id="empty-message-id"),
    ],
)
def test_kafka_key_is_the_message_id_else_the_event_id(item: dict[str, Any], key: str) -> None:
    assert normalize_event(item, "{}", CONTEXT).key == key


def test_unknown_event_type_keeps_its_fields_in_custom_args() -> None:
    item = {"event": "ai_summary_read", "sg_event_id": "x", "timestamp": 1, "seconds": 12.5}
    record = normalize_event(item, "{}", CONTEXT).record
    assert (record["event"], record["custom_args"]) == ("ai_summary_read", {"seconds": "12.5"})


# --- properties ------------------------------------------------------------------------------

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12)
)
json_values = st.recursive(
    json_scalars,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=8,
)
json_keys = st.text(max_size=6) | st.sampled_from(sorted(RESERVED_FIELDS))
arbitrary_objects = st.dictionaries(json_keys, json_values, max_size=8)
record_members = st.fixed_dictionaries(
    {}, optional={"index": json_values, "type": json_values, "name": json_values, "id": json_values}
)
likely_events = st.builds(
    lambda known, extra: {**extra, **known},
    st.fixed_dictionaries(
        {},
        optional={
            "event": st.sampled_from(sorted(DOCUMENTED_EVENT_TYPES)) | json_scalars,
            "sg_event_id": st.text(max_size=110) | json_scalars,
            "timestamp": st.integers(0, 2 * 10**12) | st.integers(0, 10**10).map(str) | json_values,
            "attempt": st.integers(-5, 2**40).map(str) | json_values,
            "tls": st.sampled_from([0, 1, "0", "1", True, False, 2, "x"]),
            "url_offset": record_members | json_values,
            "pool": record_members | json_values,
            "sg_machine_open": st.sampled_from([True, False, 0, 1, "true", "no"]),
            "category": st.text(max_size=10) | st.lists(json_values, max_size=4) | json_values,
        },
    ),
    arbitrary_objects,
)
MEMBER_NAMES = {
    f"{f.name}.{member.name}"
    for f in EVENT_FIELDS
    if isinstance(f.type, RecordType)
    for member in f.type.members
}


@settings(max_examples=300, deadline=None)
@given(st.one_of(arbitrary_objects, likely_events))
def test_any_json_object_becomes_one_encodable_record(item: dict[str, Any]) -> None:
    normalized = normalize_event(item, json.dumps(item), CONTEXT)

    decoded = CODEC.decode(CODEC.encode(normalized.record))
    assert list(decoded) == list(FIELD_NAMES)
    assert decoded["sg_event_id"] == normalized.sg_event_id != ""
    given_id = item.get("sg_event_id")
    usable_id = (isinstance(given_id, str) and given_id.strip() != "") or (
        isinstance(given_id, int | float) and not isinstance(given_id, bool)
    )
    assert decoded["sg_event_id_generated"] is not usable_id
    assert set(decoded["custom_args"]) == set(item) - RESERVED_FIELDS
    assert all(isinstance(value, str) for value in decoded["custom_args"].values())
    # Metric labels stay bounded: only field and member names, each at most once.
    assert set(decoded["coercion_errors"]) <= set(FIELD_NAMES) | MEMBER_NAMES
    assert len(set(decoded["coercion_errors"])) == len(decoded["coercion_errors"])
    assert ("event" in decoded["coercion_errors"]) is (decoded["event"] == "")
    assert 0 <= decoded["event_time"].timestamp() * 1000 <= 10_413_791_999_999
    assert decoded["raw"] == json.dumps(item)
