"""Cluster mode (clickhouse.cluster): no cluster runs here, so every statement sgpipe would run
on one -- migrations, the migrations table, retention, forget's deletes -- is generated and
parsed by the real engine (formatQuerySingleLine: the full parser; EXPLAIN AST of a Replicated
engine is refused by the embedded store's lockdown), and its shape checked: ON CLUSTER everywhere,
Replicated engines, a Distributed table in front of every table that is read, materialized
views from node-local table to node-local table."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from sgpipe.forget import PERSONAL_TABLES, Person
from sgpipe.runtime.migrations import (
    RETAINED_TABLES,
    Target,
    retention_statement,
    shipped_migrations,
)
from tests.integration.bi_support import store

pytest.importorskip("chdb")

pytestmark = pytest.mark.clickhouse

CLUSTER = Target("sgpipe", "events_cluster")


def cluster_statements() -> list[str]:
    statements = list(CLUSTER.migrations_table_ddl())
    for migration in shipped_migrations():
        statements.extend(CLUSTER.statements(migration))
    statements.extend(retention_statement(CLUSTER, table, 90) for table in RETAINED_TABLES)
    who = Person("a@example.com", ("a@example.com",), ("msg-1",))
    statements.extend(
        f"ALTER TABLE {CLUSTER.table(t.name)} {CLUSTER.on_cluster} DELETE WHERE {t.where(who)}"
        for t in PERSONAL_TABLES
    )
    return statements


async def test_every_cluster_statement_parses_and_has_the_cluster_shape(tmp_path: Path) -> None:
    formatted: list[str] = []
    async with store(tmp_path, migrate=False) as s:
        for statement in cluster_statements():
            # The engine's own parser: a syntax error raises here.
            formatted.append(await s.value("SELECT formatQuerySingleLine({q:String})", q=statement))

    created: dict[str, str] = {}
    for text in formatted:
        if text.startswith(("CREATE", "ALTER")):
            assert " ON CLUSTER events_cluster" in text, text
        match = re.match(
            r"CREATE (?:TABLE|MATERIALIZED VIEW|VIEW|OR REPLACE VIEW) (?:IF NOT EXISTS )?(\S+)",
            text,
        )
        if match:
            created[match.group(1)] = text
    engines = {name: re.search(r"ENGINE = (\w+)", text) for name, text in created.items()}
    local_tables = {name for name in created if name.endswith("_local")}
    assert local_tables == {
        "sgpipe.email_events_local",
        "sgpipe.daily_event_counts_state_local",
        "sgpipe.daily_domain_counts_state_local",
        "sgpipe.daily_template_counts_state_local",
        "sgpipe.daily_campaign_counts_state_local",
        "sgpipe.daily_bounce_counts_state_local",
        "sgpipe.message_lifecycle_state_local",
        "sgpipe.dead_letters_local",
    }
    for local in local_tables:
        engine = engines[local]
        assert engine is not None and engine.group(1).startswith("Replicated"), local
        distributed = created[local.removesuffix("_local")]
        assert (
            f"AS {local} ENGINE = Distributed('events_cluster', sgpipe, {local.split('.')[1]}"
            in distributed
        )
    migrations_table = created["sgpipe.sgpipe_schema_migrations"]
    assert (
        "ReplicatedReplacingMergeTree('/clickhouse/sgpipe/sgpipe/sgpipe_schema_migrations'"
        in migrations_table
    )
    views = [text for name, text in created.items() if name.endswith("_mv")]
    assert len(views) == 6
    for view in views:
        # Each node aggregates the rows it stores, into its own state table.
        assert re.search(r" TO sgpipe\.\w+_state_local AS SELECT ", view), view
        assert "FROM sgpipe.email_events_local" in view, view
    for name, text in created.items():
        if "VIEW" in text and not name.endswith("_mv"):
            # BI views read the Distributed tables: every shard's rows.
            assert "_local" not in text, text
    # Backfills insert through the Distributed tables, reading every shard.
    inserts = [text for text in formatted if text.startswith("INSERT")]
    assert len(inserts) == 6
    assert all("_local" not in text for text in inserts)
