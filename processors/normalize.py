"""Map: one parsed SendGrid event object -> the typed EmailEvent record. Never fails.

Every field is optional and every type untrusted (``docs/event-contract.md`` lists the rules
and the quirks they absorb: ``timestamp`` as a string or in milliseconds, ``attempt`` and
``tls`` as strings, ``category`` as a string or an array, ...). The typing is derived from the
field table (``schemas/event_fields.py``): each logical type has one coercion rule here.

A value that cannot be coerced never costs the event: its field is left at the default, its
name goes into ``coercion_errors`` and ``raw`` still holds it. An event without a usable
``sg_event_id`` gets one derived from its content (``sg_event_id_generated``); one without
``event`` or ``timestamp`` is kept with those fields empty/1970 and named in
``coercion_errors``.
"""

from __future__ import annotations

import base64
import hashlib
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

import msgspec

from schemas.email_event import EmailEventRecord
from schemas.event_fields import (
    EVENT_FIELDS,
    FIELD_NAMES,
    RESERVED_SOURCES,
    EventField,
    IntegerType,
    RecordType,
)

# Seconds since the epoch stay below this until the year 5138; milliseconds pass it in 1973.
_MILLISECONDS_THRESHOLD: Final = 100_000_000_000
# 2299-12-31 23:59:59.999, the end of ClickHouse's DateTime64 range: later values would not
# fail the insert, they would wrap around and be stored as a wrong date.
MAX_EVENT_TIME_MS: Final = 10_413_791_999_999
GENERATED_ID_PREFIX: Final = "sgpipe-"

_INTEGER_TEXT = re.compile(r"[+-]?[0-9]{1,20}")
_NUMBER_TEXT = re.compile(r"[+-]?[0-9]+(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?")
_TRUE_TEXT = frozenset({"true", "1"})
_FALSE_TEXT = frozenset({"false", "0"})

_encode_json = msgspec.json.encode
_encode_canonical_json = msgspec.json.Encoder(order="sorted").encode


class CoercionFailed(ValueError):
    """The value cannot be given the field's type (the field stays at its default)."""


@dataclass(frozen=True, slots=True)
class BatchContext:
    """What the raw batch knows about the events it carried."""

    webhook: str
    received_at_ms: int
    request_id: str


@dataclass(frozen=True, slots=True)
class NormalizedEvent:
    """The typed record (fields left out take their schema default), and what the pipeline
    needs without decoding it again."""

    record: EmailEventRecord
    sg_event_id: str
    event: str
    # Kafka key of the events topic: the message id, so that one message's events stay in
    # order on one partition; the event id when SendGrid sent no message id.
    key: str
    coercion_errors: tuple[str, ...]


# --- coercion rules, one per logical type (docs/event-contract.md, "Coercion rules") -------


def coerce_text(value: Any) -> str | None:
    """Strings trimmed (empty means absent); numbers as their JSON text."""
    if type(value) is str:
        return value.strip() or None
    if value is None:
        return None
    if isinstance(value, int | float) and not isinstance(value, bool):
        return compact_json(value)
    raise CoercionFailed(f"expected text, got {_json_type(value)}")


def coerce_integer(value: Any, minimum: int, maximum: int) -> int | None:
    """Integers, integral floats and decimal-digit strings, within the column's range."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise CoercionFailed("expected an integer, got a boolean")
    if isinstance(value, int):
        number = value
    elif isinstance(value, float):
        if not value.is_integer():
            raise CoercionFailed("expected an integer, got a fraction")
        number = int(value)
    elif isinstance(value, str):
        text = value.strip()
        if not text:
            return None
        if _INTEGER_TEXT.fullmatch(text) is None:
            raise CoercionFailed("expected an integer, got non-numeric text")
        number = int(text)
    else:
        raise CoercionFailed(f"expected an integer, got {_json_type(value)}")
    if not minimum <= number <= maximum:
        raise CoercionFailed(f"integer out of range [{minimum}, {maximum}]")
    return number


def coerce_boolean(value: Any) -> bool | None:
    """true/false, 1/0, and those as (case-insensitive) text."""
    if value is None:
        return None
    if isinstance(value, bool):
        return value
    if isinstance(value, int | float):
        if value == 1:
            return True
        if value == 0:
            return False
        raise CoercionFailed("expected a boolean, got a number other than 0 or 1")
    if isinstance(value, str):
        text = value.strip().lower()
        if not text:
            return None
        if text in _TRUE_TEXT:
            return True
        if text in _FALSE_TEXT:
            return False
        raise CoercionFailed("expected a boolean, got other text")
    raise CoercionFailed(f"expected a boolean, got {_json_type(value)}")


def coerce_flag(value: Any) -> int | None:
    """A boolean stored as 1/0 (``tls``, ``cert_err``)."""
    flag = coerce_boolean(value)
    return None if flag is None else int(flag)


def coerce_timestamp(value: Any) -> int | None:
    """Unix milliseconds from seconds (documented) or milliseconds (Single Sends), as a
    number or numeric text; told apart by magnitude; 1970 to the end of 2299."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise CoercionFailed("expected a Unix time, got a boolean")
    if isinstance(value, str):
        text = value.strip()
        if _NUMBER_TEXT.fullmatch(text) is None:
            raise CoercionFailed("expected a Unix time, got non-numeric text")
        number: float = int(text) if text.isdigit() and len(text) < 20 else float(text)
    elif isinstance(value, int | float):
        number = value
    else:
        raise CoercionFailed(f"expected a Unix time, got {_json_type(value)}")
    if isinstance(number, float) and not math.isfinite(number):
        raise CoercionFailed("Unix time out of range")
    if number < 0 or number > MAX_EVENT_TIME_MS:
        raise CoercionFailed("Unix time out of range")
    milliseconds = round(number) if number >= _MILLISECONDS_THRESHOLD else round(number * 1000)
    if milliseconds > MAX_EVENT_TIME_MS:  # seconds past 2299
        raise CoercionFailed("Unix time out of range")
    return milliseconds


def coerce_text_list(value: Any) -> list[str] | None:
    """A string or an array, always a list; non-string items as compact JSON."""
    if value is None:
        return None
    if type(value) is str:
        return [value]
    if isinstance(value, list):
        return [item if type(item) is str else compact_json(item) for item in value]
    return [compact_json(value)]


def _integer_rule(field_type: IntegerType) -> Callable[[Any], Any]:
    if field_type.name == "flag":
        return coerce_flag
    minimum, maximum = field_type.minimum, field_type.maximum
    return lambda value: coerce_integer(value, minimum, maximum)


def _rule(event_field: EventField) -> Callable[[Any], Any]:
    field_type = event_field.type
    if isinstance(field_type, IntegerType):
        return _integer_rule(field_type)
    rules: dict[str, Callable[[Any], Any]] = {
        "text": coerce_text,
        "boolean": coerce_boolean,
        "timestamp": coerce_timestamp,
        "text_list": coerce_text_list,
    }
    return rules[field_type.name]


def _record_rule(event_field: EventField) -> Callable[[Any, list[str]], dict[str, Any] | None]:
    """Objects with known members: each member by its own rule; a member that fails is null
    and named ``field.member``; anything but an object fails as a whole."""
    assert isinstance(event_field.type, RecordType)
    members = [
        (member.name, member.source or member.name, _rule(member))
        for member in event_field.type.members
    ]

    def coerce_record(value: Any, errors: list[str]) -> dict[str, Any] | None:
        if value is None:
            return None
        if not isinstance(value, dict):
            raise CoercionFailed(f"expected an object, got {_json_type(value)}")
        record: dict[str, Any] = {}
        for name, source, rule in members:
            try:
                record[name] = rule(value.get(source))
            except CoercionFailed:
                record[name] = None
                errors.append(f"{event_field.name}.{name}")
        return record

    return coerce_record


# SendGrid key -> (column, rule); built once from the field table.
_PLAIN_RULES: Final[dict[str, tuple[str, Callable[[Any], Any]]]] = {
    f.source: (f.name, _rule(f))
    for f in EVENT_FIELDS
    if f.source is not None and not isinstance(f.type, RecordType)
}
_RECORD_RULES: Final[dict[str, tuple[str, Callable[[Any, list[str]], dict[str, Any] | None]]]] = {
    f.source: (f.name, _record_rule(f))
    for f in EVENT_FIELDS
    if f.source is not None and isinstance(f.type, RecordType)
}
_REQUIRED: Final = tuple(f.name for f in EVENT_FIELDS if f.required)
_FIELD_ORDER: Final = {name: position for position, name in enumerate(FIELD_NAMES)}
# Every typed field's SendGrid key; any other key is a custom argument.
RESERVED_FIELDS: Final = RESERVED_SOURCES


def normalize_event(item: dict[str, Any], raw: str, context: BatchContext) -> NormalizedEvent:
    """The typed record of one event object; ``raw`` is its exact text. Never raises for a
    JSON object (RecursionError aside, for nesting at the parser's limit)."""
    record: EmailEventRecord = {
        "webhook": context.webhook,
        "received_at": context.received_at_ms,
        "request_id": context.request_id,
        "raw": raw,
    }
    errors: list[str] = []
    custom_args: dict[str, str] = {}
    for key, value in item.items():
        plain = _PLAIN_RULES.get(key)
        if plain is not None:
            name, rule = plain
            try:
                coerced = rule(value)
            except CoercionFailed:
                errors.append(name)
                continue
            if coerced is not None:
                record[name] = coerced
            continue
        nested = _RECORD_RULES.get(key)
        if nested is not None:
            name, record_rule = nested
            try:
                members = record_rule(value, errors)
            except CoercionFailed:
                errors.append(name)
                continue
            if members is not None:
                record[name] = members
            continue
        custom_args[key] = value if type(value) is str else compact_json(value)

    for name in _REQUIRED:
        if name not in record and name not in errors:
            errors.append(name)
    sg_event_id = record.get("sg_event_id")
    if sg_event_id is None:
        sg_event_id = record["sg_event_id"] = generated_event_id(item)
        record["sg_event_id_generated"] = True
    if custom_args:
        record["custom_args"] = custom_args
    if errors:
        errors.sort(key=lambda name: _FIELD_ORDER.get(name.split(".", 1)[0], 0))
        record["coercion_errors"] = errors
    event = record.get("event", "")
    return NormalizedEvent(
        record=record,
        sg_event_id=sg_event_id,
        event=event,
        key=record.get("sg_message_id") or sg_event_id,
        coercion_errors=tuple(errors),
    )


def generated_event_id(item: dict[str, Any]) -> str:
    """``sgpipe-`` + base64url (unpadded) SHA-256 of the event's canonical JSON: keys sorted
    at every level, no whitespace, UTF-8. Deterministic, so a retried copy of the event gets
    the same id and deduplicates like any other."""
    digest = hashlib.sha256(_encode_canonical_json(item)).digest()
    return GENERATED_ID_PREFIX + base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def compact_json(value: Any) -> str:
    return _encode_json(value).decode("utf-8")


def _json_type(value: Any) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, int | float):
        return "a number"
    return type(value).__name__
