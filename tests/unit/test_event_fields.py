"""The field table is the one definition of the event: the committed current ``.avsc``, the doc's
column table and the sink's columns must all be what it derives (the ClickHouse table is
checked on the real engine in tests/integration/test_event_contract_clickhouse.py)."""

from __future__ import annotations

import json
import re
from pathlib import Path

from schemas.email_event import schema_versions
from schemas.event_fields import (
    CURRENT_VERSION,
    EVENT_FIELDS,
    FIELD_NAMES,
    RecordType,
    add_columns_sql,
    avro_schema,
    avro_schema_text,
    clickhouse_columns,
    markdown_table,
)
from sinks.rows import EMAIL_EVENT_COLUMNS

ROOT = Path(__file__).resolve().parents[2]
AVRO_DIR = ROOT / "schemas" / "avro"
# The foundation's schema (commit 12ff45a, schemas/avro/email_event.avsc), released as v1.
FOUNDATION_V1_FINGERPRINT = "d3e347f133f12f1e"
AVRO_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def test_committed_current_avsc_is_the_field_tables() -> None:
    committed = (AVRO_DIR / f"email_event.v{CURRENT_VERSION}.avsc").read_text("utf-8")
    assert json.loads(committed) == avro_schema()
    assert committed == avro_schema_text()


def test_current_version_is_the_newest_file_and_the_newest_field() -> None:
    assert schema_versions()[-1].version == CURRENT_VERSION
    assert max(f.since for f in EVENT_FIELDS) == CURRENT_VERSION
    assert sorted(p.name for p in AVRO_DIR.glob("*.avsc")) == [
        f"email_event.v{n}.avsc" for n in range(1, CURRENT_VERSION + 1)
    ]


def test_v1_is_the_foundations_schema_byte_for_byte() -> None:
    v1 = schema_versions()[0]
    assert v1.fingerprint.hex() == FOUNDATION_V1_FINGERPRINT
    # Its fields are the table's since-1 fields, in the same order.
    assert [f["name"] for f in json.loads(v1.text)["fields"]] == [
        f.name for f in EVENT_FIELDS if f.since == 1
    ]


def test_names_are_sendgrids_with_dashes_as_underscores() -> None:
    for f in EVENT_FIELDS:
        assert AVRO_NAME.match(f.name), f.name
        if f.source is not None and f.name != "event_time":
            assert f.name == f.source.replace("-", "_")
    assert len(set(FIELD_NAMES)) == len(FIELD_NAMES)
    assert {f.source for f in EVENT_FIELDS if f.name == "event_time"} == {"timestamp"}


def test_every_field_is_documented_and_has_a_default() -> None:
    for field in avro_schema()["fields"]:
        assert field["doc"].strip(), field["name"]
        assert "default" in field, field["name"]
    for f in EVENT_FIELDS:
        if isinstance(f.type, RecordType):
            assert not f.nullable  # absent = all members null (no Nullable(Tuple))
            assert all(member.nullable and member.doc for member in f.type.members)


def test_sink_columns_are_the_field_table() -> None:
    assert EMAIL_EVENT_COLUMNS == FIELD_NAMES
    assert [name for name, _ in clickhouse_columns()] == [*FIELD_NAMES, "inserted_at"]


def test_docs_column_table_is_the_field_tables() -> None:
    doc = (ROOT / "docs" / "event-contract.md").read_text("utf-8")
    section = doc.split("<!-- columns:start -->\n")[1].split("<!-- columns:end -->")[0]
    assert section == markdown_table()


def test_migration_sql_adds_only_that_versions_columns_additively() -> None:
    sql = add_columns_sql(2)
    # The table's ALTER (in cluster mode a second one gives the Distributed table the same).
    added = re.findall(r"ADD COLUMN IF NOT EXISTS `(\w+)`", sql.split(";\n")[0])
    assert added == [f.name for f in EVENT_FIELDS if f.since == 2]
    assert "DROP" not in sql and "MODIFY" not in sql
    committed = (ROOT / "schemas" / "clickhouse" / "0002_typed_event_fields.sql").read_text()
    table_alter = committed.split(";\n")[0]
    assert re.findall(r"ADD COLUMN IF NOT EXISTS `(\w+)` ([^\n]+?) COMMENT", table_alter) == [
        (f.name, f.clickhouse_type) for f in EVENT_FIELDS if f.since == 2
    ]
