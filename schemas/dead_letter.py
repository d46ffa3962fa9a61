"""The dead-letter record: what could not be processed, why, and where it came from.

The value is the offending bytes (a whole raw body, or one event as compact JSON); headers say
why (``sgpipe-dlq-reason`` is a stable code, ``sgpipe-dlq-detail`` is for people) and where it
came from, plus the raw batch's own headers (webhook, request id, ...) so it can be replayed.

A replayed raw batch (``sgpipe dlq replay``) carries the identity of the dead letter it
replays in ``sgpipe-replay-of`` and its replay count in ``sgpipe-replay-generation``; both pass
through the processor into any dead letter it makes of it again, so the stored dead letter
keeps one identity however often it is replayed (docs/dead-letters.md).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

REASON_HEADER = "sgpipe-dlq-reason"
DETAIL_HEADER = "sgpipe-dlq-detail"
STAGE_HEADER = "sgpipe-dlq-stage"
ORIGINAL_TOPIC_HEADER = "sgpipe-original-topic"
ORIGINAL_PARTITION_HEADER = "sgpipe-original-partition"
ORIGINAL_OFFSET_HEADER = "sgpipe-original-offset"
EVENT_INDEX_HEADER = "sgpipe-event-index"
REPLAY_OF_HEADER = "sgpipe-replay-of"
REPLAY_GENERATION_HEADER = "sgpipe-replay-generation"

# The headers a dead letter adds to its record's own; what remains are the context headers.
DEAD_LETTER_HEADERS = frozenset(
    {
        REASON_HEADER,
        DETAIL_HEADER,
        STAGE_HEADER,
        ORIGINAL_TOPIC_HEADER,
        ORIGINAL_PARTITION_HEADER,
        ORIGINAL_OFFSET_HEADER,
        EVENT_INDEX_HEADER,
    }
)
# An event index that stands for the whole record rather than one element of it.
WHOLE_RECORD = -1

# Kafka headers are not meant for essays; the full text of a parse error is enough at 1 KB.
_MAX_DETAIL_BYTES = 1024


@dataclass(frozen=True, slots=True)
class DeadLetter:
    reason: str
    detail: str
    stage: str  # the stage label: "process" or "sink"
    payload: bytes
    original_topic: str
    original_partition: int
    original_offset: int
    event_index: int | None = None  # position in the raw batch, for one bad event
    context_headers: Sequence[tuple[str, bytes]] = field(default=())


def dead_letter_headers(letter: DeadLetter) -> list[tuple[str, bytes]]:
    headers = [
        (REASON_HEADER, letter.reason.encode()),
        (DETAIL_HEADER, _truncate_utf8(letter.detail, _MAX_DETAIL_BYTES)),
        (STAGE_HEADER, letter.stage.encode()),
        (ORIGINAL_TOPIC_HEADER, letter.original_topic.encode()),
        (ORIGINAL_PARTITION_HEADER, str(letter.original_partition).encode()),
        (ORIGINAL_OFFSET_HEADER, str(letter.original_offset).encode()),
    ]
    if letter.event_index is not None:
        headers.append((EVENT_INDEX_HEADER, str(letter.event_index).encode()))
    own = {name for name, _ in headers}
    headers.extend((name, value) for name, value in letter.context_headers if name not in own)
    return headers


def _truncate_utf8(text: str, limit: int) -> bytes:
    # Cut on a character boundary: the header must stay text for people and replay tools.
    encoded = text.encode("utf-8", "replace")[:limit]
    return encoded.decode("utf-8", "ignore").encode("utf-8")


@dataclass(frozen=True, slots=True)
class DeadLetterOrigin:
    """Where a dead letter's bytes first came from: its identity across replays."""

    topic: str
    partition: int
    offset: int
    event_index: int = WHOLE_RECORD  # WHOLE_RECORD: the whole record

    def header_value(self) -> bytes:
        # Kafka topic names cannot hold "/", so the value splits back unambiguously.
        return f"{self.topic}/{self.partition}/{self.offset}/{self.event_index}".encode()


def replay_headers(origin: DeadLetterOrigin, generation: int) -> list[tuple[str, bytes]]:
    """The headers that mark a raw batch as the ``generation``-th replay of ``origin``."""
    return [
        (REPLAY_OF_HEADER, origin.header_value()),
        (REPLAY_GENERATION_HEADER, str(generation).encode()),
    ]


def parse_replay_of(value: bytes) -> DeadLetterOrigin | None:
    """The origin in a ``sgpipe-replay-of`` header; None when it is not one."""
    try:
        topic, partition, offset, event_index = value.decode().rsplit("/", 3)
        return DeadLetterOrigin(topic, int(partition), int(offset), int(event_index))
    except (UnicodeDecodeError, ValueError):
        return None
