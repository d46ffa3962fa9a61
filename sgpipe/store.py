"""How a one-shot command (`sgpipe migrate`, `sgpipe forget`) reaches the ClickHouse store.

In order:

1. ``clickhouse.url`` is set: that server, with the configured credentials;
2. `sgpipe up` serves the data dir's embedded store: its HTTP endpoint (the address in
   ``<data-dir>/sgpipe-up.json``), as the data dir's writer user;
3. nothing serves it: the command opens the store itself, holding the data dir's lock (so a
   `sgpipe up` starting meanwhile waits for nothing and fails clearly), and serves it to itself
   on a free loopback port for the command's duration, with the same credentials and lockdown
   as `sgpipe up`. Every path is then the same ClickHouse HTTP protocol.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from sgpipe.runtime.settings import ClickHouseSettings, ConfigError, Settings
from sgpipe.up.layout import CLICKHOUSE_DIR, state_file


class StoreUnavailable(Exception):
    """The store cannot be reached or opened; the message says why."""


@dataclass(frozen=True, slots=True)
class StoreAccess:
    url: str
    settings: ClickHouseSettings  # with the credentials to use
    how: str  # for people: "clickhouse.url", "sgpipe up (pid 123)", "opened directly"


def running_store_url(data_dir: Path) -> str | None:
    """The embedded store's URL if `sgpipe up` serves this data dir and answers."""
    try:
        state = json.loads(state_file(data_dir).read_text(encoding="utf-8"))
        if not state.get("clickhouse_embedded", True):
            return None  # `up` ran against a configured ClickHouse: pass the same config
        url = str(state["clickhouse_url"])
        with urllib.request.urlopen(f"{url}/ping", timeout=2) as response:
            return url if response.status == 200 else None
    except (OSError, ValueError, KeyError, urllib.error.URLError):
        return None


def as_embedded_writer(settings: ClickHouseSettings, data_dir: Path) -> ClickHouseSettings:
    """``settings`` with the data dir's writer credentials (the embedded store needs them)."""
    # Here, not at the top: clickhouse-connect is not needed to find a running store, and
    # `sgpipe query` must start at once (sgpipe/cli.py).
    from sgpipe.embedded.credentials import CredentialsError, load_credentials
    from sgpipe.runtime.clickhouse import with_credentials

    try:
        writer = load_credentials(data_dir).writer
    except (FileNotFoundError, CredentialsError) as exc:
        raise StoreUnavailable(f"cannot use the embedded store's credentials: {exc}") from exc
    return with_credentials(settings, writer.name, writer.password)


@asynccontextmanager
async def open_store(
    settings: Settings, data_dir: Path, command: str, *, create: bool = False
) -> AsyncIterator[StoreAccess]:
    """The store, reached as the module docstring says. ``create``: an embedded store that
    does not exist yet is created (`migrate`); otherwise that is StoreUnavailable."""
    clickhouse = settings.clickhouse
    if clickhouse.url is not None:
        yield StoreAccess(clickhouse.url, clickhouse, "clickhouse.url")
        return
    url = running_store_url(data_dir)
    if url is not None:
        yield StoreAccess(url, as_embedded_writer(clickhouse, data_dir), "sgpipe up's endpoint")
        return
    async with _served_here(settings, data_dir, command, create=create) as access:
        yield access


@asynccontextmanager
async def _served_here(
    settings: Settings, data_dir: Path, command: str, *, create: bool
) -> AsyncIterator[StoreAccess]:
    from sgpipe.embedded.clickhouse import EmbeddedClickHouse
    from sgpipe.embedded.credentials import CredentialsError, load_or_create_credentials
    from sgpipe.preflight import lock_data_dir
    from sgpipe.runtime.clickhouse import with_credentials

    data_path = data_dir / CLICKHOUSE_DIR
    if not create and not data_path.is_dir():
        raise StoreUnavailable(f"no ClickHouse store at {data_path} (has `sgpipe up` run here?)")
    lock = lock_data_dir(data_dir, command)  # PreflightFailed: `sgpipe up` is starting
    try:
        try:
            credentials = load_or_create_credentials(data_dir)
        except CredentialsError as exc:
            raise ConfigError(str(exc)) from exc
        store = EmbeddedClickHouse(data_path, credentials)
        url = await store.start("127.0.0.1", 0)
        try:
            writer = credentials.writer
            yield StoreAccess(
                url,
                with_credentials(settings.clickhouse, writer.name, writer.password),
                "opened directly",
            )
        finally:
            await store.stop()
    finally:
        lock.release()
