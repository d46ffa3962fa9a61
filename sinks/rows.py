"""Map: decoded EmailEvent records -> the sink's column-oriented insert block (pure).

The columns are the field table's (``schemas/event_fields.py``), in its order; a decoded
record already holds every one of them (the decoder fills what an older writer lacked with
the current schema's defaults), in the form clickhouse-connect inserts as is: datetimes for
``DateTime64``, dicts for the named ``Tuple`` of a record field.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Final

from schemas.event_fields import FIELD_NAMES

# The columns the sink writes; the table's others (inserted_at) have defaults.
EMAIL_EVENT_COLUMNS: Final[tuple[str, ...]] = FIELD_NAMES


def to_columns(records: Iterable[dict[str, Any]]) -> list[list[Any]]:
    """One list per column of EMAIL_EVENT_COLUMNS; building columns, not a dict per row,
    is what keeps inserts fast."""
    columns: list[list[Any]] = [[] for _ in EMAIL_EVENT_COLUMNS]
    appenders = [column.append for column in columns]
    for record in records:
        for append, name in zip(appenders, EMAIL_EVENT_COLUMNS, strict=True):
            append(record[name])
    return columns
