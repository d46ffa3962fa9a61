"""The sink's insert (Avro bodies transcoded to RowBinary) stores exactly what a
clickhouse-connect insert of the decoded records stores -- what the sink did before, decoding
each record in Python -- on the real engine with every migration applied: byte for byte, read
back as RowBinary. Records drawn by Hypothesis over the whole schema, plus the edges of each
column type (ranges, long strings and lists, nulls inside tuples, non-ASCII text)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings

from schemas.email_event import EmailEventCodec, current_schema
from sgpipe.runtime.migrations import apply_migrations
from sgpipe.runtime.settings import ClickHouseSettings
from sgpipe.runtime.stage import BatchInfo
from sinks.clickhouse import ClickHouseWriter
from sinks.rows import EMAIL_EVENT_COLUMNS, EventRows, UnwritableEvent, to_columns
from tests.integration.clickhouse_tools import clickhouse_client, served_clickhouse
from tests.unit.test_avro_compiled import records_for

pytest.importorskip("chdb")

pytestmark = pytest.mark.clickhouse

CODEC = EmailEventCodec()
SCHEMA = json.loads(current_schema().text)

EDGES: list[dict[str, Any]] = [
    {"attempt": 2**32 - 1, "sg_user_id": 2**63 - 1, "asm_group_id": 2**63 - 1},
    {"send_at": -(2**63), "tls": 1, "cert_err": 0, "sg_machine_open": False},
    {"send_at": 2**63 - 1, "tls": 0, "cert_err": 1, "sg_machine_open": True},
    {"pool": {"name": None, "id": 2**63 - 1}, "url_offset": {"index": 2**32 - 1, "type": None}},
    {"pool": {"name": "p" * 200, "id": None}, "url_offset": {"index": None, "type": "html"}},
    {"raw": "r" * 10_000, "email": "é" * 70, "sg_message_id": "", "smtp_id": None},
    {"category": [f"c{n}" for n in range(300)], "coercion_errors": ["x" * 64]},
    {"custom_args": {f"k{n}": "v" * n for n in range(200)}, "sg_event_id_generated": True},
    {"event_time": 0, "received_at": 253_402_300_799_999},
    {"event_time": -62_135_596_800_000, "received_at": -1},
    {"reason": "\u2028\x00\U0001f600", "from": "a@b", "type": "blocked"},
]


def drawn_records(count: int) -> list[dict[str, Any]]:
    """``count`` records of the current schema drawn by Hypothesis (reproducibly)."""
    found: list[dict[str, Any]] = []

    @settings(
        max_examples=count,
        derandomize=True,
        database=None,
        deadline=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(records_for(SCHEMA, timestamps=True))
    def collect(record: dict[str, Any]) -> None:
        found.append(record)

    collect()
    return found


async def test_the_sink_stores_what_an_insert_of_the_decoded_records_stores(
    tmp_path: Path,
) -> None:
    rows_of = EventRows(CODEC)
    rows = []
    for index, record in enumerate([*EDGES, *drawn_records(300)]):
        try:
            # A unique event id: the table keeps one row per (event, day, sg_event_id).
            unique = {"sg_event_id": f"e{index:04}", "request_id": f"r{index:04}"}
            rows.append(rows_of.row(CODEC.encode({**record, **unique})))
        except UnwritableEvent:  # integers its columns cannot hold: dead letters, not rows
            continue
    assert len(rows) > 100
    async with served_clickhouse(tmp_path / "ch") as url, clickhouse_client(url) as client:
        writer = ClickHouseWriter(ClickHouseSettings(url=url, database="sink"), None, stage="sink")
        await writer.start()
        try:
            await writer.write(rows, BatchInfo({("events", 0): (0, len(rows) - 1)}))
        finally:
            await writer.stop()
        await apply_migrations(client, "decoded")
        await client.insert(
            "decoded.email_events",
            to_columns([dict(row) for row in rows]),
            column_names=list(EMAIL_EVENT_COLUMNS),
            column_oriented=True,
        )
        columns = ", ".join(f"`{name}`" for name in EMAIL_EVENT_COLUMNS)
        stored = [
            await client.raw_query(
                f"SELECT {columns} FROM {database}.email_events ORDER BY request_id",
                fmt="RowBinary",
            )
            for database in ("sink", "decoded")
        ]
        assert len(stored[0]) > 0
        assert stored[0] == stored[1]
        count = await client.query("SELECT count() FROM sink.email_events")
        assert count.result_rows == [(len(rows),)]


async def test_a_retried_batch_is_stored_once_in_every_table(tmp_path: Path) -> None:
    # Mutation caught: a write that returns before ClickHouse acknowledged the insert. A batch
    # of several chunks and many network reads: ClickHouse must still see one block per
    # insert, the same on the retry (else the views' tables would count a retry again).
    rows_of = EventRows(CODEC)
    rows = [
        rows_of.row(
            CODEC.encode(
                {
                    "sg_event_id": f"e{index}",
                    "event": ("delivered", "open", "click")[index % 3],
                    "event_time": 1_735_689_600_000 + index,
                    "sg_message_id": f"m{index % 500}",
                    "raw": "x" * 600,
                }
            )
        )
        for index in range(5_000)
    ]
    batch = BatchInfo({("events", 3): (100, 100 + len(rows) - 1)})

    tables = (
        "SELECT table, sum(rows) FROM system.parts WHERE database = 'sink' AND active "
        "GROUP BY table ORDER BY table"
    )
    async with served_clickhouse(tmp_path / "ch") as url, clickhouse_client(url) as client:
        writer = ClickHouseWriter(ClickHouseSettings(url=url, database="sink"), None, stage="sink")
        await writer.start()
        try:
            await writer.write(rows, batch)
            once = (await client.query(tables)).result_rows
            await writer.write(rows, batch)  # the retry: ClickHouse had stored it
            assert (await client.query(tables)).result_rows == once
        finally:
            await writer.stop()
        stored: dict[str, int] = {str(row[0]): int(row[1]) for row in once}
        assert stored["email_events"] == len(rows)
        assert len(stored) > 3 and all(stored.values()), stored  # the views' tables too
