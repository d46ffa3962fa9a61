"""The processor as a pure function of one consumed raw-batch record.

``process_raw_record(message)`` splits the batch into its elements' exact bytes, parses,
normalizes and encodes each element on its own, and turns every failure into a Rejection with
its reason (the runtime builds the dead letters). Every element ends as exactly one event or
one rejection; only a body that is not a JSON array is rejected whole, and so is one with more
than ``MAX_REJECTIONS_PER_RECORD`` bad elements (``too_many_invalid_elements``): past the limit
bad elements are counted, not kept, so that a hostile batch of millions costs a counter. No
Kafka client here: the stage declaration (``processors.stage``) hands it to the runtime.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from processors.errors import InvalidMessage
from processors.normalize import BatchContext, normalize_event
from processors.pii import PiiPolicy
from processors.split import parse_element, split_elements
from schemas.email_event import EmailEventCodec, SerializationError
from schemas.raw_batch import InvalidRawBatch, decode_raw_batch
from sgpipe.runtime.dead_letters import (
    MAX_REJECTIONS_PER_RECORD,
    Rejection,
    too_many_rejections,
)
from sgpipe.runtime.kafka import RECORD_HEADROOM_BYTES
from sgpipe.runtime.messages import Message

# Kafka's default message.max.bytes is 1 MB.
DEFAULT_MAX_RECORD_BYTES = 1_048_576 - RECORD_HEADROOM_BYTES


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
    rejections: list[Rejection] = field(default_factory=list)
    # Fields that could not be coerced, counted by field (the COERCION_ERRORS metric).
    coercion_errors: Counter[str] = field(default_factory=Counter)
    # Personal fields the PII policy hashed or dropped, counted by field.
    pii_masked: Counter[str] = field(default_factory=Counter)
    # Every rejected element, counted by reason, kept or not.
    rejected: Counter[str] = field(default_factory=Counter)

    def reject(self, rejection: Rejection) -> None:
        """Keep ``rejection`` while the record is under the limit; past it, count it only."""
        self.rejected[rejection.reason] += 1
        if len(self.rejections) < MAX_REJECTIONS_PER_RECORD:
            self.rejections.append(rejection)

    def collapse_past_the_limit(self) -> None:
        if self.rejected.total() > MAX_REJECTIONS_PER_RECORD:
            self.rejections = [too_many_rejections(self.rejected)]


def process_raw_record(
    message: Message,
    codec: EmailEventCodec,
    max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES,
    *,
    pii: PiiPolicy | None = None,
) -> ProcessedRecord:
    """``max_record_bytes``: the largest value the events topic takes; a bigger event is
    rejected instead of failing its whole batch forever. ``pii``: applied to each event
    object before it is normalized (processors/pii.py)."""
    result = ProcessedRecord()
    try:
        batch = decode_raw_batch(message.value, message.headers)
    except InvalidRawBatch as exc:
        result.rejections.append(Rejection("invalid_raw_batch", str(exc)))
        return result
    try:
        elements = split_elements(batch.body)
    except InvalidMessage as exc:
        result.rejections.append(Rejection(exc.reason, exc.detail))
        return result

    context = BatchContext(
        webhook=batch.webhook, received_at_ms=batch.received_at_ms, request_id=batch.request_id
    )
    for index, element in enumerate(elements):
        # A rejected element's payload is its exact bytes, as SendGrid sent them.
        try:
            item, raw = parse_element(element)
            if pii is not None:
                item, raw, masked = pii.apply(item, raw)
                result.pii_masked.update(masked)
            normalized = normalize_event(item, raw, context)
            encoded = codec.encode(normalized.record)
        except InvalidMessage as exc:
            result.reject(Rejection(exc.reason, exc.detail, element, index))
            continue
        except RecursionError:
            # Parsed at the edge of the parser's depth limit, then too deep to re-encode.
            result.reject(
                Rejection("invalid_element", "the element nests JSON too deeply", element, index)
            )
            continue
        except SerializationError as exc:
            result.reject(Rejection("serialization_error", str(exc), element, index))
            continue
        key = normalized.key.encode("utf-8")
        # The key counts too: a record over the producer's limit would fail the whole batch.
        if len(encoded) + len(key) > max_record_bytes:
            result.reject(
                Rejection(
                    "event_too_large",
                    f"the encoded event and its key are {len(encoded) + len(key)} bytes, "
                    f"over {max_record_bytes}",
                    element,
                    index,
                )
            )
            continue
        result.events.append(
            EncodedEvent(
                normalized.sg_event_id,
                normalized.event,
                encoded,
                key,
                normalized.coercion_errors,
            )
        )
        result.coercion_errors.update(normalized.coercion_errors)
    result.collapse_past_the_limit()
    return result
