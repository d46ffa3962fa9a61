"""The event contract on the real ClickHouse engine (chdb served over HTTP).

- After the migrations, ``email_events`` has exactly the field table's columns and types.
- A table created by the foundation keeps its rows through the additive migration.
- Every golden payload, processed, encoded and inserted by the sink's own code, reads back
  (through the engine, and through ``sgpipe query``) as its expected typed record.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest
import yaml

from schemas import clickhouse_migrations
from schemas.email_event import EmailEventCodec
from schemas.event_fields import FIELD_NAMES, clickhouse_columns
from sgpipe.runtime.metrics import STAGE_SINK
from sgpipe.runtime.migrations import apply_migrations
from sgpipe.runtime.settings import ClickHouseSettings
from sgpipe.runtime.stage import BatchInfo
from sinks.clickhouse import ClickHouseWriter
from tests.golden import encoded_events, expected_record, fixture_names, json_form, payload
from tests.integration.bi_support import RELEASED_0001
from tests.integration.clickhouse_tools import clickhouse_client, select_rows, served_clickhouse

pytest.importorskip("chdb")

pytestmark = pytest.mark.clickhouse

DATABASE = "sgpipe"


async def test_table_after_migrations_is_the_field_table(tmp_path: Path) -> None:
    async with served_clickhouse(tmp_path / "ch") as url, clickhouse_client(url) as client:
        applied = await apply_migrations(client, DATABASE)
        assert applied == [name for name, _ in clickhouse_migrations()]
        rows = await select_rows(
            client,
            f"SELECT name, type FROM system.columns WHERE database = '{DATABASE}' "
            "AND table = 'email_events' ORDER BY position",
        )
        assert sorted((row["name"], row["type"]) for row in rows) == sorted(clickhouse_columns())
        # Applying again changes nothing.
        assert await apply_migrations(client, DATABASE) == []


async def test_foundation_rows_survive_the_typed_columns_migration(tmp_path: Path) -> None:
    # The foundation's 0001 as released (the file has cluster placeholders since).
    first_sql = RELEASED_0001.read_text()
    async with served_clickhouse(tmp_path / "ch") as url, clickhouse_client(url) as client:
        # The foundation's table, holding a row the foundation's sink wrote.
        await client.command(f"CREATE DATABASE {DATABASE}")
        await client.command(first_sql.replace("{database}", DATABASE).strip().rstrip(";"))
        v1_columns = [
            "webhook", "event", "sg_event_id", "event_time", "email", "sg_message_id",
            "smtp_id", "category", "custom_args", "received_at", "request_id", "raw",
        ]  # fmt: skip
        when = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
        foundation_row = [
            "main", "bounce", "old-1", when, "a@example.com", None, None, ["cat"],
            {"plan": "pro"}, when, "req-0", '{"event":"bounce","reason":"full"}',
        ]  # fmt: skip
        await client.insert(f"{DATABASE}.email_events", [foundation_row], column_names=v1_columns)

        await apply_migrations(client, DATABASE)

        (row,) = await select_rows(
            client, f"SELECT * EXCEPT (inserted_at) FROM {DATABASE}.email_events FINAL"
        )
        assert [row[name] for name in v1_columns] == [
            *foundation_row[:3],
            when.replace(tzinfo=None),
            *foundation_row[4:9],
            when.replace(tzinfo=None),
            *foundation_row[10:],
        ]
        assert (row["reason"], row["attempt"], row["tls"], row["coercion_errors"]) == (
            "",
            0,
            None,
            [],
        )
        assert row["url_offset"] == {"index": None, "type": None}


async def test_golden_payloads_read_back_from_clickhouse_as_their_typed_records(
    tmp_path: Path,
) -> None:
    codec = EmailEventCodec()
    names = fixture_names()
    values = encoded_events([payload(name) for name in names], codec)
    async with served_clickhouse(tmp_path / "ch") as url, clickhouse_client(url) as client:
        # The sink's own writer: it migrates, checks the table, builds columns and inserts.
        writer = ClickHouseWriter(
            ClickHouseSettings(url=url, database=DATABASE), None, stage=STAGE_SINK
        )
        await writer.start()
        try:
            await writer.write(
                [codec.decode(value) for value in values], BatchInfo({("events", 0): (0, 31)})
            )
        finally:
            await writer.stop()

        rows = await select_rows(
            client, f"SELECT * EXCEPT (inserted_at) FROM {DATABASE}.email_events FINAL"
        )
        by_raw = {row["raw"]: json_form(row) for row in rows}
        assert len(by_raw) == len(names)
        for name in names:
            assert by_raw[payload(name).decode()] == expected_record(name), name
            assert list(by_raw[payload(name).decode()]) == list(FIELD_NAMES)

        # And as a user reads them: `sgpipe query` over the HTTP interface.
        config = tmp_path / "sgpipe.yaml"
        config.write_text(yaml.safe_dump({"clickhouse": {"url": url, "database": DATABASE}}))
        sql = (
            'SELECT event, attempt, tls, url_offset.index, "from", coercion_errors '
            "FROM email_events FINAL WHERE event IN ('deferred', 'click') "
            "ORDER BY event, sg_event_id"
        )
        result = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "sgpipe.cli", "query", "--config", str(config), sql],
            capture_output=True,
            timeout=60,
            check=False,
        )
        assert result.returncode == 0, result.stderr.decode()
        assert result.stdout.decode().splitlines() == [
            "click\t0\t\\N\t1\t\t[]",  # quirk_duplicate_keys
            "click\t0\t\\N\t0\t\t[]",  # click
            "deferred\t0\t\\N\t\\N\t\t['reason','attempt','tls','url_offset.index']",
            "deferred\t5\t0\t\\N\ttest@test.com\t[]",
        ]
