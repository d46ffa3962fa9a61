"""The golden event fixtures: SendGrid payloads (``tests/fixtures/events``) and the typed records
they must become (``tests/fixtures/typed``: the fields that differ from their defaults, times as
ISO 8601 UTC), shared by the Avro and the ClickHouse golden tests."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from processors.pipeline import process_raw_record
from schemas.email_event import EmailEventCodec
from schemas.event_fields import EVENT_FIELDS
from schemas.raw_batch import RawBatch, raw_batch_headers
from sgpipe.runtime.messages import Message

ROOT = Path(__file__).resolve().parent.parent
EVENT_FIXTURES = ROOT / "tests" / "fixtures" / "events"
TYPED_FIXTURES = ROOT / "tests" / "fixtures" / "typed"
DEFAULTS: dict[str, Any] = {f.name: f.default for f in EVENT_FIELDS}
WEBHOOK = "main"
RECEIVED_AT_MS = 1_700_000_100_000
REQUEST_ID = "req-1"


def fixture_names() -> list[str]:
    return sorted(path.stem for path in EVENT_FIXTURES.glob("*.json"))


def payload(name: str) -> bytes:
    """The fixture's element exactly as SendGrid would send it inside its array."""
    return (EVENT_FIXTURES / f"{name}.json").read_bytes().strip()


def iso(value: datetime) -> str:
    if value.tzinfo is None:  # clickhouse-connect returns UTC as naive datetimes
        value = value.replace(tzinfo=UTC)
    value = value.astimezone(UTC)
    return value.strftime("%Y-%m-%dT%H:%M:%S.") + f"{value.microsecond // 1000:03d}Z"


def json_form(record: dict[str, Any]) -> dict[str, Any]:
    """A record with its datetimes as ISO text, as the typed fixtures write them."""
    return {k: iso(v) if isinstance(v, datetime) else v for k, v in record.items()}


def expected_record(name: str, **context: Any) -> dict[str, Any]:
    """The whole typed record the fixture must become (``context`` overrides webhook,
    received_at, request_id)."""
    typed = json.loads((TYPED_FIXTURES / f"{name}.json").read_text("utf-8"))
    return {
        **DEFAULTS,
        "event_time": "1970-01-01T00:00:00.000Z",
        "webhook": WEBHOOK,
        "received_at": iso(datetime.fromtimestamp(RECEIVED_AT_MS / 1000, UTC)),
        "request_id": REQUEST_ID,
        "raw": payload(name).decode("utf-8"),
        **typed,
        **context,
    }


def encoded_events(
    elements: list[bytes],
    codec: EmailEventCodec,
    *,
    webhook: str = WEBHOOK,
    received_at_ms: int = RECEIVED_AT_MS,
    request_id: str = REQUEST_ID,
) -> list[bytes]:
    """``elements`` posted as one SendGrid batch and processed: the events topic's values."""
    body = b"[" + b",\r\n".join(elements) + b"]\r\n"
    batch = RawBatch(webhook, body, received_at_ms, request_id, None, "signature")
    message = Message("raw", 0, 0, 0, None, body, raw_batch_headers(batch))
    result = process_raw_record(message, codec)
    assert result.rejections == []
    return [event.value for event in result.events]
