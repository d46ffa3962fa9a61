"""The embedded ClickHouse as an attacker meets it: the real engine (chdb) behind the real
HTTP server, asked by raw HTTP and by clickhouse-connect.

Every case of the hostile corpus runs as the writer and as the reader and must be refused
with nothing leaked: a canary file's text never appears in a response, a target file is
never written, a listening socket standing in for "the network" never gets a connection.
"""

from __future__ import annotations

import asyncio
import base64
import pathlib
import socket
import threading
from collections.abc import Iterator
from contextlib import closing
from dataclasses import dataclass
from datetime import datetime

import pytest

pytest.importorskip("chdb")

from clickhouse_connect.driver.exceptions import DatabaseError  # noqa: E402

from schemas import clickhouse_migrations  # noqa: E402
from schemas.email_event import EmailEventCodec  # noqa: E402
from sgpipe.embedded.clickhouse import MAX_QUERY_BYTES  # noqa: E402
from sgpipe.embedded.clickhouse_policy import LOCKED_SETTINGS  # noqa: E402
from sgpipe.embedded.credentials import EmbeddedUser  # noqa: E402
from sgpipe.runtime.clickhouse import connect, with_credentials  # noqa: E402
from sgpipe.runtime.migrations import apply_migrations  # noqa: E402
from sgpipe.runtime.settings import ClickHouseSettings  # noqa: E402
from sgpipe.runtime.stage import BatchInfo  # noqa: E402
from sinks.clickhouse import ClickHouseWriter  # noqa: E402
from tests.golden import encoded_events  # noqa: E402
from tests.integration.clickhouse_server import (  # noqa: E402
    DATABASE,
    HttpAnswer,
    Served,
    basic_auth,
    http_request,
    serve,
)

# One xdist worker runs this module (make test: --dist loadgroup): its module-scoped fixture
# (an engine of its own) is then set up once, not once per worker.
pytestmark = [pytest.mark.clickhouse, pytest.mark.xdist_group("clickhouse-lockdown")]

CANARY = "CANARY-7f3a9c-not-for-your-eyes"


@dataclass
class Target:
    """What the attacks aim at: a secret file, a path to write, a port to connect to."""

    secret: pathlib.Path
    out: pathlib.Path
    port: int
    connections: list[int]

    def render(self, sql: str) -> str:
        return sql.format(secret=self.secret, out=self.out, port=self.port)


ALLOWED_ORIGIN = "https://grafana.example"


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    # One server for the module: chdb runs one engine per process.
    directory = tmp_path_factory.mktemp("lockdown")
    with serve(directory, allowed_origins=(ALLOWED_ORIGIN,)) as running:
        with closing(running.client()) as client:
            client.command("CREATE TABLE t (a String) ENGINE = MergeTree ORDER BY a")
            client.insert("t", [["kept"]], column_names=["a"])
            client.command("CREATE TABLE forged (a String) ENGINE = MergeTree ORDER BY a")
        yield running


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    directory = tmp_path_factory.mktemp("target")
    secret = directory / "secret.txt"
    secret.write_text(f"{CANARY}\n")
    listener = socket.create_server(("127.0.0.1", 0))
    connections: list[int] = []

    def accept() -> None:
        while True:
            try:
                connection, _ = listener.accept()
            except OSError:
                return
            connections.append(1)
            connection.close()

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield Target(secret, directory / "out", listener.getsockname()[1], connections)
    finally:
        listener.close()
        thread.join(5)


# --- authentication --------------------------------------------------------------------------


def _credentials_by(method: str, user: str, password: str) -> tuple[dict[str, str], dict[str, str]]:
    """(URL parameters, headers) carrying the credentials the way ``method`` says."""
    if method == "basic":
        token = base64.b64encode(f"{user}:{password}".encode()).decode()
        return {}, {"Authorization": f"Basic {token}"}
    if method == "headers":
        return {}, {"X-ClickHouse-User": user, "X-ClickHouse-Key": password}
    return {"user": user, "password": password}, {}


@pytest.mark.parametrize("method", ["basic", "headers", "parameters"])
def test_each_clickhouse_way_of_passing_credentials_is_accepted(
    served: Served, method: str
) -> None:
    for user in (served.writer, served.reader):
        params, headers = _credentials_by(method, user.name, user.password)
        answer = served.post("SELECT currentDatabase()", params=params, headers=headers)
        assert (answer.status, answer.body) == (200, f"{DATABASE}\n")


@pytest.mark.hostile("clickhouse")
@pytest.mark.parametrize("method", ["basic", "headers", "parameters"])
def test_wrong_credentials_are_refused_like_clickhouse(served: Served, method: str) -> None:
    wrong = [
        (served.writer.name, served.writer.password + "x"),
        (served.writer.name, served.reader.password),  # one user's password, another's name
        (served.reader.name, ""),
        ("default", ""),
        ("nobody", served.writer.password),
    ]
    for user, password in wrong:
        params, headers = _credentials_by(method, user, password)
        answer = served.post("SELECT 1", params=params, headers=headers)
        assert answer.status == 403
        assert answer.code == "516"
        assert answer.body.startswith("Code: 516. DB::Exception: Authentication failed")
        assert "AUTHENTICATION_FAILED" in answer.body


def test_missing_credentials_get_401_without_a_browser_login_prompt(served: Served) -> None:
    for method in ("POST", "GET"):
        answer = served.post("SELECT 1", method=method)
        assert (answer.status, answer.code) == (401, "516")
        assert "WWW-Authenticate" not in answer.headers
    # Like ClickHouse, /ping and a bare GET / need no credentials (and reveal nothing).
    assert http_request(f"{served.url}/ping", None, {}, "GET").body == "Ok.\n"
    assert http_request(f"{served.url}/", None, {}, "GET").body == "Ok.\n"


def test_mixed_or_malformed_credentials_are_refused(served: Served) -> None:
    both = served.post(
        "SELECT 1",
        served.writer,
        params={"user": served.writer.name, "password": served.writer.password},
    )
    assert (both.status, both.code) == (403, "516")
    for header in (
        "Basic !!!notbase64",
        "Bearer abc",
        "Basic " + base64.b64encode(b"\xff").decode(),
    ):
        answer = served.post("SELECT 1", headers={"Authorization": header})
        assert (answer.status, answer.code) == (403, "516")


def test_clickhouse_connect_needs_the_password(served: Served) -> None:
    with pytest.raises(DatabaseError, match="516"):
        served.client(EmbeddedUser(served.writer.name, "guess", readonly=False)).command("SELECT 1")


# --- the reader ---------------------------------------------------------------------------


def test_reader_runs_bi_reads(served: Served) -> None:
    with closing(served.client(served.reader)) as reader:
        assert reader.query("SELECT a FROM t").result_rows == [("kept",)]
        assert reader.command("SELECT getSetting('readonly')") == 2  # enforced by the engine
        # What BI tools send: schema browsing, settings on the request, parameters.
        tables = reader.query(
            "SELECT name FROM system.tables WHERE database = {db:String}",
            parameters={"db": DATABASE},
        )
        assert ("t",) in tables.result_rows
        assert reader.query(
            "SELECT count() FROM t", settings={"max_execution_time": 5, "max_threads": 1}
        ).result_rows == [(1,)]
        assert "a" in reader.command("DESCRIBE TABLE t")
        assert reader.command("EXISTS TABLE t") == 1
        assert "t" in reader.command("SHOW TABLES").split("\n")


READER_WRITES = [
    "INSERT INTO t VALUES ('bi')",
    "INSERT INTO t SELECT 'bi'",
    "INSERT INTO t FORMAT TSV\nbi\n",
    "DROP TABLE t",
    "TRUNCATE TABLE t",
    "ALTER TABLE t DELETE WHERE 1",
    "ALTER TABLE t ADD COLUMN b String",
    "DELETE FROM t WHERE 1",
    "UPDATE t SET a = 'bi' WHERE 1",
    "OPTIMIZE TABLE t FINAL",
    "CREATE TABLE u (a String) ENGINE = Memory",
    "CREATE TEMPORARY TABLE u (a String)",
    "CREATE VIEW v AS SELECT 1",
    "CREATE DATABASE bi",
    "RENAME TABLE t TO u",
    "SET readonly = 0",
    "SET readonly = 1",
    "SELECT 1 SETTINGS readonly = 0",
    "SELECT 1; DROP TABLE t",
    "SELECT 1; INSERT INTO t VALUES ('bi')",
]


@pytest.mark.hostile("clickhouse")
@pytest.mark.parametrize("sql", READER_WRITES)
def test_reader_cannot_write(served: Served, sql: str) -> None:
    answer = served.post(sql, served.reader)
    assert answer.status >= 400, answer.body
    assert answer.code in ("497", "164", "62"), answer.body
    assert served.post("SELECT a FROM t", served.reader).body == "kept\n"


def test_reader_cannot_lift_readonly_through_the_url(served: Served) -> None:
    answer = served.post("SELECT getSetting('readonly')", served.reader, params={"readonly": "0"})
    assert (answer.status, answer.code) == (500, "164")
    with closing(served.client(served.reader)) as reader:
        with pytest.raises(DatabaseError):
            reader.insert("t", [["bi"]], column_names=["a"])
        with pytest.raises(DatabaseError):
            reader.command("DROP TABLE t")
        assert reader.query("SELECT a FROM t").result_rows == [("kept",)]


def test_a_get_runs_read_only_whatever_its_parameters_say(served: Served) -> None:
    # issue 15: a writer's GET with readonly=0 ran INSERT and DROP.
    with closing(served.client()) as client:
        client.command("CREATE TABLE got (a String) ENGINE = MergeTree ORDER BY a")
    for readonly in ("0", ""):
        for sql in ("INSERT INTO got VALUES ('x')", "DROP TABLE got"):
            answer = served.post(sql, served.writer, method="GET", params={"readonly": readonly})
            assert (answer.status, answer.code) == (500, "164"), answer.body
    answer = served.post("SELECT getSetting('readonly')", served.writer, method="GET")
    assert answer.body == "2\n"
    answer = served.post(
        "DROP TABLE got", served.writer, method="GET", params={"readonly": "1"}
    )  # a stricter readonly is still read-only
    assert (answer.status, answer.code) == (500, "164"), answer.body
    assert served.post("SELECT count() FROM got", served.writer).body == "0\n"


@pytest.mark.hostile("clickhouse")
def test_an_oversized_statement_gets_413_and_is_never_held_whole(served: Served) -> None:
    # issue 15: a 100 MB POST by the reader grew the engine's process by 3.4 GB.
    huge = "SELECT 1 -- " + "x" * (MAX_QUERY_BYTES * 8) + "\n"
    for user in (served.reader, served.writer):
        answer = served.post(huge, user)
        assert (answer.status, answer.code) == (413, "393"), answer.body[:200]
        assert "embedded.clickhouse_max_query_bytes" in answer.body
    # As a multipart form field (clickhouse-connect's way for large parameters), too.
    boundary = "sgpipe-boundary"
    form = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="query"\r\n\r\n{huge}\r\n'
        f"--{boundary}--\r\n"
    ).encode()
    answer = http_request(
        served.query_url,
        form,
        {**basic_auth(served.reader), "Content-Type": f"multipart/form-data; boundary={boundary}"},
    )
    assert (answer.status, answer.code) == (413, "393"), answer.body[:200]
    # Rows are not statement text: a streamed insert larger than the cap is stored.
    with closing(served.client()) as client:
        client.command("CREATE TABLE big (a String) ENGINE = MergeTree ORDER BY a")
    rows = "".join(f"{'y' * 1000}{i}\n" for i in range(2 * MAX_QUERY_BYTES // 1000))
    answer = served.post("INSERT INTO big FORMAT TSV\n" + rows, served.writer)
    assert answer.status == 200, answer.body
    assert served.post("SELECT count() FROM big", served.writer).body == (
        f"{2 * MAX_QUERY_BYTES // 1000}\n"
    )


# Column and alias names that are also keywords: ordinary names, for both users.
KEYWORD_NAMES = ("engine", "url", "file", "settings", "format")


@pytest.mark.parametrize("who", ["writer", "reader"])
def test_keyword_like_names_are_ordinary_names(served: Served, who: str) -> None:
    with closing(served.client()) as client:
        client.command(
            "CREATE TABLE IF NOT EXISTS kw (engine String, url String, file String, "
            "settings String, format String) ENGINE = MergeTree ORDER BY engine"
        )
        client.command("TRUNCATE TABLE kw")
        client.insert("kw", [["e", "u", "f", "s", "x"], ["e", "u2", "f", "s", "x"]])
    user = served.writer if who == "writer" else served.reader
    columns = ", ".join(KEYWORD_NAMES)
    queries = {
        # What Superset, Grafana and Metabase send to list tables.
        "SELECT name, engine FROM system.tables WHERE database = currentDatabase() "
        "AND name = 't' FORMAT TSV": "t\tMergeTree\n",
        f"SELECT {columns} FROM kw WHERE engine = 'e' AND url = 'u' AND file = 'f' "
        "AND settings = 's' AND format = 'x' FORMAT TSV": "e\tu\tf\ts\tx\n",
        f"SELECT {columns}, count() AS n FROM kw GROUP BY {columns} ORDER BY {columns} "
        "FORMAT TSV": "e\tu\tf\ts\tx\t1\ne\tu2\tf\ts\tx\t1\n",
        "SELECT concat(url, '!') AS engine, 1 AS file, 2 AS settings, 3 AS format FROM kw "
        "ORDER BY engine FORMAT TSV": "u!\t1\t2\t3\nu2!\t1\t2\t3\n",
        "SELECT engine AS format FROM system.tables WHERE name = 'kw' "
        "AND database = currentDatabase() GROUP BY format FORMAT TSV": "MergeTree\n",
    }
    for sql, expected in queries.items():
        answer = served.post(sql, user)
        assert (answer.status, answer.body) == (200, expected), sql


# --- the hostile corpus ---------------------------------------------------------------------

ACCESS_DENIED = frozenset({"497"})
CONSTRAINT = frozenset({"452"})

# (name, statement, extra URL parameters, the writer's expected error codes). {secret},
# {out} and {port} are filled in. The reader's answer must be a refusal too (any of the
# refusal codes: its own allowlist answers first for writes).
# fmt: off
HOSTILE: list[tuple[str, str, dict[str, str], frozenset[str]]] = [
    # reading files
    ("file", "SELECT * FROM file('{secret}', 'LineAsString')", {}, ACCESS_DENIED),
    ("file_case", "sElEcT * FrOm FiLe('{secret}', 'LineAsString')", {}, ACCESS_DENIED),
    ("file_quoted", "SELECT * FROM `file`('{secret}', 'LineAsString')", {}, ACCESS_DENIED),
    ("file_comments", "SELECT/**/*/**/FROM/**/file/**/('{secret}', 'LineAsString')", {}, ACCESS_DENIED),
    ("file_newlines", "SELECT *\n FROM\n file\n(\n'{secret}',\n'LineAsString')", {}, ACCESS_DENIED),
    ("file_nested", "SELECT * FROM (SELECT * FROM (SELECT * FROM file('{secret}', 'LineAsString')))", {}, ACCESS_DENIED),
    ("file_with", "WITH x AS (SELECT * FROM file('{secret}', 'LineAsString')) SELECT * FROM x", {}, ACCESS_DENIED),
    ("file_union", "SELECT 'a' UNION ALL SELECT * FROM file('{secret}', 'LineAsString')", {}, ACCESS_DENIED),
    ("file_in_view", "SELECT * FROM view(SELECT * FROM file('{secret}', 'LineAsString'))", {}, ACCESS_DENIED),
    ("file_in_subquery_filter", "SELECT 1 WHERE 1 IN (SELECT length(line) FROM file('{secret}', 'LineAsString', 'line String'))", {}, ACCESS_DENIED),
    ("file_scalar", "SELECT file('{secret}')", {}, ACCESS_DENIED),
    ("file_scalar_lambda", "SELECT arrayMap(x -> file(x), ['{secret}'])", {}, ACCESS_DENIED),
    ("file_scalar_heredoc", "SELECT file($${secret}$$)", {}, ACCESS_DENIED),
    ("file_scalar_alias", "WITH '{secret}' AS p SELECT file(p)", {}, ACCESS_DENIED),
    ("filesystem_database", "SELECT * FROM default.`{secret}`", {}, ACCESS_DENIED),
    ("filesystem_database_bare", 'SELECT * FROM "{secret}"', {"database": "default"}, ACCESS_DENIED),
    ("filesystem_identifier_parameter", "SELECT * FROM {{t:Identifier}}", {"database": "default", "param_t": "SECRET"}, ACCESS_DENIED),
    ("describe_file", "DESCRIBE TABLE file('{secret}', 'LineAsString')", {}, ACCESS_DENIED),
    ("explain_file", "EXPLAIN SYNTAX SELECT * FROM file('{secret}', 'LineAsString')", {}, ACCESS_DENIED),
    ("create_as_file", "CREATE TABLE f1 AS file('{secret}', 'LineAsString')", {}, ACCESS_DENIED),
    ("create_select_file", "CREATE TABLE f2 ENGINE = MergeTree ORDER BY tuple() AS SELECT * FROM file('{secret}', 'LineAsString')", {}, ACCESS_DENIED),
    ("create_default_file", "CREATE TABLE f3 (a String DEFAULT file('{secret}')) ENGINE = MergeTree ORDER BY a", {}, ACCESS_DENIED),
    ("alter_default_file", "ALTER TABLE t MODIFY COLUMN a String DEFAULT file('{secret}')", {}, ACCESS_DENIED),
    ("view_over_file", "CREATE VIEW v1 AS SELECT * FROM file('{secret}', 'LineAsString')", {}, ACCESS_DENIED),
    ("insert_select_file", "INSERT INTO t SELECT * FROM file('{secret}', 'LineAsString')", {}, ACCESS_DENIED),
    ("insert_values_file", "INSERT INTO t VALUES (file('{secret}'))", {}, frozenset({"344"})),
    ("insert_format_values_file", "INSERT INTO t FORMAT Values (file('{secret}'))", {}, frozenset({"344"})),
    ("insert_from_infile", "INSERT INTO t FROM INFILE '{secret}' FORMAT LineAsString", {}, ACCESS_DENIED),
    ("sqlite", "SELECT * FROM sqlite('{secret}', 't')", {}, ACCESS_DENIED),
    ("iceberg_local", "SELECT * FROM icebergLocal('{secret}')", {}, ACCESS_DENIED),
    ("file_cluster", "SELECT * FROM fileCluster('default', '{secret}')", {}, ACCESS_DENIED),
    ("chdb_filesystem", "SELECT * FROM filesystem('/')", {}, ACCESS_DENIED),
    ("chdb_python", "SELECT * FROM python(served)", {}, ACCESS_DENIED),
    ("format_schema_file", "SELECT 1 FORMAT CapnProto SETTINGS format_schema = '{secret}:M'", {}, CONSTRAINT),
    ("format_schema_url_setting", "SELECT 1", {"format_schema": "{secret}:M"}, CONSTRAINT),
    ("template_file", "SELECT 1 FORMAT Template SETTINGS format_template_row = '{secret}'", {}, CONSTRAINT),
    ("function_by_parameter", "SELECT {{f:Identifier}}('{secret}')", {"param_f": "file"}, frozenset({"497", "62"})),
    # the network
    ("url", "SELECT * FROM url('http://127.0.0.1:{port}/', 'LineAsString')", {}, ACCESS_DENIED),
    ("url_insert_function", "INSERT INTO FUNCTION url('http://127.0.0.1:{port}/', 'TSV', 'a String') SELECT 'x'", {}, ACCESS_DENIED),
    ("s3", "SELECT * FROM s3('http://127.0.0.1:{port}/b/k', 'LineAsString')", {}, ACCESS_DENIED),
    ("s3_cluster", "SELECT * FROM s3Cluster('default', 'http://127.0.0.1:{port}/b/k', 'LineAsString')", {}, ACCESS_DENIED),
    ("url_cluster", "SELECT * FROM urlCluster('default', 'http://127.0.0.1:{port}/')", {}, ACCESS_DENIED),
    ("hdfs", "SELECT * FROM hdfs('hdfs://127.0.0.1:{port}/x', 'LineAsString')", {}, ACCESS_DENIED),
    ("remote", "SELECT * FROM remote('127.0.0.1:{port}', system.one)", {}, ACCESS_DENIED),
    ("remote_secure", "SELECT * FROM remoteSecure('127.0.0.1:{port}', system.one)", {}, ACCESS_DENIED),
    ("cluster", "SELECT * FROM cluster('default', system.one)", {}, ACCESS_DENIED),
    ("mysql", "SELECT * FROM mysql('127.0.0.1:{port}', 'd', 't', 'u', 'p')", {}, ACCESS_DENIED),
    ("postgresql", "SELECT * FROM postgresql('127.0.0.1:{port}', 'd', 't', 'u', 'p')", {}, ACCESS_DENIED),
    ("mongodb", "SELECT * FROM mongodb('127.0.0.1:{port}', 'd', 't', 'u', 'p', 'a String')", {}, ACCESS_DENIED),
    ("redis", "SELECT * FROM redis('127.0.0.1:{port}', 'k', 'k String')", {}, ACCESS_DENIED),
    ("jdbc", "SELECT * FROM jdbc('jdbc:mysql://127.0.0.1:{port}/d', 't')", {}, ACCESS_DENIED),
    ("odbc", "SELECT * FROM odbc('DSN=x', 't')", {}, ACCESS_DENIED),
    ("azure", "SELECT * FROM azureBlobStorage('http://127.0.0.1:{port}/a', 'c', 'b')", {}, ACCESS_DENIED),
    ("gcs", "SELECT * FROM gcs('http://127.0.0.1:{port}/b/k', 'LineAsString')", {}, ACCESS_DENIED),
    ("iceberg", "SELECT * FROM iceberg('http://127.0.0.1:{port}/t')", {}, ACCESS_DENIED),
    ("delta_lake", "SELECT * FROM deltaLake('http://127.0.0.1:{port}/t')", {}, ACCESS_DENIED),
    ("hudi", "SELECT * FROM hudi('http://127.0.0.1:{port}/t')", {}, ACCESS_DENIED),
    ("dictionary", "SELECT * FROM dictionary('d')", {}, ACCESS_DENIED),
    ("executable", "SELECT * FROM executable('x.sh', 'TSV', 'a String')", {}, ACCESS_DENIED),
    ("input", "SELECT * FROM input('a String')", {}, ACCESS_DENIED),
    ("merge", "SELECT * FROM merge('default', '.*')", {}, ACCESS_DENIED),
    ("ai_function", "SELECT aiGenerate('hello')", {}, ACCESS_DENIED),
    ("web_disk", "CREATE TABLE k2 (a Int) ENGINE = MergeTree ORDER BY a SETTINGS disk = disk(type = 'web', endpoint = 'http://127.0.0.1:{port}/')", {}, ACCESS_DENIED),
    ("web_disk_alter", "ALTER TABLE t MODIFY SETTING disk = disk(type = 'web', endpoint = 'http://127.0.0.1:{port}/')", {}, ACCESS_DENIED),
    ("avro_registry", "SELECT 1", {"format_avro_schema_registry_url": "http://127.0.0.1:{port}/"}, CONSTRAINT),
    # writing files
    ("insert_function_file", "INSERT INTO FUNCTION file('{out}', 'TSV', 'a String') VALUES ('x')", {}, ACCESS_DENIED),
    ("insert_function_file_select", "INSERT INTO FUNCTION file('{out}', 'TSV', 'a String') SELECT 'x'", {}, ACCESS_DENIED),
    ("insert_function_file_streamed", "INSERT INTO FUNCTION file('{out}', 'TSV', 'a String') FORMAT TSV\nx\n", {}, ACCESS_DENIED),
    ("into_outfile", "SELECT 'x' INTO OUTFILE '{out}'", {}, ACCESS_DENIED),
    ("into_outfile_stdout", "SELECT 'x' INTO OUTFILE '{out}' AND STDOUT", {}, ACCESS_DENIED),
    ("local_disk", "CREATE TABLE k1 (a Int) ENGINE = MergeTree ORDER BY a SETTINGS disk = disk(type = 'local', path = '{out}/')", {}, ACCESS_DENIED),
    ("named_disk", "CREATE TABLE k3 (a Int) ENGINE = MergeTree ORDER BY a SETTINGS disk = 'default'", {}, ACCESS_DENIED),
    ("tinylog_disk", "CREATE TABLE k4 (a Int) ENGINE = TinyLog SETTINGS disk = 'default'", {}, ACCESS_DENIED),
    ("log_disk_local", "CREATE TABLE k5 (a Int) ENGINE = Log SETTINGS disk = disk(type = 'local', path = '{out}/')", {}, ACCESS_DENIED),
    ("storage_policy", "CREATE TABLE k6 (a Int) ENGINE = MergeTree ORDER BY a SETTINGS storage_policy = 'default'", {}, ACCESS_DENIED),
    ("storage_policy_alter", "ALTER TABLE t MODIFY SETTING storage_policy = 'default'", {}, ACCESS_DENIED),
    ("show_create_into_outfile", "SHOW CREATE TABLE t INTO OUTFILE '{out}'", {}, ACCESS_DENIED),
    ("describe_into_outfile", "DESCRIBE TABLE t INTO OUTFILE '{out}'", {}, ACCESS_DENIED),
    ("backup", "BACKUP TABLE t TO File('{out}')", {}, ACCESS_DENIED),
    ("restore", "RESTORE TABLE t FROM File('{out}')", {}, ACCESS_DENIED),
    ("attach_from_path", "ATTACH TABLE at FROM '{out}' (a String) ENGINE = MergeTree ORDER BY a", {}, ACCESS_DENIED),
    ("detach", "DETACH TABLE t", {}, ACCESS_DENIED),
    ("freeze", "ALTER TABLE t FREEZE", {}, ACCESS_DENIED),
    ("record_errors_file", "SELECT 1", {"input_format_record_errors_file_path": "{out}"}, CONSTRAINT),
    # engines and sources that reach out
    ("engine_file", "CREATE TABLE e1 (a String) ENGINE = File(TSV, '{out}')", {}, ACCESS_DENIED),
    ("engine_url", "CREATE TABLE e2 (a String) ENGINE = URL('http://127.0.0.1:{port}/', TSV)", {}, ACCESS_DENIED),
    ("engine_s3", "CREATE TABLE e3 (a String) ENGINE = S3('http://127.0.0.1:{port}/b/k', 'TSV')", {}, ACCESS_DENIED),
    ("engine_executable", "CREATE TABLE e4 (a String) ENGINE = Executable('x.sh', 'TSV')", {}, ACCESS_DENIED),
    ("engine_mysql", "CREATE TABLE e5 (a String) ENGINE = MySQL('127.0.0.1:{port}', 'd', 't', 'u', 'p')", {}, ACCESS_DENIED),
    ("engine_distributed", "CREATE TABLE e6 (a String) ENGINE = Distributed('default', 'test', 't')", {}, ACCESS_DENIED),
    ("engine_kafka", "CREATE TABLE e7 (a String) ENGINE = Kafka SETTINGS kafka_broker_list = '127.0.0.1:{port}', kafka_topic_list = 't', kafka_group_name = 'g', kafka_format = 'TSV'", {}, ACCESS_DENIED),
    ("engine_filelog", "CREATE TABLE e8 (a String) ENGINE = FileLog('{secret}', 'TSV')", {}, ACCESS_DENIED),
    ("engine_dictionary", "CREATE TABLE e10 (a String) ENGINE = Dictionary(d)", {}, ACCESS_DENIED),
    ("engine_quoted", "CREATE TABLE e11 (a String) ENGINE = `URL`('http://127.0.0.1:{port}/', TSV)", {}, ACCESS_DENIED),
    ("database_filesystem", "CREATE DATABASE fs ENGINE = Filesystem('/')", {}, ACCESS_DENIED),
    ("database_sqlite", "CREATE DATABASE sq ENGINE = SQLite('{secret}')", {}, ACCESS_DENIED),
    ("database_mysql", "CREATE DATABASE my ENGINE = MySQL('127.0.0.1:{port}', 'd', 'u', 'p')", {}, ACCESS_DENIED),
    ("dictionary_file", "CREATE DICTIONARY d1 (a UInt64) PRIMARY KEY a SOURCE(FILE(path '{secret}' format 'TSV')) LAYOUT(FLAT()) LIFETIME(0)", {}, ACCESS_DENIED),
    ("dictionary_http", "CREATE DICTIONARY d2 (a UInt64) PRIMARY KEY a SOURCE(HTTP(url 'http://127.0.0.1:{port}/' format 'TSV')) LAYOUT(FLAT()) LIFETIME(0)", {}, ACCESS_DENIED),
    ("dictionary_clickhouse", "CREATE DICTIONARY d3 (a UInt64) PRIMARY KEY a SOURCE(CLICKHOUSE(host '127.0.0.1' port {port} table 't')) LAYOUT(FLAT()) LIFETIME(0)", {}, ACCESS_DENIED),
    ("default_engine_setting", "SET default_table_engine = 'Log'", {}, CONSTRAINT),
    # the engine itself and access control
    ("system_reload", "SYSTEM RELOAD CONFIG", {}, ACCESS_DENIED),
    ("system_shutdown", "SYSTEM SHUTDOWN", {}, ACCESS_DENIED),
    ("system_dns", "SYSTEM DROP DNS CACHE", {}, ACCESS_DENIED),
    ("kill", "KILL QUERY WHERE 1", {}, ACCESS_DENIED),
    ("create_user", "CREATE USER evil IDENTIFIED BY 'x'", {}, ACCESS_DENIED),
    ("grant", "GRANT ALL ON *.* TO default", {}, ACCESS_DENIED),
    ("set_role", "SET ROLE ALL", {}, ACCESS_DENIED),
    ("execute_as", "EXECUTE AS default SELECT 1", {}, ACCESS_DENIED),
    ("create_function", "CREATE FUNCTION f AS x -> x", {}, ACCESS_DENIED),
    ("system_users", "SELECT * FROM system.users", {}, ACCESS_DENIED),
    ("system_stack_trace", "SELECT * FROM system.stack_trace", {}, ACCESS_DENIED),
    ("system_stack_trace_view", "SELECT * FROM view(SELECT thread_name FROM system.stack_trace)", {}, ACCESS_DENIED),
    ("system_stack_trace_in", "SELECT 1 WHERE 'pytest' IN system.stack_trace", {}, ACCESS_DENIED),
    ("system_stack_trace_database", "SELECT * FROM stack_trace", {"database": "system"}, ACCESS_DENIED),
    ("dialect", "SET dialect = 'kusto'", {}, CONSTRAINT),
    ("dialect_url_setting", "SELECT 1", {"dialect": "prql"}, CONSTRAINT),
    ("values_expressions", "SET input_format_values_interpret_expressions = 1", {}, CONSTRAINT),
    ("ai_setting", "SET allow_experimental_ai_functions = 1", {}, CONSTRAINT),
    ("introspection", "SET allow_introspection_functions = 1", {}, CONSTRAINT),
    # multi-statements
    ("multi", "SELECT 1; SELECT * FROM file('{secret}', 'LineAsString')", {}, frozenset({"62"})),
    ("multi_after_comment", "SELECT 1 -- c\n; SELECT file('{secret}')", {}, frozenset({"62"})),
    ("multi_drop", "SELECT 1; DROP TABLE t", {}, frozenset({"62"})),
    ("multi_in_query_parameter", "SELECT * FROM t", {"query": "SELECT 1;"}, frozenset({"62"})),
]
# fmt: on


@pytest.mark.hostile("clickhouse")
@pytest.mark.parametrize(
    ("sql", "params", "codes"),
    [pytest.param(sql, params, codes, id=name) for name, sql, params, codes in HOSTILE],
)
@pytest.mark.parametrize("who", ["writer", "reader"])
def test_hostile_statement_is_refused_with_nothing_leaked(
    served: Served,
    target: Target,
    who: str,
    sql: str,
    params: dict[str, str],
    codes: frozenset[str],
) -> None:
    user = served.writer if who == "writer" else served.reader
    statement = target.render(sql)
    rendered = {
        name: target.render(value).replace("SECRET", str(target.secret))
        for name, value in params.items()
    }
    before = len(target.connections)
    answer = served.post(statement, user, params=rendered)
    assert answer.status >= 400, answer.body
    expected = codes if who == "writer" else codes | {"497", "164"}
    assert answer.code in expected, answer.body
    assert CANARY not in answer.body
    assert not target.out.exists()
    assert len(target.connections) == before
    # The store is untouched.
    assert served.post("SELECT a FROM t", served.writer).body == "kept\n"


def test_the_corpus_is_large(served: Served) -> None:
    # The brief's classes, each with obfuscations: keep the corpus from shrinking unnoticed.
    assert len(HOSTILE) >= 100


def test_sql_after_inline_data_is_data_never_a_statement(served: Served, target: Target) -> None:
    # clickhouse-local would run a statement on the line after an INSERT's inline data; here
    # the rows are streamed into the insert as data, so the "statement" is just a string.
    with closing(served.client()) as client:
        client.command("CREATE TABLE smuggle (a String) ENGINE = MergeTree ORDER BY a")
    line = target.render("SELECT * FROM file('{secret}', 'LineAsString')")
    answer = served.post(f"INSERT INTO smuggle FORMAT TSV\nx\n{line}\n", served.writer)
    assert answer.status == 200, answer.body
    stored = served.post("SELECT a FROM smuggle ORDER BY a FORMAT TSVRaw", served.writer).body
    assert stored == f"{line}\nx\n"
    assert CANARY not in stored
    # A statement in a comment stays a comment.
    hidden = served.post(target.render("SELECT 1 /* ; SELECT file('{secret}') */"), served.writer)
    assert (hidden.status, hidden.body) == (200, "1\n")


def test_streamed_insert_heads_are_checked_before_the_engine_sees_them(
    served: Served, target: Target
) -> None:
    # Refused by the statement check itself (its message), not only by the engine's grants.
    for head in (
        "INSERT INTO FUNCTION file('{out}', 'TSV', 'a String') FORMAT TSV",
        "INSERT INTO FUNCTION python(x) FORMAT TSV",
        "INSERT INTO FUNCTION url('http://127.0.0.1:{port}/', 'TSV', 'a String') FORMAT TSV",
    ):
        answer = served.post(target.render(head) + "\nx\n", served.writer)
        assert (answer.status, answer.code) == (403, "497"), answer.body
        assert "reaches outside the store" in answer.body
    assert not target.out.exists()


def test_rows_after_an_insert_select_are_refused_not_lost(served: Served) -> None:
    with closing(served.client()) as client:
        client.command("CREATE TABLE dropped (n UInt8) ENGINE = MergeTree ORDER BY n")
    answer = served.post("INSERT INTO dropped SELECT 1 FORMAT TSV\n5\n", served.writer)
    assert (answer.status, answer.code) == (400, "62"), answer.body
    assert served.post("SELECT count() FROM dropped", served.writer).body == "0\n"


def test_what_runs_is_the_checked_canonical_form(served: Served) -> None:
    # The engine reports the text it is running: the canonical form, not the client's.
    sql = "select   query FROM system.processes -- a comment\nWHERE query_id = queryID() /* x */"
    answer = served.post(sql + " FORMAT TSVRaw", served.reader)
    assert answer.body == (
        "SELECT query FROM system.processes WHERE query_id = queryID() FORMAT TSVRaw\n"
    )


def test_values_rows_are_inserted_as_data(served: Served) -> None:
    with closing(served.client()) as client:
        client.command("CREATE TABLE vals (a String, n UInt8) ENGINE = MergeTree ORDER BY a")
    answer = served.post("INSERT INTO vals (a, n) VALUES ('x', 1), ('y;z', 2);", served.writer)
    assert answer.status == 200, answer.body
    rows = served.post("SELECT a, n FROM vals ORDER BY a FORMAT TSVRaw", served.writer).body
    assert rows == "x\t1\ny;z\t2\n"


def test_engine_runs_with_sgpipe_access_control(served: Served) -> None:
    with closing(served.client()) as client:
        grants = client.command("SHOW GRANTS")
        unlocked = client.query(
            "SELECT name FROM system.settings WHERE name IN {names:Array(String)} AND readonly = 0",
            parameters={"names": [n for n in LOCKED_SETTINGS if not n.startswith("merge_tree_")]},
        )
    assert unlocked.result_rows == []
    for power in (
        "SOURCES",
        "READ",
        "WRITE",
        " FILE",
        " URL",
        "REMOTE",
        "SYSTEM",
        "ALL",
        "dictGet",
    ):
        assert power not in str(grants), grants
    assert "TABLE ENGINE ON File" not in str(grants)


# --- browsers ---------------------------------------------------------------------------------


def _csrf_post(served: Served, headers: dict[str, str]) -> HttpAnswer:
    """The shape a web page can make a browser send without asking: a text/plain POST, with
    credentials in the URL (as a page that learned them would put them)."""
    query = f"user={served.writer.name}&password={served.writer.password}&database={DATABASE}"
    return http_request(
        f"{served.url}/?{query}",
        b"INSERT INTO forged VALUES ('forged')",
        {"Content-Type": "text/plain;charset=UTF-8", **headers},
    )


@pytest.mark.hostile("clickhouse")
@pytest.mark.parametrize(
    "headers",
    [
        {"Origin": "https://evil.example"},
        {"Origin": "null"},  # sandboxed iframes, file:// pages, redirects
        {"Origin": "http://127.0.0.1:1"},  # another local port is another origin
        {"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "no-cors"},  # Origin stripped
        {"Sec-Fetch-Site": "same-site", "Sec-Fetch-Mode": "cors"},
        {"Sec-Fetch-Mode": "navigate", "Sec-Fetch-Site": "none"},  # a form submission
        {"Host": "attacker.example"},  # DNS rebinding: the page's own name, now 127.0.0.1
    ],
    ids=["foreign", "null", "other_port", "cross_site", "same_site", "form", "rebinding"],
)
def test_browser_requests_are_refused(served: Served, headers: dict[str, str]) -> None:
    answer = _csrf_post(served, headers)
    assert (answer.status, answer.code) == (403, "497")
    assert not [name for name in answer.headers if name.lower().startswith("access-control-")]
    # The forged insert did not happen.
    count = served.post("SELECT count() FROM forged", served.writer)
    assert count.body == "0\n"


def test_browser_preflight_and_reads_are_refused(served: Served) -> None:
    for method in ("OPTIONS", "GET"):
        answer = http_request(
            f"{served.url}/?query=SELECT%201",
            None,
            {"Origin": "https://evil.example", **basic_auth(served.writer)},
            method,
        )
        assert answer.status == 403
        assert not [name for name in answer.headers if name.lower().startswith("access-control")]
    ping = http_request(f"{served.url}/ping", None, {"Origin": "https://evil.example"}, "GET")
    assert ping.status == 403


def test_an_allowed_origin_and_ordinary_clients_get_through(served: Served) -> None:
    allowed = served.post(
        "SELECT 1",
        served.reader,
        headers={"Origin": ALLOWED_ORIGIN, "Sec-Fetch-Site": "cross-site"},
    )
    assert (allowed.status, allowed.body) == (200, "1\n")
    assert not [name for name in allowed.headers if name.lower().startswith("access-control")]
    # curl's --data-binary shape: a form content type, but no browser headers.
    curl = served.post(
        "SELECT 2",
        served.writer,
        headers={"Content-Type": "application/x-www-form-urlencoded", "Host": "localhost"},
    )
    assert (curl.status, curl.body) == (200, "2\n")


def test_a_query_id_cannot_inject_response_headers(served: Served) -> None:
    for query_id in ("a\r\nX-Injected: 1", "a\nX-Injected: 1", "\x00"):
        for user in (served.writer, None):  # before and after authentication
            answer = served.post("SELECT 1", user, params={"query_id": query_id})
            assert answer.status in (200, 401)
            assert "X-Injected" not in answer.headers
            assert answer.headers["X-ClickHouse-Query-Id"] != query_id
    kept = served.post("SELECT 1", served.writer, params={"query_id": "my-query-1"})
    assert kept.headers["X-ClickHouse-Query-Id"] == "my-query-1"


# --- what sgpipe itself does still works ---------------------------------------------------


async def test_writer_runs_migrations_and_the_sink_insert(served: Served) -> None:
    database = "sgpipe_sink"
    settings = with_credentials(
        ClickHouseSettings(database=database), served.writer.name, served.writer.password
    )
    client = await connect(settings, served.url)
    try:
        applied = await apply_migrations(client, database)
        assert applied == [name for name, _ in clickhouse_migrations()]
        assert await apply_migrations(client, database) == []  # idempotent
        # A SendGrid event as the processor encodes it and the sink decodes it.
        codec = EmailEventCodec()
        element = (
            b'{"email":"a@example.com","event":"delivered","sg_event_id":"ev-1",'
            b'"sg_message_id":"msg-1","timestamp":1714564800,"category":"welcome"}'
        )
        (value,) = encoded_events([element], codec)
        record = codec.decode(value)
        # The sink's own writer: connects, migrates, checks the table, inserts.
        writer = ClickHouseWriter(settings, served.url, stage="sink")
        await writer.start()
        try:
            await writer.probe()
            batch = BatchInfo({("sgpipe.events", 0): (0, 1)})
            await writer.write([record, codec.decode(value)], batch=batch)  # delivered twice
        finally:
            await writer.stop()
        final = await client.query(f"SELECT event, email FROM {database}.email_events FINAL")
        assert final.result_rows == [("delivered", "a@example.com")]
    finally:
        await client.close()

    # The README's query, through `sgpipe query`'s HTTP path (the writer, no flags).
    readme = served.post(
        "SELECT event, email, event_time FROM email_events FINAL",
        served.writer,
        params={"database": database},
    )
    assert readme.body == "delivered\ta@example.com\t2024-05-01 12:00:00.000\n"


def test_writer_runs_the_ddl_bi_tables_need(served: Served) -> None:
    statements = [
        "CREATE TABLE ev (id String, email String, day Date, n UInt8) "
        "ENGINE = ReplacingMergeTree PARTITION BY toYYYYMM(day) ORDER BY (day, id) "
        "TTL day + INTERVAL 10 YEAR SETTINGS non_replicated_deduplication_window = 100",
        "CREATE TABLE daily (day Date, events AggregateFunction(uniqExact, String)) "
        "ENGINE = AggregatingMergeTree ORDER BY day",
        "CREATE MATERIALIZED VIEW daily_mv TO daily AS "
        "SELECT day, uniqExactState(id) AS events FROM ev GROUP BY day",
        "CREATE TABLE sums (day Date, n UInt64) ENGINE = SummingMergeTree ORDER BY day",
        "CREATE VIEW ev_dedup AS SELECT * FROM ev FINAL",
        "ALTER TABLE ev ADD INDEX email_idx email TYPE bloom_filter GRANULARITY 4",
        "ALTER TABLE ev MODIFY TTL day + INTERVAL 20 YEAR",
        "ALTER TABLE ev ADD COLUMN extra String DEFAULT ''",
    ]
    with closing(served.client()) as client:
        for statement in statements:
            client.command(statement)
        rows = [["e1", "x@example.com", datetime(2024, 5, 1).date(), 1]]
        token = {"insert_deduplication_token": "topic-0-0-10"}
        for _ in range(2):  # a retried insert with the same token is stored once
            client.insert("ev", rows, column_names=["id", "email", "day", "n"], settings=token)
        assert client.command("SELECT count() FROM ev") == 1
        assert client.command("SELECT uniqExactMerge(events) FROM daily") == 1
        client.command(
            "ALTER TABLE ev DELETE WHERE email = 'x@example.com' SETTINGS mutations_sync = 2"
        )
        client.command("DELETE FROM ev WHERE id = 'none'")
        client.command("OPTIMIZE TABLE ev FINAL")
        assert client.command("SELECT count() FROM ev_dedup") == 0
        client.command("RENAME TABLE sums TO sums2")
        client.command("TRUNCATE TABLE sums2")
        client.command("DROP VIEW ev_dedup")
        client.command("DROP TABLE sums2")
        client.command("CREATE DATABASE IF NOT EXISTS other")
        client.command("DROP DATABASE other")


async def test_async_client_handshake_as_reader(served: Served) -> None:
    import clickhouse_connect

    client = await clickhouse_connect.get_async_client(
        host="127.0.0.1",
        port=served.port,
        username=served.reader.name,
        password=served.reader.password,
        database=DATABASE,
    )
    try:
        assert (await client.query("SELECT a FROM t")).result_rows == [("kept",)]
    finally:
        await client.close()


def test_concurrent_requests_of_both_users(served: Served) -> None:
    async def run() -> list[HttpAnswer]:
        calls = [
            asyncio.to_thread(served.post, "SELECT count() FROM t", user)
            for user in (served.writer, served.reader) * 8
        ]
        return list(await asyncio.gather(*calls))

    answers = asyncio.run(run())
    assert {(answer.status, answer.body) for answer in answers} == {(200, "1\n")}
