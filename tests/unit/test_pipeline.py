"""process_raw_record end to end on bytes (element isolation, exact raw), the dead-letter
contract, the dedup window and the EmailEvent single-object codec."""

from __future__ import annotations

import dataclasses
import json
import math
from collections import Counter
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from fastavro import parse_schema
from fastavro.schema import fingerprint, to_parsing_canonical_form
from hypothesis import given, settings
from hypothesis import strategies as st

from processors.dedup import RecentEventIds
from processors.pipeline import DEFAULT_MAX_RECORD_BYTES, EncodedEvent, process_raw_record
from processors.split import scan_elements
from schemas.dead_letter import (
    DETAIL_HEADER,
    EVENT_INDEX_HEADER,
    ORIGINAL_OFFSET_HEADER,
    ORIGINAL_PARTITION_HEADER,
    ORIGINAL_TOPIC_HEADER,
    REASON_HEADER,
    STAGE_HEADER,
    DeadLetter,
    dead_letter_headers,
)
from schemas.email_event import (
    EmailEventCodec,
    EmailEventRecord,
    SerializationError,
    UnknownWriterSchema,
    current_schema,
    schema_versions,
)
from schemas.raw_batch import FORMAT_HEADER, RawBatch, raw_batch_headers
from sgpipe.runtime.dead_letters import build_dead_letter
from sgpipe.runtime.messages import Message
from tests.sendgrid_vector import BODY as VECTOR_BODY

CODEC = EmailEventCodec()


def schema_versions_v1_text() -> str:
    return schema_versions()[0].text


@dataclasses.dataclass
class Outcome:
    """What the processor stage makes of one raw record: events, and the dead letters the
    runtime builds from its rejections."""

    events: list[EncodedEvent]
    dead_letters: list[DeadLetter]
    coercion_errors: Counter[str] = dataclasses.field(default_factory=Counter)


def run_pipeline(
    value: bytes | None,
    headers: list[tuple[str, bytes]],
    max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES,
) -> Outcome:
    message = Message(
        "sgpipe.raw", 3, 42, 1_700_000_010_500, key=None, value=value, headers=headers
    )
    processed = process_raw_record(message, CODEC, max_record_bytes)
    letters = [
        build_dead_letter(message, rejection, stage="process", max_payload_bytes=max_record_bytes)
        for rejection in processed.rejections
    ]
    return Outcome(processed.events, letters, processed.coercion_errors)


RECEIVED_AT_MS = 1_700_000_010_000


def raw_batch(body: bytes, request_id: str = "req-1") -> RawBatch:
    return RawBatch(
        webhook="main",
        body=body,
        received_at_ms=RECEIVED_AT_MS,
        request_id=request_id,
        signature_timestamp=1_700_000_009,
        authenticated_by="signature",
        content_type="application/json;charset=utf-8",
    )


def sendgrid_body(items: list[Any]) -> bytes:
    """A body the way SendGrid writes it: ``\\r\\n`` between events and at the end."""
    return ("[" + ",\r\n".join(json.dumps(item) for item in items) + "]\r\n").encode()


def process(body: bytes) -> tuple[Outcome, list[tuple[str, bytes]]]:
    headers = raw_batch_headers(raw_batch(body))
    return run_pipeline(body, headers), headers


V1_FIELDS = [field["name"] for field in json.loads(schema_versions_v1_text())["fields"]]


def at_ms(milliseconds: int) -> datetime:
    return datetime(1970, 1, 1, tzinfo=UTC) + timedelta(milliseconds=milliseconds)


EVENTS: list[dict[str, Any]] = [
    {"email": "a@example.com", "event": "processed", "sg_event_id": "ev-1", "timestamp": 1700000000,
     "smtp-id": "<a@ismtpd-1>", "sg_message_id": "m1.filter-1", "category": ["welcome"]},
    {"email": "a@example.com", "event": "delivered", "sg_event_id": "ev-2",
     "timestamp": "1700000001", "response": "250 OK", "plan": "pro"},
    {"email": "b@example.com", "event": "open", "sg_event_id": "ev-3", "timestamp": 1700000002123,
     "sg_machine_open": True, "category": "newsletter", "user_id": 7},
]  # fmt: skip


# --- valid batches ---------------------------------------------------------------------------


def test_valid_batch_yields_one_encoded_event_per_item() -> None:
    result, _ = process(sendgrid_body(EVENTS))

    assert result.dead_letters == []
    assert [(e.sg_event_id, e.event) for e in result.events] == [
        ("ev-1", "processed"),
        ("ev-2", "delivered"),
        ("ev-3", "open"),
    ]
    decoded = [CODEC.decode(e.value) for e in result.events]
    assert {name: decoded[0][name] for name in V1_FIELDS} == {
        "webhook": "main",
        "event": "processed",
        "sg_event_id": "ev-1",
        "event_time": at_ms(1_700_000_000_000),
        "email": "a@example.com",
        "sg_message_id": "m1.filter-1",
        "smtp_id": "<a@ismtpd-1>",
        "category": ["welcome"],
        "custom_args": {},
        "received_at": at_ms(RECEIVED_AT_MS),
        "request_id": "req-1",
        # Exactly the element's bytes, as json.dumps wrote them (", " and ": " included).
        "raw": json.dumps(EVENTS[0]),
    }
    assert decoded[1]["response"] == "250 OK"
    assert decoded[2]["sg_machine_open"] is True
    assert decoded[1]["event_time"] == at_ms(1_700_000_001_000)
    assert decoded[1]["custom_args"] == {"plan": "pro"}
    assert decoded[1]["sg_message_id"] is None
    assert decoded[2]["event_time"] == at_ms(1_700_000_002_123)
    assert decoded[2]["category"] == ["newsletter"]
    assert decoded[2]["custom_args"] == {"user_id": "7"}
    assert [record["raw"] for record in decoded] == [json.dumps(item) for item in EVENTS]
    # Keyed by message id when there is one, so a message's events share a partition.
    assert [e.key for e in result.events] == [b"m1.filter-1", b"ev-2", b"ev-3"]


def test_official_vector_body_is_processed() -> None:
    result, _ = process(VECTOR_BODY)

    assert result.dead_letters == []
    assert result.events == [
        EncodedEvent(
            "ZHJvcC0xMDk5NDkxOS1MUnpYbF9OSFN0T0doUTRrb2ZTbV9BLTA",
            "dropped",
            result.events[0].value,
            b"LRzXl_NHStOGhQ4kofSm_A.filterdrecv-p3mdw1-756b745b58-kmzbl-18-5F5FC76C-9.0",
        )
    ]
    record = CODEC.decode(result.events[0].value)
    assert record["email"] == "hello@world.com"
    assert record["event_time"] == datetime(2020, 9, 14, 19, 41, 32, tzinfo=UTC)
    assert record["smtp_id"] == "<LRzXl_NHStOGhQ4kofSm_A@ismtpd0039p1iad1.sendgrid.net>"
    assert record["custom_args"] == {}
    assert record["raw"].encode() == VECTOR_BODY[1:-3]


def test_empty_array_yields_nothing() -> None:
    result, _ = process(b"[]\r\n")
    assert result == Outcome(events=[], dead_letters=[])


def test_duplicate_events_in_one_batch_are_both_kept() -> None:
    # Dedup is a separate (filter) step; the pure map keeps everything it was given.
    result, _ = process(sendgrid_body([EVENTS[0], EVENTS[0]]))
    assert [e.sg_event_id for e in result.events] == ["ev-1", "ev-1"]
    assert result.events[0].value == result.events[1].value


# --- invalid events in a batch ---------------------------------------------------------------


def test_mixed_batch_keeps_every_object_and_dead_letters_only_the_others() -> None:
    items: list[Any] = [
        EVENTS[0],
        "not an event",
        {"event": "open", "timestamp": 1700000000},  # no sg_event_id: kept, id generated
        EVENTS[1],
        {"event": "click", "sg_event_id": "ev-5", "timestamp": True},  # kept, flagged
        {"event": "bounce", "sg_event_id": "ev-6", "timestamp": 1700000000, "email": {"a": 1}},
        5,
        None,
    ]
    result, headers = process(sendgrid_body(items))

    assert [e.event for e in result.events] == ["processed", "open", "delivered", "click", "bounce"]
    assert result.events[1].sg_event_id.startswith("sgpipe-")
    assert [e.coercion_errors for e in result.events] == [(), (), (), ("event_time",), ("email",)]
    assert result.coercion_errors == {"event_time": 1, "email": 1}
    assert [(d.event_index, d.reason) for d in result.dead_letters] == [
        (1, "not_an_object"),
        (6, "not_an_object"),
        (7, "not_an_object"),
    ]
    for letter in result.dead_letters:
        assert letter.stage == "process"
        assert (letter.original_topic, letter.original_partition, letter.original_offset) == (
            "sgpipe.raw",
            3,
            42,
        )
        assert list(letter.context_headers) == headers
        assert letter.payload == json.dumps(items[letter.event_index or 0]).encode()
        assert letter.detail
    assert result.dead_letters[0].payload == b'"not an event"'
    assert result.dead_letters[2].detail == "events are JSON objects; got null"


PATHOLOGICAL_ELEMENTS = {
    "deep-nesting": b'{"event":"open","a":' + b"[" * 5000 + b"]" * 5000 + b"}",
    "5000-digit-integer": b'{"event":"open","n":1' + b"0" * 5000 + b"}",
    "lone-surrogate": b'{"event":"open","sg_event_id":"\\ud800","timestamp":1}',
    "surrogate-key": b'{"event":"open","sg_event_id":"s","timestamp":1,"\\udfff":"v"}',
    "cesu-8-surrogate": b'{"event":"open","sg_event_id":"\xed\xa0\x80","timestamp":1}',
    "float-overflow": b'{"event":"open","ratio":1e400}',
    "not-utf8": b'{"event":"open","email":"\xc3\x28"}',
    "nan": b'{"event":"open","ratio":NaN}',
    "control-character": b'{"event":"open","reason":"a\x01b"}',
}


@pytest.mark.hostile("elements")
@pytest.mark.parametrize("element", PATHOLOGICAL_ELEMENTS.values(), ids=PATHOLOGICAL_ELEMENTS)
def test_pathological_element_is_dead_lettered_alone_with_its_exact_bytes(element: bytes) -> None:
    body = (
        sendgrid_body([EVENTS[0]])[:-3]
        + b",\r\n"
        + element
        + b",\r\n"
        + json.dumps(EVENTS[1]).encode()
        + b"]\r\n"
    )
    result, _ = process(body)

    assert [e.sg_event_id for e in result.events] == ["ev-1", "ev-2"]
    (letter,) = result.dead_letters
    assert (letter.event_index, letter.reason) == (1, "invalid_element")
    assert letter.payload == element
    assert [CODEC.decode(e.value)["raw"] for e in result.events] == [
        json.dumps(EVENTS[0]),
        json.dumps(EVENTS[1]),
    ]


@pytest.mark.parametrize(
    "element",
    [
        pytest.param(b'{"event":"open","sg_event_id":"dup","url":"a","url":"b"}', id="dup-keys"),
        pytest.param(b'{\r\n  "event" : "open",\t"sg_event_id":"ws" }', id="whitespace"),
        pytest.param(b'{"event":"open","sg_event_id":"esc","note":"caf\\u00e9 \\/"}', id="escapes"),
        pytest.param(b'{"event":"open","sg_event_id":"num","ratio":1.50,"n":1E3}', id="numbers"),
        pytest.param(b'{"event":"open","sg_event_id":"big","n":1' + b"0" * 400 + b"}", id="bigint"),
    ],
)
def test_raw_is_the_element_exactly_as_sent(element: bytes) -> None:
    result, _ = process(b"[" + element + b"]\r\n")
    (encoded,) = result.events
    assert CODEC.decode(encoded.value)["raw"].encode("utf-8") == element


def test_duplicate_keys_type_the_last_value() -> None:
    result, _ = process(b'[{"event":"click","sg_event_id":"d","url":"first","url":"second"}]')
    assert CODEC.decode(result.events[0].value)["url"] == "second"


# Found by the foundation's suite (OverflowError escaped); now the event is kept, flagged.
def test_integer_timestamp_beyond_float_range_keeps_the_event_flagged() -> None:
    bad_event = b'{"event":"open","sg_event_id":"big","timestamp":1' + b"0" * 400 + b"}"
    body = b"[" + json.dumps(EVENTS[0]).encode() + b",\r\n" + bad_event + b"]\r\n"
    result, _ = process(body)
    assert [e.sg_event_id for e in result.events] == ["ev-1", "big"]
    assert result.dead_letters == []
    record = CODEC.decode(result.events[1].value)
    assert record["coercion_errors"] == ["event_time"]
    assert record["event_time"] == at_ms(0)


# Every depth either parses (the event is kept) or dead-letters that element alone; the
# batch's other event always goes on.
def test_nesting_at_every_depth_is_kept_or_isolated() -> None:
    outcomes: dict[int, str] = {}
    for depth in [*range(1, 1100, 7), *range(980, 1010)]:
        nested = b"[" * depth + b"]" * depth
        body = (
            b'[{"event":"open","sg_event_id":"deep","timestamp":1,"nested":'
            + nested
            + b'},{"event":"open","sg_event_id":"next","timestamp":1}]'
        )
        result, _ = process(body)
        assert result.events[-1].sg_event_id == "next"
        if len(result.events) == 2:
            outcomes[depth] = "event"
        else:
            (letter,) = result.dead_letters
            assert (letter.event_index, letter.reason) == (0, "invalid_element")
            outcomes[depth] = letter.reason
    assert outcomes[1] == "event"
    assert outcomes[max(outcomes)] == "invalid_element"


# --- properties: nothing escapes, every item is accounted for --------------------------------

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()
    | st.text(max_size=8)
    | st.sampled_from(["\ud800", "a\udfffb", "Zürich", ""])
)
json_values = st.recursive(
    json_scalars,
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=5), children, max_size=3)
    ),
    max_leaves=6,
)
extra_fields = st.dictionaries(
    st.text(max_size=6) | st.sampled_from(["email", "category", "smtp-id"]), json_values, max_size=4
)
valid_events = st.builds(
    lambda extra, required: {**extra, **required},
    extra_fields,
    st.fixed_dictionaries(
        {
            "event": st.sampled_from(["open", "bounce", "click"]) | st.text(min_size=1, max_size=5),
            "sg_event_id": st.text(min_size=1, max_size=10),
            "timestamp": st.integers(0, 2 * 10**12) | st.integers(0, 10**10).map(str),
        }
    ),
)
suspect_events = st.builds(
    lambda required, extra: {**required, **extra},
    st.fixed_dictionaries(
        {"event": json_scalars, "sg_event_id": json_scalars, "timestamp": json_scalars}
    ),
    extra_fields,
)


pathological_elements = st.sampled_from(sorted(PATHOLOGICAL_ELEMENTS.values()))


def _element_bytes(item: Any) -> bytes:
    return item if isinstance(item, bytes) else json.dumps(item).encode()


@settings(max_examples=150, deadline=None)
@given(st.lists(valid_events | suspect_events | json_values | pathological_elements, max_size=5))
def test_every_element_ends_as_exactly_one_record_or_one_dead_letter(items: list[Any]) -> None:
    elements = [_element_bytes(item) for item in items]
    body = b"[" + b",\r\n".join(elements) + b"]\r\n"
    result, _ = process(body)

    assert len(result.events) + len(result.dead_letters) == len(elements)
    indices = [letter.event_index for letter in result.dead_letters]
    assert all(index is not None for index in indices)
    assert len(set(indices)) == len(indices)
    for index in indices:
        assert index is not None
        assert result.dead_letters[indices.index(index)].payload == elements[index]
        # Only what is not a usable JSON object is dead-lettered.
        item = items[index]
        assert isinstance(item, bytes) or not isinstance(item, dict) or _not_json(item)
    kept = sorted(e for i, e in enumerate(elements) if i not in indices)
    assert sorted(CODEC.decode(e.value)["raw"].encode() for e in result.events) == kept
    for encoded in result.events:
        record = CODEC.decode(encoded.value)
        assert (record["sg_event_id"], record["event"]) == (encoded.sg_event_id, encoded.event)
        assert record["webhook"] == "main"


def _not_json(value: Any) -> bool:
    """What json.dumps writes but is no valid JSON text: a lone surrogate anywhere (as a
    \\udXXX escape), or a non-finite float (as NaN or Infinity)."""
    if isinstance(value, str):
        return any(0xD800 <= ord(char) <= 0xDFFF for char in value)
    if isinstance(value, float):
        return not math.isfinite(value)
    if isinstance(value, list):
        return any(_not_json(item) for item in value)
    if isinstance(value, dict):
        return any(_not_json(key) or _not_json(item) for key, item in value.items())
    return False


@settings(max_examples=150, deadline=None)
@given(st.binary(max_size=64) | st.builds(lambda b: b"[" + b + b"]", st.binary(max_size=32)))
def test_arbitrary_bytes_never_raise(body: bytes) -> None:
    result, _ = process(body)

    batch_letters = [d for d in result.dead_letters if d.event_index is None]
    if batch_letters:
        assert result.events == []
        assert [d.payload for d in result.dead_letters] == [body]
    else:
        assert len(result.events) + len(result.dead_letters) == len(scan_elements(body))


# --- invalid batches -------------------------------------------------------------------------


@pytest.mark.hostile("elements")
@pytest.mark.parametrize(
    ("body", "reason"),
    [
        pytest.param(b"not json", "invalid_json", id="not-json"),
        pytest.param(b"", "invalid_json", id="empty"),
        pytest.param(b'[{"event":"open"}', "invalid_json", id="truncated"),
        pytest.param(b'{"event":"open","sg_event_id":"x"}', "not_an_array", id="object"),
        pytest.param(b'"events"', "not_an_array", id="string"),
        pytest.param(b"null", "not_an_array", id="null"),
        pytest.param(b"[1,,2]", "invalid_json", id="empty-element"),
        pytest.param(b"[1,2,]", "invalid_json", id="trailing-comma"),
        pytest.param(b'[{"a":"unterminated}]', "invalid_json", id="unterminated-string"),
        pytest.param(b'[{"a":[}]]', "invalid_json", id="mismatched-brackets"),
        pytest.param(b'[{"a":NaN}] trailing', "invalid_json", id="trailing-bytes"),
        pytest.param(b"\xff\xfe[\x00]\x00", "invalid_json", id="utf-16"),
    ],
)
def test_unusable_body_is_one_dead_letter_carrying_the_body(body: bytes, reason: str) -> None:
    result, headers = process(body)

    assert result.events == []
    assert len(result.dead_letters) == 1
    letter = result.dead_letters[0]
    assert letter.reason == reason
    assert letter.payload == body
    assert letter.event_index is None
    assert letter.stage == "process"
    assert (letter.original_topic, letter.original_partition, letter.original_offset) == (
        "sgpipe.raw",
        3,
        42,
    )
    assert list(letter.context_headers) == headers


def _without(headers: list[tuple[str, bytes]], name: str) -> list[tuple[str, bytes]]:
    return [(key, value) for key, value in headers if key != name]


def _replaced(headers: list[tuple[str, bytes]], name: str, value: bytes) -> list[tuple[str, bytes]]:
    return [(key, value if key == name else old) for key, old in headers]


VALID_HEADERS = raw_batch_headers(raw_batch(VECTOR_BODY))


@pytest.mark.parametrize(
    ("headers", "detail"),
    [
        pytest.param(_without(VALID_HEADERS, FORMAT_HEADER), "format", id="no-format"),
        pytest.param([], "format", id="no-headers"),
        pytest.param(
            _replaced(VALID_HEADERS, FORMAT_HEADER, b"sendgrid-json/2"), "format", id="v2-format"
        ),
        pytest.param(_without(VALID_HEADERS, "sgpipe-webhook"), "sgpipe-webhook", id="no-webhook"),
        pytest.param(
            _replaced(VALID_HEADERS, "sgpipe-received-at-ms", b"yesterday"),
            "malformed",
            id="bad-received-at",
        ),
        pytest.param(
            _replaced(VALID_HEADERS, "sgpipe-webhook", b"\xff\xfe"), "malformed", id="bad-utf8"
        ),
    ],
)
def test_unreadable_raw_batch_is_dead_lettered_as_invalid_raw_batch(
    headers: list[tuple[str, bytes]], detail: str
) -> None:
    result = run_pipeline(VECTOR_BODY, headers)

    assert result.events == []
    assert len(result.dead_letters) == 1
    letter = result.dead_letters[0]
    assert letter.reason == "invalid_raw_batch"
    assert detail in letter.detail
    assert letter.payload == VECTOR_BODY
    assert list(letter.context_headers) == headers
    assert letter.original_offset == 42


def test_record_without_value_is_dead_lettered_with_an_empty_payload() -> None:
    result = run_pipeline(None, VALID_HEADERS)
    assert result.events == []
    assert [(d.reason, d.payload) for d in result.dead_letters] == [("invalid_raw_batch", b"")]
    assert "no value" in result.dead_letters[0].detail


# --- dead-letter headers ---------------------------------------------------------------------


def test_dead_letter_headers_for_one_event() -> None:
    items: list[Any] = [EVENTS[0], ["open"]]
    result, batch_headers = process(sendgrid_body(items))
    (letter,) = result.dead_letters

    headers = dead_letter_headers(letter)

    values = dict(headers)
    assert values[REASON_HEADER] == b"not_an_object"
    assert values[DETAIL_HEADER] == b"events are JSON objects; got array"
    assert values[STAGE_HEADER] == b"process"
    assert values[ORIGINAL_TOPIC_HEADER] == b"sgpipe.raw"
    assert values[ORIGINAL_PARTITION_HEADER] == b"3"
    assert values[ORIGINAL_OFFSET_HEADER] == b"42"
    assert values[EVENT_INDEX_HEADER] == b"1"
    # The raw batch's own headers ride along, so the letter can be replayed.
    for name, value in batch_headers:
        assert values[name] == value
    assert values["sgpipe-webhook"] == b"main"
    assert values["sgpipe-request-id"] == b"req-1"
    assert len(headers) == len(values)


def test_dead_letter_headers_for_a_whole_batch_have_no_event_index() -> None:
    result, _ = process(b"not json")
    values = dict(dead_letter_headers(result.dead_letters[0]))
    assert values[REASON_HEADER] == b"invalid_json"
    assert EVENT_INDEX_HEADER not in values
    assert values[FORMAT_HEADER] == b"sendgrid-json/1"


def test_dead_letter_headers_truncate_detail_and_keep_own_names() -> None:
    letter = DeadLetter(
        reason="invalid_json",
        detail="é" * 2000,
        stage="sink",
        payload=b"x",
        original_topic="t",
        original_partition=0,
        original_offset=7,
        context_headers=[(REASON_HEADER, b"stale"), ("sgpipe-webhook", b"main")],
    )

    headers = dead_letter_headers(letter)

    values = dict(headers)
    assert len(values[DETAIL_HEADER]) == 1024
    assert [value for name, value in headers if name == REASON_HEADER] == [b"invalid_json"]
    assert values[STAGE_HEADER] == b"sink"
    assert values["sgpipe-webhook"] == b"main"


# Found by this suite: the detail was cut mid-character.
def test_truncated_detail_is_still_utf8() -> None:
    letter = DeadLetter(
        reason="invalid_event",
        detail="a" + "é" * 2000,
        stage="processor",
        payload=b"{}",
        original_topic="t",
        original_partition=0,
        original_offset=0,
    )
    detail = dict(dead_letter_headers(letter))[DETAIL_HEADER]
    assert len(detail) <= 1024
    assert detail.decode("utf-8").startswith("aé")


# --- dedup window ----------------------------------------------------------------------------


def test_recent_event_ids_evicts_the_oldest_beyond_capacity() -> None:
    recent = RecentEventIds(capacity=3)
    recent.remember(["a", "b", "c", "d"])
    assert len(recent) == 3
    assert "a" not in recent
    assert all(sg_event_id in recent for sg_event_id in ("b", "c", "d"))

    recent.remember(["e"])
    assert "b" not in recent
    assert len(recent) == 3


def test_recent_event_ids_remembering_again_refreshes_an_id() -> None:
    recent = RecentEventIds(capacity=2)
    recent.remember(["a", "b"])
    recent.remember(["a"])
    recent.remember(["c"])
    assert "a" in recent
    assert "b" not in recent
    assert "c" in recent


def test_recent_event_ids_counts_duplicates_once() -> None:
    recent = RecentEventIds(capacity=10)
    recent.remember(["a", "a", "b", "a"])
    assert len(recent) == 2
    assert 5 not in recent


def test_recent_event_ids_capacity_zero_remembers_nothing() -> None:
    recent = RecentEventIds(capacity=0)
    recent.remember(["a", "b"])
    assert len(recent) == 0
    assert "a" not in recent


# --- the codec -------------------------------------------------------------------------------

CRC64_EMPTY = 0xC15D213AA4D7A795


def _crc64_table() -> list[int]:
    table = []
    for byte in range(256):
        value = byte
        for _ in range(8):
            value = (value >> 1) ^ (CRC64_EMPTY if value & 1 else 0)
        table.append(value)
    return table


_CRC64_TABLE = _crc64_table()


def crc64_avro(data: bytes) -> int:
    """The Avro specification's reference CRC-64-AVRO ("Schema Fingerprints")."""
    value = CRC64_EMPTY
    for byte in data:
        value = (value >> 8) ^ _CRC64_TABLE[(value ^ byte) & 0xFF]
    return value


def sample_event(**changes: Any) -> EmailEventRecord:
    return {
        "webhook": "main",
        "event": "open",
        "sg_event_id": "ev-1",
        "event_time": 1_700_000_000_000,
        "email": "a@example.com",
        "category": ["welcome"],
        "custom_args": {"plan": "pro"},
        "received_at": RECEIVED_AT_MS,
        "request_id": "req-1",
        "raw": "{}",
        **changes,
    }


def test_fastavro_fingerprint_matches_the_avro_spec_for_null() -> None:
    assert crc64_avro(b'"null"') == 0x63DD24E7CC258F8A
    assert fingerprint('"null"', "CRC-64-AVRO") == "8a8f25cce724dd63"
    assert bytes.fromhex("8a8f25cce724dd63") == (0x63DD24E7CC258F8A).to_bytes(8, "little")


def test_encoding_starts_with_magic_and_little_endian_fingerprint() -> None:
    canonical = to_parsing_canonical_form(parse_schema(json.loads(current_schema().text)))
    expected_fingerprint = crc64_avro(canonical.encode()).to_bytes(8, "little")

    payload = CODEC.encode(sample_event())

    assert payload[:2] == b"\xc3\x01"
    assert CODEC.fingerprint == expected_fingerprint
    assert payload[2:10] == expected_fingerprint
    assert CODEC.decode(payload)["custom_args"] == {"plan": "pro"}


def test_decode_names_an_unknown_fingerprint_apart_from_damaged_bytes() -> None:
    payload = CODEC.encode(sample_event())
    foreign = payload[:2] + bytes.fromhex("8a8f25cce724dd63") + payload[10:]
    with pytest.raises(UnknownWriterSchema, match="8a8f25cce724dd63") as caught:
        CODEC.decode(foreign)
    assert caught.value.fingerprint == bytes.fromhex("8a8f25cce724dd63")
    assert not isinstance(caught.value, SerializationError)


@pytest.mark.parametrize(
    "payload",
    [b"", b"\xc3", b"\x01\x01" + CODEC.fingerprint + b"\x08main", b'{"event":"open"}', b"\x00\x01"],
    ids=["empty", "half-magic", "wrong-magic", "json", "short-confluent"],
)
def test_decode_rejects_records_that_are_not_single_object_email_events(payload: bytes) -> None:
    with pytest.raises(SerializationError, match="not an EmailEvent"):
        CODEC.decode(payload)


def test_decode_rejects_every_truncation() -> None:
    payload = CODEC.encode(sample_event(email=None, category=["a", "b"], raw='{"k":"v"}', tls=1))
    for cut in range(len(payload)):
        with pytest.raises(SerializationError):
            CODEC.decode(payload[:cut])
    assert CODEC.decode(payload)["category"] == ["a", "b"]


def test_encode_wraps_out_of_range_values_in_serialization_error() -> None:
    with pytest.raises(SerializationError, match="ev-1"):
        CODEC.encode(sample_event(event_time=2**64))


# Found by this suite: fastavro's OverflowError escaped decode, which the sink would not
# have dead-lettered.
def test_decode_of_an_out_of_range_time_raises_serialization_error() -> None:
    for event_time_ms in (253_402_300_800_000, 2**62, -(2**62)):
        payload = CODEC.encode(sample_event(event_time=event_time_ms))
        with pytest.raises(SerializationError, match="cannot decode"):
            CODEC.decode(payload)


# --- size limits (found in review: an oversized event failed its poll forever) ---------------


def test_an_event_too_large_for_the_topic_is_dead_lettered_with_its_json() -> None:
    big = {"event": "open", "sg_event_id": "big", "timestamp": 1, "note": "x" * 3000}
    body = sendgrid_body([EVENTS[0], big])
    headers = raw_batch_headers(raw_batch(body))
    result = run_pipeline(body, headers, max_record_bytes=5000)
    assert [event.sg_event_id for event in result.events] == ["ev-1"]
    (letter,) = result.dead_letters
    assert (letter.reason, letter.event_index) == ("event_too_large", 1)
    assert json.loads(letter.payload) == big


def test_a_dead_letter_too_large_for_its_topic_points_at_the_raw_record() -> None:
    big = {"event": "open", "sg_event_id": "big", "timestamp": 1, "note": "x" * 3000}
    body = sendgrid_body([big])
    headers = raw_batch_headers(raw_batch(body))
    result = run_pipeline(body, headers, max_record_bytes=2000)
    (letter,) = result.dead_letters
    assert letter.reason == "event_too_large"
    assert letter.payload == b""
    assert "read it at sgpipe.raw/3/42" in letter.detail
