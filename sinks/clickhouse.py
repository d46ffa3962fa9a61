"""The sink's ClickHouse writer: column-oriented batch inserts into ``email_events``.

A runtime ``Writer``: ``start`` connects, applies migrations and checks that the table has
every column the sink writes, with the contract's type (a mismatch is fatal: a deploy to fix,
not data to retry);
``write`` returns once ClickHouse accepted the insert; ``probe`` pings the server.
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
from sgpipe.runtime.clickhouse import apply_migrations, connect
from sgpipe.runtime.errors import FatalStageError
from sgpipe.runtime.settings import ClickHouseSettings
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

    async def write(self, outputs: Sequence[dict[str, Any]], batch: object) -> None:
        if self._client is None:
            raise RuntimeError("ClickHouseWriter.write before start")
        started = time.monotonic()
        summary = await self._client.insert(
            self._table,
            to_columns(outputs),
            column_names=list(EMAIL_EVENT_COLUMNS),
            column_oriented=True,
        )
        metrics.CLICKHOUSE_INSERT_SECONDS.labels(self._stage, EMAIL_EVENTS_TABLE).observe(
            time.monotonic() - started
        )
        metrics.CLICKHOUSE_INSERTED_ROWS.labels(self._stage, EMAIL_EVENTS_TABLE).inc(
            int(summary.written_rows)
        )

    async def _check_table(self, client: AsyncClient) -> None:
        result = await client.query(f"DESCRIBE TABLE {self._table}")
        problems = table_mismatches({row[0]: row[1] for row in result.result_rows})
        if problems:
            raise FatalStageError(
                f"{self._stage}: table {self._table} does not match what this version writes: "
                f"{'; '.join(problems)}; apply the migrations (`sgpipe migrate`) or fix the table"
            )


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
