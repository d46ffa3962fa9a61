"""The processor as a pure function of one consumed raw-batch record.

``process_raw_record(value, headers, metadata)`` splits the batch into its elements' exact
bytes, parses, normalizes and encodes each element on its own, and turns every failure into a
DeadLetter with its reason. Every element ends as exactly one event or one dead letter; only a
body that is not a JSON array is dead-lettered whole. No Kafka client here: the worker
(``processors.worker``) feeds records in and sends what comes out.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

from processors.errors import InvalidMessage
from processors.normalize import BatchContext, normalize_event
from processors.split import parse_element, split_elements
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
    # The events topic's Kafka key (sg_message_id, else sg_event_id; see docs/consuming.md).
    key: bytes
    coercion_errors: tuple[str, ...] = ()


@dataclass(slots=True)
class ProcessedRecord:
    events: list[EncodedEvent] = field(default_factory=list)
    dead_letters: list[DeadLetter] = field(default_factory=list)
    # Fields that could not be coerced, counted by field (the COERCION_ERRORS metric).
    coercion_errors: Counter[str] = field(default_factory=Counter)


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
        elements = split_elements(batch.body)
    except InvalidMessage as exc:
        dead_letter(exc.reason, exc.detail, batch.body)
        return result

    context = BatchContext(
        webhook=batch.webhook, received_at_ms=batch.received_at_ms, request_id=batch.request_id
    )
    for index, element in enumerate(elements):
        try:
            item, raw = parse_element(element)
            normalized = normalize_event(item, raw, context)
            encoded = codec.encode(normalized.record)
        except InvalidMessage as exc:
            dead_letter(exc.reason, exc.detail, element, index)
            continue
        except RecursionError:
            # Parsed at the edge of the parser's depth limit, then too deep to re-encode.
            dead_letter("invalid_element", "the element nests JSON too deeply", element, index)
            continue
        except SerializationError as exc:
            dead_letter("serialization_error", str(exc), element, index)
            continue
        if len(encoded) > max_record_bytes:
            dead_letter(
                "event_too_large",
                f"the encoded event is {len(encoded)} bytes, over {max_record_bytes}",
                element,
                index,
            )
            continue
        result.events.append(
            EncodedEvent(
                normalized.sg_event_id,
                normalized.event,
                encoded,
                normalized.key.encode("utf-8"),
                normalized.coercion_errors,
            )
        )
        result.coercion_errors.update(normalized.coercion_errors)
    return result
