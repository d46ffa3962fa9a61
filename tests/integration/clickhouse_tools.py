"""Test-side ClickHouse helpers: the embedded engine served over HTTP on a free port (the
process's shared one, emptied for each test), and rows read back as dicts."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from clickhouse_connect.driver.asyncclient import AsyncClient

from sgpipe.runtime.clickhouse import connect
from sgpipe.runtime.settings import ClickHouseSettings
from tests.integration.shared_clickhouse import shared_clickhouse


@asynccontextmanager
async def served_clickhouse(data_path: Path) -> AsyncIterator[str]:
    """A ClickHouse for this test, served on 127.0.0.1: the process's shared engine
    (tests/integration/shared_clickhouse.py) with no database left from earlier tests; yields
    its URL with the writer's credentials in it (the embedded endpoint requires them), as a
    `clickhouse.url` setting would carry them. The users' credentials file is also put where an
    engine of ``data_path`` would have kept it (``<data_path>-credentials``)."""
    shared = shared_clickhouse().clean_engine()
    shared.copy_credentials_to(data_path.parent / f"{data_path.name}-credentials")
    try:
        yield shared.writer_url
    finally:
        shared.clean_engine()


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
