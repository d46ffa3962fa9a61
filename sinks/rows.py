"""Map: decoded EmailEvent records -> the sink's column-oriented insert block (pure).

The columns are the field table's (``schemas/event_fields.py``), in its order; a decoded
record already holds every one of them (the decoder fills what an older writer lacked with
the current schema's defaults), in the form clickhouse-connect inserts as is: datetimes for
``DateTime64``, dicts for the named ``Tuple`` of a record field.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Final

from schemas.event_fields import EVENT_FIELDS, FIELD_NAMES, IntegerType, RecordType

# The columns the sink writes; the table's others (inserted_at) have defaults.
EMAIL_EVENT_COLUMNS: Final[tuple[str, ...]] = FIELD_NAMES


# (field, member or None, minimum, maximum) of every integer column, members of record fields
# included: Avro's long holds values these columns do not.
_INTEGER_RANGES: Final[tuple[tuple[str, str | None, int, int], ...]] = tuple(
    [
        (field.name, None, field.type.minimum, field.type.maximum)
        for field in EVENT_FIELDS
        if isinstance(field.type, IntegerType)
    ]
    + [
        (field.name, member.name, member.type.minimum, member.type.maximum)
        for field in EVENT_FIELDS
        if isinstance(field.type, RecordType)
        for member in field.type.members
        if isinstance(member.type, IntegerType)
    ]
)


def out_of_range(record: dict[str, Any]) -> str | None:
    """Why a decoded record cannot be inserted, or None. Avro types every value, but an
    integer may be outside its column's range (UInt32, UInt64, a 0/1 flag): the driver would
    refuse the whole batch's insert, so the sink dead-letters such a record instead. The
    processor never writes one; anyone else producing to the events topic may."""
    for name, member, minimum, maximum in _INTEGER_RANGES:
        value = record.get(name)
        if member is not None:
            value = value.get(member) if isinstance(value, dict) else None
        if value is not None and not minimum <= value <= maximum:
            column = name if member is None else f"{name}.{member}"
            return f"{column} is {value}, outside {minimum}..{maximum}"
    return None


def to_columns(records: Iterable[dict[str, Any]]) -> list[list[Any]]:
    """One list per column of EMAIL_EVENT_COLUMNS; building columns, not a dict per row,
    is what keeps inserts fast."""
    columns: list[list[Any]] = [[] for _ in EMAIL_EVENT_COLUMNS]
    appenders = [column.append for column in columns]
    for record in records:
        for append, name in zip(appenders, EMAIL_EVENT_COLUMNS, strict=True):
            append(record[name])
    return columns
