"""The EmailEvent record on the events topic: every schema version, and the two wire formats.

Records are Avro binary, framed one of two ways (``docs/consuming.md``):

- **single-object encoding** (Avro spec, the default; no registry): ``C3 01``, the writer
  schema's 8-byte little-endian CRC-64-AVRO fingerprint, the record;
- **Confluent wire format** (``kafka.events_format: confluent``): ``00``, the writer schema's
  4-byte big-endian Schema Registry id, the record.

Every version ever released lives in ``schemas/avro/email_event.v{N}.avsc`` and is never edited.
The decoder reads either framing, finds the writer schema by fingerprint or registry id and
resolves it to the current (highest) version, so records written by an older sgpipe are read
with the newer fields at their defaults: consumers can be upgraded before producers and a
rolling deploy loses nothing.
"""

from __future__ import annotations

import io
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any

from fastavro import parse_schema, schemaless_reader
from fastavro.read import SchemaResolutionError
from fastavro.schema import fingerprint, to_parsing_canonical_form

from schemas.avro_compiled import compile_reader, compile_writer

SINGLE_OBJECT_MAGIC = b"\xc3\x01"
CONFLUENT_MAGIC = b"\x00"
# Lets consumers route by schema without decoding the value (one header, every record).
SCHEMA_HEADER = "sgpipe-schema"
SCHEMA_HEADER_VALUE = b"io.sgpipe.v1.EmailEvent"

# A normalized event: Avro field name -> value; fields left out take their schema default.
EmailEventRecord = dict[str, Any]

# How many unreadable registry ids a codec remembers (then it forgets them all and asks again).
_MAX_UNREADABLE_SCHEMA_IDS = 10_000
_VERSION_FILE = re.compile(r"^email_event\.v(\d+)\.avsc$")
_DECODE_ERRORS = (
    ValueError,
    TypeError,
    OverflowError,
    EOFError,
    IndexError,
    KeyError,
    SchemaResolutionError,
)


class SerializationError(ValueError):
    """A record could not be encoded, or a payload is not a readable EmailEvent (poison)."""


class UnknownWriterSchema(Exception):
    """A record names a writer schema this process does not know: a single-object fingerprint
    of no released version (a newer sgpipe wrote it, or the bytes only look framed), or a
    Confluent registry id that was not fetched (``schema_id`` is set: a consumer with a
    registry fetches it with ``sgpipe.runtime.schema_registry`` and decodes again) or that the
    registry does not know.

    Record content, so poison, never fatal: anyone who can produce to the events topic can
    write ``00`` and four bytes. The dead-letter limit is what pauses a sink that meets
    nothing else (a newer sgpipe deployed before its consumers were upgraded).
    """

    def __init__(
        self, message: str, *, fingerprint: bytes | None = None, schema_id: int | None = None
    ) -> None:
        super().__init__(message)
        self.fingerprint = fingerprint
        self.schema_id = schema_id


@dataclass(frozen=True, slots=True)
class SchemaVersion:
    version: int
    text: str  # the committed file, byte for byte (what a registry receives)
    schema: dict[str, Any]  # parsed by fastavro
    fingerprint: bytes  # CRC-64-AVRO of the parsing canonical form, little-endian


def _parse(document: Any) -> dict[str, Any]:
    # A fresh registry of named types per schema: versions define the same names.
    parsed = parse_schema(document, named_schemas={})
    if not isinstance(parsed, dict):
        raise SerializationError("an EmailEvent schema must be an Avro record")
    return parsed


def _fingerprint(parsed: dict[str, Any]) -> bytes:
    return bytes.fromhex(fingerprint(to_parsing_canonical_form(parsed), "CRC-64-AVRO"))


@cache
def schema_versions() -> tuple[SchemaVersion, ...]:
    """Every released EmailEvent schema, oldest first; the last is the current one."""
    folder = resources.files("schemas").joinpath("avro")
    found: list[SchemaVersion] = []
    for entry in folder.iterdir():
        match = _VERSION_FILE.match(entry.name)
        if match is None:
            continue
        text = entry.read_text("utf-8")
        parsed = _parse(json.loads(text))
        found.append(SchemaVersion(int(match.group(1)), text, parsed, _fingerprint(parsed)))
    found.sort(key=lambda version: version.version)
    if [version.version for version in found] != list(range(1, len(found) + 1)):
        raise RuntimeError(f"schemas/avro must hold versions 1..N, found {found!r}")
    return tuple(found)


def current_schema() -> SchemaVersion:
    return schema_versions()[-1]


class EmailEventCodec:
    """Encodes records with the current schema in one wire format; decodes both formats and
    every known version. Schemas are parsed once (``schema_versions`` is cached).

    ``confluent_schema_id``: the id the registry gave the current schema under the events
    topic's subject; given, records are written in the Confluent wire format.
    """

    def __init__(self, *, confluent_schema_id: int | None = None) -> None:
        versions = schema_versions()
        self.current = versions[-1]
        self.fingerprint = self.current.fingerprint
        self._reader = self.current.schema
        # Compiled once from the committed schema: fastavro's generic writer was most of the
        # processor's time per event (bench/bench_hot_paths.py).
        self._write = compile_writer(json.loads(self.current.text))
        # And the reader of records written with the current schema (nearly all of them);
        # an older writer's records go through fastavro's schema resolution.
        self._read_current = compile_reader(json.loads(self.current.text))
        self._by_fingerprint = {version.fingerprint: version.schema for version in versions}
        self._by_schema_id: dict[int, dict[str, Any]] = {}
        # Registry ids known not to lead to a readable schema, and why.
        self._unreadable_schema_ids: dict[int, str] = {}
        self.confluent_schema_id = confluent_schema_id
        if confluent_schema_id is None:
            self._prefix = SINGLE_OBJECT_MAGIC + self.fingerprint
        else:
            self._by_schema_id[confluent_schema_id] = self._reader
            self._prefix = CONFLUENT_MAGIC + confluent_schema_id.to_bytes(4, "big")

    def encode(self, record: EmailEventRecord) -> bytes:
        """The framed Avro record; fields left out of ``record`` take their defaults."""
        try:
            return self._prefix + self._write(record)
        except (ValueError, TypeError, OverflowError) as exc:
            raise SerializationError(
                f"cannot encode event {record.get('sg_event_id')!r}: {exc}"
            ) from exc

    def decode(self, payload: bytes) -> EmailEventRecord:
        """The record in the current schema (``event_time``/``received_at`` as aware UTC
        datetimes). SerializationError for bytes that are not an EmailEvent record;
        UnknownWriterSchema for a record whose writer schema is not known here."""
        writer, body = self._writer_schema(payload)
        record: Any
        try:
            if writer is self._reader:
                record = self._read_current(body)
            else:
                record = schemaless_reader(io.BytesIO(body), writer, self._reader)
        except _DECODE_ERRORS as exc:
            raise SerializationError(f"cannot decode EmailEvent: {exc}") from exc
        if not isinstance(record, dict):
            raise SerializationError("EmailEvent payload did not decode to a record")
        return record

    def current_body_start(self, payload: bytes) -> int | None:
        """Where the Avro body of ``payload`` starts when its framing names the current schema
        (by fingerprint, or by a registry id known to be it), else None: another version, a
        schema not known here, or no framing (``decode`` says which). Lets a consumer take
        the body as it is, without decoding it."""
        if payload[:2] == SINGLE_OBJECT_MAGIC and len(payload) >= 10:
            return 10 if payload[2:10] == self.fingerprint else None
        if payload[:1] == CONFLUENT_MAGIC and len(payload) >= 5:
            known = self._by_schema_id.get(int.from_bytes(payload[1:5], "big"))
            return 5 if known is self._reader else None
        return None

    def _writer_schema(self, payload: bytes) -> tuple[dict[str, Any], bytes]:
        if payload[:2] == SINGLE_OBJECT_MAGIC and len(payload) >= 10:
            known = self._by_fingerprint.get(payload[2:10])
            if known is None:
                raise UnknownWriterSchema(
                    f"EmailEvent written with unknown schema fingerprint {payload[2:10].hex()} "
                    "(a newer sgpipe? upgrade this consumer)",
                    fingerprint=payload[2:10],
                )
            return known, payload[10:]
        if payload[:1] == CONFLUENT_MAGIC and len(payload) >= 5:
            schema_id = int.from_bytes(payload[1:5], "big")
            known = self._by_schema_id.get(schema_id)
            if known is None:
                why = self._unreadable_schema_ids.get(schema_id, "not fetched")
                raise UnknownWriterSchema(
                    f"EmailEvent written with schema registry id {schema_id}: {why}",
                    schema_id=schema_id,
                )
            return known, payload[5:]
        raise SerializationError(
            "not an EmailEvent record (neither single-object C3 01 nor Confluent 00 framing; "
            f"starts {payload[:10].hex()!r})"
        )

    def unknown_schema_ids(self, payloads: Iterable[bytes | None]) -> set[int]:
        """Registry ids named by Confluent-framed ``payloads`` that are not known yet."""
        return {
            schema_id
            for payload in payloads
            if payload is not None and payload[:1] == CONFLUENT_MAGIC and len(payload) >= 5
            if (schema_id := int.from_bytes(payload[1:5], "big")) not in self._by_schema_id
            and schema_id not in self._unreadable_schema_ids
        }

    def add_unreadable_schema(self, schema_id: int, why: str) -> None:
        """Remember that registry id ``schema_id`` leads to no readable schema (the registry
        does not know it, or holds no EmailEvent under it): its records are poison, and it
        is not asked for again. Bounded: ids come from record bytes, so from anyone."""
        if len(self._unreadable_schema_ids) >= _MAX_UNREADABLE_SCHEMA_IDS:
            self._unreadable_schema_ids.clear()
        self._unreadable_schema_ids[schema_id] = why

    def add_registry_schema(self, schema_id: int, schema_text: str) -> None:
        """Learn the writer schema a registry holds under ``schema_id``. A schema equal to a
        released version (same canonical form) reuses it; another must still be an EmailEvent
        this version can resolve, else SerializationError."""
        try:
            parsed = _parse(json.loads(schema_text))
        except (ValueError, TypeError, KeyError) as exc:
            raise SerializationError(f"registry schema {schema_id} is not Avro: {exc}") from exc
        self._by_schema_id[schema_id] = self._by_fingerprint.get(_fingerprint(parsed), parsed)
