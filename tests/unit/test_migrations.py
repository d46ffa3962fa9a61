"""The migration files and how they render: statements, placeholders, cluster-only parts,
the released files' meaning kept, retention parsing and the sink's insert token."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from schemas.event_fields import add_columns_sql
from sgpipe.runtime.messages import Message
from sgpipe.runtime.migrations import (
    RETAINED_TABLES,
    Migration,
    Statement,
    Target,
    retention_days_of,
    retention_statement,
    shipped_migrations,
    split_statements,
)
from sgpipe.runtime.stage import BatchInfo, batch_info_of
from sinks.clickhouse import insert_settings, insert_token

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "clickhouse"
PLACEHOLDER = re.compile(r"\{(database|local|on_cluster|replicated|cluster)\}")
SINGLE = Target("sgpipe")
CLUSTER = Target("sgpipe", "events_cluster")


def normalized(sql: str) -> str:
    return " ".join(sql.split())


def test_statements_are_split_at_line_ending_semicolons_and_comments_dropped() -> None:
    text = (
        "-- a comment; not a statement\n"
        "CREATE TABLE a (x String COMMENT 'a; b')\nENGINE = Memory;\n\n"
        "-- cluster-only: explained here\n-- over two lines\n"
        "CREATE TABLE b AS a\nENGINE = Memory;\n"
        "ALTER TABLE a ADD COLUMN y String"
    )
    assert split_statements(text) == [
        Statement("CREATE TABLE a (x String COMMENT 'a; b')\nENGINE = Memory"),
        Statement("CREATE TABLE b AS a\nENGINE = Memory", cluster_only=True),
        Statement("ALTER TABLE a ADD COLUMN y String"),
    ]


@pytest.mark.parametrize(
    ("migration", "released"),
    [
        ("0001_email_events", "0001_email_events.released.sql"),
        ("0002_typed_event_fields", "0002_typed_event_fields.released.sql"),
        ("0003_dead_letters", "0003_dead_letters.released.sql"),
    ],
)
def test_released_migrations_mean_on_one_server_what_they_meant_when_released(
    migration: str, released: str
) -> None:
    """0001 to 0003 gained placeholders for cluster mode after their release: on one server
    they render to the released statements, so stores that applied them are unchanged."""
    (current,) = [m for m in shipped_migrations() if m.name == migration]
    as_released = Migration(migration, (FIXTURES / released).read_text())
    assert [normalized(s) for s in SINGLE.statements(current)] == [
        normalized(s) for s in SINGLE.statements(as_released)
    ]


def test_migration_names_are_numbered_in_order_and_unique() -> None:
    names = [m.name for m in shipped_migrations()]
    assert names == sorted(names)
    numbers = [name.split("_", 1)[0] for name in names]
    assert all(re.fullmatch(r"\d{4}", number) for number in numbers)
    assert len(set(numbers)) == len(numbers)


def test_on_one_server_nothing_of_cluster_mode_remains() -> None:
    for migration in shipped_migrations():
        for statement in SINGLE.statements(migration):
            assert not PLACEHOLDER.search(statement), (migration.name, statement)
            assert not re.search(r"ON CLUSTER|Replicated|Distributed|_local\b", statement)


def test_in_cluster_mode_every_ddl_statement_runs_on_the_cluster() -> None:
    """(The real engine parses every one of them: tests/integration/test_cluster_ddl.py.)"""
    for migration in shipped_migrations():
        for statement in CLUSTER.statements(migration):
            assert not PLACEHOLDER.search(statement), statement
            if statement.startswith(("CREATE", "ALTER")):
                assert "ON CLUSTER 'events_cluster'" in statement, statement
            for engine in re.findall(r"ENGINE = (\w+)", statement):
                assert engine.startswith("Replicated") or engine == "Distributed", statement
    for statement in CLUSTER.migrations_table_ddl():
        assert "ON CLUSTER 'events_cluster'" in statement


def test_the_typed_columns_migration_is_what_the_field_table_generates() -> None:
    (committed,) = [m for m in shipped_migrations() if m.name == "0002_typed_event_fields"]
    assert split_statements(committed.text) == split_statements(add_columns_sql(2))


@pytest.mark.parametrize(
    ("engine_full", "days"),
    [
        ("ReplacingMergeTree(received_at) PARTITION BY toYYYYMM(event_time) ORDER BY x", 0),
        ("ReplacingMergeTree TTL if(a, b, c) + toIntervalDay(30) SETTINGS x = 1", 30),
        ("MergeTree TTL event_time + toIntervalMonth(1) SETTINGS x = 1", None),
    ],
)
def test_retention_is_read_back_from_the_engine(engine_full: str, days: int | None) -> None:
    assert retention_days_of(engine_full) == days


def test_retention_statements() -> None:
    events = RETAINED_TABLES[0]
    assert retention_statement(SINGLE, events, 0) == "ALTER TABLE sgpipe.email_events  REMOVE TTL"
    assert retention_statement(CLUSTER, events, 7) == (
        "ALTER TABLE sgpipe.email_events_local ON CLUSTER 'events_cluster' MODIFY TTL "
        "if(has(coercion_errors, 'event_time'), received_at, event_time) + toIntervalDay(7)"
    )


def test_the_insert_token_names_the_batchs_offsets_in_a_stable_order() -> None:
    batch = BatchInfo({("sgpipe.events", 3): (10, 19), ("sgpipe.events", 0): (100, 250)})
    same = BatchInfo({("sgpipe.events", 0): (100, 250), ("sgpipe.events", 3): (10, 19)})
    assert insert_token(batch) == "sgpipe.events/0/100-250,sgpipe.events/3/10-19"
    assert insert_token(same) == insert_token(batch)
    assert insert_token(BatchInfo({("sgpipe.events", 0): (100, 251)})) != insert_token(batch)
    settings = insert_settings(batch)
    assert settings["insert_deduplication_token"] == insert_token(batch)
    assert settings["deduplicate_blocks_in_dependent_materialized_views"] == 1
    assert "insert_distributed_sync" in insert_settings(batch, cluster=True)


def test_the_insert_token_tells_a_new_log_at_the_same_offsets_from_a_retry() -> None:
    def read(*values: bytes, topic: str = "sgpipe.events", first: int = 0) -> BatchInfo:
        return batch_info_of(
            [
                Message(topic, 0, first + i, 1_000 + i, b"key", value)
                for i, value in enumerate(values)
            ]
        )

    old_log = read(b"event-a", b"event-b")
    assert old_log.offsets == {("sgpipe.events", 0): (0, 1)}
    token = insert_token(old_log)
    assert token.startswith("sgpipe.events/0/0-1#") and len(old_log.digest) == 32
    # The same records read again (a retried write, a redelivery): the same token.
    assert insert_token(read(b"event-a", b"event-b")) == token
    # Other records at the same offsets (the log re-created from 0): another token.
    assert insert_token(read(b"event-a", b"event-c")) != token
    # Bytes moved between key and value, or between two records, are other records too.
    assert read(b"event-aevent-b", b"").digest != read(b"event-a", b"event-b").digest
    assert insert_token(read(b"event-a", b"event-b", first=5)) != token
