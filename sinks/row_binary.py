"""Avro bodies -> ClickHouse ``RowBinary``: the body of the sink's inserts.

Why by hand: ClickHouse reads Avro itself (``FORMAT Avro``), but its Avro reader cost ~10 µs
of CPU per event row more than ``RowBinary`` (measured with the migrations' table on the
embedded engine: ~28 against ~18 µs per row, insert included), about as much as the whole
Python step. ``RowBinary`` is the row-wise twin of the Native format -- lengths as unsigned
LEB128, integers fixed-width little-endian, ``Nullable`` a leading null byte -- close enough to
Avro's binary encoding that a compiled, straight-line transcoder per schema is a few µs per
row, and it runs in the writer while ClickHouse reads the previous chunk.

Only for bodies the sink's scan vouched for (``schemas.avro_compiled.compile_scanner``):
canonical, well-formed, every integer within its column's range; it checks nothing again.
The column types are the field table's (``schemas/event_fields.py``); the Avro and ClickHouse
type pairs it knows are exactly the ones the table uses, any other raises UnsupportedSchema
when compiled (at import), so a new field type cannot reach ClickHouse mistyped.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any, Final

from schemas.avro_compiled import SourceEmitter, UnsupportedSchema, read_long


def _leb128(value: int) -> bytes:
    """Unsigned LEB128: the length prefix of RowBinary strings, arrays and maps."""
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


_LEB: Final = tuple(_leb128(n) for n in range(128))
# Fixed-width integers by the width in bytes and signedness.
_WIDTHS: Final = {
    "UInt8": (1, False),
    "UInt32": (4, False),
    "UInt64": (8, False),
    "Int64": (8, True),
}


def _small_integers(width: int, signed: bool) -> tuple[bytes, ...]:
    """By one-byte Avro varint (0..127): its value (zig-zag) in ``width`` bytes; negative
    values of an unsigned type are never asked for (the scan checked the ranges)."""
    return tuple(
        ((byte >> 1) ^ -(byte & 1)).to_bytes(width, "little", signed=True)
        if signed or not byte & 1
        else b""
        for byte in range(128)
    )


def _strip(clickhouse_type: str) -> str:
    """The type as RowBinary writes it: without LowCardinality (a storage choice that RowBinary
    writes as the type it wraps)."""
    return without_low_cardinality(re.sub(r"\s+", " ", clickhouse_type).strip())


def without_low_cardinality(clickhouse_type: str) -> str:
    """``clickhouse_type`` with every ``LowCardinality(...)`` replaced by the type it wraps
    (also used by the sink's table check, sinks.clickhouse)."""
    while (start := clickhouse_type.find("LowCardinality(")) >= 0:
        depth, index = 1, start + len("LowCardinality(")
        inner_start = index
        while depth:
            depth += {"(": 1, ")": -1}.get(clickhouse_type[index], 0)
            index += 1
        inner = clickhouse_type[inner_start : index - 1]
        clickhouse_type = clickhouse_type[:start] + inner + clickhouse_type[index:]
    return clickhouse_type


def _tuple_members(clickhouse_type: str) -> list[str]:
    """``Tuple(a T1, b T2)`` -> ``[T1, T2]`` (top-level commas only)."""
    inner = clickhouse_type[len("Tuple(") : -1]
    members, depth, start = [], 0, 0
    for index, char in enumerate(inner):
        depth += {"(": 1, ")": -1}.get(char, 0)
        if char == "," and depth == 0:
            members.append(inner[start:index])
            start = index + 1
    members.append(inner[start:])
    return [member.strip().split(" ", 1)[1] for member in members]


class _Compiler(SourceEmitter):
    """Emits the body of ``transcode(d, out)``: one Avro record appended to ``out`` as RowBinary."""

    def value(self, avro: Any, clickhouse: str, indent: int) -> None:
        """Transcode one value at ``p`` (Avro ``avro``) as ClickHouse ``clickhouse``."""
        clickhouse = _strip(clickhouse)
        if isinstance(avro, dict) and avro.get("logicalType") == "timestamp-millis":
            if clickhouse != "DateTime64(3, 'UTC')":
                raise UnsupportedSchema(f"timestamp-millis as {clickhouse}")
            self.timestamp(indent)
            return
        kind = avro if isinstance(avro, str | list) else avro.get("type")
        if isinstance(kind, list):
            self.nullable(kind, clickhouse, indent)
        elif isinstance(kind, dict):
            self.value(kind, clickhouse, indent)
        elif kind == "string" and clickhouse == "String":
            self.text(indent)
        elif kind == "long" and clickhouse in _WIDTHS:
            self.integer(*_WIDTHS[clickhouse], indent)
        elif kind == "boolean" and clickhouse == "Bool":
            self.emit(indent, "w(_BOOL[d[p]])")
            self.emit(indent, "p += 1")
        elif kind == "array" and clickhouse.startswith("Array("):
            self.blocks(indent, lambda i: self.value(avro["items"], clickhouse[6:-1], i))
        elif kind == "map" and clickhouse.startswith("Map(String, "):
            values = clickhouse[len("Map(String, ") : -1]

            def pair(i: int) -> None:
                self.text(i)
                self.value(avro["values"], values, i)

            self.blocks(indent, pair)
        elif kind == "record" and clickhouse.startswith("Tuple("):
            members = _tuple_members(clickhouse)
            if len(members) != len(avro["fields"]):
                raise UnsupportedSchema(f"record {avro.get('name')} as {clickhouse}")
            for field, member in zip(avro["fields"], members, strict=True):
                self.value(field["type"], member, indent)
        else:
            raise UnsupportedSchema(f"Avro {kind!r} as {clickhouse}")

    def varint(self, target: str, indent: int) -> None:
        self.emit(indent, f"{target} = d[p]")
        self.emit(
            indent, f"if {target} < 0x80: {target} = ({target} >> 1) ^ -({target} & 1); p += 1"
        )
        self.emit(indent, f"else: {target}, p = _read_long(d, p)")

    def text(self, indent: int) -> None:
        self.emit(indent, "n = d[p]")
        self.emit(indent, "if n == 0:")
        self.emit(indent + 1, "w(b'\\x00')")
        self.emit(indent + 1, "p += 1")
        self.emit(indent, "else:")
        self.emit(indent + 1, "if n < 0x80: n >>= 1; p += 1")
        self.emit(
            indent + 1, "elif d[p + 1] < 0x80: n = ((n & 0x7F) | (d[p + 1] << 7)) >> 1; p += 2"
        )
        self.emit(indent + 1, "else: n, p = _read_long(d, p)")
        self.emit(indent + 1, "w(_LEB[n] if n < 128 else _leb128(n))")
        self.emit(indent + 1, "q = p + n")
        self.emit(indent + 1, "w(d[p:q])")
        self.emit(indent + 1, "p = q")

    def integer(self, width: int, signed: bool, indent: int) -> None:
        small = self.constant(_small_integers(width, signed))
        self.emit(indent, "v = d[p]")
        self.emit(indent, f"if v < 0x80: w({small}[v]); p += 1")
        self.emit(indent, "else:")
        self.emit(indent + 1, "v, p = _read_long(d, p)")
        self.emit(indent + 1, f"w(v.to_bytes({width}, 'little', signed={signed}))")

    def timestamp(self, indent: int) -> None:
        # Unix milliseconds as Int64: DateTime64(3)'s value.
        self.varint("v", indent)
        self.emit(indent, "w(v.to_bytes(8, 'little', signed=True))")

    def nullable(self, branches: list[Any], clickhouse: str, indent: int) -> None:
        names = [b if isinstance(b, str) else b.get("type") for b in branches]
        if len(branches) != 2 or "null" not in names or not clickhouse.startswith("Nullable("):
            raise UnsupportedSchema(f"union {names!r} as {clickhouse}")
        null_index = names.index("null")
        # The scan let only the branch bytes 00 and 02 through (indexes 0 and 1).
        self.emit(indent, f"if d[p] == {2 * null_index}:")
        self.emit(indent + 1, "w(b'\\x01')")
        self.emit(indent + 1, "p += 1")
        self.emit(indent, "else:")
        self.emit(indent + 1, "w(b'\\x00')")
        self.emit(indent + 1, "p += 1")
        self.value(branches[1 - null_index], clickhouse[len("Nullable(") : -1], indent + 1)

    def blocks(self, indent: int, item: Callable[[int], None]) -> None:
        # Avro: blocks of count items, then 0 (the scan let only positive counts through);
        # RowBinary: the total count first.
        count, total, slot = self.name("n"), self.name("t"), self.name("s")
        self.emit(indent, "if d[p] == 0:")
        self.emit(indent + 1, "w(b'\\x00')")
        self.emit(indent + 1, "p += 1")
        self.emit(indent, "else:")
        indent += 1
        self.emit(indent, f"{slot} = len(out)")
        self.emit(indent, "w(b'')")
        self.emit(indent, f"{total} = 0")
        self.varint(count, indent)
        self.emit(indent, f"while {count}:")
        self.emit(indent + 1, f"{total} += {count}")
        self.emit(indent + 1, f"for _ in range({count}):")
        item(indent + 2)
        self.varint(count, indent + 1)
        self.emit(indent, f"out[{slot}] = _LEB[{total}] if {total} < 128 else _leb128({total})")


def compile_transcoder(
    schema: dict[str, Any], columns: list[tuple[str, str]]
) -> Callable[[bytes, list[bytes]], None]:
    """``transcode(body, out)``: appends to ``out`` the RowBinary row of the Avro record
    ``body`` (of ``schema``, vouched for by the scan), whose fields are ``columns`` -- their
    names and ClickHouse types, in the schema's order."""
    fields = schema["fields"]
    if [field["name"] for field in fields] != [name for name, _ in columns]:
        raise UnsupportedSchema("the columns must be the schema's fields, in its order")
    compiler = _Compiler()
    compiler.emit(1, "w = out.append")
    compiler.emit(1, "p = 0")
    for field, (_, clickhouse) in zip(fields, columns, strict=True):
        compiler.value(field["type"], clickhouse, 1)
    source = "def transcode(d, out):\n" + "\n".join(compiler.lines) + "\n"
    namespace: dict[str, Any] = {
        "_read_long": read_long,
        "_LEB": _LEB,
        "_leb128": _leb128,
        "_BOOL": (b"\x00", b"\x01"),
        **compiler.constants,
    }
    # The code comes from a schema sgpipe ships, never from input data.
    exec(compile(source, f"<RowBinary transcoder for {schema.get('name')}>", "exec"), namespace)
    transcode: Callable[[bytes, list[bytes]], None] = namespace["transcode"]
    return transcode


class RowBinaryBody:
    """An insert's body: ``bodies`` (Avro, vouched for) transcoded to RowBinary chunk by chunk
    in a worker thread, so that ClickHouse reads one chunk while the next is built. Iterable
    again from the start: a request the HTTP client sends again (a retried status) sends
    every row again, never the rest of a spent stream (which ClickHouse would take as an
    insert of the rows left, or of none)."""

    def __init__(
        self,
        bodies: Sequence[bytes],
        transcode: Callable[[bytes, list[bytes]], None],
        chunk_rows: int = 2_000,
    ) -> None:
        self._bodies = bodies
        self._transcode = transcode
        self._chunk_rows = chunk_rows

    def chunk(self, first: int) -> bytes:
        out: list[bytes] = []
        transcode = self._transcode
        for body in self._bodies[first : first + self._chunk_rows]:
            transcode(body, out)
        return b"".join(out)

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for first in range(0, len(self._bodies), self._chunk_rows):
            yield await asyncio.to_thread(self.chunk, first)
