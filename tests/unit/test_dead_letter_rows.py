"""The dead-letter sink's step: a dead-letter record -> a `dead_letters` row (pure, total).

The row's identity (source topic, partition, offset, event index) and version decide what
ClickHouse's ReplacingMergeTree keeps: a redelivered letter must give the same identity and
version, a letter made again of a replay must take the replayed letter's identity and a higher
version."""

from __future__ import annotations

from datetime import UTC, datetime

from hypothesis import given
from hypothesis import strategies as st

from schemas.dead_letter import (
    REPLAY_GENERATION_HEADER,
    REPLAY_OF_HEADER,
    WHOLE_RECORD,
    DeadLetter,
    DeadLetterOrigin,
    dead_letter_headers,
    parse_replay_of,
    replay_headers,
)
from schemas.raw_batch import RawBatch, raw_batch_headers
from sgpipe.runtime.messages import Message
from sinks.dead_letters import (
    DEAD_LETTER_COLUMNS,
    UNKNOWN,
    dead_letter_columns,
    dead_letter_row,
)

BATCH_HEADERS = raw_batch_headers(
    RawBatch("main", b"[]", 1_700_000_010_000, "req-1", 1_700_000_009, "signature")
)
DEAD_LETTER_TIME_MS = 1_700_000_020_500


def letter_record(
    letter: DeadLetter, *, offset: int = 5, timestamp_ms: int = DEAD_LETTER_TIME_MS
) -> Message:
    """``letter`` as it is consumed from the dead-letter topic."""
    return Message(
        topic="sgpipe.dead-letter",
        partition=1,
        offset=offset,
        timestamp_ms=timestamp_ms,
        key=None,
        value=letter.payload,
        headers=tuple(dead_letter_headers(letter)),
    )


def element_letter(
    *,
    offset: int = 42,
    event_index: int | None = 2,
    reason: str = "not_an_object",
    context: list[tuple[str, bytes]] | None = None,
) -> DeadLetter:
    return DeadLetter(
        reason=reason,
        detail="events are JSON objects; got string",
        stage="process",
        payload=b'"not an event"',
        original_topic="sgpipe.raw",
        original_partition=3,
        original_offset=offset,
        event_index=event_index,
        context_headers=BATCH_HEADERS if context is None else context,
    )


def test_a_processor_dead_letter_becomes_a_row_with_its_origin_and_context() -> None:
    row = dead_letter_row(letter_record(element_letter()))

    assert row.origin == DeadLetterOrigin("sgpipe.raw", 3, 42, 2)
    assert (row.reason, row.detail, row.stage) == (
        "not_an_object",
        "events are JSON objects; got string",
        "process",
    )
    assert (row.webhook, row.request_id) == ("main", "req-1")
    assert row.received_at == datetime(2023, 11, 14, 22, 13, 30, tzinfo=UTC)
    assert row.payload == b'"not an event"'
    assert row.dead_lettered_at == datetime(2023, 11, 14, 22, 13, 40, 500_000, tzinfo=UTC)
    assert (row.replay_generation, row.version) == (0, 0)
    # Every header is kept, the raw batch's own included (what a replay sends again).
    assert row.headers["sgpipe-dlq-reason"] == "not_an_object"
    assert row.headers["sgpipe-format"] == "sendgrid-json/1"
    assert row.headers["sgpipe-signature-timestamp"] == "1700000009"


def test_a_redelivered_dead_letter_gives_the_same_identity_and_version() -> None:
    letter = element_letter()
    first = dead_letter_row(letter_record(letter, offset=5))
    # Written twice (a retried produce) and read again after a restart.
    again = dead_letter_row(letter_record(letter, offset=9, timestamp_ms=DEAD_LETTER_TIME_MS + 1))

    assert (again.origin, again.version) == (first.origin, first.version)


def test_a_whole_record_dead_letter_has_event_index_minus_one() -> None:
    row = dead_letter_row(letter_record(element_letter(event_index=None, reason="invalid_json")))
    assert row.event_index == WHOLE_RECORD == -1


def test_a_dead_letter_of_a_replayed_element_keeps_the_replayed_letters_identity() -> None:
    original = DeadLetterOrigin("sgpipe.raw", 3, 42, 2)
    # The replayed raw batch holds the one element at index 0, at a new raw offset.
    replayed_context = [*BATCH_HEADERS, *replay_headers(original, 1)]
    again = element_letter(offset=977, event_index=0, context=replayed_context)

    row = dead_letter_row(letter_record(again))

    assert row.origin == original
    assert (row.replay_generation, row.version) == (1, 2)
    # Where the replayed copy was is still in the headers.
    assert row.headers["sgpipe-original-offset"] == "977"


def test_a_whole_record_replayed_keeps_each_elements_own_index() -> None:
    original = DeadLetterOrigin("sgpipe.raw", 3, 42, WHOLE_RECORD)
    context = [*BATCH_HEADERS, *replay_headers(original, 2)]

    rows = [
        dead_letter_row(
            letter_record(element_letter(offset=978, event_index=index, context=context))
        )
        for index in (1, 4)
    ]

    assert [row.origin for row in rows] == [
        DeadLetterOrigin("sgpipe.raw", 3, 42, 1),
        DeadLetterOrigin("sgpipe.raw", 3, 42, 4),
    ]
    assert {row.version for row in rows} == {4}


def test_a_record_without_dead_letter_headers_is_its_own_origin() -> None:
    foreign = Message("sgpipe.dead-letter", 0, 17, 1_700_000_000_000, None, b"??", ())

    row = dead_letter_row(foreign)

    assert row.origin == DeadLetterOrigin("sgpipe.dead-letter", 0, 17, WHOLE_RECORD)
    assert (row.reason, row.stage, row.webhook, row.received_at) == (UNKNOWN, UNKNOWN, "", None)
    assert row.payload == b"??"


def test_malformed_headers_are_treated_as_absent() -> None:
    headers = (
        ("sgpipe-dlq-reason", b"\xff\xfe"),
        ("sgpipe-original-topic", b"sgpipe.raw"),
        ("sgpipe-original-partition", b"-3"),
        ("sgpipe-original-offset", b"12"),
        ("sgpipe-received-at-ms", b"yesterday"),
        (REPLAY_OF_HEADER, b"no slashes"),
        (REPLAY_GENERATION_HEADER, b"99999999999999"),
    )
    row = dead_letter_row(Message("dlq", 2, 8, -1, None, None, headers))

    assert row.origin == DeadLetterOrigin("dlq", 2, 8, WHOLE_RECORD)
    assert row.reason == "\ufffd\ufffd"
    assert row.received_at is None
    assert (row.replay_generation, row.payload) == (0, b"")
    assert row.dead_lettered_at == datetime(1970, 1, 1, tzinfo=UTC)


def test_replay_of_round_trips_and_rejects_what_is_not_one() -> None:
    origin = DeadLetterOrigin("sgpipe.raw", 3, 42, WHOLE_RECORD)
    assert parse_replay_of(origin.header_value()) == origin
    assert origin.header_value() == b"sgpipe.raw/3/42/-1"
    for value in (b"", b"a/b/c/d", b"t/1/2", b"\xff/1/2/3"):
        assert parse_replay_of(value) is None


def test_columns_are_in_the_row_order() -> None:
    rows = [dead_letter_row(letter_record(element_letter(offset=offset))) for offset in (1, 2)]
    columns = dict(zip(DEAD_LETTER_COLUMNS, dead_letter_columns(rows), strict=True))
    assert columns["source_offset"] == [1, 2]
    assert columns["payload"] == [b'"not an event"'] * 2
    assert DEAD_LETTER_COLUMNS[:4] == (
        "source_topic",
        "source_partition",
        "source_offset",
        "event_index",
    )


header_names = st.sampled_from(
    [
        "sgpipe-dlq-reason",
        "sgpipe-original-topic",
        "sgpipe-original-partition",
        "sgpipe-original-offset",
        "sgpipe-event-index",
        "sgpipe-received-at-ms",
        REPLAY_OF_HEADER,
        REPLAY_GENERATION_HEADER,
        "other",
    ]
)


@given(
    headers=st.lists(st.tuples(header_names, st.binary(max_size=30)), max_size=10),
    value=st.none() | st.binary(max_size=50),
    timestamp_ms=st.integers(min_value=-(2**63), max_value=2**63 - 1),
)
def test_any_record_becomes_a_row_that_fits_the_columns(
    headers: list[tuple[str, bytes]], value: bytes | None, timestamp_ms: int
) -> None:
    row = dead_letter_row(Message("dlq", 0, 3, timestamp_ms, None, value, tuple(headers)))

    assert 0 <= row.source_partition < 2**32
    assert 0 <= row.source_offset < 2**64
    assert -1 <= row.event_index < 2**31
    assert row.replay_generation >= 0 and row.version == 2 * row.replay_generation
    assert row.version < 2**32
    assert row.dead_lettered_at.year <= 2299
