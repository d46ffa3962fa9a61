"""`sgpipe serve-clickhouse`: the child of `sgpipe up` that holds the embedded ClickHouse.

chdb lets one process open a data path; this process is it. It serves ClickHouse's HTTP
interface for the store (``sgpipe.embedded.clickhouse``) to the users in the data dir's
credentials file, which `sgpipe up` created before starting it, and logs one line with the URL
(``embedded clickhouse serving``) that the supervisor waits for. Why a child rather than part of
the supervisor (measured, docs/up.md): the engine's inserts stall the process's event loop by
tens of milliseconds, a crash of the engine takes only this process down (it is restarted),
and the supervisor stays small.
"""

from __future__ import annotations

import asyncio
import errno
from pathlib import Path
from urllib.parse import urlsplit

import structlog

from sgpipe.runtime import status
from sgpipe.runtime.settings import ConfigError, Settings
from sgpipe.up.layout import CLICKHOUSE_DIR

log = structlog.get_logger(__name__)


async def serve_embedded_clickhouse(
    settings: Settings, data_dir: Path, stop: asyncio.Event
) -> None:
    """Serve until ``stop`` is set. ConfigError when the credentials file is missing or unsafe."""
    from sgpipe.embedded.child import PortInUse, port_in_use
    from sgpipe.embedded.clickhouse import EmbeddedClickHouse
    from sgpipe.embedded.credentials import (
        CredentialsError,
        credentials_file,
        load_credentials,
    )

    try:
        credentials = load_credentials(data_dir)
    except (FileNotFoundError, CredentialsError) as exc:
        raise ConfigError(f"cannot use the embedded store's credentials: {exc}") from exc
    store = EmbeddedClickHouse(
        data_dir / CLICKHOUSE_DIR,
        credentials,
        allowed_origins=settings.embedded.clickhouse_allowed_origins,
        max_query_bytes=settings.embedded.clickhouse_max_query_bytes,
    )
    port = settings.embedded.clickhouse_http_port or 0  # unset: a free one, bound at once
    try:
        url = await store.start(settings.embedded.host, port)
    except OSError as exc:
        if exc.errno != errno.EADDRINUSE:
            raise
        # Taken between `sgpipe up`'s check and this bind: said as the check says it.
        raise PortInUse(
            port_in_use("embedded.clickhouse_http_port", settings.embedded.host, port)
        ) from exc
    try:
        log.info(
            "embedded clickhouse serving",
            url=url,
            users=[user.name for user in credentials.users],
            credentials=str(credentials_file(data_dir)),
        )
        status.report_listening("clickhouse", urlsplit(url).port or 0, url=url)
        await stop.wait()
    finally:
        await store.stop()
    log.info("stopped")
