"""The processor as a pure function of one consumed raw-batch record.

``process_raw_record(message)`` splits the batch, normalizes and encodes each event, and turns
every failure into a Rejection with its reason (the runtime builds the dead letters). No Kafka
client here: the stage declaration (``processors.stage``) hands it to the runtime.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from processors.errors import InvalidMessage
from processors.normalize import BatchContext, normalize_event
from processors.split import split_batch
from schemas.email_event import EmailEventCodec, SerializationError
from schemas.raw_batch import InvalidRawBatch, decode_raw_batch
from sgpipe.runtime.dead_letters import Rejection
from sgpipe.runtime.kafka import RECORD_HEADROOM_BYTES
from sgpipe.runtime.messages import Message

# Kafka's default message.max.bytes is 1 MB.
DEFAULT_MAX_RECORD_BYTES = 1_048_576 - RECORD_HEADROOM_BYTES


@dataclass(frozen=True, slots=True)
class EncodedEvent:
    sg_event_id: str
    event: str
    value: bytes


@dataclass(slots=True)
class ProcessedRecord:
    events: list[EncodedEvent] = field(default_factory=list)
    rejections: list[Rejection] = field(default_factory=list)


def process_raw_record(
    message: Message,
    codec: EmailEventCodec,
    max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES,
) -> ProcessedRecord:
    """``max_record_bytes``: the largest value the events topic takes; a bigger event is
    rejected instead of failing its whole batch forever."""
    result = ProcessedRecord()
    try:
        batch = decode_raw_batch(message.value, message.headers)
    except InvalidRawBatch as exc:
        result.rejections.append(Rejection("invalid_raw_batch", str(exc)))
        return result
    try:
        items = split_batch(batch.body)
    except InvalidMessage as exc:
        result.rejections.append(Rejection(exc.reason, exc.detail))
        return result

    context = BatchContext(
        webhook=batch.webhook, received_at_ms=batch.received_at_ms, request_id=batch.request_id
    )
    for index, item in enumerate(items):
        try:
            event = normalize_event(item, context)
            encoded = codec.encode(event)
        except InvalidMessage as exc:
            result.rejections.append(
                Rejection(exc.reason, exc.detail, _event_bytes(item, batch.body), index)
            )
            continue
        except SerializationError as exc:
            result.rejections.append(
                Rejection("serialization_error", str(exc), _event_bytes(item, batch.body), index)
            )
            continue
        if len(encoded) > max_record_bytes:
            result.rejections.append(
                Rejection(
                    "event_too_large",
                    f"the encoded event is {len(encoded)} bytes, over {max_record_bytes}",
                    _event_bytes(item, batch.body),
                    index,
                )
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
