"""Map: decoded EmailEvent records -> the sink's column-oriented insert block (pure)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

# The columns the sink writes, in EmailEvent's Avro field order; the rest have defaults.
EMAIL_EVENT_COLUMNS = (
    "webhook",
    "event",
    "sg_event_id",
    "event_time",
    "email",
    "sg_message_id",
    "smtp_id",
    "category",
    "custom_args",
    "received_at",
    "request_id",
    "raw",
)


def to_columns(records: Iterable[dict[str, Any]]) -> list[list[Any]]:
    """One list per column of EMAIL_EVENT_COLUMNS; building columns, not a dict per row,
    is what keeps inserts fast."""
    columns: list[list[Any]] = [[] for _ in EMAIL_EVENT_COLUMNS]
    appenders = [column.append for column in columns]
    for record in records:
        for append, name in zip(appenders, EMAIL_EVENT_COLUMNS, strict=True):
            append(record[name])
    return columns
