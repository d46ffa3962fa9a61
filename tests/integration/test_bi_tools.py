"""BI tools' own discovery against the served embedded ClickHouse, as the read-only `sgpipe_bi`.

- Superset: clickhouse-connect's SQLAlchemy dialect, driven through SQLAlchemy's inspector
  (the calls Superset's schema browser makes) and a query of docs/bi.md.
- Grafana's ClickHouse plugin and Metabase's ClickHouse driver (through ClickHouse's JDBC
  driver, whose DatabaseMetaData Metabase calls) cannot run here; their catalogue statements
  are copied from their public source (file and commit named at each) and sent as they send
  them.
- information_schema, as generic SQL tools read it.

One served store for the module (migrated, a small simulated stream seeded), as the BI tests
use: the engine behind the real HTTP server.
"""

from __future__ import annotations

import asyncio
import pathlib
import re
import time
from collections.abc import Iterator
from contextlib import closing
from typing import Any

import pytest

pytest.importorskip("chdb")
sqlalchemy = pytest.importorskip("sqlalchemy")

from clickhouse_connect.driver.exceptions import DatabaseError  # noqa: E402
from sqlalchemy.exc import DBAPIError  # noqa: E402

from sgpipe.runtime.clickhouse import connect  # noqa: E402
from sgpipe.runtime.migrations import apply_migrations  # noqa: E402
from sgpipe.runtime.settings import ClickHouseSettings  # noqa: E402
from sgpipe.simulator.dataset import simulated_posts, sink_records  # noqa: E402
from tests.integration.bi_support import AGGREGATE_VIEWS, Store, batch_info  # noqa: E402
from tests.integration.clickhouse_server import Served, serve  # noqa: E402

pytestmark = pytest.mark.clickhouse

DATABASE = "sgpipe"
DOCS = pathlib.Path(__file__).resolve().parents[2] / "docs" / "bi.md"


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    with serve(tmp_path_factory.mktemp("bi-tools")) as running:
        asyncio.run(_migrate_and_seed(running))
        yield running


async def _migrate_and_seed(served: Served) -> None:
    writer = served.writer
    url = served.url.replace("://", f"://{writer.name}:{writer.password}@", 1)
    client = await connect(ClickHouseSettings(url=url))
    try:
        await apply_migrations(client, DATABASE)
        store = Store(url, client, DATABASE)
        start = int(time.time()) - 2 * 86_400  # the guide's queries look at recent days
        posts = simulated_posts(300, seed=19, start_time=start)
        for offset, batch in enumerate(sink_records(posts, start_time=start)):
            await store.insert(batch, batch=batch_info("sgpipe.events", 0, offset, offset))
    finally:
        await client.close()


@pytest.fixture(scope="module")
def superset(served: Served) -> Iterator[Any]:
    """What Superset holds: a SQLAlchemy engine on clickhouse-connect's dialect."""
    reader = served.reader
    engine = sqlalchemy.create_engine(
        f"clickhousedb://{reader.name}:{reader.password}@127.0.0.1:{served.port}/{DATABASE}"
    )
    yield engine
    engine.dispose()


def read(served: Served, sql: str) -> list[tuple[Any, ...]]:
    with closing(served.client(served.reader, database=DATABASE)) as client:
        return list(client.query(sql).result_rows)


# --- Superset: clickhouse-connect's SQLAlchemy dialect ------------------------------------------


def test_superset_discovers_schemas_tables_views_and_columns(superset: Any) -> None:
    inspector = sqlalchemy.inspect(superset)
    assert DATABASE in inspector.get_schema_names()
    tables = inspector.get_table_names()
    assert {"email_events", "dead_letters", "daily_event_counts_state"} <= set(tables)
    views = inspector.get_view_names()
    assert {"email_events_dedup", "message_lifecycle", *AGGREGATE_VIEWS} <= set(views)
    assert not set(views) & {"email_events", "dead_letters"}
    columns = {column["name"]: column for column in inspector.get_columns("email_events")}
    assert {"sg_event_id", "event", "email", "event_time"} <= set(columns)
    assert str(columns["event"]["type"]).startswith(("LowCardinality", "String"))
    assert inspector.get_columns("daily_event_counts")  # a view's columns too
    assert inspector.get_table_names(schema=DATABASE) == tables


def example_query(heading: str) -> str:
    text = DOCS.read_text().split(f"### {heading}", 1)[1]
    match = re.search(r"```sql\n(.*?)```", text, re.DOTALL)
    assert match is not None, heading
    return match.group(1)


def test_superset_runs_a_dashboard_query_of_the_bi_guide(superset: Any) -> None:
    with superset.connect() as connection:
        rows = connection.execute(
            sqlalchemy.text(example_query("Where messages ended up"))
        ).fetchall()
        events = connection.execute(
            sqlalchemy.text("SELECT count() FROM email_events_dedup")
        ).scalar()
    assert rows
    assert events and events > 0


@pytest.mark.parametrize(
    "sql",
    [
        "INSERT INTO email_events (sg_event_id) VALUES ('x')",
        "DROP TABLE email_events",
        "CREATE TABLE superset_tmp (a String) ENGINE = Memory",
        "ALTER TABLE email_events DELETE WHERE 1",
        "SELECT * FROM file('/etc/passwd', 'LineAsString')",
        "SELECT * FROM url('http://127.0.0.1:9/', 'LineAsString')",
    ],
)
def test_superset_cannot_write_or_reach_out(superset: Any, sql: str) -> None:
    with superset.connect() as connection, pytest.raises(DBAPIError, match=r"\b(497|164)\b"):
        connection.execute(sqlalchemy.text(sql))


# --- Grafana's ClickHouse plugin ------------------------------------------------------------
# grafana/clickhouse-datasource, src/data/CHDatasource.ts at commit
# 1d04063a31fb30f9582cd0b3aeaacb7d350b0dcf: fetchDatabases, fetchTables(db), fetchFields,
# getTagSource (ad-hoc filter keys) and fetchSqlFunctions, with the database and table filled in.
GRAFANA = {
    "databases": "SHOW DATABASES",
    "tables": f'SHOW TABLES FROM "{DATABASE}"',
    "fields": f'DESC TABLE "{DATABASE}"."email_events"',
    "adhoc_keys": f"SELECT name, type, table FROM system.columns WHERE database IN ('{DATABASE}') "
    "AND table = 'email_events'",
    "functions": """
      SELECT
        name, is_aggregate, case_insensitive, alias_to, origin, description,
        syntax, arguments, returned_value, examples, categories
      FROM system.functions
      LIMIT 10000
    """,
}


def test_grafanas_catalogue_queries(served: Served) -> None:
    assert (DATABASE,) in read(served, GRAFANA["databases"])
    assert ("email_events",) in read(served, GRAFANA["tables"])
    assert "sg_event_id" in [row[0] for row in read(served, GRAFANA["fields"])]
    assert ("event", "LowCardinality(String)", "email_events") in read(
        served, GRAFANA["adhoc_keys"]
    )
    assert len(read(served, GRAFANA["functions"])) > 100


# --- Metabase's ClickHouse driver -------------------------------------------------------------
# ClickHouse/metabase-clickhouse-driver, src/metabase/driver/clickhouse.clj at commit
# c628179f468d53efe1515377d319067340db2cfb (cloud-mode check, database-exists check); its
# describe-database and describe-table go through JDBC DatabaseMetaData: ClickHouse/
# clickhouse-java, jdbc-v2/src/main/java/com/clickhouse/jdbc/metadata/DatabaseMetaDataImpl.java
# at commit f3c6f9715f5bbf2c58cb17ecc0c9ce39176f115f, getTables and getColumns as they render
# for Metabase's call (schema "sgpipe", table "%", types TABLE/VIEW/...); the driver builds the
# engine list and the per-type sizes of COLUMN_SIZE from long Java tables, abbreviated here to
# a few entries with the structure and every function kept.
METABASE = {
    "cloud_mode": "SELECT value='1' FROM system.settings WHERE name='cloud_mode'",
    "database_exists": f"SELECT count(*) > 0 FROM system.databases WHERE name = '{DATABASE}'",
    "get_tables": "SELECT '' AS TABLE_CAT, t.database AS TABLE_SCHEM, t.name AS TABLE_NAME, "
    "if(t.is_temporary = 1, concat('Temporary', t.engine), t.engine) AS TABLE_TYPE, "
    "t.comment AS REMARKS, CAST(null as Nullable(String)) AS TYPE_CAT, d.engine AS TYPE_SCHEM, "
    "CAST(null as Nullable(String)) AS TYPE_NAME, "
    "CAST(null as Nullable(String)) AS SELF_REFERENCING_COL_NAME, "
    "CAST(null as Nullable(String)) AS REF_GENERATION "
    "FROM system.tables t JOIN system.databases d ON system.tables.database = "
    f"system.databases.name WHERE t.database LIKE '{DATABASE}' AND t.name LIKE '%' "
    "AND ( (t.engine IN ('View','MaterializedView','Memory','Log','TinyLog','StripeLog')) OR "
    "(t.engine NOT IN ('View','MaterializedView','Memory','Log','TinyLog','StripeLog','Remote') "
    "AND NOT t.engine LIKE 'System%' AND NOT t.engine LIKE 'Async%' AND t.is_temporary = 0)) "
    "AND (t.is_temporary = 0)",
    "get_columns": "SELECT '' AS TABLE_CAT, database AS TABLE_SCHEM, table AS TABLE_NAME, "
    "name AS COLUMN_NAME, toInt32(1111) AS DATA_TYPE, type AS TYPE_NAME, "
    "toInt32(multiIf(character_octet_length IS NOT NULL, character_octet_length, "
    "system.columns.type == 'UInt8', 1, system.columns.type == 'UInt64', 8, "
    "numeric_precision IS NOT NULL, numeric_precision, 0)) AS COLUMN_SIZE, "
    "toInt32(0) AS BUFFER_LENGTH, "
    "toInt32(IF (numeric_scale == 0, NULL, numeric_scale)) as DECIMAL_DIGITS,  "
    "toInt32(numeric_precision_radix) AS NUM_PREC_RADIX, "
    "toInt32(position(type, 'Nullable(') >= 1 ?1 : 0) as NULLABLE, "
    "system.columns.comment AS REMARKS, system.columns.default_expression AS COLUMN_DEF, "
    "toInt32(0) AS SQL_DATA_TYPE, toInt32(0) AS SQL_DATETIME_SUB, "
    "character_octet_length::Nullable(Int32) AS CHAR_OCTET_LENGTH, "
    "toInt32(system.columns.position) AS ORDINAL_POSITION, "
    "position(upper(type), 'NULLABLE') >= 1 ? 'YES' : 'NO' AS IS_NULLABLE,"
    "CAST(NULL as Nullable(String)) AS SCOPE_CATALOG, "
    "CAST(NULL as Nullable(String)) AS SCOPE_SCHEMA, "
    "CAST(NULL as Nullable(String)) AS SCOPE_TABLE, "
    "CAST(NULL as Nullable(Int16)) AS SOURCE_DATA_TYPE, 'NO' as IS_AUTOINCREMENT, "
    "'NO' as IS_GENERATEDCOLUMN  FROM system.columns "
    f"WHERE database LIKE '{DATABASE}' AND table LIKE 'email_events' AND name LIKE '%' "
    "ORDER BY TABLE_SCHEM, TABLE_NAME, ORDINAL_POSITION",
}


def test_metabases_catalogue_queries(served: Served) -> None:
    assert read(served, METABASE["cloud_mode"]) in ([], [(False,)], [(0,)])
    assert read(served, METABASE["database_exists"])[0][0] in (True, 1)
    tables = {row[2]: row[3] for row in read(served, METABASE["get_tables"])}
    assert tables["email_events"].endswith("MergeTree")
    assert tables["message_lifecycle"] == "View"
    columns = [row[3] for row in read(served, METABASE["get_columns"])]
    assert columns[:1] and "sg_event_id" in columns


# --- information_schema -----------------------------------------------------------------------


def test_information_schema(served: Served) -> None:
    assert (DATABASE,) in read(served, "SELECT schema_name FROM information_schema.schemata")
    tables = dict(
        read(
            served,
            "SELECT table_name, table_type FROM information_schema.tables "
            f"WHERE table_schema = '{DATABASE}'",
        )
    )
    assert tables["email_events"] == "BASE TABLE"
    assert tables["email_events_dedup"] == "VIEW"
    columns = read(
        served,
        "SELECT column_name, data_type FROM INFORMATION_SCHEMA.COLUMNS "
        f"WHERE table_schema = '{DATABASE}' AND table_name = 'email_events' "
        "ORDER BY ordinal_position",
    )
    assert ("sg_event_id", "String") in columns


def test_the_catalogue_stays_read_only(served: Served) -> None:
    with closing(served.client(served.reader, database=DATABASE)) as client:
        for sql in (
            "CREATE TABLE information_schema.x (a String) ENGINE = Memory",
            "INSERT INTO system.one VALUES (1)",
            "SELECT * FROM system.stack_trace",
        ):
            with pytest.raises(DatabaseError, match=r"\b(497|164)\b"):
                client.query(sql)
