"""The sinks' ClickHouse writer: column-oriented batch inserts into one table.

A runtime ``Writer``: ``start`` connects, applies migrations and checks that the table can take
what the sink writes (for ``email_events``: every column, with the contract's type; a mismatch
is fatal: a deploy to fix, not data to retry); ``write`` returns once ClickHouse accepted the
insert; ``probe`` pings the server. ``TableWriter`` is generic over the table (``Table``);
``ClickHouseWriter`` is the one for ``email_events``.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import structlog
from clickhouse_connect.driver.asyncclient import AsyncClient

from schemas.event_fields import clickhouse_columns
from sgpipe.runtime import metrics
from sgpipe.runtime.clickhouse import apply_migrations, connect
from sgpipe.runtime.errors import FatalStageError
from sgpipe.runtime.settings import ClickHouseSettings
from sinks.rows import EMAIL_EVENT_COLUMNS, to_columns

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
            applied = await apply_migrations(client, self._database)
            if applied:
                log.info("applied migrations", stage=self._stage, migrations=applied)
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

    async def write(self, outputs: Sequence[T], batch: object) -> None:
        if self._client is None:
            raise RuntimeError(f"{type(self).__name__}.write before start")
        started = time.monotonic()
        summary = await self._client.insert(
            self._table,
            self._spec.to_columns(outputs),
            column_names=list(self._spec.columns),
            column_oriented=True,
        )
        metrics.CLICKHOUSE_INSERT_SECONDS.labels(self._stage, self._spec.name).observe(
            time.monotonic() - started
        )
        metrics.CLICKHOUSE_INSERTED_ROWS.labels(self._stage, self._spec.name).inc(
            int(summary.written_rows)
        )

    async def _check_table(self, client: AsyncClient) -> None:
        result = await client.query(f"DESCRIBE TABLE {self._table}")
        problems = self._spec.mismatches({row[0]: row[1] for row in result.result_rows})
        if problems:
            raise FatalStageError(
                f"{self._stage}: table {self._table} does not match what this version writes: "
                f"{'; '.join(problems)}; apply the migrations (`sgpipe migrate`) or fix the table"
            )


class ClickHouseWriter(TableWriter[dict[str, Any]]):
    """Inserts column-oriented batches of decoded email events into ``{database}.email_events``."""

    def __init__(self, settings: ClickHouseSettings, url: str | None, *, stage: str) -> None:
        super().__init__(settings, url, stage=stage, table=EMAIL_EVENTS)


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


EMAIL_EVENTS: Table[dict[str, Any]] = Table(
    EMAIL_EVENTS_TABLE, EMAIL_EVENT_COLUMNS, to_columns, table_mismatches
)
