"""The one definition of a normalized SendGrid event: every field, once.

Each row of ``EVENT_FIELDS`` says what a field is called (SendGrid's name, ``-`` becoming
``_``), which SendGrid key it comes from, its logical type, whether absence is kept apart from
every value (``nullable``), whether ClickHouse stores it as ``LowCardinality``, what it means
and in which schema version it appeared. Everything else is derived from these rows:

- the normalizer's typing (``processors/normalize.py`` maps each logical type to its coercion),
- the Avro schema of the current version (``avro_schema()``; committed as
  ``schemas/avro/email_event.v{N}.avsc``, checked by a test),
- the ClickHouse columns (``clickhouse_columns()``; the table after migrations is checked
  against it on the real engine) and the ``ALTER`` that adds a version's columns,
- the sink's column list and row building (``sinks/rows.py``),
- the column table in ``docs/event-contract.md`` (checked by a test).

Adding a field is one row here plus the regenerated artefacts:
``python -m schemas.event_fields avsc|migration N|markdown``; changing a codec is the row plus a
new migration from ``python -m schemas.event_fields codecs`` (codecs were measured on simulated
traffic: ``bench/clickhouse_storage.py``, docs/clickhouse.md).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

# The version ``avro_schema()`` describes; the highest ``since`` below.
CURRENT_VERSION: Final = 2

# Kept for every version: changing the full name would make Avro resolution and registry
# compatibility checks treat the schema as another type. The "v1" is the contract's major
# version (a breaking change would get a new name and a new topic), not a schema version.
RECORD_NAME: Final = "EmailEvent"
RECORD_NAMESPACE: Final = "io.sgpipe.v1"
RECORD_DOC: Final = (
    "One SendGrid Event Webhook event, typed. Every SendGrid field has a typed field named as "
    "SendGrid names it ('-' becomes '_'); keys SendGrid does not reserve are in custom_args; "
    "raw is the event exactly as SendGrid sent it. A value that could not be coerced leaves its "
    "field at the default and is named in coercion_errors. See docs/event-contract.md."
)

# Avro's long is signed 64-bit: an unsigned ClickHouse column cannot take more than this
# through Avro, so integer ranges stop here too.
_AVRO_LONG_MAX: Final = 2**63 - 1


@dataclass(frozen=True, slots=True)
class FieldType:
    """A logical type: its Avro and ClickHouse forms, and a non-nullable field's value when
    SendGrid did not send it. ``name`` selects the coercion rule in the normalizer."""

    name: str
    avro: Any
    clickhouse: str
    zero: Any

    def clickhouse_type(self, *, nullable: bool, low_cardinality: bool) -> str:
        inner = f"Nullable({self.clickhouse})" if nullable else self.clickhouse
        return f"LowCardinality({inner})" if low_cardinality else inner


@dataclass(frozen=True, slots=True)
class IntegerType(FieldType):
    minimum: int = 0
    maximum: int = 0


@dataclass(frozen=True, slots=True)
class ListType(FieldType):
    def clickhouse_type(self, *, nullable: bool, low_cardinality: bool) -> str:
        # An absent list is the empty list; LowCardinality applies to the items.
        items = "LowCardinality(String)" if low_cardinality else "String"
        return f"Array({items})"


@dataclass(frozen=True, slots=True)
class RecordType(FieldType):
    """A JSON object SendGrid sends with known members (``url_offset``, ``pool``).

    Never nullable as a whole: every member is nullable, and an absent object is the record
    with all members null. ClickHouse stores it as a named Tuple (``Nullable(Tuple)`` is too
    new for many servers).
    """

    members: tuple[EventField, ...] = ()

    def clickhouse_type(self, *, nullable: bool, low_cardinality: bool) -> str:
        parts = ", ".join(f"{member.name} {member.clickhouse_type}" for member in self.members)
        return f"Tuple({parts})"


def _integer(clickhouse: str, minimum: int, maximum: int) -> IntegerType:
    return IntegerType(
        "integer", "long", clickhouse, 0, minimum=minimum, maximum=min(maximum, _AVRO_LONG_MAX)
    )


TEXT: Final = FieldType("text", "string", "String", "")
TIMESTAMP: Final = FieldType(
    "timestamp", {"type": "long", "logicalType": "timestamp-millis"}, "DateTime64(3, 'UTC')", 0
)
BOOLEAN: Final = FieldType("boolean", "boolean", "Bool", False)
# 0/1 that SendGrid documents as a boolean and sends as 1/0, "1"/"0" or true/false.
FLAG: Final = IntegerType("flag", "long", "UInt8", 0, minimum=0, maximum=1)
UINT32: Final = _integer("UInt32", 0, 2**32 - 1)
UINT64: Final = _integer("UInt64", 0, 2**64 - 1)
INT64: Final = _integer("Int64", -(2**63), 2**63 - 1)
TEXT_LIST: Final = ListType("text_list", {"type": "array", "items": "string"}, "Array(String)", [])
TEXT_MAP: Final = FieldType(
    "text_map", {"type": "map", "values": "string"}, "Map(String, String)", {}
)


@dataclass(frozen=True, slots=True)
class EventField:
    """One field of the normalized event.

    ``source`` is the SendGrid key it is read from; None for fields sgpipe sets itself.
    ``nullable``: absence is kept apart from every value (Avro null, ClickHouse NULL); other
    fields take their type's zero when absent. ``required``: an absent value is a coercion
    error too (the row is still kept). ``since``: the schema version that introduced it.
    """

    name: str
    type: FieldType
    doc: str
    since: int
    source: str | None
    nullable: bool = False
    low_cardinality: bool = False
    required: bool = False
    clickhouse_codec: str | None = None

    @property
    def avro_type(self) -> Any:
        avro = _record_avro(self.type) if isinstance(self.type, RecordType) else self.type.avro
        return ["null", avro] if self.nullable else avro

    @property
    def default(self) -> Any:
        """The value a reader fills in when a writer's schema lacks the field."""
        if self.nullable:
            return None
        if isinstance(self.type, RecordType):
            return {member.name: None for member in self.type.members}
        return self.type.zero

    @property
    def clickhouse_type(self) -> str:
        return self.type.clickhouse_type(
            nullable=self.nullable, low_cardinality=self.low_cardinality
        )


def _sendgrid(
    name: str,
    type_: FieldType,
    doc: str,
    *,
    since: int = 2,
    source: str | None = None,
    **flags: Any,
) -> EventField:
    return EventField(name, type_, doc, since, source if source is not None else name, **flags)


def _sgpipe(name: str, type_: FieldType, doc: str, *, since: int = 2, **flags: Any) -> EventField:
    return EventField(name, type_, doc, since, None, **flags)


def _member(name: str, type_: FieldType, doc: str, **flags: Any) -> EventField:
    return EventField(name, type_, doc, 2, name, nullable=True, **flags)


URL_OFFSET: Final = RecordType(
    "record",
    "UrlOffset",
    "Tuple",
    None,
    members=(
        _member("index", UINT32, "Position of the link among the message's links, from 0."),
        _member("type", TEXT, "Part of the message the link is in: html or text.", low_cardinality=True),
    ),
)  # fmt: skip
POOL: Final = RecordType(
    "record",
    "Pool",
    "Tuple",
    None,
    members=(
        _member("name", TEXT, "IP pool name.", low_cardinality=True),
        _member("id", UINT64, "IP pool id."),
    ),
)


# Order is the Avro field order and the sink's column order. v1 fields first, as v1 had them.
EVENT_FIELDS: Final[tuple[EventField, ...]] = (
    _sgpipe("webhook", TEXT, "Name of the sgpipe webhook (URL path segment) that received the event.", since=1, low_cardinality=True),
    _sendgrid("event", TEXT, "SendGrid's event type as sent: processed, dropped, delivered, deferred, bounce, open, click, spamreport, unsubscribe, group_unsubscribe, group_resubscribe, account_status_change, or a newer one. Empty (and named in coercion_errors) when the event had none.", since=1, low_cardinality=True, required=True),
    _sendgrid("sg_event_id", TEXT, "SendGrid's unique event id, the deduplication key; opaque. When SendGrid sent none, sgpipe- followed by the base64url SHA-256 of the event's canonical JSON (see sg_event_id_generated).", since=1, clickhouse_codec="ZSTD(1)"),
    _sendgrid("event_time", TIMESTAMP, "SendGrid's timestamp (Unix seconds, or milliseconds for Single Sends, as a number or a string) as UTC. 1970-01-01 (and named in coercion_errors) when absent or unusable.", since=1, source="timestamp", required=True, clickhouse_codec="Delta(8), ZSTD(1)"),
    _sendgrid("email", TEXT, "Recipient address as sent, trimmed; null when absent (account_status_change). Personal data.", since=1, nullable=True, clickhouse_codec="ZSTD(1)"),
    _sendgrid("sg_message_id", TEXT, "Message id, trimmed (SendGrid sometimes sends a leading space); null when absent (async bounces).", since=1, nullable=True, clickhouse_codec="ZSTD(1)"),
    _sendgrid("smtp_id", TEXT, "The smtp-id field, trimmed; null when absent or empty.", since=1, source="smtp-id", nullable=True, clickhouse_codec="ZSTD(1)"),
    _sendgrid("category", TEXT_LIST, "Categories; SendGrid sends a string or an array, always an array here (non-string items as compact JSON).", since=1, clickhouse_codec="ZSTD(1)"),
    _sgpipe("custom_args", TEXT_MAP, "Every top-level key that is not one of this record's SendGrid fields (unique_args / custom_args set by the sender, and fields of event types sgpipe does not know yet). Non-string values as compact JSON.", since=1, clickhouse_codec="ZSTD(1)"),
    _sgpipe("received_at", TIMESTAMP, "When the ingress received the batch.", since=1, clickhouse_codec="ZSTD(1)"),
    _sgpipe("request_id", TEXT, "The ingress request that carried the batch.", since=1, clickhouse_codec="ZSTD(1)"),
    _sgpipe("raw", TEXT, "The event exactly as SendGrid sent it: the bytes of its element of the posted JSON array (since v2; v1 wrote it re-encoded compactly).", since=1, clickhouse_codec="ZSTD(3)"),
    _sgpipe("sg_event_id_generated", BOOLEAN, "True when SendGrid sent no usable sg_event_id and sgpipe derived it from the event's content."),
    _sgpipe("coercion_errors", TEXT_LIST, "Fields whose value could not be coerced to their type (left null or at their default; raw keeps the value), and required fields that were absent. Empty for a clean event.", low_cardinality=True),
    # Deliverability: processed, dropped, delivered, deferred, bounce.
    _sendgrid("type", TEXT, "bounce: bounce (hard) or blocked (soft); account_status_change: compliance_suspend, compliance_deactivate, compliance_ban or reactivate.", low_cardinality=True),
    _sendgrid("bounce_classification", TEXT, "Bounce category: Invalid Address, Technical, Content, Reputation, Frequency/Volume, Mailbox Unavailable or Unclassified.", low_cardinality=True),
    _sendgrid("reason", TEXT, "Why the message was dropped, bounced or blocked, as SendGrid or the receiving server said it.", clickhouse_codec="ZSTD(1)"),
    _sendgrid("status", TEXT, "SMTP status code, usually 5.x.y (sometimes a bare code such as 550).", low_cardinality=True),
    _sendgrid("response", TEXT, "The receiving server's SMTP response (delivered, deferred).", clickhouse_codec="ZSTD(1)"),
    _sendgrid("attempt", UINT32, "Delivery attempt number of a deferred event (SendGrid sends it as a string); 0 when absent."),
    _sendgrid("tls", FLAG, "1 when the message was delivered over TLS, 0 when not; null when not reported. SendGrid sends 1/0, \"1\"/\"0\" or true/false.", nullable=True),
    _sendgrid("cert_err", FLAG, "1 when the receiving server's TLS certificate failed validation, 0 when not; null when not reported.", nullable=True),
    _sendgrid("ip", TEXT, "Sending IP (deliverability events) or the recipient's IP (engagement events); may be \"unknown\". Personal data on engagement events.", clickhouse_codec="ZSTD(1)"),
    _sendgrid("pool", POOL, "The IP pool the message was sent from, {name, id}; members null when absent."),
    _sendgrid("domain", TEXT, "Recipient domain (deferred).", low_cardinality=True),
    _sendgrid("from", TEXT, "Sender address (deferred). Quote the column in SQL: \"from\".", low_cardinality=True),
    # Engagement: open, click, spamreport, unsubscribe, group_unsubscribe, group_resubscribe.
    _sendgrid("useragent", TEXT, "The recipient's user agent (open, click). Personal data.", clickhouse_codec="ZSTD(1)"),
    _sendgrid("url", TEXT, "The clicked link (click).", clickhouse_codec="ZSTD(1)"),
    _sendgrid("url_offset", URL_OFFSET, "Which link was clicked, {index, type}; members null when absent."),
    _sendgrid("sg_machine_open", BOOLEAN, "True when the open came from a privacy proxy (e.g. Apple Mail Privacy Protection) rather than a person; null when not reported.", nullable=True),
    _sendgrid("asm_group_id", UINT64, "Unsubscribe (ASM) group id; 0 when absent."),
    # Templates, Marketing Campaigns and Single Sends.
    _sendgrid("sg_template_id", TEXT, "Dynamic template id (d-...).", low_cardinality=True),
    _sendgrid("sg_template_name", TEXT, "Dynamic template name.", low_cardinality=True),
    _sendgrid("marketing_campaign_id", TEXT, "Marketing campaign id (a number in legacy campaigns; kept as text).", low_cardinality=True),
    _sendgrid("marketing_campaign_name", TEXT, "Marketing campaign name.", low_cardinality=True),
    _sendgrid("marketing_campaign_version", TEXT, "A/B test version of a legacy marketing campaign.", low_cardinality=True),
    _sendgrid("marketing_campaign_split_id", TEXT, "A/B test split id of a legacy marketing campaign (kept as text).", low_cardinality=True),
    _sendgrid("singlesend_id", TEXT, "Single Send id.", low_cardinality=True),
    _sendgrid("singlesend_name", TEXT, "Single Send name.", low_cardinality=True),
    _sendgrid("send_at", INT64, "Scheduled send time of a Single Send as SendGrid sent it (Unix seconds); 0 when absent."),
    _sendgrid("phase_id", TEXT, "Marketing Campaigns phase (send, test, ...).", low_cardinality=True),
    _sendgrid("mc_stats", TEXT, "Marketing Campaigns statistics bucket (singlesend, automation, ...).", low_cardinality=True),
    _sendgrid("post_type", TEXT, "Marketing Campaigns post type.", low_cardinality=True),
    _sendgrid("sg_user_id", UINT64, "SendGrid user (account) id; 0 when absent."),
    _sendgrid("sg_content_type", TEXT, "Content part the event concerns (html, text).", low_cardinality=True),
    _sendgrid("reseller_id", TEXT, "Reseller id (undocumented by SendGrid; kept as text).", low_cardinality=True),
)  # fmt: skip

# Columns of email_events that the sink does not write: ClickHouse fills them.
TABLE_ONLY_COLUMNS: Final[tuple[tuple[str, str], ...]] = (("inserted_at", "DateTime64(3, 'UTC')"),)

FIELD_NAMES: Final[tuple[str, ...]] = tuple(f.name for f in EVENT_FIELDS)
FIELDS_BY_SOURCE: Final[dict[str, EventField]] = {
    f.source: f for f in EVENT_FIELDS if f.source is not None
}
# Top-level keys with a typed field; every other key is a custom argument.
RESERVED_SOURCES: Final[frozenset[str]] = frozenset(FIELDS_BY_SOURCE)


def field_named(name: str) -> EventField:
    for candidate in EVENT_FIELDS:
        if candidate.name == name:
            return candidate
    raise KeyError(name)


def _record_avro(record: RecordType) -> dict[str, Any]:
    return {
        "type": "record",
        "name": record.avro,
        "doc": f"{record.avro}: members are null when SendGrid did not send them.",
        "fields": [_avro_field(member) for member in record.members],
    }


def _avro_field(event_field: EventField) -> dict[str, Any]:
    return {
        "name": event_field.name,
        "type": event_field.avro_type,
        "default": event_field.default,
        "doc": event_field.doc,
    }


def avro_schema() -> dict[str, Any]:
    """The current version's Avro schema, as committed in ``schemas/avro/``."""
    return {
        "type": "record",
        "name": RECORD_NAME,
        "namespace": RECORD_NAMESPACE,
        "doc": RECORD_DOC,
        "fields": [_avro_field(event_field) for event_field in EVENT_FIELDS],
    }


def avro_schema_text() -> str:
    """``avro_schema()`` as the committed file's text: one field per line."""
    document = avro_schema()
    fields = document.pop("fields")
    head = "".join(
        f"  {json.dumps(key)}: {json.dumps(value, ensure_ascii=False)},\n"
        for key, value in document.items()
    )
    lines = ",\n".join(f"    {json.dumps(item, ensure_ascii=False)}" for item in fields)
    return f'{{\n{head}  "fields": [\n{lines}\n  ]\n}}\n'


def clickhouse_columns() -> list[tuple[str, str]]:
    """``(name, type)`` of every ``email_events`` column, as ClickHouse reports them."""
    return [(f.name, f.clickhouse_type) for f in EVENT_FIELDS] + list(TABLE_ONLY_COLUMNS)


def _sql_string(text: str) -> str:
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _quoted(name: str) -> str:
    return f"`{name}`"


def add_columns_sql(version: int) -> str:
    """The additive ``ALTER``s for the columns introduced in ``version`` (a migration's body,
    with the placeholders of ``sgpipe/runtime/migrations.py``): the table's, and in cluster
    mode the Distributed table's too. Codecs are not part of it: they come from the
    ``codecs`` migration (``modify_codecs_sql``), so that a column's codec can change later
    while this stays what was released."""
    clauses = [
        f"    ADD COLUMN IF NOT EXISTS {_quoted(f.name)} {f.clickhouse_type} "
        f"COMMENT {_sql_string(f.doc)}"
        for f in EVENT_FIELDS
        if f.since == version
    ]
    body = ",\n".join(clauses)
    return (
        f"ALTER TABLE {{database}}.email_events{{local}} {{on_cluster}}\n{body};\n\n"
        "-- cluster-only: the Distributed table reads and writes the same columns.\n"
        f"ALTER TABLE {{database}}.email_events {{on_cluster}}\n{body};\n"
    )


def clickhouse_codecs() -> list[tuple[str, str]]:
    """``(name, codec)`` of every ``email_events`` column with a codec of its own (the others
    use the server's default, LZ4)."""
    return [(f.name, f.clickhouse_codec) for f in EVENT_FIELDS if f.clickhouse_codec]


def modify_codecs_sql() -> str:
    """One ``ALTER`` giving every column its codec from the field table (a migration's body).
    Only new parts and merges use a new codec: nothing is rewritten at once."""
    clauses = [
        f"    MODIFY COLUMN {_quoted(name)} CODEC({codec})" for name, codec in clickhouse_codecs()
    ]
    return "ALTER TABLE {database}.email_events{local} {on_cluster}\n" + ",\n".join(clauses) + ";\n"


def _markdown_cell(text: str) -> str:
    return text.replace("|", "\\|")


def markdown_table(fields: Sequence[EventField] = EVENT_FIELDS) -> str:
    """The column table of ``docs/event-contract.md``."""
    rows = [
        "| column | SendGrid key | type | Avro | ClickHouse | since | meaning |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for f in fields:
        if isinstance(f.type, RecordType):
            avro = f"record {f.type.avro}"
        else:
            avro = json.dumps(f.avro_type).replace('"', "")
        rows.append(
            f"| `{f.name}` | {f'`{f.source}`' if f.source else '(sgpipe)'} | {f.type.name}"
            f"{' (required)' if f.required else ''} | `{avro}` | `{f.clickhouse_type}` | "
            f"{f.since} | {_markdown_cell(f.doc)} |"
        )
    return "\n".join(rows) + "\n"


def _main(argv: Sequence[str]) -> int:
    """``avsc`` | ``migration VERSION`` | ``codecs`` | ``markdown``: print a derived artefact."""
    if argv[:1] == ["avsc"]:
        sys.stdout.write(avro_schema_text())
    elif argv[:1] == ["migration"] and len(argv) == 2:
        sys.stdout.write(add_columns_sql(int(argv[1])))
    elif argv[:1] == ["codecs"]:
        sys.stdout.write(modify_codecs_sql())
    elif argv[:1] == ["markdown"]:
        sys.stdout.write(markdown_table())
    else:
        print("usage: python -m schemas.event_fields avsc|migration VERSION|codecs|markdown")
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
