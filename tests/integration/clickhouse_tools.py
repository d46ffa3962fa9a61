"""Test-side ClickHouse helpers: the embedded engine served over HTTP on a free port, and rows
read back as dicts."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from clickhouse_connect.driver.asyncclient import AsyncClient

from sgpipe.embedded.clickhouse import EmbeddedClickHouse
from sgpipe.embedded.credentials import load_or_create_credentials
from sgpipe.runtime.clickhouse import connect
from sgpipe.runtime.settings import ClickHouseSettings


@asynccontextmanager
async def served_clickhouse(data_path: Path) -> AsyncIterator[str]:
    """The real engine (chdb) on ``data_path``, served on 127.0.0.1; yields its URL with the
    writer's credentials in it (the embedded endpoint requires them), as a `clickhouse.url`
    setting would carry them."""
    credentials = load_or_create_credentials(data_path.parent / f"{data_path.name}-credentials")
    store = EmbeddedClickHouse(data_path, credentials)
    url = await store.start(port=0)
    writer = credentials.writer
    try:
        yield url.replace("://", f"://{writer.name}:{writer.password}@", 1)
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
