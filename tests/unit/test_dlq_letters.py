"""`sgpipe dlq`'s pure parts: which raw batch replays a dead letter, what the processor would
make of it, what ClickHouse says became of it, and how it is all printed."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from schemas.dead_letter import (
    REPLAY_GENERATION_HEADER,
    REPLAY_OF_HEADER,
    WHOLE_RECORD,
    DeadLetterOrigin,
)
from schemas.raw_batch import RawBatch, raw_batch_headers
from sgpipe.dlq.command import parse_since
from sgpipe.dlq.letters import (
    DEAD_LETTERED_AGAIN,
    LANDED,
    NO_PAYLOAD,
    PARTLY_LANDED,
    SINK_NOT_REPLAYABLE,
    WOULD_BE_DEAD_LETTERED,
    WOULD_LAND,
    WOULD_PARTLY_LAND,
    ElementForecast,
    LaterLetter,
    Outcome,
    ReplayRecord,
    Skip,
    StoredLetter,
    expected_outcome,
    forecast,
    letter_name,
    observed_outcome,
    plan_replay,
)
from sgpipe.dlq.report import (
    ReplayLine,
    excerpt,
    list_json,
    list_text,
    list_tsv,
    replay_text,
    replay_tsv,
)
from sgpipe.dlq.store import LetterFilter, ReasonSummary, quote

RAW = "sgpipe.raw"
BATCH_HEADERS = {
    name: value.decode()
    for name, value in raw_batch_headers(
        RawBatch("main", b"[]", 1_700_000_010_000, "req-1", 1_700_000_009, "signature")
    )
}
DEAD_LETTER_HEADERS = {
    "sgpipe-dlq-reason": "not_an_object",
    "sgpipe-dlq-detail": "events are JSON objects; got string",
    "sgpipe-dlq-stage": "process",
    "sgpipe-original-topic": RAW,
    "sgpipe-original-partition": "3",
    "sgpipe-original-offset": "42",
    "sgpipe-event-index": "2",
}
EVENT = b'{"event":"open","sg_event_id":"ev-1","email":"a@example.com","timestamp":1700000000}'


def stored(
    payload: bytes = b'"not an event"',
    *,
    event_index: int = 2,
    stage: str = "process",
    reason: str = "not_an_object",
    generation: int = 0,
    headers: dict[str, str] | None = None,
) -> StoredLetter:
    return StoredLetter(
        origin=DeadLetterOrigin(RAW, 3, 42, event_index),
        stage=stage,
        reason=reason,
        detail="events are JSON objects; got string",
        webhook="main",
        request_id="req-1",
        dead_lettered_at="2023-11-14 22:13:40.500",
        replay_generation=generation,
        replayed_at=None,
        payload_bytes=len(payload),
        payload=payload,
        headers={**DEAD_LETTER_HEADERS, **BATCH_HEADERS} if headers is None else headers,
    )


def planned(letter: StoredLetter) -> ReplayRecord:
    plan = plan_replay(letter)
    assert isinstance(plan, ReplayRecord), plan
    return plan


# --- the replay record -------------------------------------------------------------------------


def test_an_element_is_replayed_as_a_batch_of_one_with_the_raw_batch_headers() -> None:
    plan = planned(stored(EVENT))

    assert plan.value == b"[" + EVENT + b"]"
    headers = dict(plan.headers)
    # The raw batch's own headers, as the processor read them the first time...
    assert {name: headers[name] for name in BATCH_HEADERS} == {
        name: value.encode() for name, value in BATCH_HEADERS.items()
    }
    # ... none of the dead letter's, and the letter's identity and the next generation.
    assert not set(DEAD_LETTER_HEADERS) & set(headers)
    assert headers[REPLAY_OF_HEADER] == f"{RAW}/3/42/2".encode()
    assert headers[REPLAY_GENERATION_HEADER] == b"1"
    assert len(plan.headers) == len(BATCH_HEADERS) + 2


def test_a_whole_record_is_replayed_as_it_was() -> None:
    plan = planned(stored(b"not json", event_index=WHOLE_RECORD, reason="invalid_json"))
    assert plan.value == b"not json"
    assert dict(plan.headers)[REPLAY_OF_HEADER] == f"{RAW}/3/42/-1".encode()


def test_a_letter_dead_lettered_again_keeps_its_identity_and_counts_on() -> None:
    # Stored from a replay: its headers hold the previous replay's; the new ones replace them.
    previous = {**DEAD_LETTER_HEADERS, **BATCH_HEADERS}
    previous.update({REPLAY_OF_HEADER: f"{RAW}/3/42/2", REPLAY_GENERATION_HEADER: "2"})
    headers = planned(stored(generation=2, headers=previous)).headers

    assert [value for name, value in headers if name == REPLAY_OF_HEADER] == [b"sgpipe.raw/3/42/2"]
    assert [value for name, value in headers if name == REPLAY_GENERATION_HEADER] == [b"3"]


@pytest.mark.parametrize(
    ("letter", "why"),
    [
        (stored(b"\x00x", stage="sink", reason="undecodable_event"), SINK_NOT_REPLAYABLE),
        (stored(b""), NO_PAYLOAD),
        (stored(stage="unknown"), "not replayable: written by stage 'unknown', not the processor"),
    ],
)
def test_what_is_not_replayable_is_skipped_with_why(letter: StoredLetter, why: str) -> None:
    assert plan_replay(letter) == Skip(why)


# --- what the processor would make of it ---------------------------------------------------


def test_forecast_of_an_element_reports_it_at_its_original_index() -> None:
    (item,) = forecast(planned(stored(EVENT)))
    assert (item.index, item.event_id, item.reason) == (2, "ev-1", None)
    assert item.encoded_bytes > len(EVENT)
    assert expected_outcome([item], 10_000) == Outcome(WOULD_LAND, landed=1)
    # Under a smaller limit on the events topic's records it would be too large again.
    assert expected_outcome([item], 100) == Outcome(
        WOULD_BE_DEAD_LETTERED, again=("event_too_large",)
    )


def test_forecast_of_garbage_says_it_would_be_dead_lettered_again() -> None:
    (item,) = forecast(planned(stored()))
    assert (item.index, item.event_id, item.reason) == (2, None, "not_an_object")


def test_forecast_of_a_whole_batch_gives_each_element_its_index() -> None:
    body = b"[" + EVENT + b',"x",' + EVENT.replace(b"ev-1", b"ev-2") + b"]"
    items = forecast(planned(stored(body, event_index=WHOLE_RECORD, reason="invalid_raw_batch")))

    assert [(i.index, i.event_id, i.reason) for i in items] == [
        (0, "ev-1", None),
        (1, None, "not_an_object"),
        (2, "ev-2", None),
    ]
    assert expected_outcome(items, 10_000) == Outcome(
        WOULD_PARTLY_LAND, landed=2, again=("not_an_object",)
    )


def test_forecast_of_a_batch_that_is_still_not_json() -> None:
    letter = stored(b"not json", event_index=WHOLE_RECORD, reason="invalid_json")
    assert forecast(planned(letter)) == [ElementForecast(WHOLE_RECORD, reason="invalid_json")]


# --- what became of it -------------------------------------------------------------------------


def later(index: int, generation: int, reason: str, offset: int = 42) -> LaterLetter:
    return LaterLetter(DeadLetterOrigin(RAW, 3, offset, index), generation, reason)


def test_an_element_that_landed() -> None:
    letter = stored(EVENT)
    items = [ElementForecast(2, "ev-1", 100)]
    assert observed_outcome(letter, items, [], {"ev-1"}) == Outcome(LANDED, landed=1)
    # Not yet in email_events, nothing dead-lettered: not known yet.
    assert observed_outcome(letter, items, [], set()) is None


def test_an_element_dead_lettered_again_only_counts_a_later_generation() -> None:
    letter = stored(generation=1)
    items = [ElementForecast(2, reason="not_an_object")]
    # Its own row (generation 1), and a row of another letter of the record: not an outcome.
    assert observed_outcome(letter, items, [later(2, 1, "x"), later(3, 2, "y")], set()) is None
    assert observed_outcome(letter, items, [later(2, 2, "invalid_element")], set()) == Outcome(
        DEAD_LETTERED_AGAIN, again=("invalid_element",)
    )
    # Another record's letter at the same index is not this one's.
    assert observed_outcome(letter, items, [later(2, 5, "x", offset=43)], set()) is None


def test_a_whole_batch_partly_landed() -> None:
    letter = stored(b"...", event_index=WHOLE_RECORD, reason="invalid_raw_batch")
    items = [ElementForecast(0, "ev-1", 10), ElementForecast(1, reason="not_an_object")]
    seen = [later(1, 1, "not_an_object")]
    assert observed_outcome(letter, items, seen, {"ev-1"}) == Outcome(
        PARTLY_LANDED, landed=1, again=("not_an_object",)
    )
    assert observed_outcome(letter, items, [], {"ev-1"}) is None
    # The batch refused as a whole again.
    assert observed_outcome(letter, items, [later(WHOLE_RECORD, 1, "invalid_json")], set()) == (
        Outcome(DEAD_LETTERED_AGAIN, again=("invalid_json",))
    )


def test_outcomes_describe_themselves() -> None:
    assert Outcome(LANDED, landed=1).describe() == "landed (1 event)"
    assert Outcome(PARTLY_LANDED, landed=2, again=("b", "a", "a")).describe() == (
        "partly landed (2 events; dead-lettered again: a, b)"
    )
    assert Outcome(DEAD_LETTERED_AGAIN, again=("a",)).describe() == "dead-lettered again: a"
    assert Outcome("skipped", note="why").describe() == "skipped: why"


# --- SQL pieces --------------------------------------------------------------------------------


def test_strings_are_quoted_for_clickhouse() -> None:
    assert quote("it's a \\ test") == "'it\\'s a \\\\ test'"


def test_filters() -> None:
    since = datetime(2024, 5, 1, 10, 0, 0, 123456, tzinfo=UTC)
    assert LetterFilter(reason="x'y", since=since, pending_only=True).conditions() == [
        "reason = 'x\\'y'",
        "dead_lettered_at >= toDateTime64('2024-05-01 10:00:00.123', 3, 'UTC')",
        "replayed_at IS NULL",
    ]
    assert LetterFilter().conditions() == []


def test_a_stored_letter_reads_quoted_64_bit_integers_and_base64() -> None:
    letter = StoredLetter.from_json(
        json.loads(
            '{"source_topic":"raw","source_partition":1,"source_offset":"18446744073709551615",'
            '"event_index":-1,"stage":"process","reason":"r","detail":"d","webhook":"",'
            '"request_id":"","dead_lettered_at":"2024-01-01 00:00:00.000","replay_generation":0,'
            '"replayed_at":null,"payload_bytes":"3","payload_base64":"/wBh","headers":{"a":"b"}}'
        )
    )
    assert letter.origin == DeadLetterOrigin("raw", 1, 2**64 - 1, WHOLE_RECORD)
    assert (letter.payload, letter.payload_bytes, letter.pending) == (b"\xff\x00a", 3, True)
    assert letter.headers == {"a": "b"}
    assert letter_name(letter.origin) == "raw/1/18446744073709551615"
    assert letter_name(DeadLetterOrigin("raw", 1, 7, 4)) == "raw/1/7#4"


# --- output ------------------------------------------------------------------------------------


def test_excerpts_are_one_line_and_show_bytes_that_are_not_text() -> None:
    assert excerpt(b'"a"\n\t\x00\xff\xe9t\xc3\xa9', 11) == '"a"\\n\\t\\x00\\xff\\xe9té'
    assert excerpt(b"x" * 200, 200, limit=5) == "xxxxx..."
    # Only the start of a longer payload was read.
    assert excerpt(b"abc", 1000) == "abc..."


DAY_1, NOON_1, DAY_2 = (
    "2024-01-01 00:00:00.000",
    "2024-01-01 12:00:00.000",
    "2024-01-02 00:00:00.000",
)
SUMMARIES = [
    ReasonSummary("process", "not_an_object", 2, 1, DAY_1, DAY_2),
    ReasonSummary("sink", "undecodable_event", 1, 0, NOON_1, NOON_1),
]


def test_list_tsv_is_a_header_and_one_line_per_reason() -> None:
    assert list_tsv(SUMMARIES).splitlines() == [
        "stage\treason\tpending\treplayed\tfirst\tlast",
        "process\tnot_an_object\t2\t1\t2024-01-01 00:00:00.000\t2024-01-02 00:00:00.000",
        "sink\tundecodable_event\t1\t0\t2024-01-01 12:00:00.000\t2024-01-01 12:00:00.000",
    ]


def test_list_text_and_json_show_counts_range_and_samples() -> None:
    sample = stored()
    text = list_text("sgpipe.dead_letters", SUMMARIES, [sample])

    assert text.startswith(
        "4 dead letters in sgpipe.dead_letters: 3 pending, 1 replayed; "
        "dead-lettered 2024-01-01 00:00:00.000 .. 2024-01-02 00:00:00.000 UTC\n"
    )
    assert "process  not_an_object            2         1  2024-01-01 00:00:00.000" in text
    assert "not_an_object (process): showing 1 of 3\n" in text
    assert f"  {RAW}/3/42#2  2023-11-14 22:13:40.500  pending  webhook main request req-1" in text
    assert '    payload (14 bytes): "not an event"' in text

    document: dict[str, Any] = json.loads(list_json("sgpipe.dead_letters", SUMMARIES, [sample]))
    assert (document["total"], document["pending"], document["replayed"]) == (4, 3, 1)
    assert [len(reason["samples"]) for reason in document["reasons"]] == [1, 0]
    assert document["reasons"][0]["samples"][0]["payload_excerpt"] == '"not an event"'


def test_an_empty_list_says_so() -> None:
    assert list_text("t", [], []) == "no dead letters in t (for these filters)\n"


def test_replay_reports() -> None:
    lines = [
        ReplayLine(stored(), Outcome(DEAD_LETTERED_AGAIN, again=("not_an_object",))),
        ReplayLine(stored(EVENT, event_index=5), Outcome(LANDED, landed=1)),
    ]
    text = replay_text(RAW, lines, dry_run=False, waited_seconds=3.2)
    assert text.splitlines()[0] == f"replayed to {RAW}; after 3 s: 1 dead-lettered again, 1 landed"
    assert f"{RAW}/3/42#2  process  not_an_object  dead-lettered again: not_an_object" in text
    assert f"{RAW}/3/42#5  process  not_an_object  landed (1 event)" in text
    assert replay_tsv(lines).splitlines()[1] == (
        f"{RAW}/3/42#2\tprocess\tnot_an_object\tdead-lettered again\t0\tnot_an_object\t"
    )


# --- --since -----------------------------------------------------------------------------------

NOW = datetime(2024, 5, 10, 12, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("90m", NOW - timedelta(minutes=90)),
        ("12h", NOW - timedelta(hours=12)),
        ("7d", NOW - timedelta(days=7)),
        ("1.5h", NOW - timedelta(minutes=90)),
        ("2024-05-01", datetime(2024, 5, 1, tzinfo=UTC)),
        ("2024-05-01T10:00", datetime(2024, 5, 1, 10, tzinfo=UTC)),
        ("2024-05-01T10:00:00Z", datetime(2024, 5, 1, 10, tzinfo=UTC)),
        ("2024-05-01T12:00:00+02:00", datetime(2024, 5, 1, 10, tzinfo=UTC)),
    ],
)
def test_since_takes_durations_and_times(text: str, expected: datetime) -> None:
    assert parse_since(text, NOW) == expected


def test_since_refuses_anything_else() -> None:
    with pytest.raises(ValueError, match="neither a duration"):
        parse_since("last tuesday", NOW)
