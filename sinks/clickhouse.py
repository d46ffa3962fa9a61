"""The sink's ClickHouse writer: column-oriented batch inserts into ``email_events``.

A runtime ``Writer``: ``start`` connects, applies the migrations (``clickhouse.migrate_on_start``;
otherwise it only checks that none is pending) and checks that the table has every column the
sink writes, with the contract's type (a mismatch is fatal: a deploy to fix, not data to
retry); ``write`` returns once ClickHouse accepted the insert; ``probe`` pings the server.

Every insert is idempotent: it carries an ``insert_deduplication_token`` derived from the Kafka
offsets of its batch (``insert_token``). The runtime retries a failed write with the same batch,
so an insert that ClickHouse stored but whose answer was lost (a timeout, a crash of the
connection) is recognised and skipped, in ``email_events`` and in every materialized view fed
from it (``deduplicate_blocks_in_dependent_materialized_views``; each table keeps a
deduplication log: ``non_replicated_deduplication_window``, migration 0004). Redeliveries that
arrive in other batches are absorbed by the tables themselves (docs/clickhouse.md).
"""

from __future__ import annotations

import re
import time
from collections.abc import Sequence
from typing import Any

import structlog
from clickhouse_connect.driver.asyncclient import AsyncClient

from schemas.event_fields import clickhouse_columns
from sgpipe.runtime import metrics
from sgpipe.runtime.clickhouse import connect
from sgpipe.runtime.errors import FatalStageError
from sgpipe.runtime.migrations import MigrationError, Target, migrate, plan_migrations
from sgpipe.runtime.settings import ClickHouseSettings
from sgpipe.runtime.stage import BatchInfo
from sinks.rows import EMAIL_EVENT_COLUMNS, to_columns

log = structlog.get_logger(__name__)

EMAIL_EVENTS_TABLE = "email_events"


class ClickHouseWriter:
    """Inserts column-oriented batches of decoded email events into ``{database}.email_events``."""

    output = EMAIL_EVENTS_TABLE
    destination = "ClickHouse"

    def __init__(self, settings: ClickHouseSettings, url: str | None, *, stage: str) -> None:
        self._settings = settings
        self._url = url
        self._stage = stage
        self._database = settings.database
        self._table = f"{settings.database}.{EMAIL_EVENTS_TABLE}"
        self._client: AsyncClient | None = None

    async def start(self) -> None:
        client = await connect(self._settings, self._url)
        try:
            if self._settings.migrate_on_start:
                applied = await migrate(client, self._settings)
                if applied:
                    log.info("applied migrations", stage=self._stage, migrations=applied)
            else:
                await self._check_migrations(client)
            await self._check_table(client)
        except BaseException:
            await client.close()
            raise
        self._client = client

    async def stop(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.close()

    async def probe(self) -> None:
        if self._client is None or not await self._client.ping():
            raise ConnectionError("ClickHouse does not answer ping")

    async def write(self, outputs: Sequence[dict[str, Any]], batch: BatchInfo) -> None:
        if self._client is None:
            raise RuntimeError("ClickHouseWriter.write before start")
        started = time.monotonic()
        summary = await self._client.insert(
            self._table,
            to_columns(outputs),
            column_names=list(EMAIL_EVENT_COLUMNS),
            column_oriented=True,
            settings=insert_settings(batch, cluster=self._settings.cluster is not None),
        )
        metrics.CLICKHOUSE_INSERT_SECONDS.labels(self._stage, EMAIL_EVENTS_TABLE).observe(
            time.monotonic() - started
        )
        metrics.CLICKHOUSE_INSERTED_ROWS.labels(self._stage, EMAIL_EVENTS_TABLE).inc(
            int(summary.written_rows)
        )

    async def _check_migrations(self, client: AsyncClient) -> None:
        plan = await plan_migrations(
            client, Target.from_settings(self._settings), self._settings.retention_days
        )
        if plan.pending:
            names = ", ".join(migration.name for migration in plan.pending)
            raise MigrationError(
                f"{self._stage}: migrations not applied to {self._database}: {names}; run "
                "`sgpipe migrate` (clickhouse.migrate_on_start is off)"
            )
        if plan.retention:
            log.warning(
                "table TTLs differ from clickhouse.retention_days; `sgpipe migrate` sets them",
                stage=self._stage,
            )

    async def _check_table(self, client: AsyncClient) -> None:
        result = await client.query(f"DESCRIBE TABLE {self._table}")
        problems = table_mismatches({row[0]: row[1] for row in result.result_rows})
        if problems:
            raise FatalStageError(
                f"{self._stage}: table {self._table} does not match what this version writes: "
                f"{'; '.join(problems)}; apply the migrations (`sgpipe migrate`) or fix the table"
            )


def insert_token(batch: BatchInfo) -> str:
    """The insert's deduplication token: the Kafka records it holds, as
    ``topic/partition/first-last`` per partition, in order. The same batch retried gives the
    same token; ClickHouse stores an insert whose token it has seen (within its
    deduplication window) only once."""
    return ",".join(
        f"{topic}/{partition}/{first}-{last}"
        for (topic, partition), (first, last) in sorted(batch.offsets.items())
    )


def insert_settings(batch: BatchInfo, *, cluster: bool = False) -> dict[str, Any]:
    """The settings each sink insert carries."""
    settings: dict[str, Any] = {
        "insert_deduplicate": 1,
        "insert_deduplication_token": insert_token(batch),
        # A retried insert whose block was already stored must not feed the materialized
        # views again either (each view's table checks its own deduplication log).
        "deduplicate_blocks_in_dependent_materialized_views": 1,
        # One insert of a whole batch is what ClickHouse wants; asynchronous inserts (on by
        # default in new servers) would buffer it and deduplicate by other rules.
        "async_insert": 0,
    }
    if cluster:
        # Return only once every shard stored its rows: the offsets are committed after this.
        settings["insert_distributed_sync"] = 1  # distributed_foreground_insert since 23.x
    return settings


def table_mismatches(present: dict[str, str]) -> list[str]:
    """What keeps the sink from writing a table with these ``{column: type}``: each column
    it writes must exist with the type the event contract declares (schemas/event_fields.py)."""
    expected = dict(clickhouse_columns())
    problems = []
    for column in EMAIL_EVENT_COLUMNS:
        if column not in present:
            problems.append(f"column {column} is missing")
        elif _value_type(present[column]) != _value_type(expected[column]):
            shown = " ".join(present[column].split())
            problems.append(f"column {column} is {shown}, expected {expected[column]}")
    return problems


def _value_type(clickhouse_type: str) -> str:
    """The type without LowCardinality wrappers (a storage choice that inserts the same
    values, which an operator may make differently) or layout (ClickHouse reports a Tuple
    over several lines)."""
    clickhouse_type = re.sub(r"\s+", " ", clickhouse_type).replace("( ", "(").strip()
    while (start := clickhouse_type.find("LowCardinality(")) >= 0:
        depth, index = 1, start + len("LowCardinality(")
        inner_start = index
        while depth:
            depth += {"(": 1, ")": -1}.get(clickhouse_type[index], 0)
            index += 1
        inner = clickhouse_type[inner_start : index - 1]
        clickhouse_type = clickhouse_type[:start] + inner + clickhouse_type[index:]
    return clickhouse_type
