"""`sgpipe dlq`'s SQL against the real engine (chdb served over HTTP), rows written by the
dead-letter sink's own writer: what is pending and what replayed, in whichever order a mark
and a dead letter made of the replay arrive; filters, paging, and what a replay became."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path

import pytest

from schemas.dead_letter import (
    WHOLE_RECORD,
    DeadLetter,
    DeadLetterOrigin,
    dead_letter_headers,
    replay_headers,
)
from sgpipe.cli import _store_runner
from sgpipe.dlq.letters import LaterLetter
from sgpipe.dlq.store import DeadLetterStore, LetterFilter
from sgpipe.runtime.messages import Message
from sgpipe.runtime.settings import Settings
from sgpipe.runtime.stage import BatchInfo
from sinks.clickhouse import TableWriter
from sinks.dead_letters import DEAD_LETTERS, DeadLetterRow, dead_letter_row
from tests.integration.processes import ServedClickHouse, served_clickhouse

pytestmark = pytest.mark.clickhouse

DAY_MS = 86_400_000
T0 = 1_700_000_000_000


@pytest.fixture
def clickhouse(tmp_path: Path) -> Iterator[ServedClickHouse]:
    with served_clickhouse(tmp_path / "clickhouse") as served:
        yield served


@pytest.fixture
def settings(clickhouse: ServedClickHouse, unique_name: str) -> Settings:
    return Settings.model_validate(
        {"clickhouse": {"url": clickhouse.url, "database": f"db_{unique_name}"}}
    )


@pytest.fixture
def store(settings: Settings, tmp_path: Path) -> DeadLetterStore:
    return DeadLetterStore(_store_runner(tmp_path, settings), settings.clickhouse.database)


def row(
    offset: int,
    reason: str = "not_an_object",
    *,
    index: int | None = 0,
    at_ms: int = T0,
    replay_of: DeadLetterOrigin | None = None,
    generation: int = 1,
) -> DeadLetterRow:
    context = replay_headers(replay_of, generation) if replay_of is not None else []
    letter = DeadLetter(reason, f"{reason}!", "process", b"[1]", "raw", 0, offset, index, context)
    headers = tuple(dead_letter_headers(letter))
    return dead_letter_row(Message("dlq", 0, 0, at_ms, None, letter.payload, headers))


def write(clickhouse: ServedClickHouse, settings: Settings, rows: Sequence[DeadLetterRow]) -> None:
    """Through the dead-letter sink's writer (which applies the migrations first)."""

    async def insert() -> None:
        writer = TableWriter(settings.clickhouse, None, stage="test", table=DEAD_LETTERS)
        await writer.start()
        try:
            # Each call its own batch (its own offsets: a fresh deduplication token).
            await writer.write(rows, BatchInfo({(f"dlq-{uuid.uuid4().hex}", 0): (0, 0)}))
        finally:
            await writer.stop()

    asyncio.run(insert())


def state(clickhouse: ServedClickHouse, settings: Settings) -> str:
    return clickhouse.query(
        "SELECT source_offset, event_index, reason, replay_generation, replayed_at IS NOT NULL "
        f"FROM {settings.clickhouse.database}.dead_letters FINAL ORDER BY source_offset"
    )


def test_a_mark_and_the_replays_dead_letter_settle_the_same_in_either_order(
    clickhouse: ServedClickHouse, settings: Settings, store: DeadLetterStore
) -> None:
    # Mutation caught: the mark's version at or above the next generation's (2g + 2).
    write(clickhouse, settings, [row(1), row(2)])
    pending = store.letters(LetterFilter(pending_only=True), None, 10)
    assert [letter.origin.offset for letter in pending] == [1, 2]

    # Letter 1: marked, then dead-lettered again. Letter 2: dead-lettered again first (a fast
    # pipeline), then the mark, which must not hide the newer letter.
    store.mark_replayed(pending[:1])
    assert state(clickhouse, settings) == "1\t0\tnot_an_object\t0\t1\n2\t0\tnot_an_object\t0\t0\n"
    write(
        clickhouse,
        settings,
        [
            row(901, "invalid_element", replay_of=DeadLetterOrigin("raw", 0, 1, 0)),
            row(902, "invalid_element", replay_of=DeadLetterOrigin("raw", 0, 2, 0)),
        ],
    )
    store.mark_replayed(pending[1:])
    # And the first dead letter once more, redelivered: it changes nothing.
    write(clickhouse, settings, [row(1), row(2)])

    assert state(clickhouse, settings) == (
        "1\t0\tinvalid_element\t1\t0\n2\t0\tinvalid_element\t1\t0\n"
    )
    assert store.later_letters(pending) == [
        LaterLetter(DeadLetterOrigin("raw", 0, 1, 0), 1, "invalid_element"),
        LaterLetter(DeadLetterOrigin("raw", 0, 2, 0), 1, "invalid_element"),
    ]


def test_summary_samples_and_filters(
    clickhouse: ServedClickHouse, settings: Settings, store: DeadLetterStore
) -> None:
    write(
        clickhouse,
        settings,
        [
            row(1, at_ms=T0),
            row(2, at_ms=T0 + DAY_MS),
            row(3, "invalid_json", index=None, at_ms=T0 + 2 * DAY_MS),
            row(4, at_ms=T0 + 3 * DAY_MS),
        ],
    )
    store.mark_replayed(store.letters(LetterFilter(reason="invalid_json"), None, 10))

    summary = {
        (s.reason, s.pending, s.replayed, s.first, s.last) for s in store.summary(LetterFilter())
    }
    assert summary == {
        ("not_an_object", 3, 0, "2023-11-14 22:13:20.000", "2023-11-17 22:13:20.000"),
        ("invalid_json", 0, 1, "2023-11-16 22:13:20.000", "2023-11-16 22:13:20.000"),
    }
    since = LetterFilter(since=store_time(T0 + DAY_MS))
    assert {(s.reason, s.total) for s in store.summary(since)} == {
        ("not_an_object", 2),
        ("invalid_json", 1),
    }
    assert store.summary(LetterFilter(reason="nope")) == []

    samples = store.samples(LetterFilter(), per_reason=2, excerpt_bytes=2)
    # Pending first, newest first; at most two per reason; the excerpt cut, the size whole.
    assert [(s.reason, s.origin.offset) for s in samples] == [
        ("invalid_json", 3),
        ("not_an_object", 4),
        ("not_an_object", 2),
    ]
    assert samples[0].origin.event_index == WHOLE_RECORD
    assert (samples[1].payload, samples[1].payload_bytes, samples[1].headers) == (b"[1", 3, {})


def test_letters_are_paged_in_key_order(
    clickhouse: ServedClickHouse, settings: Settings, store: DeadLetterStore
) -> None:
    write(
        clickhouse, settings, [row(offset, index=index) for offset in (5, 1, 3) for index in (1, 0)]
    )
    seen: list[tuple[int, int]] = []
    after = None
    while page := store.letters(LetterFilter(), after, 4):
        seen.extend((letter.origin.offset, letter.origin.event_index) for letter in page)
        after = page[-1].origin
    assert seen == [(1, 0), (1, 1), (3, 0), (3, 1), (5, 0), (5, 1)]
    (first,) = store.letters(LetterFilter(), None, 1)
    assert first.payload == b"[1]"
    assert first.headers["sgpipe-dlq-reason"] == "not_an_object"


def test_landed_reads_email_events(
    clickhouse: ServedClickHouse, settings: Settings, store: DeadLetterStore
) -> None:
    write(clickhouse, settings, [row(1)])  # applies every migration
    database = settings.clickhouse.database
    clickhouse.query(
        f"INSERT INTO {database}.email_events (webhook, event, sg_event_id, event_time, "
        "received_at, request_id, raw) VALUES "
        "('main', 'open', 'ev-1', '2024-01-01 00:00:00', '2024-01-01 00:00:00', 'r', '{}'), "
        "('main', 'open', 'it''s', '2024-01-01 00:00:00', '2024-01-01 00:00:00', 'r', '{}')"
    )
    assert store.landed(["ev-1", "ev-2", "it's"]) == {"ev-1", "it's"}
    assert store.exists()
    assert not DeadLetterStore(_store_runner(Path("."), settings), "nothing_here").exists()


def store_time(milliseconds: int) -> datetime:
    return datetime.fromtimestamp(milliseconds / 1000, tz=UTC)
