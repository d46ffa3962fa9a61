"""ClickHouse plumbing shared by every process that talks to ClickHouse: clients from
settings and the migration runner. The sink's writer lives in ``sinks/``."""

from __future__ import annotations

from urllib.parse import unquote, urlsplit

import clickhouse_connect
import structlog
from clickhouse_connect.driver.asyncclient import AsyncClient
from pydantic import SecretStr

from schemas import clickhouse_migrations
from sgpipe.runtime.redact import redact_url
from sgpipe.runtime.settings import ClickHouseSettings

log = structlog.get_logger(__name__)

MIGRATIONS_TABLE = "sgpipe_schema_migrations"


async def connect(
    settings: ClickHouseSettings, url: str | None = None, *, database: str | None = None
) -> AsyncClient:
    """A client for ``url`` (default: ``settings.url``). The pipeline's clients are bound to
    no database (every statement names its own), so they work before the database exists."""
    target = url or settings.url
    if target is None:
        raise ValueError("clickhouse.url is not set")
    parts = urlsplit(target)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"clickhouse.url must be http(s)://host:port, got {redact_url(target)!r}")
    client: AsyncClient = await clickhouse_connect.get_async_client(
        host=parts.hostname,
        port=parts.port or (8443 if parts.scheme == "https" else 8123),
        secure=parts.scheme == "https",
        username=unquote(parts.username) if parts.username else settings.username,
        password=(
            unquote(parts.password) if parts.password else settings.password.get_secret_value()
        ),
        connect_timeout=settings.connect_timeout,
        send_receive_timeout=settings.send_receive_timeout,
        database=database,
    )
    return client


def with_credentials(
    settings: ClickHouseSettings, username: str, password: str
) -> ClickHouseSettings:
    """``settings`` with this user and password (e.g. the embedded store's writer), for a URL
    that names no user of its own."""
    return settings.model_copy(update={"username": username, "password": SecretStr(password)})


async def apply_migrations(client: AsyncClient, database: str) -> list[str]:
    """Create the database and apply the ``schemas/clickhouse`` files not applied yet, in order;
    returns the names applied now. Each file is recorded once it succeeded."""
    await client.command(f"CREATE DATABASE IF NOT EXISTS {database}")
    await client.command(
        f"CREATE TABLE IF NOT EXISTS {database}.{MIGRATIONS_TABLE} "
        "(name String, applied_at DateTime64(3, 'UTC') DEFAULT now64(3)) "
        "ENGINE = ReplacingMergeTree ORDER BY name"
    )
    result = await client.query(f"SELECT name FROM {database}.{MIGRATIONS_TABLE} FINAL")
    applied = {row[0] for row in result.result_rows}
    newly_applied: list[str] = []
    for name, sql in clickhouse_migrations():
        if name in applied:
            continue
        for statement in _statements(sql.replace("{database}", database)):
            await client.command(statement)
        await client.insert(f"{database}.{MIGRATIONS_TABLE}", [[name]], column_names=["name"])
        log.info("applied clickhouse migration", migration=name, database=database)
        newly_applied.append(name)
    return newly_applied


def _statements(sql: str) -> list[str]:
    # Migration files separate statements with a ";" at the end of a line.
    lines = [line for line in sql.splitlines() if not line.lstrip().startswith("--")]
    return [part.strip() for part in "\n".join(lines).split(";\n") if part.strip(" ;\n")]
