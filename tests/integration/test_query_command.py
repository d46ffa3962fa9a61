"""`sgpipe query` behaves like clickhouse-client: a table on a terminal, headerless TSV in a
pipe, ``--format`` passed through; the same over HTTP (a server, or `sgpipe up`'s store) and
straight from the embedded data path."""

from __future__ import annotations

import asyncio
import os
import pty
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

pytest.importorskip("chdb")

from sgpipe.embedded.clickhouse import EmbeddedClickHouse, query_store  # noqa: E402
from sgpipe.embedded.credentials import load_or_create_credentials  # noqa: E402
from sgpipe.preflight import lock_data_dir  # noqa: E402
from tests import forked

pytestmark = pytest.mark.clickhouse

SETUP = [
    "CREATE DATABASE IF NOT EXISTS sgpipe",
    "CREATE TABLE sgpipe.t (x UInt8, y String) ENGINE = MergeTree ORDER BY x",
    "INSERT INTO sgpipe.t VALUES (1, 'a'), (2, 'b')",
]


@dataclass(frozen=True)
class Store:
    """How `sgpipe query` reaches the store: arguments and environment."""

    args: list[str]
    env: dict[str, str]


def run(store: Store, *args: str) -> subprocess.CompletedProcess[str]:
    return forked.run(
        [sys.executable, "-m", "sgpipe", "query", "--log-format", "console", *store.args, *args],
        env=store.env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def base_environment() -> dict[str, str]:
    return {name: value for name, value in os.environ.items() if not name.startswith("SGPIPE_")}


@pytest.fixture
def direct(tmp_path: Path) -> Store:
    """An embedded data dir nobody serves: `sgpipe query` opens it itself."""
    data_path = tmp_path / "data" / "clickhouse"
    data_path.mkdir(parents=True)
    for statement in SETUP:
        query_store(data_path, statement)
    return Store(["--data-dir", str(tmp_path / "data")], base_environment())


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Store]:
    """A ClickHouse HTTP endpoint at clickhouse.url (the embedded server, in a thread)."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    writer = load_or_create_credentials(tmp_path / "credentials").writer
    server = EmbeddedClickHouse(
        tmp_path / "served", load_or_create_credentials(tmp_path / "credentials")
    )
    try:
        url = asyncio.run_coroutine_threadsafe(server.start(port=0), loop).result(30)
        import clickhouse_connect

        client = clickhouse_connect.get_client(
            host="127.0.0.1",
            port=int(url.rsplit(":", 1)[1]),
            username=writer.name,
            password=writer.password,
        )
        for statement in SETUP:
            client.command(statement)
        client.close()
        environment = {
            **base_environment(),
            "SGPIPE_CLICKHOUSE__URL": url,
            "SGPIPE_CLICKHOUSE__USERNAME": writer.name,
            "SGPIPE_CLICKHOUSE__PASSWORD": writer.password,
        }
        yield Store([], environment)
    finally:
        asyncio.run_coroutine_threadsafe(server.stop(), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(30)
        loop.close()


@pytest.fixture(params=["direct", "http"])
def store(request: pytest.FixtureRequest) -> Store:
    chosen: Store = request.getfixturevalue("direct" if request.param == "direct" else "served")
    return chosen


SQL = "SELECT x, y FROM t ORDER BY x"


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        pytest.param([], "1\ta\n2\tb\n", id="pipe-default-headerless-tsv"),
        pytest.param(["--format", "TSVWithNames"], "x\ty\n1\ta\n2\tb\n", id="TSVWithNames"),
        pytest.param(
            ["--format", "JSONEachRow"], '{"x":1,"y":"a"}\n{"x":2,"y":"b"}\n', id="JSONEachRow"
        ),
        pytest.param(["--format", "CSVWithNames"], '"x","y"\n1,"a"\n2,"b"\n', id="CSVWithNames"),
    ],
)
def test_formats(store: Store, args: list[str], expected: str) -> None:
    result = run(store, *args, SQL)
    assert result.returncode == 0, result.stderr
    assert result.stdout == expected
    assert result.stderr == ""


def test_the_querys_own_format_wins(store: Store) -> None:
    result = run(store, "--format", "TSVWithNames", f"{SQL} FORMAT JSONEachRow")
    assert result.stdout == '{"x":1,"y":"a"}\n{"x":2,"y":"b"}\n'


def test_a_terminal_gets_a_table(store: Store) -> None:
    leader, follower = pty.openpty()
    try:
        process = forked.run(
            [sys.executable, "-m", "sgpipe", "query", *store.args, SQL],
            env=store.env,
            stdout=follower,
            stderr=subprocess.PIPE,
            timeout=60,
            check=False,
        )
        os.close(follower)
        output = b""
        while True:
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # EIO: the terminal's other end is closed and drained
                break
            if not chunk:
                break
            output += chunk
    finally:
        os.close(leader)
    assert process.returncode == 0, process.stderr
    # Bold headers and grey row numbers, as clickhouse-client draws them on a terminal.
    table = re.sub(r"\x1b\[[0-9;]*m", "", output.decode())
    assert "┌─x─┬─y─┐" in table
    assert "│ 2 │ b │" in table


def test_a_failing_query_is_one_line(store: Store) -> None:
    result = run(store, "SELEC 1")
    assert result.returncode == 1
    assert result.stdout == ""
    (line,) = result.stderr.splitlines()
    assert line.startswith("sgpipe: ")
    assert "SYNTAX_ERROR" in line


def test_an_unknown_format_is_clickhouses_error(store: Store) -> None:
    result = run(store, "--format", "NoSuchFormat", SQL)
    assert result.returncode == 1
    (line,) = result.stderr.splitlines()
    assert "NoSuchFormat" in line


def test_a_format_is_a_name_not_sql(direct: Store) -> None:
    result = run(direct, "--format", "TSV; DROP TABLE t", SQL)
    assert result.returncode == 2
    assert result.stderr == (
        "sgpipe: --format 'TSV; DROP TABLE t' is not a format name (e.g. TSVWithNames)\n"
    )


def test_a_data_dir_held_by_a_starting_up_is_named(direct: Store, tmp_path: Path) -> None:
    lock = lock_data_dir(tmp_path / "data", "up")
    try:
        result = run(direct, SQL)
    finally:
        lock.release()
    assert result.returncode == 2
    assert result.stderr == (
        f"sgpipe: data dir {tmp_path / 'data'} is in use by another sgpipe up (pid {os.getpid()})\n"
    )


def test_no_store_at_all(tmp_path: Path) -> None:
    result = run(Store(["--data-dir", str(tmp_path / "none")], base_environment()), SQL)
    assert result.returncode == 1
    assert result.stderr == (
        f"sgpipe: no ClickHouse store at {tmp_path / 'none' / 'clickhouse'} "
        "(has `sgpipe up` run here?)\n"
    )
    assert not (tmp_path / "none").exists()
