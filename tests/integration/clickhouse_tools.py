"""Test-side ClickHouse helpers: the embedded engine served over HTTP on a free port, and rows
read back as dicts."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from clickhouse_connect.driver.asyncclient import AsyncClient

from sgpipe.embedded.clickhouse import EmbeddedClickHouse
from sgpipe.runtime.clickhouse import connect
from sgpipe.runtime.settings import ClickHouseSettings


@asynccontextmanager
async def served_clickhouse(data_path: Path) -> AsyncIterator[str]:
    """The real engine (chdb) on ``data_path``, served on 127.0.0.1; yields its URL."""
    store = EmbeddedClickHouse(data_path)
    url = await store.start(port=0)
    try:
        yield url
    finally:
        await store.stop()


@asynccontextmanager
async def clickhouse_client(url: str) -> AsyncIterator[AsyncClient]:
    client = await connect(ClickHouseSettings(url=url))
    try:
        yield client
    finally:
        await client.close()


async def select_rows(client: AsyncClient, sql: str) -> list[dict[str, Any]]:
    result = await client.query(sql)
    return [dict(zip(result.column_names, row, strict=True)) for row in result.result_rows]
