"""The sink's ClickHouse writer: column-oriented batch inserts into ``email_events``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from clickhouse_connect.driver.asyncclient import AsyncClient

from sinks.rows import EMAIL_EVENT_COLUMNS

EMAIL_EVENTS_TABLE = "email_events"


class ClickHouseWriter:
    """Inserts column-oriented batches of email events into ``{database}.email_events``."""

    def __init__(self, client: AsyncClient, database: str) -> None:
        self._client = client
        self._table = f"{database}.{EMAIL_EVENTS_TABLE}"

    async def insert(self, columns: Sequence[Sequence[Any]]) -> int:
        """Returns the rows written; raises clickhouse-connect's errors (the caller retries)."""
        summary = await self._client.insert(
            self._table, list(columns), column_names=list(EMAIL_EVENT_COLUMNS), column_oriented=True
        )
        return int(summary.written_rows)
