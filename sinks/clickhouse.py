"""The sinks' ClickHouse writer: column-oriented batch inserts into one table.

A runtime ``Writer``: ``start`` connects, applies the migrations (``clickhouse.migrate_on_start``;
otherwise it only checks that none is pending) and checks that the table can take what the sink
writes (for ``email_events``: every column, with the contract's type; a mismatch is fatal: a
deploy to fix, not data to retry); ``write`` returns once ClickHouse accepted the insert;
``probe`` pings the server. ``TableWriter`` is generic over the table (``Table``);
``ClickHouseWriter`` is the one for ``email_events``.

Every insert is idempotent: it carries an ``insert_deduplication_token`` derived from the Kafka
offsets of its batch and a digest of their records (``insert_token``). The runtime retries a
failed write with the same batch, so an insert that ClickHouse stored but whose answer was lost
(a timeout, a crash of the connection) is recognised and skipped, in the table and in every
materialized view fed from it
(``deduplicate_blocks_in_dependent_materialized_views``; each table keeps a deduplication log:
``non_replicated_deduplication_window``, migrations 0004-0006 and 0008). Redeliveries that
arrive in other batches are absorbed by the tables themselves (docs/clickhouse.md).
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Generic, TypeVar

import structlog
from clickhouse_connect.driver.asyncclient import AsyncClient
from clickhouse_connect.driver.summary import QuerySummary

from schemas.event_fields import clickhouse_columns
from sgpipe.runtime import metrics
from sgpipe.runtime.clickhouse import connect
from sgpipe.runtime.errors import FatalStageError
from sgpipe.runtime.migrations import MigrationError, Target, migrate, plan_migrations
from sgpipe.runtime.settings import ClickHouseSettings
from sgpipe.runtime.stage import BatchInfo
from sinks.row_binary import without_low_cardinality
from sinks.rows import EMAIL_EVENT_COLUMNS, EventRow, row_binary_body, to_columns

log = structlog.get_logger(__name__)

EMAIL_EVENTS_TABLE = "email_events"

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Table(Generic[T]):
    """A table a sink writes: its name, the columns it inserts, how a batch of outputs becomes
    those columns (one list per column), and what keeps it from writing the table as found
    (``{column: type}`` -> problems; checked at start)."""

    name: str
    columns: tuple[str, ...]
    to_columns: Callable[[Sequence[T]], list[list[Any]]]
    mismatches: Callable[[dict[str, str]], list[str]]


class TableWriter(Generic[T]):
    """Inserts column-oriented batches of outputs into ``{database}.{table.name}``."""

    destination = "ClickHouse"

    def __init__(
        self, settings: ClickHouseSettings, url: str | None, *, stage: str, table: Table[T]
    ) -> None:
        self._settings = settings
        self._url = url
        self._stage = stage
        self._spec = table
        self.output = table.name
        self._database = settings.database
        self._table = f"{settings.database}.{table.name}"
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

    async def write(self, outputs: Sequence[T], batch: BatchInfo) -> None:
        client = self._started()
        started = time.monotonic()
        summary = await client.insert(
            self._table,
            self._spec.to_columns(outputs),
            column_names=list(self._spec.columns),
            column_oriented=True,
            settings=insert_settings(batch, cluster=self._settings.cluster is not None),
        )
        self._inserted(outputs, summary, started)

    def _started(self) -> AsyncClient:
        if self._client is None:
            raise RuntimeError(f"{type(self).__name__}.write before start")
        return self._client

    def _inserted(self, outputs: Sequence[T], summary: QuerySummary, started: float) -> None:
        metrics.CLICKHOUSE_INSERT_SECONDS.labels(self._stage, self._spec.name).observe(
            time.monotonic() - started
        )
        # The summary's written_rows also counts what the materialized views wrote; 0 means
        # ClickHouse dropped the insert as a retry it already had (same deduplication token).
        stored = len(outputs) if int(summary.written_rows) > 0 else 0
        metrics.CLICKHOUSE_INSERTED_ROWS.labels(self._stage, self._spec.name).inc(stored)

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
        problems = self._spec.mismatches({row[0]: row[1] for row in result.result_rows})
        if problems:
            raise FatalStageError(
                f"{self._stage}: table {self._table} does not match what this version writes: "
                f"{'; '.join(problems)}; apply the migrations (`sgpipe migrate`) or fix the table"
            )


def insert_token(batch: BatchInfo) -> str:
    """The insert's deduplication token: the Kafka records it holds, as
    ``topic/partition/first-last`` per partition, in order, then ``#`` and the digest of the
    records' content (``BatchInfo``). The same batch retried gives the same token; ClickHouse
    stores an insert whose token it has seen (within its deduplication window) only once. The
    digest keeps a new log at the same offsets (a topic re-created, a broker that came back
    empty) from being taken for a retry."""
    where = ",".join(
        f"{topic}/{partition}/{first}-{last}"
        for (topic, partition), (first, last) in sorted(batch.offsets.items())
    )
    return f"{where}#{batch.digest}" if batch.digest else where


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


class ClickHouseWriter(TableWriter[Mapping[str, Any]]):
    """Inserts batches of email events into ``{database}.email_events``: each batch as one
    ``INSERT ... FORMAT RowBinary``, its rows' Avro bodies transcoded chunk by chunk while
    ClickHouse reads (``sinks.rows.row_binary_body``); ``write`` returns once ClickHouse
    acknowledged the whole insert. The rows are the sink's ``EventRow``s or decoded records."""

    def __init__(self, settings: ClickHouseSettings, url: str | None, *, stage: str) -> None:
        super().__init__(settings, url, stage=stage, table=EMAIL_EVENTS)

    async def write(self, outputs: Sequence[Mapping[str, Any]], batch: BatchInfo) -> None:
        client = self._started()
        if not outputs:
            return
        started = time.monotonic()
        summary = await client.raw_insert(
            self._table,
            list(EMAIL_EVENT_COLUMNS),
            row_binary_body(outputs),
            settings=insert_settings(batch, cluster=self._settings.cluster is not None),
            fmt="RowBinary",
        )
        self._inserted(outputs, summary, started)
        # One observation per insert, for its oldest event: an upper bound of the 2xx -> row
        # latency of every event in it, at the cost of one pass over the batch.
        oldest = min((received_at_ms(row) for row in outputs), default=None)
        if oldest is not None:
            metrics.RECEIVED_TO_STORED_SECONDS.labels(self._stage).observe(
                max(time.time() - oldest / 1000, 0.0)
            )


def received_at_ms(row: Mapping[str, Any]) -> int:
    if isinstance(row, EventRow):
        return row.received_at_ms
    received_at = row["received_at"]
    if isinstance(received_at, datetime):
        return int(received_at.timestamp() * 1000)
    return int(received_at)


def missing_columns(columns: Sequence[str]) -> Callable[[dict[str, str]], list[str]]:
    """A ``Table.mismatches`` that only asks for each of ``columns`` to exist."""

    def mismatches(present: dict[str, str]) -> list[str]:
        return [f"column {column} is missing" for column in columns if column not in present]

    return mismatches


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
    return without_low_cardinality(re.sub(r"\s+", " ", clickhouse_type).replace("( ", "(").strip())


EMAIL_EVENTS: Table[Mapping[str, Any]] = Table(
    EMAIL_EVENTS_TABLE, EMAIL_EVENT_COLUMNS, to_columns, table_mismatches
)
