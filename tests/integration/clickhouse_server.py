"""Test-side embedded ClickHouse: the real HTTP server on a free port, run on its own event
loop in a background thread (as it would run in another process), so that blocking clients
(clickhouse-connect's sync client, urllib) can be used from the test."""

from __future__ import annotations

import asyncio
import pathlib
import threading
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Mapping
from contextlib import closing, contextmanager
from dataclasses import dataclass
from typing import Any

import aiohttp
import clickhouse_connect

from sgpipe.embedded.clickhouse import EmbeddedClickHouse
from sgpipe.embedded.credentials import (
    EmbeddedCredentials,
    EmbeddedUser,
    load_or_create_credentials,
)

TIMEOUT = 30.0
# chdb's `default` database also exposes the file system, so the lockdown makes it unusable
# for tables: the tests work in a database of their own, as sgpipe does.
DATABASE = "test"


@dataclass(frozen=True)
class HttpAnswer:
    status: int
    headers: Mapping[str, str]
    body: str

    @property
    def code(self) -> str | None:
        """ClickHouse's error code (X-ClickHouse-Exception-Code), None on success."""
        return self.headers.get("X-ClickHouse-Exception-Code")


@dataclass
class Served:
    store: EmbeddedClickHouse
    loop: asyncio.AbstractEventLoop
    data_path: pathlib.Path
    url: str
    credentials: EmbeddedCredentials

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    @property
    def writer(self) -> EmbeddedUser:
        return self.credentials.writer

    @property
    def reader(self) -> EmbeddedUser:
        return self.credentials.reader

    @property
    def auth(self) -> dict[str, str]:
        """The writer's HTTP Basic header."""
        return basic_auth(self.writer)

    @property
    def query_url(self) -> str:
        return f"{self.url}/?database={DATABASE}"

    def client(self, user: EmbeddedUser | None = None, **kwargs: Any) -> Any:
        """A clickhouse-connect sync client (of the writer unless ``user``), in the test
        database."""
        user = user or self.writer
        kwargs.setdefault("database", DATABASE)
        return clickhouse_connect.get_client(
            host="127.0.0.1", port=self.port, username=user.name, password=user.password, **kwargs
        )

    def post(
        self,
        sql: str,
        user: EmbeddedUser | None = None,
        *,
        params: Mapping[str, str] | None = None,
        headers: Mapping[str, str] | None = None,
        method: str = "POST",
    ) -> HttpAnswer:
        """``sql`` as a request body (a GET sends it as the `query` parameter), with the user's
        HTTP Basic credentials unless ``user`` is None and ``headers`` bring their own."""
        query = {"database": DATABASE, **(params or {})}
        all_headers = {**(basic_auth(user) if user else {}), **(headers or {})}
        data: bytes | None = sql.encode()
        if method == "GET":
            query["query"], data = sql, None
        return http_request(
            f"{self.url}/?{urllib.parse.urlencode(query)}", data, all_headers, method
        )

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.store.stop(), self.loop).result(TIMEOUT)


def basic_auth(user: EmbeddedUser) -> dict[str, str]:
    return {"Authorization": aiohttp.encode_basic_auth(user.name, user.password)}


def http_request(
    url: str, data: bytes | None, headers: Mapping[str, str], method: str = "POST"
) -> HttpAnswer:
    request = urllib.request.Request(url, data=data, headers=dict(headers), method=method)
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT) as response:
            return HttpAnswer(response.status, dict(response.headers), response.read().decode())
    except urllib.error.HTTPError as error:
        return HttpAnswer(error.code, dict(error.headers), error.read().decode())


@contextmanager
def serve(tmp_path: pathlib.Path, *, allowed_origins: tuple[str, ...] = ()) -> Iterator[Served]:
    """The embedded ClickHouse on a free port with fresh credentials and a `test` database."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    credentials = load_or_create_credentials(tmp_path)
    store = EmbeddedClickHouse(tmp_path / "store", credentials, allowed_origins=allowed_origins)
    try:
        url = asyncio.run_coroutine_threadsafe(store.start(port=0), loop).result(TIMEOUT)
        served = Served(store, loop, tmp_path / "store", url, credentials)
        with closing(served.client(database=None)) as client:
            client.command(f"CREATE DATABASE {DATABASE}")
        yield served
    finally:
        asyncio.run_coroutine_threadsafe(store.stop(), loop).result(TIMEOUT)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(TIMEOUT)
        loop.close()
