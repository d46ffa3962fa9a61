"""ClickHouse schema migrations: versioned ``schemas/clickhouse/NNNN_*.sql`` files, applied in
order, recorded with their checksum, never edited once applied.

A file is statements separated by a ``;`` at the end of a line. ``--`` comment lines are
dropped, except that a statement with a ``-- cluster-only`` line runs only in cluster mode.
Placeholders are filled from the target:

    {database}    clickhouse.database
    {local}       "" on one server; "_local" in cluster mode (the node-local storage table,
                  behind a Distributed table with the plain name)
    {on_cluster}  "" ; "ON CLUSTER '<clickhouse.cluster>'"
    {replicated}  "" ; "Replicated" (ReplicatedReplacingMergeTree with the server's default
                  replica path and {shard}/{replica} macros)
    {cluster}     '<clickhouse.cluster>' (cluster-only statements)

What makes it safe to re-run:

- every statement is idempotent (``IF NOT EXISTS``, settings, idempotent aggregates), so a
  migration that failed half-way is simply applied again from its first statement;
- a migration is recorded (``sgpipe_schema_migrations``: name, SHA-256 of the file, time) only
  once all its statements succeeded;
- a recorded migration whose file changed since is an error naming the file
  (``MigrationError``): migrations are history, a change is a new file. Migrations recorded
  before checksums existed get the current file's checksum on first sight.

Retention (``clickhouse.retention_days``) is not a migration (it is configuration): after the
migrations, the TTL of each table that holds per-person rows is brought to the configured
value, and left alone when it already is.

Only one migrator should run at a time (the Helm chart's Job, or ``sgpipe up``); two at once
are harmless for everything above except that both may apply the same migration.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Final

import structlog
from clickhouse_connect.driver.asyncclient import AsyncClient

from schemas import clickhouse_migrations
from sgpipe.runtime.errors import ErrorClass, FatalStageError, classify
from sgpipe.runtime.settings import ClickHouseSettings

log = structlog.get_logger(__name__)

MIGRATIONS_TABLE: Final = "sgpipe_schema_migrations"
MIGRATIONS_DIR: Final = "schemas/clickhouse"
CLUSTER_ONLY_MARKER: Final = "-- cluster-only"
LOCAL_SUFFIX: Final = "_local"

_PLACEHOLDER = re.compile(r"\{(database|local|on_cluster|replicated|cluster)\}")
# What the migrations table's engine shows of a TTL sgpipe set: "... + toIntervalDay(N)".
_TTL_DAYS = re.compile(r"\bTTL\b.*?\btoIntervalDay\((\d+)\)")
_HAS_TTL = re.compile(r"\bTTL\b")


class MigrationError(FatalStageError):
    """The store's schema history does not match this version's migrations (an edited
    migration), or a migration failed: a person must look."""


@dataclass(frozen=True, slots=True)
class Migration:
    name: str  # the file name without .sql: "0004_email_events_for_bi"
    text: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.text.encode("utf-8")).hexdigest()

    @property
    def path(self) -> str:
        return f"{MIGRATIONS_DIR}/{self.name}.sql"


def shipped_migrations() -> list[Migration]:
    """This version's migrations, in order."""
    return [Migration(name, text) for name, text in clickhouse_migrations()]


@dataclass(frozen=True, slots=True)
class Statement:
    sql: str
    cluster_only: bool = False


def split_statements(text: str) -> list[Statement]:
    """The statements of a migration file (see the module docstring)."""
    statements: list[Statement] = []
    lines: list[str] = []
    cluster_only = False
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("--"):
            cluster_only = cluster_only or stripped.startswith(CLUSTER_ONLY_MARKER)
            continue
        lines.append(line)
        if stripped.endswith(";"):
            statements.append(Statement("\n".join(lines).strip().rstrip(";").strip(), cluster_only))
            lines, cluster_only = [], False
    rest = "\n".join(lines).strip()
    if rest:
        statements.append(Statement(rest.rstrip(";").strip(), cluster_only))
    return [statement for statement in statements if statement.sql]


@dataclass(frozen=True, slots=True)
class Target:
    """Where the DDL goes: a database, on one server or on a cluster."""

    database: str
    cluster: str | None = None

    @classmethod
    def from_settings(cls, settings: ClickHouseSettings) -> Target:
        return cls(settings.database, settings.cluster)

    def table(self, name: str) -> str:
        """The storage table behind ``name`` (the node-local one in cluster mode)."""
        return f"{self.database}.{self.local(name)}"

    def local(self, name: str) -> str:
        return f"{name}{LOCAL_SUFFIX}" if self.cluster else name

    @property
    def on_cluster(self) -> str:
        return f"ON CLUSTER {_sql_string(self.cluster)}" if self.cluster else ""

    def render(self, text: str) -> str:
        values = {
            "database": self.database,
            "local": LOCAL_SUFFIX if self.cluster else "",
            "on_cluster": self.on_cluster,
            "replicated": "Replicated" if self.cluster else "",
            "cluster": _sql_string(self.cluster or ""),
        }
        return _PLACEHOLDER.sub(lambda match: values[match.group(1)], text)

    def statements(self, migration: Migration) -> list[str]:
        """The migration's statements as they run on this target."""
        return [
            self.render(statement.sql)
            for statement in split_statements(migration.text)
            if self.cluster or not statement.cluster_only
        ]

    def migrations_table_ddl(self) -> list[str]:
        table = f"{self.database}.{MIGRATIONS_TABLE}"
        # In cluster mode one replicated table for the whole cluster (no {shard} in its path):
        # whichever node a migrator reaches knows what was applied.
        engine = (
            "ReplicatedReplacingMergeTree("
            f"'/clickhouse/sgpipe/{self.database}/{MIGRATIONS_TABLE}', '{{replica}}')"
            if self.cluster
            else "ReplacingMergeTree"
        )
        return [
            f"CREATE DATABASE IF NOT EXISTS {self.database} {self.on_cluster}",
            f"CREATE TABLE IF NOT EXISTS {table} {self.on_cluster} "
            "(name String, applied_at DateTime64(3, 'UTC') DEFAULT now64(3), "
            f"checksum String DEFAULT '') ENGINE = {engine} ORDER BY name",
            # The foundation's table had no checksum column.
            f"ALTER TABLE {table} {self.on_cluster} "
            "ADD COLUMN IF NOT EXISTS checksum String DEFAULT ''",
        ]


def _sql_string(text: str | None) -> str:
    text = text or ""
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


# --- retention -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RetainedTable:
    """A table whose rows expire after ``clickhouse.retention_days``: its TTL expression up
    to the interval, written as ClickHouse shows it back (so a re-run sees no change)."""

    name: str
    expires_from: str


RETAINED_TABLES: Final[tuple[RetainedTable, ...]] = (
    # An event whose timestamp was unusable (1970) counts from when sgpipe received it.
    RetainedTable(
        "email_events", "if(has(coercion_errors, 'event_time'), received_at, event_time)"
    ),
    RetainedTable("message_lifecycle_state", "last_event_at"),
    # Pending letters expire too: their payload is the original bytes, personal data included.
    RetainedTable("dead_letters", "dead_lettered_at"),
)


def retention_days_of(engine_full: str) -> int | None:
    """The days of a TTL sgpipe set (0: no TTL; None: a TTL sgpipe did not write)."""
    match = _TTL_DAYS.search(engine_full)
    if match:
        return int(match.group(1))
    return None if _HAS_TTL.search(engine_full) else 0


def retention_statement(target: Target, table: RetainedTable, days: int) -> str:
    name = target.table(table.name)
    if days == 0:
        return f"ALTER TABLE {name} {target.on_cluster} REMOVE TTL"
    ttl = f"{table.expires_from} + toIntervalDay({days})"
    return f"ALTER TABLE {name} {target.on_cluster} MODIFY TTL {ttl}"


# --- the plan and applying it ----------------------------------------------------------------


@dataclass(slots=True)
class MigrationPlan:
    """What applying would do. ``pending``: not applied yet, in order; ``unrecorded_checksums``:
    applied before checksums were kept; ``unknown``: applied by a newer sgpipe (additive, so
    this version keeps working); ``retention``: TTL statements."""

    target: Target
    pending: list[Migration] = field(default_factory=list)
    unrecorded_checksums: list[Migration] = field(default_factory=list)
    unknown: list[str] = field(default_factory=list)
    retention: list[str] = field(default_factory=list)

    @property
    def up_to_date(self) -> bool:
        return not self.pending and not self.retention

    def describe(self) -> list[str]:
        """Lines for people: each pending migration with the SQL it would run, then the TTLs."""
        lines: list[str] = []
        for migration in self.pending:
            lines.append(f"-- {migration.name} ({migration.path})")
            lines.extend(f"{statement};" for statement in self.target.statements(migration))
        if self.retention:
            lines.append("-- retention (clickhouse.retention_days)")
            lines.extend(f"{statement};" for statement in self.retention)
        return lines


async def plan_migrations(
    client: AsyncClient,
    target: Target,
    retention_days: int,
    migrations: Sequence[Migration] | None = None,
) -> MigrationPlan:
    """Read what the store has applied and compare it with ``migrations`` (this version's by
    default). Changes nothing. Raises MigrationError for an applied migration whose file
    changed."""
    migrations = list(shipped_migrations() if migrations is None else migrations)
    plan = MigrationPlan(target)
    recorded = await _recorded(client, target)
    by_name = {migration.name: migration for migration in migrations}
    for name, checksum in recorded.items():
        migration = by_name.get(name)
        if migration is None:
            plan.unknown.append(name)
        elif not checksum:
            plan.unrecorded_checksums.append(migration)
        elif checksum != migration.checksum:
            raise MigrationError(
                f"migration {migration.path} was edited after it was applied to "
                f"{target.database} (recorded sha256 {checksum[:12]}..., the file's "
                f"{migration.checksum[:12]}...): restore the file; changes go in a new migration"
            )
    plan.pending = [migration for migration in migrations if migration.name not in recorded]
    # Tables a pending migration creates get their TTL right after it.
    plan.retention = await _retention_changes(
        client, target, retention_days, missing_tables=bool(plan.pending)
    )
    return plan


@dataclass(frozen=True, slots=True)
class MigrationResult:
    applied: list[str]  # migration names, in order
    retention: list[str]  # TTL statements run


async def run_migrations(
    client: AsyncClient,
    target: Target,
    retention_days: int,
    migrations: Sequence[Migration] | None = None,
) -> MigrationResult:
    """Create the database, apply the migrations not applied yet, in order, then bring the
    TTLs to ``retention_days``. Raises MigrationError; a retriable error (ClickHouse
    unavailable) as it is, the unrecorded migration then runs again from its start."""
    for statement in target.migrations_table_ddl():
        await client.command(statement)
    plan = await plan_migrations(client, target, retention_days, migrations)
    if plan.unknown:
        log.warning(
            "the store has migrations this version does not know (a newer sgpipe applied them)",
            migrations=plan.unknown,
        )
    for migration in plan.unrecorded_checksums:
        await _record(client, target, migration, keep_applied_at=True)
    applied: list[str] = []
    for migration in plan.pending:
        for statement in target.statements(migration):
            try:
                await client.command(statement)
            except Exception as exc:
                if classify(exc) is ErrorClass.RETRIABLE:
                    raise
                first_line = statement.split("\n", 1)[0]
                raise MigrationError(
                    f"migration {migration.path} failed on {first_line!r}: "
                    f"{' '.join(str(exc).split())}"
                ) from exc
        await _record(client, target, migration)
        log.info("applied clickhouse migration", migration=migration.name, database=target.database)
        applied.append(migration.name)
    # Retention after the migrations: they may have created the tables it applies to.
    retention = await _retention_changes(client, target, retention_days)
    for statement in retention:
        await client.command(statement)
        log.info("set retention", statement=statement)
    return MigrationResult(applied, retention)


async def apply_migrations(
    client: AsyncClient,
    database: str,
    *,
    cluster: str | None = None,
    retention_days: int = 0,
    migrations: Sequence[Migration] | None = None,
) -> list[str]:
    """``run_migrations`` on ``database``; returns the names of the migrations applied now."""
    result = await run_migrations(client, Target(database, cluster), retention_days, migrations)
    return result.applied


# `sgpipe sink` starts two writers (events, dead letters) at once, each migrating at start: one
# at a time per process, so the second finds nothing pending instead of running every statement
# again. (Separate processes, such as two sink replicas, rely on the migrations' idempotency.)
_MIGRATING: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Lock] = (
    weakref.WeakKeyDictionary()
)


async def migrate(client: AsyncClient, settings: ClickHouseSettings) -> list[str]:
    """``apply_migrations`` as ``settings`` say (database, cluster, retention)."""
    lock = _MIGRATING.setdefault(asyncio.get_running_loop(), asyncio.Lock())
    async with lock:
        return await apply_migrations(
            client,
            settings.database,
            cluster=settings.cluster,
            retention_days=settings.retention_days,
        )


async def _recorded(client: AsyncClient, target: Target) -> dict[str, str]:
    """name -> checksum ("" when recorded without one) of every applied migration."""
    exists = await client.query(
        "SELECT count() FROM system.tables WHERE database = {db:String} AND name = {t:String}",
        parameters={"db": target.database, "t": MIGRATIONS_TABLE},
    )
    if not exists.result_rows[0][0]:
        return {}
    columns = await client.query(
        "SELECT name FROM system.columns WHERE database = {db:String} AND table = {t:String}",
        parameters={"db": target.database, "t": MIGRATIONS_TABLE},
    )
    checksum = "checksum" if ("checksum",) in columns.result_rows else "''"
    result = await client.query(
        f"SELECT name, {checksum} FROM {target.database}.{MIGRATIONS_TABLE} FINAL"
    )
    return {str(name): str(value) for name, value in result.result_rows}


async def _record(
    client: AsyncClient, target: Target, migration: Migration, *, keep_applied_at: bool = False
) -> None:
    table = f"{target.database}.{MIGRATIONS_TABLE}"
    if keep_applied_at:
        # A migration applied before checksums were recorded: the same row with a checksum
        # (the table keeps the last row of a name), applied_at unchanged.
        await client.command(
            f"INSERT INTO {table} (name, applied_at, checksum) "
            f"SELECT name, applied_at, {{checksum:String}} FROM {table} FINAL "
            "WHERE name = {name:String}",
            parameters={"checksum": migration.checksum, "name": migration.name},
        )
        return
    # A statement with parameters, not client.insert(): clickhouse-connect's insert() asks
    # whether its data is a pandas DataFrame and imports pandas (with numpy and pyarrow) to
    # ask, ~0.45 s of CPU and ~80 MB in every process that migrates (the sink at each start).
    await client.command(
        f"INSERT INTO {table} (name, checksum) SELECT {{name:String}}, {{checksum:String}}",
        parameters={"name": migration.name, "checksum": migration.checksum},
    )


async def _retention_changes(
    client: AsyncClient, target: Target, days: int, *, missing_tables: bool = False
) -> list[str]:
    """TTL statements for the retained tables whose TTL is not ``days`` yet (with
    ``missing_tables``, also for those that do not exist yet, as a plan shows them)."""
    names = [target.local(table.name) for table in RETAINED_TABLES]
    result = await client.query(
        "SELECT name, engine_full FROM system.tables "
        "WHERE database = {db:String} AND name IN {names:Array(String)}",
        parameters={"db": target.database, "names": names},
    )
    engines = {str(name): str(engine) for name, engine in result.result_rows}
    statements = []
    for table in RETAINED_TABLES:
        engine = engines.get(target.local(table.name))
        needed = (
            bool(missing_tables and days)
            if engine is None
            else retention_days_of(engine) != days  # None (a TTL not ours) differs too
        )
        if needed:
            statements.append(retention_statement(target, table, days))
    return statements
