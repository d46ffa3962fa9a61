"""The statement check on the engine's own syntax tree: statements are parsed by chdb (the
same engine the server runs) exactly as the HTTP layer does, then checked. The server-side
half (grants, the HTTP layer) is tested in tests/integration/test_clickhouse_lockdown.py."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

chdb = pytest.importorskip("chdb")

from sgpipe.embedded.clickhouse import EmbeddedQueryError, _parsed_statement  # noqa: E402
from sgpipe.embedded.clickhouse_policy import (  # noqa: E402
    Statement,
    StatementDenied,
    StatementPolicy,
    check_statement,
    escape_query_parameter,
)

POLICY = StatementPolicy.from_engine(
    ["file", "url", "numbers", "view", "format", "python", "Remote", "s3"],
    ["file", "format", "aiGenerate", "AIEmbed", "airline", "concat"],
)


@pytest.fixture(scope="module")
def conn() -> Iterator[object]:
    connection = chdb.connect(":memory:")
    yield connection
    connection.close()


def parse(conn: object, sql: str) -> Statement:
    return _parsed_statement(conn, sql)  # type: ignore[arg-type]


def test_policy_denies_table_functions_but_the_safe_ones() -> None:
    assert {"file", "url", "python", "remote", "s3", "disk", "aigenerate", "aiembed"} <= (
        POLICY.denied_functions
    )
    assert not {"numbers", "view", "format", "concat", "airline"} & POLICY.denied_functions


ALLOWED_FOR_BOTH = [
    "SELECT 1",
    "SELECT count() FROM sgpipe.email_events FINAL WHERE event = 'open' FORMAT Native",
    "WITH x AS (SELECT 1) SELECT * FROM x",
    "SELECT * FROM numbers(10)",
    "SELECT format('{}', 1), concat('file(', 'x')",  # a string is never a call
    "SELECT 'INTO OUTFILE x', `file` FROM t",  # nor a quoted column named file
    "SELECT {x:UInt8} + 1 SETTINGS max_threads = 1",
    # Keyword-like names are names: in SELECT, WHERE, GROUP BY and as aliases.
    "SELECT name, engine FROM system.tables WHERE database = currentDatabase()",
    "SELECT engine, url, file, settings, format FROM t WHERE engine = 'x' AND url != '' "
    "GROUP BY engine, url, file, settings, format",
    "SELECT name AS engine, 1 AS url, 2 AS file, 3 AS settings, 4 AS format FROM t",
    "SELECT engine AS e FROM system.tables ORDER BY engine SETTINGS max_threads = 1",
    "SHOW TABLES",
    "SHOW DATABASES",
    "DESCRIBE TABLE t",
    "DESC system.tables",
    "EXISTS TABLE t",
    "SHOW CREATE TABLE t",
    "EXPLAIN SYNTAX SELECT 1",
    "SET max_threads = 1, max_execution_time = 5",
    "USE sgpipe",
]
ALLOWED_FOR_WRITER = [
    "INSERT INTO sgpipe.email_events (a, b) FORMAT Native",
    "INSERT INTO t SELECT * FROM numbers(3)",
    "CREATE TABLE IF NOT EXISTS t (a String) ENGINE = ReplacingMergeTree(v) ORDER BY a",
    "CREATE TABLE t (a String) ENGINE = MergeTree ORDER BY a SETTINGS index_granularity = 8",
    "CREATE OR REPLACE TABLE t (a String) ENGINE = Memory",
    "CREATE MATERIALIZED VIEW mv TO t2 AS SELECT a FROM t",
    "CREATE VIEW v AS SELECT * FROM t FINAL",
    "CREATE DATABASE IF NOT EXISTS sgpipe",
    "CREATE DATABASE d ENGINE = Atomic",
    "ALTER TABLE t DELETE WHERE email = 'x'",
    "DELETE FROM t WHERE 1",
    "DROP TABLE IF EXISTS t",
    "DROP VIEW v",
    "DROP DATABASE d",
    "TRUNCATE TABLE t",
    "OPTIMIZE TABLE t FINAL",
    "RENAME TABLE a TO b",
]


@pytest.mark.parametrize("sql", ALLOWED_FOR_BOTH + ALLOWED_FOR_WRITER)
def test_writer_statements(conn: object, sql: str) -> None:
    check_statement(parse(conn, sql), POLICY, readonly=False)


@pytest.mark.parametrize("sql", ALLOWED_FOR_BOTH)
def test_reader_reads(conn: object, sql: str) -> None:
    check_statement(parse(conn, sql), POLICY, readonly=True)


@pytest.mark.parametrize("sql", ALLOWED_FOR_WRITER)
def test_reader_cannot_write(conn: object, sql: str) -> None:
    with pytest.raises(StatementDenied, match="read-only user"):
        check_statement(parse(conn, sql), POLICY, readonly=True)


DENIED = [
    ("SELECT * FROM file('/etc/passwd')", "file()"),
    ("SELECT * FROM FILE('/etc/passwd')", "file()"),
    ("SELECT * FROM `file`('/etc/passwd')", "file()"),
    ("SELECT arrayMap(x -> file(x), ['/etc/passwd'])", "file()"),
    ("SELECT * FROM view(SELECT * FROM url('http://x'))", "url()"),
    ("SELECT * FROM Remote('h', system.one)", "remote()"),
    ("SELECT * FROM airline()", "airline()"),  # an unknown table function is not safe
    ("SELECT aiGenerate('x')", "aigenerate()"),
    ("SELECT 1 INTO OUTFILE 'x'", "INTO OUTFILE"),
    ("SHOW CREATE TABLE t INTO OUTFILE 'x'", "a table and settings only"),
    ("INSERT INTO t FROM INFILE 'x' FORMAT TSV", "FROM INFILE"),
    ("INSERT INTO FUNCTION file('x') SELECT 1", "file()"),
    ("CREATE TABLE t AS url('http://x', CSV)", "url()"),
    ("DESCRIBE TABLE url('http://x', CSV)", "a table and settings only"),
    ("DESCRIBE (SELECT file('x'))", "a table and settings only"),
    ("CREATE TABLE t (a Int) ENGINE = File(TSV)", "ENGINE = File"),
    ("CREATE TABLE t (a Int) ENGINE = `URL`('x')", "ENGINE = URL"),
    ("CREATE TABLE t (a Int) ENGINE = Kafka SETTINGS x = 1", "ENGINE = Kafka"),
    ("CREATE DATABASE d ENGINE = Filesystem('/')", "ENGINE = Filesystem"),
    ("CREATE TABLE t (a Int) ENGINE = TinyLog SETTINGS disk = 'default'", "SETTINGS disk"),
    ("CREATE TABLE t (a Int) ENGINE = MergeTree ORDER BY a SETTINGS disk = disk(type = web)", ""),
    (
        "CREATE TABLE t (a Int) ENGINE = MergeTree ORDER BY a SETTINGS storage_policy = 'x'",
        "SETTINGS storage_policy",
    ),
    ("ALTER TABLE t MODIFY SETTING storage_policy = 'x'", "SETTINGS storage_policy"),
    ("CREATE TABLE t (a Int DEFAULT file('x')) ENGINE = Memory", "file()"),
    (
        "CREATE DICTIONARY d (a UInt64) PRIMARY KEY a SOURCE(FILE(path 'x')) LAYOUT(FLAT()) "
        "LIFETIME(0)",
        "CREATE is allowed",
    ),  # fmt: skip
    ("CREATE USER u", "any user"),
    ("CREATE FUNCTION f AS x -> x", "any user"),
    ("DROP USER u", "any user"),
    ("DROP DICTIONARY d", "DROP is allowed"),
    ("SET ROLE ALL", "any user"),
    ("SET DEFAULT ROLE NONE TO default", "any user"),
    ("ATTACH TABLE t", "CREATE is allowed"),
    ("DETACH TABLE t", "DROP is allowed"),
    ("SYSTEM SHUTDOWN", "any user"),
    ("KILL QUERY WHERE 1 ASYNC", "any user"),
    ("GRANT ALL ON *.* TO default", "any user"),
    ("BACKUP TABLE t TO File('x')", "any user"),
    ("SELECT * FROM system.stack_trace", "stack_trace"),
    ("SELECT * FROM stack_trace", "stack_trace"),
    ("SELECT 1 WHERE 'x' IN system.stack_trace", "stack_trace"),
    ("SELECT joinGet(system.stack_trace, 'x', 1)", "stack_trace"),
    ("EXPLAIN SELECT * FROM url('x')", "url()"),
]


@pytest.mark.parametrize(("sql", "reason"), DENIED)
@pytest.mark.parametrize("readonly", [False, True])
def test_denied(conn: object, sql: str, reason: str, readonly: bool) -> None:
    with pytest.raises(StatementDenied) as denied:
        check_statement(parse(conn, sql), POLICY, readonly=readonly)
    if not readonly:
        assert reason in str(denied.value)


def test_a_table_named_by_a_parameter_is_checked_with_its_value(conn: object) -> None:
    statement = parse(conn, "SELECT * FROM {t:Identifier}")
    check_statement(statement, POLICY, readonly=True, parameters={"t": "email_events"})
    with pytest.raises(StatementDenied, match="stack_trace"):
        check_statement(statement, POLICY, readonly=True, parameters={"t": "system.stack_trace"})


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT 1; SELECT 2",
        "SELECT 1 -- c\n; SELECT file('x')",
        "SELECT {f:Identifier}('x')",
        "SELECT 'unterminated",
        "",
    ],
)
def test_what_the_parser_refuses_never_reaches_the_check(conn: object, sql: str) -> None:
    with pytest.raises(EmbeddedQueryError, match="SYNTAX_ERROR|Empty query"):
        parse(conn, sql)


def test_the_parse_gives_the_kind_the_format_and_what_runs(conn: object) -> None:
    select = parse(conn, "select  engine -- c\nfrom system.tables FORMAT JSON")
    assert (select.kind, select.output_format, select.returns_rows) == (
        "SelectWithUnionQuery",
        "JSON",
        True,
    )
    assert select.canonical == "SELECT engine FROM system.tables FORMAT JSON"
    insert = parse(conn, "insert into t (a) format Native")
    assert (insert.insert_format, insert.returns_rows) == ("Native", False)
    describe = parse(conn, "DESC t FORMAT JSON")
    assert (describe.kind, describe.output_format) == ("DescribeQuery", "JSON")


def test_escape_query_parameter_round_trips_the_escapes_the_engine_reads() -> None:
    assert escape_query_parameter("a\\b\nc\td\re\0") == "a\\\\b\\nc\\td\\re\\0"
