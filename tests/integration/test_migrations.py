"""ClickHouse migrations on the real engine: from an empty database and from every earlier
version (the foundation's schema with its data included), idempotent, checksummed, retention
as configured, and what the sink does when migrations are pending."""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import yaml

from schemas.event_fields import clickhouse_codecs, clickhouse_columns
from sgpipe.runtime.errors import FatalStageError
from sgpipe.runtime.migrations import (
    MIGRATIONS_TABLE,
    Migration,
    MigrationError,
    apply_migrations,
    shipped_migrations,
)
from sgpipe.runtime.settings import ClickHouseSettings
from sinks.clickhouse import ClickHouseWriter
from tests import forked
from tests.integration.bi_support import (
    AGGREGATE_VIEWS,
    RELEASED,
    VERSIONS,
    Store,
    aggregate_mismatches,
    batch_info,
    create_version,
    seeded_batches,
    store,
)

pytest.importorskip("chdb")

pytestmark = pytest.mark.clickhouse

ALL = [migration.name for migration in shipped_migrations()]
STATE_TABLES = [f"{view}_state" for view in AGGREGATE_VIEWS] + ["message_lifecycle_state"]
VIEWS = ["email_events_dedup", *AGGREGATE_VIEWS, "message_lifecycle"]


async def table_facts(s: Store) -> dict[str, dict[str, str]]:
    rows = await s.rows(
        "SELECT name, engine_full, sorting_key, partition_key FROM system.tables "
        "WHERE database = {db:String}",
        db=s.database,
    )
    return {row["name"]: row for row in rows}


async def test_from_an_empty_database_every_table_and_view_is_created(tmp_path: Path) -> None:
    async with store(tmp_path, migrate=False) as s:
        assert await apply_migrations(s.client, s.database) == ALL
        facts = await table_facts(s)
        events = facts["email_events"]
        assert events["engine_full"].startswith("ReplacingMergeTree(received_at)")
        assert (events["sorting_key"], events["partition_key"]) == (
            "event, toDate(event_time), sg_event_id",
            "toYYYYMM(event_time)",
        )
        assert "non_replicated_deduplication_window = 1000" in events["engine_full"]
        for table in ("dead_letters", *STATE_TABLES):
            engine = facts[table]["engine_full"]
            assert engine.startswith(("AggregatingMergeTree", "ReplacingMergeTree")), table
            assert "non_replicated_deduplication_window = 1000" in facts[table]["engine_full"]
        assert facts["message_lifecycle_state"]["sorting_key"] == "sg_message_id"
        for view in VIEWS:
            assert view in facts, view
        # The table is the field table: names, types and codecs.
        columns = await s.rows(
            "SELECT name, type, compression_codec FROM system.columns "
            "WHERE database = {db:String} AND table = 'email_events' ORDER BY position",
            db=s.database,
        )
        assert sorted((c["name"], c["type"]) for c in columns) == sorted(clickhouse_columns())
        codecs = {c["name"]: c["compression_codec"] for c in columns if c["compression_codec"]}
        assert codecs == {name: f"CODEC({codec})" for name, codec in clickhouse_codecs()}
        # BI reads every column through the view (a view's columns are fixed at creation).
        view_columns = await s.rows(
            "SELECT name, type FROM system.columns WHERE database = {db:String} "
            "AND table = 'email_events_dedup' ORDER BY position",
            db=s.database,
        )
        assert [(c["name"], c["type"]) for c in view_columns] == [
            (c["name"], c["type"]) for c in columns
        ]
        indexes = await s.rows(
            "SELECT table, name, type_full FROM system.data_skipping_indices "
            "WHERE database = {db:String} ORDER BY table, name",
            db=s.database,
        )
        assert [(i["table"], i["name"], i["type_full"]) for i in indexes] == [
            ("email_events", "email_bloom", "bloom_filter(0.01)"),
            ("email_events", "sg_message_id_bloom", "bloom_filter(0.01)"),
            ("message_lifecycle_state", "email_bloom", "bloom_filter(0.01)"),
        ]
        recorded = await s.rows(
            f"SELECT name, checksum FROM {s.database}.{MIGRATIONS_TABLE} FINAL ORDER BY name"
        )
        assert recorded == [{"name": m.name, "checksum": m.checksum} for m in shipped_migrations()]
        # Applying again changes nothing.
        assert await apply_migrations(s.client, s.database) == []


@pytest.mark.parametrize("version", VERSIONS)
async def test_upgrade_from_an_earlier_version_keeps_every_row(
    tmp_path: Path, version: str
) -> None:
    batches = seeded_batches(events=800, seed=5)
    async with store(tmp_path, migrate=False) as s:
        columns = await create_version(s, version)
        # That version's sink wrote these rows (the copies SendGrid re-sent included).
        for index, batch in enumerate(batches):
            await s.insert(batch, columns=columns, batch=batch_info("events", 0, index, index))
        before = await s.rows(
            f"SELECT sg_event_id, event, email, raw FROM {s.database}.email_events FINAL "
            "ORDER BY sg_event_id"
        )
        unique = {record["sg_event_id"] for batch in batches for record in batch}
        assert len(before) == len(unique)

        applied = await apply_migrations(s.client, s.database)
        first_new = len(RELEASED[version]) if version in RELEASED else ALL.index(version) + 1
        assert applied == ALL[first_new:]

        after = await s.rows(
            f"SELECT sg_event_id, event, email, raw FROM {s.database}.email_events_dedup "
            "ORDER BY sg_event_id"
        )
        assert after == before
        # The aggregates were backfilled from the rows already stored, exactly.
        assert await aggregate_mismatches(s) == {}
        assert await s.value(
            f"SELECT uniqExactMerge(events) FROM {s.database}.daily_event_counts_state"
        ) == len(unique)
        # And new rows still arrive everywhere, each event once.
        more = seeded_batches(events=300, seed=6)
        for index, batch in enumerate(more):
            await s.insert(batch, batch=batch_info("events", 1, index, index))
        assert await aggregate_mismatches(s) == {}


async def test_a_migration_that_failed_half_way_is_applied_again_from_its_start(
    tmp_path: Path,
) -> None:
    """Every statement is idempotent: re-running migrations that were (partly) applied but
    not recorded changes no table and no count."""
    async with store(tmp_path) as s:
        for index, batch in enumerate(seeded_batches(events=500, seed=8)):
            await s.insert(batch, batch=batch_info("events", 0, index, index))
        counts = await s.rows(f"SELECT * FROM {s.database}.daily_event_counts ORDER BY ALL")
        # Forget that 0004 and later were applied: their statements all run a second time.
        await s.client.command(f"DELETE FROM {s.database}.{MIGRATIONS_TABLE} WHERE name >= '0004'")
        assert await apply_migrations(s.client, s.database) == ALL[3:]
        assert await s.rows(f"SELECT * FROM {s.database}.daily_event_counts ORDER BY ALL") == counts
        assert await aggregate_mismatches(s) == {}


async def test_an_edited_applied_migration_is_an_error_naming_the_file(tmp_path: Path) -> None:
    async with store(tmp_path) as s:
        edited = [*shipped_migrations()]
        index = ALL.index("0005_daily_aggregates")
        edited[index] = Migration(ALL[index], edited[index].text + "\n-- a harmless-looking edit\n")
        with pytest.raises(MigrationError, match=r"schemas/clickhouse/0005_daily_aggregates\.sql"):
            await apply_migrations(s.client, s.database, migrations=edited)
        assert issubclass(MigrationError, FatalStageError)  # the sink stops: exit 3


async def test_migrations_recorded_without_checksums_get_them(tmp_path: Path) -> None:
    async with store(tmp_path, migrate=False) as s:
        await create_version(s, "contract")
        await apply_migrations(s.client, s.database)
        recorded = await s.rows(
            f"SELECT name, checksum FROM {s.database}.{MIGRATIONS_TABLE} FINAL ORDER BY name"
        )
        assert recorded == [{"name": m.name, "checksum": m.checksum} for m in shipped_migrations()]


async def test_retention_sets_a_ttl_that_drops_old_months(tmp_path: Path) -> None:
    async with store(tmp_path, migrate=False) as s:
        await apply_migrations(s.client, s.database, retention_days=30)
        facts = await table_facts(s)
        for table in ("email_events", "message_lifecycle_state"):
            assert re.search(r"\bTTL .*\+ toIntervalDay\(30\)", facts[table]["engine_full"])
            assert "ttl_only_drop_parts = 1" in facts[table]["engine_full"]
        assert "TTL dead_lettered_at + toIntervalDay(30)" in facts["dead_letters"]["engine_full"]
        assert "TTL" not in facts["daily_event_counts_state"]["engine_full"]

        (record,) = seeded_batches(events=1, seed=3)[0]
        now = datetime.now(UTC)
        old = {**record, "sg_event_id": "old", "event_time": now - timedelta(days=400)}
        recent = {**record, "sg_event_id": "recent", "event_time": now - timedelta(days=1)}
        # A timestamp SendGrid did not send (1970) counts from when it was received.
        untimed = {
            **record,
            "sg_event_id": "untimed",
            "event_time": datetime(1970, 1, 1, tzinfo=UTC),
            "received_at": now,
            "coercion_errors": ["event_time"],
        }
        for row in (old, recent, untimed):
            await s.insert([row])
        await s.client.command(f"OPTIMIZE TABLE {s.database}.email_events FINAL")
        kept = await s.rows(f"SELECT sg_event_id FROM {s.database}.email_events ORDER BY 1")
        assert kept == [{"sg_event_id": "recent"}, {"sg_event_id": "untimed"}]
        partitions = await s.rows(
            "SELECT DISTINCT partition FROM system.parts WHERE database = {db:String} "
            "AND table = 'email_events' AND active AND rows > 0 ORDER BY 1",
            db=s.database,
        )
        assert [p["partition"] for p in partitions] == sorted(
            {"197001", (now - timedelta(days=1)).strftime("%Y%m")}
        )

        # Changed, then off: the TTL follows the setting, and is left alone when it matches.
        assert await apply_migrations(s.client, s.database, retention_days=90) == []
        assert "toIntervalDay(90)" in (await table_facts(s))["email_events"]["engine_full"]
        await apply_migrations(s.client, s.database, retention_days=0)
        assert "TTL" not in (await table_facts(s))["email_events"]["engine_full"]


async def test_a_sink_that_must_not_migrate_refuses_to_start_on_pending_migrations(
    tmp_path: Path,
) -> None:
    async with store(tmp_path, migrate=False) as s:
        await create_version(s, "contract")
        settings = ClickHouseSettings(database=s.database, migrate_on_start=False)
        writer = ClickHouseWriter(settings, s.url, stage="sink")
        with pytest.raises(MigrationError, match="0004_email_events_for_bi.*sgpipe migrate"):
            await writer.start()
        # Once migrated (by `sgpipe migrate`, here the runner), it starts.
        await apply_migrations(s.client, s.database)
        await writer.start()
        await writer.stop()


def run_migrate(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return forked.run(
        [sys.executable, "-m", "sgpipe", "migrate", "--config", str(config), *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


async def test_sgpipe_migrate_dry_run_then_apply_then_up_to_date(tmp_path: Path) -> None:
    async with store(tmp_path, migrate=False) as s:
        config = tmp_path / "sgpipe.yaml"
        config.write_text(
            yaml.safe_dump(
                {
                    "clickhouse": {"url": s.url, "database": s.database, "retention_days": 365},
                    "kafka": {"create_topics": False},
                }
            )
        )
        dry = await asyncio.to_thread(run_migrate, config, "--dry-run")
        assert dry.returncode == 0, dry.stderr
        for name in ALL:
            assert f"-- {name} (schemas/clickhouse/{name}.sql)" in dry.stdout
        assert f"CREATE TABLE IF NOT EXISTS {s.database}.email_events" in dry.stdout
        assert "MODIFY TTL" in dry.stdout
        tables = await s.rows(
            "SELECT name FROM system.tables WHERE database = {db:String}", db=s.database
        )
        assert tables == []  # a dry run changes nothing

        applied = await asyncio.to_thread(run_migrate, config)
        assert applied.returncode == 0, applied.stderr
        assert applied.stdout.splitlines()[: len(ALL)] == [f"applied {name}" for name in ALL]
        assert [
            line.split(" MODIFY TTL ")[0] for line in applied.stdout.splitlines()[len(ALL) :]
        ] == [
            f"retention: ALTER TABLE {s.database}.email_events ",
            f"retention: ALTER TABLE {s.database}.message_lifecycle_state ",
            f"retention: ALTER TABLE {s.database}.dead_letters ",
        ]
        again = await asyncio.to_thread(run_migrate, config)
        assert (again.returncode, again.stdout) == (0, f"{s.database} is up to date\n")

        # An applied migration whose file differs: exit 3, naming the file.
        await s.client.command(
            f"INSERT INTO {s.database}.{MIGRATIONS_TABLE} (name, checksum) "
            "VALUES ('0006_message_lifecycle', 'a-different-file')"
        )
        edited = await asyncio.to_thread(run_migrate, config)
        assert edited.returncode == 3
        assert "schemas/clickhouse/0006_message_lifecycle.sql was edited" in edited.stderr


# `sgpipe migrate` through the CLI's entry point, then the dataframe libraries it imported.
_MIGRATE_THEN_LIST_IMPORTS = """
import sys
from sgpipe.cli import main
code = main(sys.argv[1:])
print(sorted({"numpy", "pandas", "pyarrow", "rich", "pygments"} & sys.modules.keys()))
sys.exit(code)
"""


async def test_migrating_imports_no_dataframe_library(tmp_path: Path) -> None:
    """The sink migrates at every start. clickhouse-connect's insert() imports pandas (with
    numpy and pyarrow) to ask whether its data is a DataFrame: ~0.45 s of CPU and ~80 MB per
    process, so the migrations record what they applied with a statement instead. Nor does
    structlog bring rich and pygments in (sgpipe.runtime.logs). Mutations caught: insert()
    put back; structlog imported without rich hidden."""
    async with store(tmp_path, migrate=False) as s:
        config = tmp_path / "sgpipe.yaml"
        config.write_text(
            yaml.safe_dump(
                {
                    "clickhouse": {"url": s.url, "database": s.database},
                    "kafka": {"create_topics": False},
                }
            )
        )
        command = [sys.executable, "-c", _MIGRATE_THEN_LIST_IMPORTS, "migrate"]
        done = await asyncio.to_thread(
            subprocess.run,
            [*command, "--config", str(config)],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert done.returncode == 0, done.stderr
        lines = done.stdout.splitlines()
        assert lines[: len(ALL)] == [f"applied {name}" for name in ALL]
        assert lines[-1] == "[]"
        recorded = await s.rows(f"SELECT name FROM {s.database}.{MIGRATIONS_TABLE} FINAL")
        assert sorted(row["name"] for row in recorded) == ALL


async def test_two_writers_starting_together_apply_each_migration_once(tmp_path: Path) -> None:
    """`sgpipe sink` starts its events and dead-letter writers at once, both migrating."""
    from sgpipe.runtime.migrations import migrate
    from tests.integration.clickhouse_tools import clickhouse_client

    async with store(tmp_path, migrate=False) as s:
        settings = ClickHouseSettings(database=s.database)
        async with clickhouse_client(s.url) as other:
            results = await asyncio.gather(migrate(s.client, settings), migrate(other, settings))
        assert sorted(results, key=len) == [[], ALL]
        recorded = await s.rows(
            f"SELECT name, count() AS times FROM {s.database}.{MIGRATIONS_TABLE} GROUP BY name"
        )
        assert {row["name"]: row["times"] for row in recorded} == dict.fromkeys(ALL, 1)
