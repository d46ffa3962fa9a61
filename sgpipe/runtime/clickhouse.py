"""ClickHouse plumbing shared by every process that talks to ClickHouse: clients from
settings. The migration runner is ``migrations``; the sink's writer lives in ``sinks/``."""

from __future__ import annotations

from urllib.parse import unquote, urlsplit

import clickhouse_connect
import structlog
from clickhouse_connect.driver.asyncclient import AsyncClient
from pydantic import SecretStr

from sgpipe.runtime.redact import redact_url
from sgpipe.runtime.settings import ClickHouseSettings

log = structlog.get_logger(__name__)


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
