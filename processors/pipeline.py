"""The processor as a pure function of one consumed raw-batch record.

``process_raw_record(value, headers, metadata)`` splits the batch, normalizes and encodes each
event, and turns every failure into a DeadLetter with its reason. No Kafka client here: the
worker (``processors.worker``) feeds records in and sends what comes out.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field

from processors.errors import InvalidMessage
from processors.normalize import BatchContext, normalize_event
from processors.split import split_batch
from schemas.dead_letter import DeadLetter
from schemas.email_event import EmailEventCodec, SerializationError
from schemas.raw_batch import InvalidRawBatch, decode_raw_batch

STAGE = "processor"
# Room left in a Kafka request for a record's headers and the batch framing.
RECORD_HEADROOM_BYTES = 65_536
# Kafka's default message.max.bytes is 1 MB.
DEFAULT_MAX_RECORD_BYTES = 1_048_576 - RECORD_HEADROOM_BYTES


@dataclass(frozen=True, slots=True)
class Metadata:
    """Where a consumed record came from."""

    topic: str
    partition: int
    offset: int
    timestamp_ms: int


@dataclass(frozen=True, slots=True)
class EncodedEvent:
    sg_event_id: str
    event: str
    value: bytes


@dataclass(slots=True)
class ProcessedRecord:
    events: list[EncodedEvent] = field(default_factory=list)
    dead_letters: list[DeadLetter] = field(default_factory=list)


def process_raw_record(
    value: bytes | None,
    headers: Sequence[tuple[str, bytes]],
    metadata: Metadata,
    codec: EmailEventCodec,
    max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES,
) -> ProcessedRecord:
    """``max_record_bytes``: the largest value the events and dead-letter topics take; a
    bigger event is dead-lettered instead of failing its whole poll forever."""
    result = ProcessedRecord()

    def dead_letter(
        reason: str, detail: str, payload: bytes, event_index: int | None = None
    ) -> None:
        if len(payload) > max_record_bytes:
            # Too big for the dead-letter topic too; the raw record still holds it.
            detail = (
                f"{detail} (payload of {len(payload)} bytes omitted: read it at "
                f"{metadata.topic}/{metadata.partition}/{metadata.offset})"
            )
            payload = b""
        result.dead_letters.append(
            DeadLetter(
                reason=reason,
                detail=detail,
                stage=STAGE,
                payload=payload,
                original_topic=metadata.topic,
                original_partition=metadata.partition,
                original_offset=metadata.offset,
                event_index=event_index,
                context_headers=headers,
            )
        )

    try:
        batch = decode_raw_batch(value, headers)
    except InvalidRawBatch as exc:
        dead_letter("invalid_raw_batch", str(exc), value or b"")
        return result
    try:
        items = split_batch(batch.body)
    except InvalidMessage as exc:
        dead_letter(exc.reason, exc.detail, batch.body)
        return result

    context = BatchContext(
        webhook=batch.webhook, received_at_ms=batch.received_at_ms, request_id=batch.request_id
    )
    for index, item in enumerate(items):
        try:
            event = normalize_event(item, context)
            encoded = codec.encode(event)
        except InvalidMessage as exc:
            dead_letter(exc.reason, exc.detail, _event_bytes(item, batch.body), index)
            continue
        except SerializationError as exc:
            dead_letter("serialization_error", str(exc), _event_bytes(item, batch.body), index)
            continue
        if len(encoded) > max_record_bytes:
            dead_letter(
                "event_too_large",
                f"the encoded event is {len(encoded)} bytes, over {max_record_bytes}",
                _event_bytes(item, batch.body),
                index,
            )
            continue
        result.events.append(EncodedEvent(event.sg_event_id, event.event, encoded))
    return result


def _event_bytes(item: object, body: bytes) -> bytes:
    """The dead letter's payload for one event: the event as compact JSON, or, when it cannot
    be re-encoded (nesting too deep), the whole body; the event index still says which."""
    try:
        # ASCII escapes: an event can hold a lone surrogate (a valid JSON escape, invalid
        # Unicode) that UTF-8 cannot encode, and its dead letter must still be written.
        return json.dumps(item, separators=(",", ":")).encode()
    except RecursionError:
        return body
