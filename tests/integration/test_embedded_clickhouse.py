"""The embedded ClickHouse HTTP endpoint against real clickhouse-connect clients (as the
writer user; what the lockdown refuses is in test_clickhouse_lockdown.py)."""

from __future__ import annotations

import asyncio
import json
import pathlib
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing
from datetime import UTC, datetime
from typing import Any

import aiohttp
import lz4.frame
import pytest

pytest.importorskip("chdb")

import clickhouse_connect  # noqa: E402
from clickhouse_connect.driver.exceptions import DatabaseError  # noqa: E402

from sgpipe.embedded.clickhouse import (  # noqa: E402
    EmbeddedClickHouse,
    EmbeddedQueryError,
    LockdownError,
    _Engine,
    _load_engine_info,
    _open_request_connection,
    _Params,
    _run_query,
    _verify_lockdown,
    query_tsv,
)
from tests.integration.clickhouse_server import DATABASE, TIMEOUT, Served, serve  # noqa: E402

pytestmark = pytest.mark.clickhouse

EVENTS_DDL = """
CREATE TABLE events (
    event_id String,
    event LowCardinality(String),
    reason Nullable(String),
    ts DateTime64(3, 'UTC'),
    categories Array(String),
    args Map(String, String),
    status UInt16,
    version UInt64
) ENGINE = ReplacingMergeTree(version) ORDER BY event_id
"""
COLUMNS = ["event_id", "event", "reason", "ts", "categories", "args", "status", "version"]
TS = datetime(2024, 5, 1, 12, 30, 45, 123000, tzinfo=UTC)


@pytest.fixture
def served(tmp_path: pathlib.Path) -> Iterator[Served]:
    with serve(tmp_path) as running:
        yield running


def test_default_sync_client_round_trips_every_column_type(served: Served) -> None:
    with closing(served.client()) as client:
        # The default client compresses inserts with lz4, which the server must decode.
        assert client.write_compression == "lz4"
        client.command(EVENTS_DDL)
        rows = [
            ["e1", "open", None, TS, ["welcome", "promo"], {"campaign": "spring"}, 200, 1],
            ["e2", "bounce", "550 no such user", TS, [], {}, 550, 1],
        ]
        assert client.insert("events", rows, column_names=COLUMNS).written_rows == 2
        later = datetime(2024, 5, 2, 0, 0, 0, 1000, tzinfo=UTC)
        columns = [
            ["e1", "e3"],
            ["click", "delivered"],
            [None, "250 ok"],
            [later, later],
            [["promo"], ["a", "b", "c"]],
            [{"url": "https://x.test/?a=1&b=2"}, {"k1": "v1", "k2": "v2"}],
            [200, 250],
            [2, 1],  # e1 again, newer version: FINAL must keep this one
        ]
        summary = client.insert("events", columns, column_names=COLUMNS, column_oriented=True)
        assert summary.written_rows == 2

        result = client.query(f"SELECT {', '.join(COLUMNS)} FROM events FINAL ORDER BY event_id")
        # clickhouse-connect's default tz_mode returns UTC values as naive datetimes.
        naive_ts, naive_later = TS.replace(tzinfo=None), later.replace(tzinfo=None)
        assert result.result_rows == [
            (
                "e1",
                "click",
                None,
                naive_later,
                ["promo"],
                {"url": "https://x.test/?a=1&b=2"},
                200,
                2,
            ),
            ("e2", "bounce", "550 no such user", naive_ts, [], {}, 550, 1),
            (
                "e3",
                "delivered",
                "250 ok",
                naive_later,
                ["a", "b", "c"],
                {"k1": "v1", "k2": "v2"},
                250,
                1,
            ),
        ]
        aware = client.query("SELECT ts FROM events FINAL ORDER BY event_id", tz_mode="schema")
        assert aware.result_rows == [(later,), (TS,), (later,)]
        assert aware.result_rows[0][0].utcoffset().total_seconds() == 0
        assert client.command("SELECT count() FROM events") == 4


def test_raw_tsv_and_bound_parameters(served: Served) -> None:
    with closing(served.client()) as client:
        client.command("CREATE TABLE kv (k String, n UInt64) ENGINE = MergeTree ORDER BY k")
        client.insert("kv", [["a", 1], ["tab\there", 2], ["c", 3]], column_names=["k", "n"])

        raw = client.raw_query("SELECT k, n FROM kv ORDER BY n", fmt="TabSeparated")
        assert raw == b"a\t1\ntab\\there\t2\nc\t3\n"

        result = client.query(
            "SELECT n FROM kv WHERE k = {k:String} OR n > {n:UInt64} ORDER BY n",
            parameters={"k": "tab\there", "n": 2},
        )
        assert result.result_rows == [(2,), (3,)]
        quoted = client.query(
            "SELECT {s:String}, {xs:Array(String)}",
            parameters={"s": "it's \\ ok", "xs": ["x'y", "z"]},
        )
        assert quoted.result_rows == [("it's \\ ok", ["x'y", "z"])]
        # Large bound values travel in a multipart form instead of the URL.
        big = "z" * 100_000
        assert client.query("SELECT length({v:String})", parameters={"v": big}).result_rows == [
            (100_000,)
        ]


def test_database_and_settings_apply_per_request(served: Served) -> None:
    with closing(served.client()) as client:
        client.command("CREATE DATABASE analytics")
        client.command("CREATE TABLE analytics.t (x String) ENGINE = Memory")
        default_threads = client.command("SELECT getSetting('max_threads')")
        one_thread = client.query("SELECT getSetting('max_threads')", settings={"max_threads": 1})
        assert one_thread.result_rows == [(1,)]
        # As over HTTP without a session: a SET lasts for its own request only.
        client.command("SET max_threads = 1")
        assert client.command("SELECT getSetting('max_threads')") == default_threads
    with closing(served.client(database="analytics")) as scoped:
        scoped.insert("t", [["in analytics"]], column_names=["x"])
        assert scoped.query("SELECT x, currentDatabase() FROM t").result_rows == [
            ("in analytics", "analytics")
        ]


def test_errors_surface_as_database_errors(served: Served) -> None:
    with closing(served.client()) as client:
        with pytest.raises(DatabaseError) as unknown:
            client.query("SELECT * FROM no_such_table")
        assert "Code: 60" in str(unknown.value)
        assert "no_such_table" in str(unknown.value)
        assert "UNKNOWN_TABLE" in str(unknown.value)

        with pytest.raises(DatabaseError, match="SYNTAX_ERROR"):
            client.command("SELEC 1")
        # The server is still fine afterwards.
        assert client.command("SELECT 40 + 2") == 42


async def test_async_client_queries_and_inserts(served: Served) -> None:
    client = await clickhouse_connect.get_async_client(
        host="127.0.0.1",
        port=served.port,
        username=served.credentials.writer.name,
        password=served.credentials.writer.password,
        database=DATABASE,
    )
    try:
        await client.command("CREATE TABLE t (id UInt64, s String) ENGINE = MergeTree ORDER BY id")
        summary = await client.insert("t", [[1, "one"], [2, "two"]], column_names=["id", "s"])
        assert summary.written_rows == 2
        result = await client.query("SELECT id, s FROM t ORDER BY id")
        assert result.result_rows == [(1, "one"), (2, "two")]
        version = await client.query("SELECT version()")
        assert version.result_rows[0][0].split(".")[0].isdigit()
    finally:
        await client.close()


def test_query_tsv_reads_what_was_served(served: Served) -> None:
    with closing(served.client()) as client:
        client.command("CREATE TABLE t (id UInt64, s String) ENGINE = MergeTree ORDER BY id")
        client.insert("t", [[1, "one"], [2, "two"]], column_names=["id", "s"])
        client.command("CREATE DATABASE other")
        client.command("CREATE TABLE other.t (x String) ENGINE = MergeTree ORDER BY x")
        client.insert("t", [["elsewhere"]], column_names=["x"], database="other")
    served.stop()

    assert (
        query_tsv(served.data_path, "SELECT id, s FROM t ORDER BY id", database=DATABASE)
        == b"1\tone\n2\ttwo\n"
    )
    assert query_tsv(
        served.data_path, "SELECT count() AS c FROM t FORMAT JSONEachRow", database=DATABASE
    ) == (b'{"c":2}\n')
    assert query_tsv(served.data_path, "SELECT x FROM t", database="other") == b"elsewhere\n"
    with pytest.raises(EmbeddedQueryError, match="UNKNOWN_TABLE"):
        query_tsv(served.data_path, "SELECT * FROM missing", database=DATABASE)


def test_concurrent_inserts_and_selects(served: Served) -> None:
    with closing(served.client()) as client:
        client.command("CREATE TABLE c (worker UInt8, i UInt64) ENGINE = MergeTree ORDER BY i")
    workers, rounds, rows = 4, 8, 50

    def work(worker: int) -> list[int]:
        seen = []
        with closing(served.client()) as own:
            for r in range(rounds):
                data = [[worker, r * rows + i] for i in range(rows)]
                own.insert("c", data, column_names=["worker", "i"])
                seen.append(own.command(f"SELECT count() FROM c WHERE worker = {worker}"))
        return seen

    with ThreadPoolExecutor(workers) as pool:
        futures = [pool.submit(work, w) for w in range(workers)]
        # A deadlock shows up as a timeout here rather than a hung test run.
        results = [f.result(timeout=TIMEOUT) for f in futures]

    assert results == [[rows * (r + 1) for r in range(rounds)]] * workers
    with closing(served.client()) as client:
        totals = client.query("SELECT worker, count(), uniqExact(i) FROM c GROUP BY worker")
        assert sorted(totals.result_rows) == [(w, rounds * rows, rounds * rows) for w in range(4)]


async def test_http_surface(served: Served) -> None:
    """What clickhouse-connect relies on, checked at the HTTP level."""
    async with aiohttp.ClientSession(headers=served.auth) as http:
        for path in ("/ping", "/"):
            async with http.get(served.url + path) as response:
                assert (response.status, await response.text()) == (200, "Ok.\n")

        await _post(http, served.query_url, "CREATE TABLE h (a UInt64) ENGINE = Memory")
        # The query in the URL and lz4 data in the body, as one frame per block.
        frames = lz4.frame.compress(b"1\n2\n") + lz4.frame.compress(b"3\n")
        async with http.post(
            served.url,
            params={"query": "INSERT INTO h FORMAT TabSeparated", "database": DATABASE},
            data=frames,
            headers={"Content-Encoding": "lz4"},
        ) as response:
            assert response.status == 200, await response.text()
            assert json.loads(response.headers["X-ClickHouse-Summary"])["written_rows"] == "3"

        async with http.get(
            served.url, params={"query": "SELECT sum(a) FROM h", "database": DATABASE}
        ) as response:
            assert await response.read() == b"6\n"
            assert response.headers["X-ClickHouse-Format"] == "TabSeparated"
            assert response.headers["X-ClickHouse-Timezone"]
            assert response.headers["X-ClickHouse-Query-Id"]
        # A GET must not write, as in ClickHouse.
        async with http.get(
            served.url, params={"query": "DROP TABLE h", "database": DATABASE}
        ) as response:
            assert response.status == 500
            assert response.headers["X-ClickHouse-Exception-Code"] == "164"

        async with http.post(served.query_url, data="SELECT * FROM nowhere") as response:
            assert response.status == 404
            assert response.headers["X-ClickHouse-Exception-Code"] == "60"
            assert (await response.text()).startswith("Code: 60. DB::Exception: ")


async def test_client_disconnecting_mid_insert_releases_the_engine(
    served: Served, tmp_path: pathlib.Path
) -> None:
    async with aiohttp.ClientSession(headers=served.auth) as http:
        await _post(
            http, served.query_url, "CREATE TABLE d (a UInt64) ENGINE = MergeTree ORDER BY a"
        )
    reader, writer = await asyncio.open_connection("127.0.0.1", served.port)
    writer.write(
        b"POST /?database=test&query=INSERT%20INTO%20d%20FORMAT%20TabSeparated HTTP/1.1\r\n"
        b"Host: 127.0.0.1\r\nAuthorization: " + served.auth["Authorization"].encode() + b"\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n4\r\n1\n2\n\r\n"
    )
    await writer.drain()
    await asyncio.sleep(0.2)
    writer.close()
    await writer.wait_closed()
    await asyncio.to_thread(served.stop)

    # chdb hosts one engine per process: a leaked handle would keep it bound to the old path.
    other = EmbeddedClickHouse(tmp_path / "other", served.credentials)
    try:
        assert (await other.start(port=0)).startswith("http://127.0.0.1:")
    finally:
        await other.stop()
    assert query_tsv(served.data_path, "SELECT count() FROM d", database=DATABASE) == b"0\n"


async def _post(http: aiohttp.ClientSession, url: str, sql: str) -> bytes:
    async with http.post(url, data=sql) as response:
        body = await response.read()
        assert response.status == 200, body
        return body


def test_an_engine_without_the_users_file_is_refused(tmp_path: pathlib.Path) -> None:
    # chdb silently falls back to an all-powerful user when it cannot load the users file:
    # the start-up check must notice.
    from chdb.state import connect as chdb_connect

    conn: Any = chdb_connect(str(tmp_path / "plain"))
    try:
        with pytest.raises(LockdownError, match="access control"):
            _verify_lockdown(conn)
    finally:
        conn.close()


def test_an_insert_whose_rows_the_canonical_form_drops_is_refused(tmp_path: pathlib.Path) -> None:
    # The canonical form of `INSERT ... VALUES <rows>` has no rows. Such inserts are streamed
    # (their rows are data); should one ever reach the statement path, it must fail loudly
    # rather than insert nothing.
    engine = _Engine(tmp_path / "store")
    try:
        info = _load_engine_info(engine.conn_str)
        params = _Params()
        conn = _open_request_connection(engine.conn_str, params, {}, readonly=False)
        try:
            conn.query("CREATE DATABASE d", "TSV")
            conn.query("CREATE TABLE d.t (n UInt8) ENGINE = MergeTree ORDER BY n", "TSV")
            with pytest.raises(EmbeddedQueryError, match="NOT_IMPLEMENTED"):
                _run_query(conn, "INSERT INTO d.t VALUES (1)", params, info.policy, readonly=False)
            assert conn.query("SELECT count() FROM d.t", "TSV").bytes() == b"0\n"
        finally:
            conn.close()
    finally:
        engine.close()


_OPEN_AN_ENGINE_THEN_LIST_IMPORTS = """
import sys
from sgpipe.embedded.clickhouse import _connect
_connect(":memory:").close()
print("pyarrow" in sys.modules)
import pyarrow
print(pyarrow.__name__)
"""


def test_an_embedded_engine_starts_without_pyarrow_and_leaves_it_importable() -> None:
    """chdb.state imports pyarrow (~0.15 s of CPU) for Arrow APIs sgpipe never calls; every
    engine start skips it, and a later ``import pyarrow`` still works. Mutation caught:
    chdb.state imported with pyarrow visible."""
    done = subprocess.run(
        [sys.executable, "-c", _OPEN_AN_ENGINE_THEN_LIST_IMPORTS],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["False", "pyarrow"]
