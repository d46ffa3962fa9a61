"""The statement check on canonical statements (as `formatQuerySingleLine` renders them); the
engine-side half is tested against chdb in tests/integration/test_clickhouse_lockdown.py."""

from __future__ import annotations

import pytest

from sgpipe.embedded.clickhouse_policy import (
    StatementDenied,
    StatementPolicy,
    check_statement,
    escape_query_parameter,
    statement_kind,
)

POLICY = StatementPolicy.from_engine(
    ["file", "url", "numbers", "view", "format", "python", "Remote", "s3"],
    ["file", "format", "aiGenerate", "AIEmbed", "airline", "concat"],
)


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
    "SHOW TABLES",
    "DESCRIBE TABLE t",
    "EXISTS TABLE t",
    "EXPLAIN SYNTAX SELECT 1",
    "SET max_threads = 1, max_execution_time = 5",
    "USE sgpipe",
]
ALLOWED_FOR_WRITER = [
    "INSERT INTO sgpipe.email_events (a, b)",
    "INSERT INTO t SELECT * FROM numbers(3)",
    "CREATE TABLE IF NOT EXISTS t (`a` String) ENGINE = ReplacingMergeTree(v) ORDER BY a",
    "CREATE OR REPLACE TABLE t (`a` String) ENGINE = Memory",
    "CREATE MATERIALIZED VIEW mv TO t2 AS SELECT a FROM t",
    "CREATE VIEW v AS SELECT * FROM t FINAL",
    "CREATE DATABASE IF NOT EXISTS sgpipe",
    "CREATE DATABASE d ENGINE = Atomic",
    "ALTER TABLE t (DELETE WHERE email = 'x')",
    "DELETE FROM t WHERE 1",
    "DROP TABLE IF EXISTS t",
    "DROP VIEW v",
    "DROP DATABASE d",
    "TRUNCATE TABLE t",
    "OPTIMIZE TABLE t FINAL",
    "RENAME TABLE a TO b",
]


@pytest.mark.parametrize("canonical", ALLOWED_FOR_BOTH + ALLOWED_FOR_WRITER)
def test_writer_statements(canonical: str) -> None:
    check_statement(canonical, POLICY, readonly=False)


@pytest.mark.parametrize("canonical", ALLOWED_FOR_BOTH)
def test_reader_reads(canonical: str) -> None:
    check_statement(canonical, POLICY, readonly=True)


@pytest.mark.parametrize("canonical", ALLOWED_FOR_WRITER)
def test_reader_cannot_write(canonical: str) -> None:
    with pytest.raises(StatementDenied, match="read-only user"):
        check_statement(canonical, POLICY, readonly=True)


DENIED = [
    ("SELECT * FROM file('/etc/passwd')", "file()"),
    ("SELECT * FROM FILE('/etc/passwd')", "file()"),
    ("SELECT * FROM `file`('/etc/passwd')", "file()"),
    ("SELECT arrayMap(x -> file(x), ['/etc/passwd'])", "file()"),
    ("SELECT * FROM view(SELECT * FROM url('http://x'))", "url()"),
    ("SELECT * FROM Remote('h', system.one)", "remote()"),
    ("SELECT aiGenerate('x')", "aigenerate()"),
    (
        "CREATE TABLE t (`a` Int) ENGINE = MergeTree ORDER BY a SETTINGS disk = disk(type = web)",
        "disk()",
    ),
    ("SELECT {f:Identifier}('x')", "parameter"),
    ("SELECT 1 INTO OUTFILE 'x'", "INTO OUTFILE"),
    ("INSERT INTO t FROM INFILE 'x' FORMAT TSV", "FROM INFILE"),
    ("CREATE TABLE t (`a` Int) ENGINE = File(TSV)", "ENGINE = FILE"),
    ("CREATE TABLE t (`a` Int) ENGINE = `URL`('x')", "ENGINE = URL"),
    ("CREATE TABLE t (`a` Int) ENGINE = Kafka SETTINGS x = 1", "ENGINE = KAFKA"),
    ("CREATE DATABASE d ENGINE = Filesystem('/')", "ENGINE = FILESYSTEM"),
    ("CREATE TABLE t (`a` Int) ENGINE = {e:Identifier}", "ENGINE clause"),
    ("CREATE DICTIONARY d (`a` UInt64) PRIMARY KEY a SOURCE(FILE(path 'x'))", "CREATE is allowed"),
    ("CREATE USER u", "CREATE is allowed"),
    ("CREATE FUNCTION f AS x -> x", "CREATE is allowed"),
    ("CREATE LIVE VIEW v AS SELECT 1", "CREATE is allowed"),
    ("DROP USER u", "DROP is allowed"),
    ("DROP DICTIONARY d", "DROP is allowed"),
    ("SET ROLE ALL", "only SET"),
    ("SET DEFAULT ROLE NONE TO default", "only SET"),
    ("ATTACH TABLE t", "ATTACH"),
    ("DETACH TABLE t", "DETACH"),
    ("SYSTEM SHUTDOWN", "SYSTEM"),
    ("KILL QUERY WHERE 1 ASYNC", "KILL"),
    ("GRANT ALL ON *.* TO default", "GRANT"),
    ("BACKUP TABLE t TO File('x')", "BACKUP"),
    ("EXECUTE AS u SELECT 1", "EXECUTE"),
    ("BEGIN TRANSACTION", "BEGIN"),
    ("SELECT 'unterminated", "could not be read"),
    ("SELECT `unterminated", "could not be read"),
    ("", "not a statement"),
    ("(SELECT 1)", "not a statement"),
]


@pytest.mark.parametrize(("canonical", "reason"), DENIED)
@pytest.mark.parametrize("readonly", [False, True])
def test_denied(canonical: str, reason: str, readonly: bool) -> None:
    with pytest.raises(StatementDenied) as denied:
        check_statement(canonical, POLICY, readonly=readonly)
    if not readonly:
        assert reason in str(denied.value)


def test_statement_kind() -> None:
    assert statement_kind("SELECT 1") == "SELECT"
    assert statement_kind("  with x AS (SELECT 1) SELECT 1") == "WITH"
    assert statement_kind("'x'") == ""


def test_escape_query_parameter_round_trips_the_escapes_the_engine_reads() -> None:
    assert escape_query_parameter("a\\b\nc\td\re\0") == "a\\\\b\\nc\\td\\re\\0"
