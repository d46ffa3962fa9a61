"""The dead-letter sink, declared: the dead-letter topic -> ClickHouse ``dead_letters``.

Step: ``dead_letter_row`` reads one dead letter (its bytes and ``sgpipe-dlq-*`` /
``sgpipe-original-*`` headers, ``schemas.dead_letter``) into a row. It is total: any record on
the topic becomes a row, a foreign or damaged one with what can be read of it. Writer: a
column-oriented insert into ``dead_letters`` (``TableWriter``); the runtime commits the topic's
offsets only after ClickHouse accepted the insert. The stage never dead-letters
(``writes_dead_letters=False``): its dead letters would land on the topic it reads.

Rows are idempotent: the table is a ReplacingMergeTree keyed by the letter's identity (source
topic, partition, offset, event index) with ``version = 2 * replay_generation``, so a
redelivered letter replaces itself. A replayed raw batch names the letter it replays in
``sgpipe-replay-of``; a dead letter made of it again takes that identity and the next
generation, so it replaces the replayed letter instead of adding one
(docs/dead-letters.md). ``sgpipe sink`` runs this stage next to the events sink.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from datetime import UTC, datetime
from typing import Any, Final

from schemas.dead_letter import (
    DETAIL_HEADER,
    EVENT_INDEX_HEADER,
    ORIGINAL_OFFSET_HEADER,
    ORIGINAL_PARTITION_HEADER,
    ORIGINAL_TOPIC_HEADER,
    REASON_HEADER,
    REPLAY_GENERATION_HEADER,
    REPLAY_OF_HEADER,
    STAGE_HEADER,
    WHOLE_RECORD,
    DeadLetterOrigin,
    parse_replay_of,
)
from schemas.raw_batch import RECEIVED_AT_HEADER, REQUEST_ID_HEADER, WEBHOOK_HEADER
from sgpipe.runtime.kafka import max_record_bytes
from sgpipe.runtime.messages import Message
from sgpipe.runtime.metrics import STAGE_DEAD_LETTERS
from sgpipe.runtime.settings import Settings
from sgpipe.runtime.stage import ConsumerStage, StageOptions, Transformed
from sinks.clickhouse import Table, TableWriter, missing_columns

DEAD_LETTERS_TABLE: Final = "dead_letters"
# A letter without the header (written by something else than sgpipe) still gets one.
UNKNOWN: Final = "unknown"

# Column ranges (UInt32, UInt64, Int32): a header outside them is treated as absent rather
# than failing the insert of the whole batch.
_UINT32_MAX: Final = 2**32 - 1
_UINT64_MAX: Final = 2**64 - 1
_INT32_MAX: Final = 2**31 - 1
# The last millisecond DateTime64(3) holds (2299-12-31 23:59:59.999 UTC).
_MAX_DATETIME64_MS: Final = 10_413_791_999_999


@dataclass(frozen=True, slots=True)
class DeadLetterRow:
    """One row of ``dead_letters``, its fields in column order (``DEAD_LETTER_COLUMNS``)."""

    source_topic: str
    source_partition: int
    source_offset: int
    event_index: int  # WHOLE_RECORD (-1): the whole record
    reason: str
    detail: str
    stage: str
    webhook: str
    request_id: str
    received_at: datetime | None
    headers: dict[str, str]
    payload: bytes
    dead_lettered_at: datetime
    replay_generation: int
    version: int

    @property
    def origin(self) -> DeadLetterOrigin:
        return DeadLetterOrigin(
            self.source_topic, self.source_partition, self.source_offset, self.event_index
        )


# The columns the stage writes; the table's others (replayed_at, inserted_at) have defaults.
DEAD_LETTER_COLUMNS: Final[tuple[str, ...]] = tuple(field.name for field in fields(DeadLetterRow))


def dead_letter_row(message: Message) -> DeadLetterRow:
    """The row for one record of the dead-letter topic (pure, never raises)."""
    headers = _last_values(message.headers)
    origin = _origin(headers, message)
    replay_of = parse_replay_of(headers[REPLAY_OF_HEADER]) if REPLAY_OF_HEADER in headers else None
    generation = 0
    if replay_of is not None:
        # The identity of the letter that was replayed. A whole record replayed may come back
        # as dead letters of single elements: each keeps its own index.
        index = replay_of.event_index
        if index == WHOLE_RECORD:
            index = origin.event_index
        origin = DeadLetterOrigin(replay_of.topic, replay_of.partition, replay_of.offset, index)
        generation = _bounded_int(headers.get(REPLAY_GENERATION_HEADER), 1, _UINT32_MAX // 2 - 1)
    received_at_ms = _bounded_int(headers.get(RECEIVED_AT_HEADER), -1, _MAX_DATETIME64_MS)
    return DeadLetterRow(
        source_topic=origin.topic,
        source_partition=origin.partition,
        source_offset=origin.offset,
        event_index=origin.event_index,
        reason=_text(headers.get(REASON_HEADER)) or UNKNOWN,
        detail=_text(headers.get(DETAIL_HEADER)),
        stage=_text(headers.get(STAGE_HEADER)) or UNKNOWN,
        webhook=_text(headers.get(WEBHOOK_HEADER)),
        request_id=_text(headers.get(REQUEST_ID_HEADER)),
        received_at=_utc(received_at_ms) if received_at_ms >= 0 else None,
        headers={name: _text(value) for name, value in headers.items()},
        payload=message.value or b"",
        dead_lettered_at=_utc(min(max(message.timestamp_ms, 0), _MAX_DATETIME64_MS)),
        replay_generation=generation,
        version=2 * generation,
    )


def dead_letter_columns(rows: Sequence[DeadLetterRow]) -> list[list[Any]]:
    """One list per column of DEAD_LETTER_COLUMNS."""
    return [[getattr(row, name) for row in rows] for name in DEAD_LETTER_COLUMNS]


DEAD_LETTERS: Final[Table[DeadLetterRow]] = Table(
    DEAD_LETTERS_TABLE,
    DEAD_LETTER_COLUMNS,
    dead_letter_columns,
    missing_columns((*DEAD_LETTER_COLUMNS, "replayed_at")),
)


def dead_letter_stage(
    settings: Settings, clickhouse_url: str | None = None
) -> ConsumerStage[DeadLetterRow]:
    """``clickhouse_url`` overrides ``clickhouse.url`` (the embedded store's address)."""

    def transform(message: Message) -> Transformed[DeadLetterRow]:
        return Transformed([dead_letter_row(message)])

    def writer(producer: Any) -> TableWriter[DeadLetterRow]:
        return TableWriter(
            settings.clickhouse, clickhouse_url, stage=STAGE_DEAD_LETTERS, table=DEAD_LETTERS
        )

    return ConsumerStage(
        name=STAGE_DEAD_LETTERS,
        topic=settings.kafka.topics.dead_letter,
        group_id=settings.sink.dead_letter_group_id,
        options=StageOptions.from_settings(
            STAGE_DEAD_LETTERS,
            settings.sink,
            max_dead_letter_payload_bytes=max_record_bytes(settings.kafka),
        ),
        transform=transform,
        writer=writer,
        writes_dead_letters=False,
        # Every `sgpipe sink` replica runs this stage; the dead-letter topic may have fewer
        # partitions than there are replicas, and a replica without one is still a good sink.
        ready_without_partitions=True,
    )


def _last_values(headers: Sequence[tuple[str, bytes]]) -> dict[str, bytes]:
    # A header repeated (which sgpipe never writes) keeps its last value.
    return {name: value or b"" for name, value in headers}


def _origin(headers: Mapping[str, bytes], message: Message) -> DeadLetterOrigin:
    """Where the letter's bytes came from; a letter that does not say is its own origin."""
    topic = _text(headers.get(ORIGINAL_TOPIC_HEADER))
    partition = _bounded_int(headers.get(ORIGINAL_PARTITION_HEADER), -1, _UINT32_MAX)
    offset = _bounded_int(headers.get(ORIGINAL_OFFSET_HEADER), -1, _UINT64_MAX)
    if not topic or partition < 0 or offset < 0:
        return DeadLetterOrigin(message.topic, message.partition, message.offset)
    event_index = _bounded_int(headers.get(EVENT_INDEX_HEADER), WHOLE_RECORD, _INT32_MAX)
    return DeadLetterOrigin(topic, partition, offset, event_index)


def _bounded_int(value: bytes | None, default: int, maximum: int) -> int:
    """The non-negative integer in ``value``, else ``default``."""
    if value is None:
        return default
    try:
        number = int(value.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        return default
    return number if 0 <= number <= maximum else default


def _text(value: bytes | None) -> str:
    return "" if value is None else value.decode("utf-8", "replace")


def _utc(milliseconds: int) -> datetime:
    return datetime.fromtimestamp(milliseconds / 1000, tz=UTC)
