"""Test-side support for the BI tables: a migrated store, stores as earlier sgpipe versions
left them, seeded rows, and a scan of every table for a string."""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from clickhouse_connect.driver.asyncclient import AsyncClient

from schemas.event_fields import FIELD_NAMES
from sgpipe.runtime.migrations import apply_migrations, shipped_migrations
from sgpipe.runtime.stage import BatchInfo
from sgpipe.simulator.dataset import simulated_posts, sink_records
from sinks.clickhouse import insert_settings
from sinks.rows import to_columns
from tests.integration.clickhouse_tools import clickhouse_client, served_clickhouse
from tests.integration.shared_clickhouse import shared_clickhouse

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "clickhouse"
# The migration files as released, before placeholders were added to them.
RELEASED_0001 = FIXTURES / "0001_email_events.released.sql"
RELEASED_0002 = FIXTURES / "0002_typed_event_fields.released.sql"
RELEASED_0003 = FIXTURES / "0003_dead_letters.released.sql"
# The versions released before this migration runner, and the migrations each had applied.
RELEASED = {
    "foundation": (RELEASED_0001,),
    "contract": (RELEASED_0001, RELEASED_0002),
    "dead-letters": (RELEASED_0001, RELEASED_0002, RELEASED_0003),
}
# The columns the foundation's sink wrote (schema v1).
V1_COLUMNS = (
    "webhook", "event", "sg_event_id", "event_time", "email", "sg_message_id", "smtp_id",
    "category", "custom_args", "received_at", "request_id", "raw",
)  # fmt: skip
# The aggregate tables and what each view of them counts.
AGGREGATE_VIEWS = (
    "daily_event_counts",
    "daily_domain_counts",
    "daily_template_counts",
    "daily_campaign_counts",
    "daily_bounce_counts",
)


@dataclass
class Store:
    url: str
    client: AsyncClient
    database: str

    async def rows(self, sql: str, **parameters: Any) -> list[dict[str, Any]]:
        result = await self.client.query(sql, parameters=parameters or None)
        return [dict(zip(result.column_names, row, strict=True)) for row in result.result_rows]

    async def value(self, sql: str, **parameters: Any) -> Any:
        result = await self.client.query(sql, parameters=parameters or None)
        return result.result_rows[0][0]

    async def insert(
        self,
        records: Sequence[dict[str, Any]],
        *,
        batch: BatchInfo | None = None,
        columns: Sequence[str] = FIELD_NAMES,
    ) -> None:
        """Insert ``records`` into email_events as the sink does (with ``batch``'s token)."""
        if set(columns) == set(FIELD_NAMES):
            data = to_columns(records)
            names = list(FIELD_NAMES)
        else:
            names = list(columns)
            data = [[record[name] for record in records] for name in names]
        await self.client.insert(
            f"{self.database}.email_events",
            data,
            column_names=names,
            column_oriented=True,
            settings=insert_settings(batch) if batch is not None else None,
        )


@asynccontextmanager
async def store(
    tmp_path: Path, database: str = "sgpipe", *, migrate: bool = True
) -> AsyncIterator[Store]:
    """The real engine served on a free port (the process's shared one, emptied for this
    test; its users' credentials in ``tmp_path / "ch-credentials"``), with ``database``
    created: as every shipped migration leaves it (copied from a template migrated once per
    process, tests/integration/shared_clickhouse.py), or empty if ``migrate`` is False."""
    async with served_clickhouse(tmp_path / "ch") as url, clickhouse_client(url) as client:
        if migrate:
            shared_clickhouse().create_migrated(database)
        else:
            await client.command(f"CREATE DATABASE IF NOT EXISTS {database}")
        yield Store(url, client, database)


def batch_info(topic: str, partition: int, first: int, last: int) -> BatchInfo:
    return BatchInfo({(topic, partition): (first, last)})


# --- earlier versions ------------------------------------------------------------------------

VERSIONS = (*RELEASED, *(m.name for m in shipped_migrations()[len(RELEASED) : -1]))


async def create_version(store: Store, version: str) -> tuple[str, ...]:
    """The schema ``version`` of sgpipe left (a released version: its migration files as
    released, recorded by the foundation's migration runner; a migration name: every migration
    up to it). Returns the email_events columns a sink of that version wrote."""
    database = store.database
    if version in RELEASED:
        released = RELEASED[version]
        # The foundation's migration runner: no checksum column.
        await store.client.command(
            f"CREATE TABLE {database}.sgpipe_schema_migrations "
            "(name String, applied_at DateTime64(3, 'UTC') DEFAULT now64(3)) "
            "ENGINE = ReplacingMergeTree ORDER BY name"
        )
        for path in released:
            for statement in path.read_text().split(";\n"):
                lines = [line for line in statement.splitlines() if not line.startswith("--")]
                if "\n".join(lines).strip():
                    await store.client.command(statement.replace("{database}", database))
            await store.client.insert(
                f"{database}.sgpipe_schema_migrations",
                [[path.name.removesuffix(".released.sql")]],
                column_names=["name"],
            )
        return V1_COLUMNS if version == "foundation" else FIELD_NAMES
    migrations = shipped_migrations()
    upto = [m.name for m in migrations].index(version) + 1
    await apply_migrations(store.client, database, migrations=migrations[:upto])
    return FIELD_NAMES


# --- looking for a value everywhere --------------------------------------------------------


async def tables_containing(store: Store, needle: str) -> dict[str, int]:
    """``{table.column: rows}`` for every column of every table in the database (views
    excluded: they read the tables) whose text holds ``needle``, case-insensitively."""
    tables = await store.rows(
        "SELECT name FROM system.tables WHERE database = {db:String} AND has_own_data",
        db=store.database,
    )
    found: dict[str, int] = {}
    for table in (row["name"] for row in tables):
        columns = [
            row["name"]
            for row in await store.rows(
                "SELECT name FROM system.columns WHERE database = {db:String} "
                "AND table = {t:String} ORDER BY position",
                db=store.database,
                t=table,
            )
        ]
        counts = ", ".join(
            f"countIf(positionCaseInsensitive(toString(`{column}`), {{n:String}}) > 0)"
            for column in columns
        )
        result = await store.client.query(
            f"SELECT {counts} FROM {store.database}.`{table}`", parameters={"n": needle}
        )
        for column, count in zip(columns, result.result_rows[0], strict=True):
            if count:
                found[f"{table}.{column}"] = int(count)
    return found


def distinct(values: Iterable[Any]) -> int:
    return len(set(values))


# --- aggregates against the events they count -------------------------------------------------

_DOMAIN = "lower(extract(ifNull(email, ''), '@([^@]+)$'))"
# For each aggregate view: its rows, and the same figures computed from email_events_dedup
# (each event once) with plain SQL. They must be equal, row for row.
AGGREGATE_TRUTHS: dict[str, tuple[str, str]] = {
    "daily_event_counts": (
        "SELECT day, webhook, event, category, events, messages FROM {db}.daily_event_counts",
        "SELECT toDate(event_time) AS day, webhook, event, "
        "arrayJoin(if(empty(category), [''], category)) AS category, "
        "uniqExact(sg_event_id) AS events, uniqExact(sg_message_id) AS messages "
        "FROM {db}.email_events_dedup GROUP BY ALL",
    ),
    "daily_domain_counts": (
        "SELECT day, webhook, event, recipient_domain, events FROM {db}.daily_domain_counts",
        f"SELECT toDate(event_time) AS day, webhook, event, {_DOMAIN} AS recipient_domain, "
        "count() AS events FROM {db}.email_events_dedup GROUP BY ALL",
    ),
    "daily_template_counts": (
        "SELECT day, webhook, event, sg_template_id, sg_template_name, events, messages "
        "FROM {db}.daily_template_counts",
        "SELECT toDate(event_time) AS day, webhook, event, sg_template_id, sg_template_name, "
        "count() AS events, uniqExact(sg_message_id) AS messages FROM {db}.email_events_dedup "
        "WHERE sg_template_id != '' OR sg_template_name != '' GROUP BY ALL",
    ),
    "daily_campaign_counts": (
        "SELECT day, webhook, event, marketing_campaign_id, marketing_campaign_name, "
        "singlesend_id, singlesend_name, events, messages FROM {db}.daily_campaign_counts",
        "SELECT toDate(event_time) AS day, webhook, event, marketing_campaign_id, "
        "marketing_campaign_name, singlesend_id, singlesend_name, count() AS events, "
        "uniqExact(sg_message_id) AS messages FROM {db}.email_events_dedup "
        "WHERE marketing_campaign_id != '' OR marketing_campaign_name != '' OR singlesend_id != '' "
        "GROUP BY ALL",
    ),
    "daily_bounce_counts": (
        "SELECT day, webhook, type, bounce_classification, recipient_domain, events "
        "FROM {db}.daily_bounce_counts",
        f"SELECT toDate(event_time) AS day, webhook, type, bounce_classification, "
        f"{_DOMAIN} AS recipient_domain, count() AS events FROM {{db}}.email_events_dedup "
        "WHERE event = 'bounce' GROUP BY ALL",
    ),
    "message_lifecycle": (
        "SELECT sg_message_id, email, processed_at, delivered_at, first_open_at, "
        "first_click_at, last_event_at, opens, clicks, deferrals, bounce_type "
        "FROM {db}.message_lifecycle",
        "SELECT assumeNotNull(sg_message_id) AS id, max(email), minIfOrNull(event_time, "
        "event = 'processed'), minIfOrNull(event_time, event = 'delivered'), "
        "minIfOrNull(event_time, event = 'open'), minIfOrNull(event_time, event = 'click'), "
        "max(event_time), countIf(event = 'open'), countIf(event = 'click'), "
        "countIf(event = 'deferred'), nullIf(argMaxIf(toString(type), event_time, "
        "event = 'bounce'), '') FROM {db}.email_events_dedup WHERE sg_message_id IS NOT NULL "
        "GROUP BY id",
    ),
}


async def aggregate_mismatches(store: Store) -> dict[str, tuple[int, int]]:
    """Aggregates whose rows differ from the events: ``{view: (rows, expected rows)}``."""
    mismatches: dict[str, tuple[int, int]] = {}
    for view, (aggregate_sql, truth_sql) in AGGREGATE_TRUTHS.items():
        got = await _sorted_rows(store, aggregate_sql.format(db=store.database))
        expected = await _sorted_rows(store, truth_sql.format(db=store.database))
        if got != expected:
            mismatches[view] = (len(got), len(expected))
    return mismatches


async def _sorted_rows(store: Store, sql: str) -> list[tuple[Any, ...]]:
    result = await store.client.query(sql)
    return sorted((tuple(row) for row in result.result_rows), key=repr)


@functools.cache
def seeded_batches(
    events: int = 3000, seed: int = 11, duplicates: float = 0.05
) -> tuple[tuple[dict[str, Any], ...], ...]:
    """A simulated SendGrid stream (lifecycles, quirks, duplicate copies and re-sent posts)
    as the sink receives it, one tuple of records per post."""
    posts = simulated_posts(events, seed=seed, duplicates=duplicates)
    return tuple(tuple(batch) for batch in sink_records(posts))
