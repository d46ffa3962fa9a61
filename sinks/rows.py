"""Map: EmailEvent records on the events topic -> what the sink inserts (pure).

The sink does not decode the records it writes: a batch goes to ClickHouse as the records' Avro
bodies, transcoded to ``RowBinary`` by the writer (``row_binary_body``; sinks/row_binary.py).
Decoding each record in Python, then serializing the values again for the driver, was most of
the sink's time (issue 16; bench/sink.py).

What it does per record instead (``EventRows.row``): for a record framed with the current
schema, a compiled scan of its bytes (``schemas.avro_compiled.compile_scanner``) that
vouches that it is one well-formed record any Avro reader reads as the decoder here does,
with every integer within its column's range; the row is then the record's Avro body as it
came (``EventRow``). Anything the scan does not vouch for -- another schema version, a
registry schema, bytes in a non-canonical form, a broken record -- is decoded as before
(``EmailEventCodec.decode``: the same rejections as always) and, when it is a row,
re-encoded with the current schema. So every record still ends as exactly the row it decoded
to, or as a rejection with the reason it always had.

The columns are the field table's (``schemas/event_fields.py``), in its order; a decoded
record holds every one of them (the decoder fills what an older writer lacked with the
current schema's defaults). ``to_columns`` builds the column-oriented block of decoded
records, as clickhouse-connect inserts it (datetimes for ``DateTime64``, dicts for a named
``Tuple``): the other tables' writers and the tools use it.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, Final

from schemas.avro_compiled import (
    NotScanned,
    compile_reader,
    compile_scanner,
    compile_writer,
)
from schemas.email_event import EmailEventCodec, current_schema
from schemas.event_fields import (
    EVENT_FIELDS,
    FIELD_NAMES,
    IntegerType,
    RecordType,
    clickhouse_columns,
)
from sinks.row_binary import RowBinaryBody, compile_transcoder

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


def to_columns(records: Iterable[Mapping[str, Any]]) -> list[list[Any]]:
    """One list per column of EMAIL_EVENT_COLUMNS; building columns, not a dict per row,
    is what keeps inserts fast."""
    columns: list[list[Any]] = [[] for _ in EMAIL_EVENT_COLUMNS]
    appenders = [column.append for column in columns]
    for record in records:
        for append, name in zip(appenders, EMAIL_EVENT_COLUMNS, strict=True):
            append(record[name])
    return columns


class UnwritableEvent(ValueError):
    """A record decodes, but a value of it does not fit its column (``out_of_range``)."""


# What a scan raises for bytes it does not vouch for (the record is then decoded instead).
_NOT_SCANNED = (NotScanned, ValueError, EOFError, IndexError, OverflowError)


class EventRow(Mapping[str, Any]):
    """One row of ``email_events``: the Avro body of a record in the current schema, checked
    (``EventRows``), and its ``received_at`` in Unix milliseconds. Reading a field decodes the
    body (once); the sink's writer never does, it sends ``body`` as it is."""

    __slots__ = ("_record", "body", "received_at_ms")

    def __init__(
        self, body: bytes, received_at_ms: int, record: dict[str, Any] | None = None
    ) -> None:
        self.body = body
        self.received_at_ms = received_at_ms
        self._record = record

    def _decoded(self) -> dict[str, Any]:
        if self._record is None:
            self._record = _read_current(self.body)
        return self._record

    def __getitem__(self, name: str) -> Any:
        return self._decoded()[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._decoded())

    def __len__(self) -> int:
        return len(self._decoded())

    def __repr__(self) -> str:
        return f"EventRow({self._decoded()!r})"


_CURRENT_SCHEMA: Final = json.loads(current_schema().text)
_COLUMN_TYPES: Final = dict(clickhouse_columns())
_read_current = compile_reader(_CURRENT_SCHEMA)
_write_current = compile_writer(_CURRENT_SCHEMA)
_scan_current = compile_scanner(
    _CURRENT_SCHEMA,
    {
        name if member is None else f"{name}.{member}": (minimum, maximum)
        for name, member, minimum, maximum in _INTEGER_RANGES
    },
    capture="received_at",
)


class EventRows:
    """Makes the sink's rows from events-topic payloads, decoding only what it must."""

    def __init__(self, codec: EmailEventCodec) -> None:
        self._codec = codec

    def row(self, payload: bytes) -> EventRow:
        """The row of ``payload``. Raises what ``EmailEventCodec.decode`` raises for a payload
        that is no readable EmailEvent (SerializationError, UnknownWriterSchema), and
        UnwritableEvent for one whose values its columns cannot hold."""
        start = self._codec.current_body_start(payload)
        if start is not None:
            try:
                end, received_at_ms = _scan_current(payload, start)
            except _NOT_SCANNED:
                pass
            else:
                return EventRow(payload[start:end], received_at_ms)
        record = self._codec.decode(payload)
        problem = out_of_range(record)
        if problem is not None:
            raise UnwritableEvent(problem)
        # Re-encoded in the current schema, canonically; the scan (which vouches for what
        # ClickHouse reads) must accept it. Neither fails for what the decoder makes.
        try:
            body = _write_current(record)
            _, received_at_ms = _scan_current(body, 0)
        except (*_NOT_SCANNED, TypeError) as exc:
            raise UnwritableEvent(f"cannot re-encode the decoded record: {exc}") from exc
        return EventRow(body, received_at_ms, record)


_TRANSCODE: Final = compile_transcoder(
    _CURRENT_SCHEMA, [(name, _COLUMN_TYPES[name]) for name in EMAIL_EVENT_COLUMNS]
)


def row_binary_body(rows: Sequence[Mapping[str, Any]], chunk_rows: int = 2_000) -> RowBinaryBody:
    """The body of ``INSERT INTO email_events (EMAIL_EVENT_COLUMNS) FORMAT RowBinary`` for
    ``rows``. An ``EventRow`` goes in as its Avro body, transcoded; a decoded record (a dict,
    as tests and tools build them) is encoded first."""
    bodies = [row.body if isinstance(row, EventRow) else _write_current(dict(row)) for row in rows]
    return RowBinaryBody(bodies, _TRANSCODE, chunk_rows)
