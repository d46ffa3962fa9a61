"""The dead-letter record: what could not be processed, why, and where it came from.

The value is the offending bytes (a whole raw body, or one event as compact JSON); headers say
why (``sgpipe-dlq-reason`` is a stable code, ``sgpipe-dlq-detail`` is for people) and where it
came from, plus the raw batch's own headers (webhook, request id, ...) so it can be replayed.
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
