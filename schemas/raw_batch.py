"""The raw-batch record on the raw topic: SendGrid's body, untouched, plus receipt metadata.

The Kafka value is the request body exactly as received (the ingress never parses it); the
metadata travels in Kafka headers. ``sgpipe-format`` names the layout so that a later layout
(an Avro envelope) can be introduced while processors still read this one. The ingress signs
the value and these headers (``schemas.raw_auth``); the processor reads none of them before the
signature verified.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

FORMAT_HEADER = "sgpipe-format"
FORMAT_SENDGRID_JSON_V1 = b"sendgrid-json/1"

WEBHOOK_HEADER = "sgpipe-webhook"
RECEIVED_AT_HEADER = "sgpipe-received-at-ms"
REQUEST_ID_HEADER = "sgpipe-request-id"
_WEBHOOK = WEBHOOK_HEADER
_RECEIVED_AT = RECEIVED_AT_HEADER
_REQUEST_ID = REQUEST_ID_HEADER
SIGNATURE_TIMESTAMP_HEADER = "sgpipe-signature-timestamp"
AUTHENTICATED_BY_HEADER = "sgpipe-authenticated-by"
CONTENT_TYPE_HEADER = "sgpipe-content-type"
_SIGNATURE_TIMESTAMP = SIGNATURE_TIMESTAMP_HEADER
_AUTHENTICATED_BY = AUTHENTICATED_BY_HEADER
_CONTENT_TYPE = CONTENT_TYPE_HEADER
# Arrival minus the signed timestamp, in milliseconds (signed batches only): how far into
# SendGrid's 24-hour retry window the batch arrived.
DELIVERY_DELAY_HEADER = "sgpipe-delivery-delay-ms"

KafkaHeaders = list[tuple[str, bytes]]


class InvalidRawBatch(ValueError):
    """The record is not a raw batch this version can read (deterministic: dead-letter it)."""


@dataclass(frozen=True, slots=True)
class RawBatch:
    webhook: str
    body: bytes
    received_at_ms: int
    request_id: str
    # The signed X-Twilio-Email-Event-Webhook-Timestamp, kept to study retries and replays.
    signature_timestamp: int | None
    # What the request carried: "signature", "token", "both" or "none" (allow_unsigned).
    authenticated_by: str
    content_type: str | None = None
    delivery_delay_ms: int | None = None


def raw_batch_headers(batch: RawBatch) -> KafkaHeaders:
    headers: KafkaHeaders = [
        (FORMAT_HEADER, FORMAT_SENDGRID_JSON_V1),
        (_WEBHOOK, batch.webhook.encode()),
        (_RECEIVED_AT, str(batch.received_at_ms).encode()),
        (_REQUEST_ID, batch.request_id.encode()),
        (_AUTHENTICATED_BY, batch.authenticated_by.encode()),
    ]
    if batch.signature_timestamp is not None:
        headers.append((_SIGNATURE_TIMESTAMP, str(batch.signature_timestamp).encode()))
    if batch.content_type is not None:
        headers.append((_CONTENT_TYPE, batch.content_type.encode("utf-8", "replace")))
    if batch.delivery_delay_ms is not None:
        headers.append((DELIVERY_DELAY_HEADER, str(batch.delivery_delay_ms).encode()))
    return headers


def decode_raw_batch(value: bytes | None, headers: Sequence[tuple[str, bytes]]) -> RawBatch:
    """Rebuild a RawBatch from a consumed record; InvalidRawBatch if it is not one."""
    fields = dict(headers)
    layout = fields.get(FORMAT_HEADER)
    if layout != FORMAT_SENDGRID_JSON_V1:
        raise InvalidRawBatch(f"unknown raw batch format {layout!r}")
    if value is None:
        raise InvalidRawBatch("raw batch record has no value")
    try:
        return RawBatch(
            webhook=fields[_WEBHOOK].decode(),
            body=value,
            received_at_ms=int(fields[_RECEIVED_AT]),
            request_id=fields[_REQUEST_ID].decode(),
            signature_timestamp=(
                int(fields[_SIGNATURE_TIMESTAMP]) if _SIGNATURE_TIMESTAMP in fields else None
            ),
            authenticated_by=fields[_AUTHENTICATED_BY].decode(),
            content_type=(
                fields[_CONTENT_TYPE].decode("utf-8", "replace")
                if _CONTENT_TYPE in fields
                else None
            ),
            delivery_delay_ms=(
                int(fields[DELIVERY_DELAY_HEADER]) if DELIVERY_DELAY_HEADER in fields else None
            ),
        )
    except KeyError as exc:
        raise InvalidRawBatch(f"raw batch header {exc.args[0]} is missing") from exc
    except (TypeError, AttributeError) as exc:
        # A header present without a value (Kafka allows a null header value).
        raise InvalidRawBatch(f"raw batch header has no value: {exc}") from exc
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidRawBatch(f"raw batch header is malformed: {exc}") from exc
