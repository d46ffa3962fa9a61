"""EmailEvent: the normalized event, and its Avro encoding on the events topic.

Records use Avro single-object encoding (Avro spec, "Single-object encoding"): the two bytes
``C3 01``, the schema's 8-byte CRC-64-AVRO fingerprint, then the binary-encoded record. A
consumer can thus tell which schema wrote a record without a registry; a registry-based wire
format can be added beside it later.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from typing import Any

from fastavro import parse_schema, schemaless_reader, schemaless_writer
from fastavro.schema import fingerprint, to_parsing_canonical_form

from schemas import avro_schema_json

SINGLE_OBJECT_MAGIC = b"\xc3\x01"


class SerializationError(ValueError):
    """A record could not be encoded or decoded against the EmailEvent schema."""


@dataclass(frozen=True, slots=True)
class EmailEvent:
    webhook: str
    event: str
    sg_event_id: str
    event_time_ms: int
    email: str | None
    sg_message_id: str | None
    smtp_id: str | None
    category: list[str]
    custom_args: dict[str, str]
    received_at_ms: int
    request_id: str
    raw: str = field(repr=False)


class EmailEventCodec:
    """Encodes EmailEvents and decodes them back to column values; the schema is parsed once."""

    def __init__(self) -> None:
        self._schema = parse_schema(avro_schema_json("email_event"))
        self.fingerprint = bytes.fromhex(
            fingerprint(to_parsing_canonical_form(self._schema), "CRC-64-AVRO")
        )
        self._prefix = SINGLE_OBJECT_MAGIC + self.fingerprint

    def encode(self, event: EmailEvent) -> bytes:
        # Built by hand: dataclasses.asdict deep-copies every list and dict, and was most of
        # the processor's time per event.
        record = {
            "webhook": event.webhook,
            "event": event.event,
            "sg_event_id": event.sg_event_id,
            "event_time": event.event_time_ms,
            "email": event.email,
            "sg_message_id": event.sg_message_id,
            "smtp_id": event.smtp_id,
            "category": event.category,
            "custom_args": event.custom_args,
            "received_at": event.received_at_ms,
            "request_id": event.request_id,
            "raw": event.raw,
        }
        buffer = io.BytesIO()
        buffer.write(self._prefix)
        try:
            schemaless_writer(buffer, self._schema, record)
        except (ValueError, TypeError, OverflowError) as exc:
            raise SerializationError(f"cannot encode event {event.sg_event_id!r}: {exc}") from exc
        return buffer.getvalue()

    def decode(self, payload: bytes) -> dict[str, Any]:
        """The record as a dict; ``event_time``/``received_at`` are aware UTC datetimes."""
        if payload[:10] != self._prefix:
            raise SerializationError(
                "not an EmailEvent single-object record (unknown magic or schema fingerprint "
                f"{payload[2:10].hex()!r})"
            )
        try:
            record = schemaless_reader(io.BytesIO(payload[10:]), self._schema)
        except (ValueError, TypeError, OverflowError, EOFError, IndexError) as exc:
            raise SerializationError(f"cannot decode EmailEvent: {exc}") from exc
        if not isinstance(record, dict):
            raise SerializationError("EmailEvent payload did not decode to a record")
        return record
