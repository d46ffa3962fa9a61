"""The BI tools' own discovery against a running `sgpipe up`, as the read-only `sgpipe_bi`: the
address a BI user finds in the data dir, the credentials file `sgpipe up` wrote, the tools'
own client code (clickhouse-connect's SQLAlchemy dialect, as Superset) and their catalogue SQL
(Grafana's plugin, Metabase's driver; copied in test_bi_tools.py with file and commit)."""

from __future__ import annotations

from contextlib import closing
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import clickhouse_connect
import pytest

sqlalchemy = pytest.importorskip("sqlalchemy")

from sgpipe.embedded.credentials import load_credentials  # noqa: E402
from tests.integration.test_bi_tools import GRAFANA, METABASE  # noqa: E402
from tests.integration.test_up import (  # noqa: E402
    _wait_until_serving,
    start_pipeline,
    stop_pipeline,
)
from tests.up_support import read_state  # noqa: E402

pytestmark = [pytest.mark.kafka, pytest.mark.clickhouse]

DATABASE = "sgpipe"


def test_bi_tools_discover_the_store_of_a_running_sgpipe_up(tmp_path: Path) -> None:
    running = start_pipeline(
        tmp_path, embedded={"broker_storage": "memory", "kafka_port": 0, "clickhouse_http_port": 0}
    )
    try:
        _wait_until_serving(running)
        # The sink creates the tables at its start: wait for them as a BI user would see them.
        running.wait_for(
            "SELECT count() > 0 FROM system.tables WHERE database = 'sgpipe' "
            "AND name = 'email_events_dedup'",
            "1\n",
        )
        port = urlsplit(read_state(running.data_dir)["clickhouse_url"]).port
        assert port is not None
        reader = load_credentials(running.data_dir).reader
        assert reader.name == "sgpipe_bi"

        # Superset: SQLAlchemy's inspector on clickhouse-connect's dialect.
        engine = sqlalchemy.create_engine(
            f"clickhousedb://{reader.name}:{reader.password}@127.0.0.1:{port}/{DATABASE}"
        )
        try:
            inspector = sqlalchemy.inspect(engine)
            assert DATABASE in inspector.get_schema_names()
            assert {"email_events", "dead_letters"} <= set(inspector.get_table_names())
            assert "email_events_dedup" in inspector.get_view_names()
            columns = {column["name"] for column in inspector.get_columns("email_events")}
            assert {"sg_event_id", "event", "email", "event_time"} <= columns
            with engine.connect() as connection:
                rows = connection.execute(
                    sqlalchemy.text("SELECT event, count() FROM email_events_dedup GROUP BY event")
                ).all()
            assert rows == []  # nothing posted: a dashboard query on an empty store
        finally:
            engine.dispose()

        client = clickhouse_connect.get_client(
            host="127.0.0.1",
            port=port,
            username=reader.name,
            password=reader.password,
            database=DATABASE,
        )
        with closing(client):

            def read(sql: str) -> list[tuple[Any, ...]]:
                return [tuple(row) for row in client.query(sql).result_rows]

            # Grafana's plugin.
            assert (DATABASE,) in read(GRAFANA["databases"])
            assert ("email_events",) in read(GRAFANA["tables"])
            assert "sg_event_id" in [row[0] for row in read(GRAFANA["fields"])]
            # Metabase's driver (through JDBC DatabaseMetaData).
            tables = {row[2]: row[3] for row in read(METABASE["get_tables"])}
            assert tables["email_events"].endswith("MergeTree")
            assert "sg_event_id" in [row[3] for row in read(METABASE["get_columns"])]
            # Generic SQL tools.
            schemata = read("SELECT schema_name FROM information_schema.schemata")
            assert (DATABASE,) in schemata
            # The keyword-like column of the catalogue is an ordinary name.
            engines = dict(read("SELECT name, engine FROM system.tables WHERE database = 'sgpipe'"))
            assert engines["email_events_dedup"] == "View"
            # And the reader still reads only.
            with pytest.raises(Exception, match="(?i)readonly|not enough privileges|denied"):
                client.command("INSERT INTO sgpipe.dead_letters (reason) VALUES ('x')")
    finally:
        stop_pipeline(running)
