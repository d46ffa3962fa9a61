"""Compiled Avro binary writer and reader for one record schema: the stages' hot paths.

fastavro's generic writer and reader walk the schema for every record and cost about
0.4-2 µs per field (unions and defaults most); with ~50 fields that was most of the
processor's time per event and doubled the sink's decoding. This turns the schema, once, into
straight-line Python: ``compile_writer`` (per field a dict lookup, a type check, one or two
appends; runs of absent fields written from precomputed bytes) and ``compile_reader`` (per
field a varint or a slice). The bytes and values are the Avro specification's binary encoding
and fastavro's, which ``tests/unit/test_avro_compiled.py`` checks on generated records. Only
the types the EmailEvent schema uses are supported (null, boolean, int, long, string,
timestamp-millis, arrays and maps of those, records, unions with null); any other schema
raises ``UnsupportedSchema`` and the caller keeps fastavro. Schema resolution (reading an
older writer's record) stays fastavro's.

Writer errors: a value of the wrong type raises TypeError, an integer out of range
OverflowError, a string that is not valid Unicode UnicodeEncodeError. Reader errors on
truncated or malformed bytes: EOFError or IndexError, ValueError (UnicodeDecodeError),
OverflowError. Callers wrap them.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable
from typing import Any, Final

_LONG_MIN: Final = -(2**63)
_LONG_MAX: Final = 2**63 - 1
_INT_MIN: Final = -(2**31)
_INT_MAX: Final = 2**31 - 1
_EPOCH: Final = datetime.datetime(1970, 1, 1, tzinfo=datetime.UTC)


class UnsupportedSchema(ValueError):
    """The schema uses a type this writer does not compile."""


def zigzag_varint(value: int) -> bytes:
    """Avro's ``long`` encoding: zig-zag, then base-128 varint, least significant group first."""
    if value.__class__ is not int:
        raise TypeError(f"expected an integer, got {type(value).__name__}")
    if not _LONG_MIN <= value <= _LONG_MAX:
        raise OverflowError(f"{value} does not fit an Avro long")
    number = (value << 1) ^ (value >> 63)
    out = bytearray()
    while number > 0x7F:
        out.append((number & 0x7F) | 0x80)
        number >>= 7
    out.append(number)
    return bytes(out)


# Lengths and small values cost a table lookup instead of a call.
_SMALL: Final = tuple(zigzag_varint(n) for n in range(64))


def _int(value: int) -> bytes:
    if value.__class__ is int and _INT_MIN <= value <= _INT_MAX:
        return zigzag_varint(value)
    if value.__class__ is not int:
        raise TypeError(f"expected an integer, got {type(value).__name__}")
    raise OverflowError(f"{value} does not fit an Avro int")


def _timestamp_millis(value: Any) -> bytes:
    if value.__class__ is int:
        return zigzag_varint(value)
    if isinstance(value, datetime.datetime) and value.tzinfo is not None:
        delta = value - _EPOCH
        return zigzag_varint(
            (delta.days * 86_400 + delta.seconds) * 1000 + delta.microseconds // 1000
        )
    raise TypeError(f"expected Unix milliseconds or an aware datetime, got {value!r}")


def _text(value: Any) -> bytes:
    if value.__class__ is not str:
        raise TypeError(f"expected a string, got {type(value).__name__}")
    return value.encode("utf-8")


class SourceEmitter:
    """What every schema compiler here (and the sink's RowBinary transcoder) builds its
    function's source with: lines, fresh local names, and constants passed in its namespace."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.constants: dict[str, Any] = {}
        self._counter = 0

    def name(self, prefix: str) -> str:
        self._counter += 1
        return f"{prefix}{self._counter}"

    def constant(self, value: Any) -> str:
        name = self.name("_c")
        self.constants[name] = value
        return name

    def emit(self, indent: int, line: str) -> None:
        self.lines.append("    " * indent + line)


class _Compiler(SourceEmitter):
    """Emits the body of ``write(record, out)`` line by line."""

    def value(self, schema: Any, expr: str, indent: int) -> None:
        """Write the value of ``expr`` (an already evaluated local) as ``schema``."""
        if isinstance(schema, list):
            self.union(schema, expr, indent)
            return
        kind = schema if isinstance(schema, str) else schema.get("type")
        logical = schema.get("logicalType") if isinstance(schema, dict) else None
        if kind == "long" and logical == "timestamp-millis":
            self.emit(indent, f"w(_timestamp_millis({expr}))")
        elif logical is not None and not isinstance(kind, dict):
            raise UnsupportedSchema(f"logical type {logical!r}")
        elif kind == "string":
            data = self.name("b")
            self.emit(indent, f"{data} = _text({expr})")
            self.emit(indent, f"n = len({data})")
            self.emit(indent, "w(_SMALL[n] if n < 64 else _long(n))")
            self.emit(indent, f"w({data})")
        elif kind == "long":
            self.emit(indent, f"w(_long({expr}))")
        elif kind == "int":
            self.emit(indent, f"w(_int({expr}))")
        elif kind == "boolean":
            self.emit(indent, f"if {expr} is True: w(b'\\x01')")
            self.emit(indent, f"elif {expr} is False: w(b'\\x00')")
            self.emit(indent, f"else: raise TypeError('expected a boolean, got ' + repr({expr}))")
        elif kind == "null":
            self.emit(indent, f"if {expr} is not None: raise TypeError('expected null')")
        elif kind == "array":
            item = self.name("i")
            self.emit(indent, f"if {expr}:")
            self.emit(indent + 1, f"w(_long(len({expr})))")
            self.emit(indent + 1, f"for {item} in {expr}:")
            self.value(schema["items"], item, indent + 2)
            self.emit(indent, "w(b'\\x00')")
        elif kind == "map":
            key, item = self.name("k"), self.name("v")
            self.emit(indent, f"if {expr}:")
            self.emit(indent + 1, f"w(_long(len({expr})))")
            self.emit(indent + 1, f"for {key}, {item} in {expr}.items():")
            self.value("string", key, indent + 2)
            self.value(schema["values"], item, indent + 2)
            self.emit(indent, "w(b'\\x00')")
        elif kind == "record":
            self.record(schema, expr, indent)
        elif isinstance(kind, dict | list):
            self.value(kind, expr, indent)
        else:
            raise UnsupportedSchema(f"Avro type {kind!r}")

    def union(self, branches: list[Any], expr: str, indent: int) -> None:
        # Only [null, T] / [T, null]: the branch is chosen by None-ness, as fastavro does.
        names = [b if isinstance(b, str) else b.get("type") for b in branches]
        if len(branches) != 2 or "null" not in names:
            raise UnsupportedSchema(f"union {names!r}")
        null_index = names.index("null")
        other = branches[1 - null_index]
        self.emit(indent, f"if {expr} is None: w({_SMALL[null_index]!r})")
        self.emit(indent, "else:")
        self.emit(indent + 1, f"w({_SMALL[1 - null_index]!r})")
        self.value(other, expr, indent + 1)

    def record(self, schema: dict[str, Any], expr: str, indent: int) -> None:
        getter = self.name("g")
        self.emit(indent, f"if {expr}.__class__ is not dict: raise TypeError('expected a record')")
        self.emit(indent, f"{getter} = {expr}.get")
        for group in _runs_with_defaults(schema["fields"]):
            if len(group) < _SKIP_RUN:
                for field in group:
                    self.field(field, getter, indent)
                continue
            # Most fields of an event are absent: when none of a run of fields is present,
            # their default bytes (computed once, here) are written in one go.
            names = self.constant(frozenset(field["name"] for field in group))
            encoded = self.constant(b"".join(_default_bytes(field) for field in group))
            self.emit(indent, f"if {expr}.keys().isdisjoint({names}): w({encoded})")
            self.emit(indent, "else:")
            for field in group:
                self.field(field, getter, indent + 1)

    def field(self, field: dict[str, Any], getter: str, indent: int) -> None:
        local = self.name("f")
        self.emit(indent, f"{local} = {getter}({field['name']!r}, _MISSING)")
        if "default" in field:
            encoded = self.constant(_default_bytes(field))
            self.emit(indent, f"if {local} is _MISSING: w({encoded})")
            self.emit(indent, "else:")
            self.value(field["type"], local, indent + 1)
        else:
            self.emit(
                indent, f"if {local} is _MISSING: raise TypeError('no value for {field['name']}')"
            )
            self.value(field["type"], local, indent)


# Runs of at least this many fields with defaults get the all-absent shortcut.
_SKIP_RUN: Final = 4


def _runs_with_defaults(fields: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """``fields`` cut into runs: fields without a default alone, the others in runs of up to
    eight consecutive fields."""
    runs: list[list[dict[str, Any]]] = []
    for field in fields:
        if "default" in field and runs and "default" in runs[-1][0] and len(runs[-1]) < 8:
            runs[-1].append(field)
        else:
            runs.append([field])
    return runs


def _default_bytes(field: dict[str, Any]) -> bytes:
    """The encoding of a field's default value (compiled without defaults, then run)."""
    bare = {key: value for key, value in field.items() if key != "default"}
    write = compile_writer({"type": "record", "name": "Default", "fields": [bare]})
    return write({field["name"]: field["default"]})


_MISSING: Final = object()


def compile_writer(schema: dict[str, Any]) -> Callable[[dict[str, Any]], bytes]:
    """``write(record) -> bytes``: the Avro binary encoding of ``record`` (a dict; fields left
    out take their schema default) under ``schema`` (a record, as JSON or parsed by fastavro).
    UnsupportedSchema when the schema uses a type not compiled here."""
    if schema.get("type") != "record":
        raise UnsupportedSchema("the schema must be a record")
    compiler = _Compiler()
    compiler.emit(1, "parts = []")
    compiler.emit(1, "w = parts.append")
    compiler.record(schema, "record", 1)
    compiler.emit(1, "return b''.join(parts)")
    source = "def write(record):\n" + "\n".join(compiler.lines) + "\n"
    namespace: dict[str, Any] = {
        "_SMALL": _SMALL,
        "_long": zigzag_varint,
        "_int": _int,
        "_text": _text,
        "_timestamp_millis": _timestamp_millis,
        "_MISSING": _MISSING,
        **compiler.constants,
    }
    # The code comes from a schema sgpipe ships (field names are quoted with repr), never
    # from input data.
    exec(compile(source, f"<avro writer for {schema.get('name')}>", "exec"), namespace)
    writer: Callable[[dict[str, Any]], bytes] = namespace["write"]
    return writer


# --- reader ------------------------------------------------------------------------------------


def read_long(data: bytes, position: int) -> tuple[int, int]:
    """The zig-zag varint at ``position`` and the position after it."""
    shift = 0
    number = 0
    while True:
        try:
            byte = data[position]
        except IndexError:
            raise EOFError("truncated Avro long") from None
        position += 1
        number |= (byte & 0x7F) << shift
        if byte < 0x80:
            return (number >> 1) ^ -(number & 1), position
        shift += 7
        if shift > 63:
            raise ValueError("Avro long longer than 10 bytes")


def _read_text(data: bytes, position: int) -> tuple[str, int]:
    length, position = read_long(data, position)
    end = position + length
    if length < 0 or end > len(data):
        raise EOFError("truncated Avro string")
    return data[position:end].decode("utf-8"), end


def _read_boolean(data: bytes, position: int) -> tuple[bool, int]:
    try:
        byte = data[position]
    except IndexError:
        raise EOFError("truncated Avro boolean") from None
    if byte > 1:
        raise ValueError(f"invalid Avro boolean byte {byte}")
    return byte == 1, position + 1


def _read_timestamp_millis(data: bytes, position: int) -> tuple[datetime.datetime, int]:
    milliseconds, position = read_long(data, position)
    # As fastavro: epoch + timedelta (fromtimestamp is wrong for some values, bpo-36439).
    return _EPOCH + datetime.timedelta(microseconds=milliseconds * 1000), position


def _block_count(data: bytes, position: int) -> tuple[int, int]:
    count, position = read_long(data, position)
    if count < 0:  # a negative count is followed by the block's size in bytes
        _, position = read_long(data, position)
        count = -count
    return count, position


class _ReaderCompiler(SourceEmitter):
    """Emits ``read(data) -> record``: each value read into a local, the record a dict."""

    def value(self, schema: Any, target: str, indent: int) -> None:
        """Read one value of ``schema`` at ``p`` into the local ``target``, advancing ``p``."""
        if isinstance(schema, list):
            self.union(schema, target, indent)
            return
        kind = schema if isinstance(schema, str) else schema.get("type")
        logical = schema.get("logicalType") if isinstance(schema, dict) else None
        if kind == "long" and logical == "timestamp-millis":
            self.emit(indent, f"{target}, p = _read_timestamp_millis(d, p)")
        elif logical is not None and not isinstance(kind, dict):
            raise UnsupportedSchema(f"logical type {logical!r}")
        elif kind == "string":
            # Inline for lengths below 64 (one varint byte), the common case.
            length = self.name("n")
            self.emit(indent, f"{length} = d[p]")
            self.emit(indent, f"if {length} < 0x80: {length} >>= 1; p += 1")
            self.emit(indent, f"else: {length}, p = _read_long(d, p)")
            self.emit(indent, f"{target} = d[p:p + {length}].decode()")
            self.emit(indent, f"p += {length}")
            self.emit(indent, "if p > e: raise EOFError('truncated Avro string')")
        elif kind in ("long", "int"):
            self.long(target, indent)
        elif kind == "boolean":
            self.emit(indent, f"{target}, p = _read_boolean(d, p)")
        elif kind == "null":
            self.emit(indent, f"{target} = None")
        elif kind == "array":
            count, item = self.name("n"), self.name("i")
            self.emit(indent, f"{target} = []")
            self.emit(indent, f"{count}, p = _block_count(d, p)")
            self.emit(indent, f"while {count}:")
            self.emit(indent + 1, f"for _ in range({count}):")
            self.value(schema["items"], item, indent + 2)
            self.emit(indent + 2, f"{target}.append({item})")
            self.emit(indent + 1, f"{count}, p = _block_count(d, p)")
        elif kind == "map":
            count, key, item = self.name("n"), self.name("k"), self.name("i")
            self.emit(indent, f"{target} = {{}}")
            self.emit(indent, f"{count}, p = _block_count(d, p)")
            self.emit(indent, f"while {count}:")
            self.emit(indent + 1, f"for _ in range({count}):")
            self.emit(indent + 2, f"{key}, p = _read_text(d, p)")
            self.value(schema["values"], item, indent + 2)
            self.emit(indent + 2, f"{target}[{key}] = {item}")
            self.emit(indent + 1, f"{count}, p = _block_count(d, p)")
        elif kind == "record":
            self.record(schema, target, indent)
        elif isinstance(kind, dict | list):
            self.value(kind, target, indent)
        else:
            raise UnsupportedSchema(f"Avro type {kind!r}")

    def long(self, target: str, indent: int) -> None:
        # Inline for values in [-64, 63] (one varint byte), the common case.
        self.emit(indent, f"{target} = d[p]")
        self.emit(
            indent, f"if {target} < 0x80: {target} = ({target} >> 1) ^ -({target} & 1); p += 1"
        )
        self.emit(indent, f"else: {target}, p = _read_long(d, p)")

    def union(self, branches: list[Any], target: str, indent: int) -> None:
        names = [b if isinstance(b, str) else b.get("type") for b in branches]
        if len(branches) != 2 or "null" not in names:
            raise UnsupportedSchema(f"union {names!r}")
        null_index = names.index("null")
        branch = self.name("u")
        self.long(branch, indent)
        self.emit(indent, f"if {branch} == {null_index}: {target} = None")
        self.emit(indent, f"elif {branch} == {1 - null_index}:")
        self.value(branches[1 - null_index], target, indent + 1)
        self.emit(indent, f"else: raise ValueError('invalid union branch ' + str({branch}))")

    def record(self, schema: dict[str, Any], target: str, indent: int) -> None:
        locals_ = []
        for field in schema["fields"]:
            local = self.name("f")
            self.value(field["type"], local, indent)
            locals_.append((field["name"], local))
        items = ", ".join(f"{name!r}: {local}" for name, local in locals_)
        self.emit(indent, f"{target} = {{{items}}}")


def compile_reader(schema: dict[str, Any]) -> Callable[[bytes], dict[str, Any]]:
    """``read(data) -> record``: the record Avro-encoded at the start of ``data`` under
    ``schema`` (writer and reader schema alike), as fastavro's ``schemaless_reader`` returns
    it (timestamps as aware UTC datetimes). Bytes after the record are ignored, as fastavro
    does. UnsupportedSchema when the schema uses a type not compiled here."""
    if schema.get("type") != "record":
        raise UnsupportedSchema("the schema must be a record")
    compiler = _ReaderCompiler()
    compiler.emit(1, "p = 0")
    compiler.emit(1, "e = len(d)")
    compiler.record(schema, "record", 1)
    compiler.emit(1, "return record")
    source = "def read(d):\n" + "\n".join(compiler.lines) + "\n"
    namespace: dict[str, Any] = {
        "_read_long": read_long,
        "_read_text": _read_text,
        "_read_boolean": _read_boolean,
        "_read_timestamp_millis": _read_timestamp_millis,
        "_block_count": _block_count,
    }
    # As for the writer: the code comes from a schema sgpipe ships, never from input data.
    exec(compile(source, f"<avro reader for {schema.get('name')}>", "exec"), namespace)
    reader: Callable[[bytes], dict[str, Any]] = namespace["read"]
    return reader


# --- scanner -----------------------------------------------------------------------------------


class NotScanned(ValueError):
    """The scanner does not vouch for these bytes: not a well-formed record in the canonical
    form it accepts, or a value outside its allowed range. Not a verdict on the record: the
    caller decodes it (``compile_reader``/fastavro) to learn what it is."""


# Timestamps the reader can turn into datetimes (years 1 to 9999); it raises beyond them.
_TIMESTAMP_MIN: Final = -62_135_596_800_000
_TIMESTAMP_MAX: Final = 253_402_300_799_999


class _ScannerCompiler(SourceEmitter):
    """Emits ``scan(d, p) -> (end, captured)``: walks one record, builds no values."""

    def __init__(self, ranges: dict[str, tuple[int, int]], capture: str | None) -> None:
        super().__init__()
        self._ranges = ranges
        self._capture = capture

    def value(self, schema: Any, path: str, indent: int, target: str | None = None) -> None:
        """Check one value of ``schema`` at ``p`` and advance ``p`` past it; a long or a
        timestamp is left in ``target`` when given."""
        if isinstance(schema, list):
            self.union(schema, path, indent)
            return
        kind = schema if isinstance(schema, str) else schema.get("type")
        logical = schema.get("logicalType") if isinstance(schema, dict) else None
        if kind == "long" and logical == "timestamp-millis":
            self.timestamp(target, indent)
        elif logical is not None and not isinstance(kind, dict):
            raise UnsupportedSchema(f"logical type {logical!r}")
        elif kind == "string":
            self.text(indent)
        elif kind == "long":
            low, high = self._ranges.get(path, (_LONG_MIN, _LONG_MAX))
            self.long(target or "v", max(low, _LONG_MIN), min(high, _LONG_MAX), indent)
        elif kind == "int":
            low, high = self._ranges.get(path, (_INT_MIN, _INT_MAX))
            self.long(target or "v", max(low, _INT_MIN), min(high, _INT_MAX), indent)
        elif kind == "boolean":
            self.emit(indent, "if d[p] > 1: raise _NotScanned('boolean')")
            self.emit(indent, "p += 1")
        elif kind == "null":
            pass
        elif kind in ("array", "map"):
            self.blocks(schema, path, indent)
        elif kind == "record":
            self.record(schema, path, indent)
        elif isinstance(kind, dict | list):
            self.value(kind, path, indent, target)
        else:
            raise UnsupportedSchema(f"Avro type {kind!r}")

    def length(self, target: str, indent: int) -> None:
        """A length or block count: non-negative (a negative block count, which the spec
        allows, is left to the reader). Inline up to two varint bytes (below 8,192)."""
        self.emit(indent, f"{target} = d[p]")
        self.emit(indent, f"if {target} < 0x80:")
        self.emit(indent + 1, "p += 1")
        self.emit(indent, "elif d[p + 1] < 0x80:")
        self.emit(indent + 1, f"{target} = ({target} & 0x7F) | (d[p + 1] << 7)")
        self.emit(indent + 1, "p += 2")
        self.emit(indent, "else:")
        self.emit(indent + 1, f"{target}, p = _read_long(d, p)")
        self.emit(indent + 1, f"{target} = {target} << 1 if {target} >= 0 else 1")
        # Zig-zag: an odd number is a negative length.
        self.emit(indent, f"if {target} & 1: raise _NotScanned('negative length')")
        self.emit(indent, f"{target} >>= 1")

    def timestamp(self, target: str | None, indent: int) -> None:
        """A timestamp-millis within the reader's years. Inline for the six-byte varints of
        every date from 1970 +- 69 years (any of them is within those years)."""
        self.emit(
            indent,
            "if d[p + 5] < 0x80 and d[p + 4] > 0x7F and d[p + 3] > 0x7F and "
            "d[p + 2] > 0x7F and d[p + 1] > 0x7F and d[p] > 0x7F:",
        )
        if target is not None:
            self.emit(
                indent + 1,
                f"{target} = (d[p] & 0x7F) | (d[p + 1] & 0x7F) << 7 | (d[p + 2] & 0x7F) << 14 "
                "| (d[p + 3] & 0x7F) << 21 | (d[p + 4] & 0x7F) << 28 | d[p + 5] << 35",
            )
            self.emit(indent + 1, f"{target} = ({target} >> 1) ^ -({target} & 1)")
        self.emit(indent + 1, "p += 6")
        self.emit(indent, "else:")
        self.long(target or "v", _TIMESTAMP_MIN, _TIMESTAMP_MAX, indent + 1)

    def text(self, indent: int, key_set: str | None = None) -> None:
        # Valid UTF-8 (the reader decodes it); a map key also unique (the reader keeps the
        # last of equal keys, ClickHouse's Map would keep both).
        length = self.name("n")
        self.length(length, indent)
        self.emit(indent, f"if {length}:")
        self.emit(indent + 1, f"q = p + {length}")
        self.emit(indent + 1, "if q > e: raise EOFError('truncated Avro string')")
        if key_set is None:
            self.emit(indent + 1, "d[p:q].decode()")
            self.emit(indent + 1, "p = q")
            return
        self.emit(indent + 1, "k = d[p:q]")
        self.emit(indent + 1, "k.decode()")
        self.emit(indent + 1, "p = q")
        self.emit(indent, "else:")
        self.emit(indent + 1, "k = b''")
        self.emit(indent, f"if k in {key_set}: raise _NotScanned('duplicate map key')")
        self.emit(indent, f"{key_set}.add(k)")

    def long(self, target: str, low: int, high: int, indent: int) -> None:
        self.emit(indent, f"{target} = d[p]")
        self.emit(
            indent, f"if {target} < 0x80: {target} = ({target} >> 1) ^ -({target} & 1); p += 1"
        )
        self.emit(indent, f"else: {target}, p = _read_long(d, p)")
        self.emit(indent, f"if not {low} <= {target} <= {high}: raise _NotScanned('out of range')")

    def union(self, branches: list[Any], path: str, indent: int) -> None:
        names = [b if isinstance(b, str) else b.get("type") for b in branches]
        if len(branches) != 2 or "null" not in names:
            raise UnsupportedSchema(f"union {names!r}")
        null_index = names.index("null")
        self.emit(indent, "u = d[p]")
        self.emit(indent, "p += 1")
        # Branch indexes 0 and 1 are the bytes 00 and 02 (zig-zag).
        self.emit(indent, f"if u == {2 * (1 - null_index)}:")
        self.value(branches[1 - null_index], path, indent + 1)
        self.emit(indent, f"elif u != {2 * null_index}: raise _NotScanned('union branch')")

    def blocks(self, schema: dict[str, Any], path: str, indent: int) -> None:
        count = self.name("n")
        keys = self.name("ks") if schema["type"] == "map" else None
        if keys is not None:
            self.emit(indent, f"{keys} = set()")
        self.length(count, indent)
        self.emit(indent, f"while {count}:")
        self.emit(indent + 1, f"for _ in range({count}):")
        if keys is not None:
            self.text(indent + 2, keys)
            self.value(schema["values"], path, indent + 2)
        else:
            self.value(schema["items"], path, indent + 2)
        self.length(count, indent + 1)

    def record(self, schema: dict[str, Any], path: str, indent: int) -> None:
        prefix = f"{path}." if path else ""
        for field in schema["fields"]:
            self.field(field, prefix, indent)

    def field(self, field: dict[str, Any], prefix: str, indent: int) -> None:
        captured = "captured" if not prefix and field["name"] == self._capture else None
        if captured is None and "default" in field and _default_bytes(field) == b"\x00":
            # The default alone: one zero byte (an empty string, list or map, 0, false, null
            # as a union's first branch), the commonest value of most fields.
            self.emit(indent, "if d[p] == 0: p += 1")
            self.emit(indent, "else:")
            indent += 1
        self.value(field["type"], prefix + field["name"], indent, captured)


def compile_scanner(
    schema: dict[str, Any],
    ranges: dict[str, tuple[int, int]] | None = None,
    capture: str | None = None,
) -> Callable[[bytes, int], tuple[int, int]]:
    """``scan(data, start) -> (end, captured)``: checks that ``data[start:]`` begins with a
    record of ``schema`` that ``compile_reader`` reads without error and that any Avro reader
    reads as the same values, and returns where it ends (bytes after it are not the record's)
    and the value of the top-level long or timestamp field ``capture`` (0 without one).

    It builds no values (a few times cheaper than reading), and vouches only for what it can
    check cheaply: lengths and counts non-negative, booleans 0 or 1, union branches 0 or 1 in
    one byte, strings and map keys valid UTF-8, map keys unique, timestamps within the years
    the reader can represent, and each long in ``ranges`` (by dotted path: ``pool.id``) within
    its bounds (else the 64-bit range; ``int`` the 32-bit one). Anything else raises: NotScanned,
    EOFError or IndexError (truncated), ValueError (UnicodeDecodeError, an over-long varint);
    the caller then reads the record to learn what it is."""
    if schema.get("type") != "record":
        raise UnsupportedSchema("the schema must be a record")
    compiler = _ScannerCompiler(dict(ranges or {}), capture)
    compiler.emit(1, "e = len(d)")
    compiler.emit(1, "captured = 0")
    compiler.record(schema, "", 1)
    compiler.emit(1, "if p > e: raise EOFError('truncated Avro record')")
    compiler.emit(1, "return p, captured")
    source = "def scan(d, p):\n" + "\n".join(compiler.lines) + "\n"
    namespace: dict[str, Any] = {
        "_read_long": read_long,
        "_NotScanned": NotScanned,
        **compiler.constants,
    }
    # As for the writer: the code comes from a schema sgpipe ships, never from input data.
    exec(compile(source, f"<avro scanner for {schema.get('name')}>", "exec"), namespace)
    scanner: Callable[[bytes, int], tuple[int, int]] = namespace["scan"]
    return scanner
