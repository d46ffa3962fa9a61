"""Map: one parsed SendGrid event object -> EmailEvent, or InvalidEvent with the reason.

Every field is optional and every type untrusted (see docs: ``timestamp`` as a string or in
milliseconds, ``category`` as a string or an array, ``sg_message_id`` with a leading space).
Only ``event``, ``sg_event_id`` and ``timestamp`` are required: without them an event cannot be
typed, deduplicated or placed in time.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from processors.errors import InvalidEvent
from schemas.email_event import EmailEvent

# Every key SendGrid documents (or is seen sending). Any other top-level key is a custom
# argument set by the sender; on a name collision the reserved meaning wins.
RESERVED_FIELDS = frozenset(
    {
        "email", "timestamp", "event", "sg_event_id", "sg_message_id", "smtp-id", "category",
        "sg_template_id", "sg_template_name", "marketing_campaign_id", "marketing_campaign_name",
        "marketing_campaign_version", "marketing_campaign_split_id", "asm_group_id", "pool",
        "ip", "tls", "cert_err", "useragent", "url", "url_offset", "reason", "status",
        "response", "attempt", "type", "bounce_classification", "sg_machine_open",
        "singlesend_id", "singlesend_name", "send_at", "phase_id", "mc_stats", "post_type",
        "sg_user_id", "sg_content_type", "domain", "from", "reseller_id", "newsletter",
        "unique_args", "custom_args",
    }
)  # fmt: skip

# Seconds since the epoch stay below this until the year 5138; milliseconds pass it in 1973.
_MILLISECONDS_THRESHOLD = 100_000_000_000
# 2299-12-31 23:59:59.999, the end of ClickHouse's DateTime64 range: later values would not
# fail the insert, they would wrap around and be stored as a wrong date.
_MAX_EVENT_TIME_MS = 10_413_791_999_999


@dataclass(frozen=True, slots=True)
class BatchContext:
    """What the raw batch knows about the events it carried."""

    webhook: str
    received_at_ms: int
    request_id: str


def normalize_event(item: Any, context: BatchContext) -> EmailEvent:
    if not isinstance(item, dict):
        raise InvalidEvent("not_an_object", f"events are JSON objects; got {type(item).__name__}")
    event = _required_text(item, "event")
    sg_event_id = _required_text(item, "sg_event_id")
    if "timestamp" not in item or item["timestamp"] is None:
        raise InvalidEvent("missing_timestamp", "the event has no timestamp")
    try:
        arguments, raw = custom_arguments(item), _compact_json(item)
    except RecursionError:
        # json.loads accepted the nesting, but re-encoding costs a few frames more.
        raise InvalidEvent("nesting_too_deep", "the event nests JSON too deeply") from None
    return EmailEvent(
        webhook=context.webhook,
        event=event,
        sg_event_id=sg_event_id,
        event_time_ms=normalize_timestamp(item["timestamp"]),
        email=_optional_text(item, "email"),
        sg_message_id=_optional_text(item, "sg_message_id"),
        smtp_id=_optional_text(item, "smtp-id"),
        category=normalize_category(item.get("category")),
        custom_args=arguments,
        received_at_ms=context.received_at_ms,
        request_id=context.request_id,
        raw=raw,
    )


def normalize_timestamp(value: Any) -> int:
    """SendGrid's ``timestamp`` in Unix milliseconds.

    Accepts integer seconds (documented), numeric strings and floats (seen), and milliseconds
    (Single Send examples), told apart by magnitude.
    """
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise InvalidEvent(
            "invalid_timestamp", f"timestamp must be a number, got {type(value).__name__}"
        )
    try:
        # float() of a JSON integer beyond float range raises OverflowError, not inf.
        number = float(value.strip() if isinstance(value, str) else value)
    except (ValueError, OverflowError):
        raise InvalidEvent(
            "invalid_timestamp", f"timestamp is not a usable number: {str(value)[:40]!r}"
        ) from None
    if not math.isfinite(number) or number < 0:
        raise InvalidEvent("invalid_timestamp", f"timestamp out of range: {str(value)[:40]!r}")
    milliseconds = round(number) if number >= _MILLISECONDS_THRESHOLD else round(number * 1000)
    if milliseconds > _MAX_EVENT_TIME_MS:
        raise InvalidEvent("invalid_timestamp", f"timestamp out of range: {str(value)[:40]!r}")
    return milliseconds


def normalize_category(value: Any) -> list[str]:
    """``category`` arrives as a string or an array of strings; always a list here."""
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, list):
        return [item if isinstance(item, str) else _compact_json(item) for item in value]
    return [_compact_json(value)]


def custom_arguments(item: dict[str, Any]) -> dict[str, str]:
    """Every non-reserved top-level key, as strings (non-strings as compact JSON)."""
    return {
        key: value if isinstance(value, str) else _compact_json(value)
        for key, value in item.items()
        if key not in RESERVED_FIELDS
    }


def _required_text(item: dict[str, Any], key: str) -> str:
    value = item.get(key)
    if value is None or value == "":
        raise InvalidEvent(f"missing_{key}", f"the event has no {key}")
    if not isinstance(value, str):
        raise InvalidEvent(f"invalid_{key}", f"{key} must be a string, got {type(value).__name__}")
    return value


def _optional_text(item: dict[str, Any], key: str) -> str | None:
    value = item.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        field = key.replace("-", "_")
        raise InvalidEvent(
            f"invalid_{field}", f"{key} must be a string, got {type(value).__name__}"
        )
    # A leading space on sg_message_id is a known SendGrid quirk; "" means absent.
    text = str(value).strip()
    return text or None


def _compact_json(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)
