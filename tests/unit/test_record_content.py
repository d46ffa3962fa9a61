"""Record content is never fatal: whatever bytes, key and headers a record carries, each
consuming stage's steps (the ``transform`` of its ``ConsumerStage`` declaration, run through
``run_steps``, the code StageLoop turns exceptions into rejections with) make it an output or a
dead letter, never an exception out of the stage.

Property-based (Hypothesis) over the three topics: raw batches for the processor, events for
the sink, dead letters for the dead-letter sink. Values are arbitrary bytes, and bytes built to
get past the first checks (well-framed Avro with a known or unknown schema, JSON arrays of
anything, valid raw-batch headers with some values broken); headers arbitrary names and values
(None, not UTF-8, repeated). The example budget is modest so that this runs in seconds; the
known cases are pinned as examples.
"""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from processors.pipeline import ProcessedRecord
from processors.stage import processor_stage
from schemas.dead_letter import (
    EVENT_INDEX_HEADER,
    ORIGINAL_OFFSET_HEADER,
    ORIGINAL_PARTITION_HEADER,
    ORIGINAL_TOPIC_HEADER,
    REASON_HEADER,
    REPLAY_GENERATION_HEADER,
    REPLAY_OF_HEADER,
    dead_letter_headers,
)
from schemas.email_event import CONFLUENT_MAGIC, SINGLE_OBJECT_MAGIC, EmailEventCodec
from schemas.raw_auth import sign_raw_record
from schemas.raw_batch import (
    FORMAT_HEADER,
    FORMAT_SENDGRID_JSON_V1,
    RECEIVED_AT_HEADER,
    REQUEST_ID_HEADER,
    WEBHOOK_HEADER,
)
from sgpipe.runtime.dead_letters import (
    MAX_REJECTIONS_PER_RECORD,
    TOO_MANY_INVALID_ELEMENTS,
    Rejection,
    build_dead_letter,
    too_many_rejections,
)
from sgpipe.runtime.kafka import max_record_bytes
from sgpipe.runtime.messages import Message
from sgpipe.runtime.settings import Settings
from sgpipe.runtime.stage import ConsumerStage, Transformed, run_steps
from sinks.dead_letters import dead_letter_stage
from sinks.rows import to_columns
from sinks.stage import sink_stage
from tests.raw_auth_support import RAW_AUTH_DOCUMENT, TEST_RAW_AUTH_KEY

SETTINGS = Settings.model_validate({"raw_auth": RAW_AUTH_DOCUMENT})
RECORD_LIMIT = max_record_bytes(SETTINGS.kafka)
CODEC = EmailEventCodec()
EXAMPLES = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

KNOWN_HEADERS = [
    FORMAT_HEADER,
    WEBHOOK_HEADER,
    RECEIVED_AT_HEADER,
    REQUEST_ID_HEADER,
    "sgpipe-authenticated-by",
    "sgpipe-signature-timestamp",
    "sgpipe-content-type",
    "sgpipe-schema",
    REASON_HEADER,
    ORIGINAL_TOPIC_HEADER,
    ORIGINAL_PARTITION_HEADER,
    ORIGINAL_OFFSET_HEADER,
    EVENT_INDEX_HEADER,
    REPLAY_OF_HEADER,
    REPLAY_GENERATION_HEADER,
]

header_values = st.one_of(
    st.none(),
    st.binary(max_size=40),
    st.sampled_from(
        [b"", b"0", b"-1", b"1700000000000", b"99999999999999999999", b"\xff\xfe", b"main",
         b"signature", FORMAT_SENDGRID_JSON_V1, b"sgpipe.raw/0/5/-1", b"a/b/c/d", b"\xc3\x28"]
    ),
)  # fmt: skip
headers = st.lists(
    st.tuples(st.one_of(st.sampled_from(KNOWN_HEADERS), st.text(max_size=12)), header_values),
    max_size=12,
)


def raw_batch_headers(values: list[bytes | None]) -> list[tuple[str, bytes | None]]:
    """The ingress's headers, with the given (possibly broken) values."""
    names = [WEBHOOK_HEADER, RECEIVED_AT_HEADER, REQUEST_ID_HEADER, "sgpipe-authenticated-by"]
    return [(FORMAT_HEADER, FORMAT_SENDGRID_JSON_V1), *zip(names, values, strict=False)]


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False)
    | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(
        st.sampled_from(["event", "sg_event_id", "sg_message_id", "email", "timestamp",
                         "attempt", "tls", "pool", "url_offset", "asm_group_id", "x"])
        | st.text(max_size=8),
        children,
        max_size=6,
    ),
    max_leaves=12,
)  # fmt: skip
raw_bodies = st.one_of(
    st.binary(max_size=200),
    st.lists(json_values, max_size=6).map(lambda items: json.dumps(items).encode()),
    st.lists(st.binary(max_size=12), max_size=6).map(lambda parts: b"[" + b",".join(parts) + b"]"),
)
raw_headers = st.one_of(
    headers,
    st.lists(header_values, min_size=0, max_size=4).map(raw_batch_headers),
    st.tuples(st.lists(header_values, max_size=4).map(raw_batch_headers), headers).map(
        lambda both: both[0] + both[1]
    ),
)


def framed(prefix: bytes) -> st.SearchStrategy[bytes]:
    return st.binary(max_size=120).map(lambda body: prefix + body)


event_values = st.one_of(
    st.none(),
    st.binary(max_size=120),
    framed(CONFLUENT_MAGIC),
    framed(SINGLE_OBJECT_MAGIC + CODEC.fingerprint),
    framed(SINGLE_OBJECT_MAGIC),
    # A real event with bytes flipped or cut: well framed, damaged Avro.
    st.tuples(st.integers(0, 200), st.binary(min_size=1, max_size=4)).map(
        lambda cut: (
            CODEC.encode({"sg_event_id": "e", "event": "open", "event_time": 0})[: cut[0]] + cut[1]
        )
    ),
)


def message(
    value: bytes | None,
    record_headers: list[tuple[str, bytes | None]],
    key: bytes | None = None,
    timestamp_ms: int = 0,
    offset: int = 7,
) -> Message:
    # aiokafka hands header values through as they are on the wire: bytes, or None.
    return Message("topic", 3, offset, timestamp_ms, key, value, tuple(record_headers))  # type: ignore[arg-type]


def outcome(stage: ConsumerStage[Any], record: Message) -> Transformed[Any]:
    """The steps' result; an exception here would have left the stage (FatalStageError)."""
    result = run_steps(stage.transform, record)
    for rejection in result.rejections:
        # Every way a record can be bad is anticipated with its own reason; processing_error
        # is what run_steps says of an exception nobody expected (a bug).
        assert rejection.reason != "processing_error", rejection.detail
        letter = build_dead_letter(
            record, rejection, stage=stage.name, max_payload_bytes=RECORD_LIMIT
        )
        # The dead letter itself must be writable: its headers build, and it fits a record.
        letter_headers = dead_letter_headers(letter)
        size = len(letter.payload) + sum(
            len(name.encode()) + len(value or b"") for name, value in letter_headers
        )
        assert size <= SETTINGS.kafka.max_request_size
    return result


PROCESSOR = processor_stage(SETTINGS)
SINK = sink_stage(SETTINGS)
DEAD_LETTER_SINK = dead_letter_stage(SETTINGS)


@EXAMPLES
@given(
    value=st.one_of(st.none(), raw_bodies),
    record_headers=raw_headers,
    key=st.none() | st.binary(max_size=8),
    signed=st.booleans(),
)
@example(value=b"[" + b",".join([b"0"] * 101) + b"]", record_headers=raw_batch_headers(
    [b"main", b"1700000000000", b"req", b"signature"]), key=None, signed=True)  # fmt: skip
@example(value=b'[{"event":"open","sg_event_id":"\\ud800"}]', record_headers=raw_batch_headers(
    [b"main", b"1700000000000", b"req", b"signature"]), key=None, signed=True)  # fmt: skip
@example(value=b"[]", record_headers=raw_batch_headers([b"\xff", None, b"x", b"y"]), key=None,
         signed=True)  # fmt: skip
@example(value=b"[0]", record_headers=raw_batch_headers([b"main", b"1", b"r", b"s"]), key=None,
         signed=False)  # fmt: skip
def test_the_processor_makes_every_raw_record_events_or_dead_letters(
    value: bytes | None,
    record_headers: list[tuple[str, bytes | None]],
    key: bytes | None,
    signed: bool,
) -> None:
    # Signed with the processor's key (as the ingress does), so that what follows the HMAC
    # check sees the arbitrary content too; unsigned, it must be an unauthenticated dead letter.
    if signed:
        record_headers = list(
            sign_raw_record(TEST_RAW_AUTH_KEY, value, record_headers)  # type: ignore[arg-type]
        )
    record = message(value, record_headers, key)
    result = outcome(PROCESSOR, record)
    if not signed:
        assert not result.outputs
        assert [r.reason for r in result.rejections] == ["unauthenticated_raw_record"]
    for event in result.outputs:
        # What the events topic takes: value and key within the record limit.
        assert len(event.value) + len(event.key) <= RECORD_LIMIT
    if not result.outputs and not result.rejections:
        # Only an empty batch makes nothing: its offset is committed and that is all.
        assert json.loads(value or b"null") == []


@EXAMPLES
@given(value=event_values, record_headers=headers, key=st.none() | st.binary(max_size=8))
@example(value=b"\x00garbage", record_headers=[], key=None)
@example(value=SINGLE_OBJECT_MAGIC + b"\x01" * 8 + b"x", record_headers=[], key=None)
def test_the_sink_makes_every_event_record_a_row_or_a_dead_letter(
    value: bytes | None, record_headers: list[tuple[str, bytes | None]], key: bytes | None
) -> None:
    result = outcome(SINK, message(value, record_headers, key))
    assert len(result.outputs) + len(result.rejections) == 1
    if result.outputs:
        to_columns(result.outputs)  # a row the insert can build


@EXAMPLES
@given(
    value=st.none() | st.binary(max_size=60),
    record_headers=headers,
    key=st.none() | st.binary(max_size=8),
    timestamp_ms=st.integers(-(2**63), 2**63 - 1),
    offset=st.integers(0, 2**63 - 1),
)
def test_the_dead_letter_sink_makes_every_record_a_row(
    value: bytes | None,
    record_headers: list[tuple[str, bytes | None]],
    key: bytes | None,
    timestamp_ms: int,
    offset: int,
) -> None:
    result = outcome(DEAD_LETTER_SINK, message(value, record_headers, key, timestamp_ms, offset))
    # It must not dead-letter (its letters would come back to it): every record is a row.
    assert len(result.outputs) == 1 and result.rejections == []


# --- sizes: what a record carries must not make the stage's own writes too large ------------


def test_an_event_whose_key_would_push_it_over_the_record_limit_is_dead_lettered() -> None:
    # The key (sg_message_id) is sent next to the value: together over the producer's limit,
    # the produce fails for the whole batch (MessageSizeTooLargeError, fatal).
    # About 3 MB encoded (the id is in the event and in raw), within the 4 MB limit on its own.
    message_id = "m" * 1_500_000
    body = json.dumps([{"event": "open", "sg_event_id": "e", "sg_message_id": message_id}])
    headers = raw_batch_headers([b"main", b"1700000000000", b"req", b"signature"])
    signed = sign_raw_record(TEST_RAW_AUTH_KEY, body.encode(), headers)  # type: ignore[arg-type]
    record = message(body.encode(), list(signed))
    result = outcome(PROCESSOR, record)
    assert result.outputs == []
    (rejection,) = result.rejections
    assert rejection.reason == "event_too_large"
    assert "the encoded event and its key are" in rejection.detail


def test_a_record_with_more_headers_than_a_dead_letter_holds_keeps_what_fits() -> None:
    huge = [(f"h{index}", b"x" * 20_000) for index in range(4)]
    headers = [*raw_batch_headers([b"main", b"1", b"r", b"s"]), *huge]
    signed = sign_raw_record(TEST_RAW_AUTH_KEY, b"not json", headers)  # type: ignore[arg-type]
    record = message(b"not json", list(signed))
    (rejection,) = outcome(PROCESSOR, record).rejections
    assert rejection.reason == "invalid_json"
    letter = build_dead_letter(record, rejection, stage="process", max_payload_bytes=RECORD_LIMIT)
    names = [name for name, _ in letter.context_headers]
    assert names == [FORMAT_HEADER, WEBHOOK_HEADER, RECEIVED_AT_HEADER, REQUEST_ID_HEADER,
                     "sgpipe-authenticated-by", "h0"]  # fmt: skip
    assert "(4 headers omitted: read them at topic/3/7)" in letter.detail


# --- many bad elements: one dead letter of the record, its good elements still events --------


def _signed_batch(elements: list[bytes]) -> Message:
    body = b"[" + b",".join(elements) + b"]"
    headers = raw_batch_headers([b"main", b"1700000000000", b"req", b"signature"])
    signed = sign_raw_record(TEST_RAW_AUTH_KEY, body, headers)  # type: ignore[arg-type]
    return message(body, list(signed))


def _event(number: int) -> bytes:
    return json.dumps({"event": "open", "sg_event_id": f"e{number}", "email": "a@b.c"}).encode()


def test_past_the_limit_of_bad_elements_the_record_is_one_dead_letter_and_its_events_stay() -> None:
    bad = [b"0"] * MAX_REJECTIONS_PER_RECORD + [b"[1]", b"nope"]
    record = _signed_batch([_event(1), *bad, _event(2)])
    result = outcome(PROCESSOR, record)
    assert [event.sg_event_id for event in result.outputs] == ["e1", "e2"]
    (rejection,) = result.rejections
    assert rejection.reason == TOO_MANY_INVALID_ELEMENTS
    assert rejection.payload is None  # the dead letter carries the whole record
    assert rejection.detail == (
        f"{MAX_REJECTIONS_PER_RECORD + 2} of its elements were rejected (not_an_object: "
        f"{MAX_REJECTIONS_PER_RECORD + 1}, invalid_element: 1); the record is kept whole "
        "instead of as one dead letter per element"
    )


def test_at_the_limit_every_bad_element_is_its_own_signed_dead_letter() -> None:
    record = _signed_batch([_event(1), *[b"0"] * MAX_REJECTIONS_PER_RECORD])
    result = outcome(PROCESSOR, record)
    assert len(result.outputs) == 1
    assert len(result.rejections) == MAX_REJECTIONS_PER_RECORD
    assert [rejection.event_index for rejection in result.rejections] == list(
        range(1, MAX_REJECTIONS_PER_RECORD + 1)
    )
    # Each replays as a batch of one, with the processor's HMAC over it.
    assert all(rejection.headers for rejection in result.rejections)


def test_past_the_limit_bad_elements_are_counted_not_kept() -> None:
    # A signed batch of millions of bad elements must cost a counter, not a letter each (built,
    # then signed by the stage): what is kept stops at the limit before the record collapses.
    processed = ProcessedRecord()
    for index in range(MAX_REJECTIONS_PER_RECORD + 50):
        processed.reject(Rejection("not_an_object", "no", b"0", index))
    assert len(processed.rejections) == MAX_REJECTIONS_PER_RECORD
    assert processed.rejected == {"not_an_object": MAX_REJECTIONS_PER_RECORD + 50}
    processed.collapse_past_the_limit()
    assert [rejection.reason for rejection in processed.rejections] == [TOO_MANY_INVALID_ELEMENTS]


def test_run_steps_collapses_any_stage_past_the_limit_with_the_same_words() -> None:
    many = [Rejection("bad", "x", b"0", index) for index in range(MAX_REJECTIONS_PER_RECORD + 1)]

    def transform(record: Message) -> Transformed[None]:
        return Transformed([], list(many))

    result = run_steps(transform, message(b"", []))
    assert result.rejections == [too_many_rejections(Counter(bad=MAX_REJECTIONS_PER_RECORD + 1))]
    assert result.rejections[0].detail.startswith(f"{MAX_REJECTIONS_PER_RECORD + 1} of its")
