"""What a BI user runs, on the real engine, as the read-only BI user (`sgpipe_bi`) of the embedded
endpoint, over a simulated SendGrid stream with its duplicates: every example query of
docs/bi.md and every panel of the Grafana dashboard runs and returns rows, their figures match
the stream, and the BI user cannot change anything."""

from __future__ import annotations

import json
import re
import time
from collections import defaultdict
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from clickhouse_connect.driver.asyncclient import AsyncClient
from clickhouse_connect.driver.exceptions import DatabaseError

from schemas.email_event import EmailEventCodec
from sgpipe.embedded.credentials import load_credentials
from sgpipe.runtime.clickhouse import connect, with_credentials
from sgpipe.runtime.settings import ClickHouseSettings
from sgpipe.simulator.dataset import simulated_posts, sink_records
from tests.golden import encoded_events, fixture_names, payload
from tests.integration.bi_support import Store, batch_info, store

pytest.importorskip("chdb")

pytestmark = pytest.mark.clickhouse

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs" / "bi.md"
DASHBOARD = ROOT / "dashboards" / "grafana" / "sgpipe-email.json"
EVENTS = 4000
# The docs' placeholders, replaced by a recipient and a message of the seeded stream.
ADDRESS_PLACEHOLDER = "alice@example.com"
MESSAGE_PLACEHOLDER = "nzDqXnaXAA7Vmzl5OBsb-g.filterdrecv-p1mdw1-6d9f7b8c44-tzk2w-11-A6048457-0.0"


@dataclass
class Seeded:
    store: Store
    reader: AsyncClient
    unique: list[dict[str, Any]]  # each simulated event once

    async def read(self, sql: str) -> list[dict[str, Any]]:
        result = await self.reader.query(sql)
        return [dict(zip(result.column_names, row, strict=True)) for row in result.result_rows]


@asynccontextmanager
async def seeded(tmp_path: Path) -> AsyncIterator[Seeded]:
    """The store after a two-day-old stream of EVENTS events (SendGrid's duplicates, re-sent
    posts, and a retried insert included) and the golden quirk events; and a client of the BI
    user."""
    start = int(time.time()) - 2 * 86_400
    posts = simulated_posts(EVENTS, seed=77, duplicates=0.1, start_time=start)
    batches = sink_records(posts, start_time=start)
    codec = EmailEventCodec()
    quirks = [codec.decode(v) for v in encoded_events([payload(n) for n in fixture_names()], codec)]
    async with store(tmp_path) as s:
        for offset, batch in enumerate(batches):
            await s.insert(batch, batch=batch_info("sgpipe.events", 0, offset, offset))
        await s.insert(batches[0], batch=batch_info("sgpipe.events", 0, 0, 0))  # a retry
        await s.insert(quirks, batch=batch_info("sgpipe.events", 1, 0, len(quirks) - 1))
        reader = (load_credentials(tmp_path / "ch-credentials")).reader
        settings = with_credentials(ClickHouseSettings(), reader.name, reader.password)
        client = await connect(settings, _base(s.url), database="sgpipe")
        try:
            unique = {r["sg_event_id"]: r for batch in batches for r in batch}
            yield Seeded(s, client, list(unique.values()))
        finally:
            await client.close()


def _base(url: str) -> str:
    """The endpoint's URL without the writer's credentials in it."""
    return re.sub(r"//[^@/]*@", "//", url)


# --- docs/bi.md ------------------------------------------------------------------------------


def example_queries() -> dict[str, str]:
    """Heading -> SQL of every ```sql block under "## Example queries"."""
    text = DOCS.read_text().split("## Example queries", 1)[1]
    queries = {}
    for section in re.split(r"^### ", text, flags=re.MULTILINE)[1:]:
        heading = section.splitlines()[0].strip()
        for block in re.findall(r"```sql\n(.*?)```", section, re.DOTALL):
            queries[heading] = block
    return queries


def truth(unique: list[dict[str, Any]]) -> dict[str, Any]:
    with_message = [r for r in unique if r["sg_message_id"] is not None]
    messages_by_event: dict[str, set[str]] = defaultdict(set)
    for r in with_message:
        messages_by_event[r["event"]].add(r["sg_message_id"])
    return {
        "events": len(unique),
        "processed": len(messages_by_event["processed"]),
        "delivered": len(messages_by_event["delivered"]),
        "bounces": sum(r["event"] == "bounce" for r in unique),
        # Opens of delivered messages (the stream ends mid-lifecycle: an open can come first).
        "opens": sum(
            r["event"] == "open" and r["sg_message_id"] in messages_by_event["delivered"]
            for r in with_message
        ),
        "dropped": sum(r["event"] == "dropped" for r in unique),
    }


async def test_every_example_query_of_the_bi_guide_runs_and_is_right(tmp_path: Path) -> None:
    queries = example_queries()
    assert len(queries) >= 12
    async with seeded(tmp_path) as data:
        expected = truth(data.unique)
        by_address = defaultdict(list)
        for record in data.unique:
            by_address[record["email"]].append(record)
        address, history = max(by_address.items(), key=lambda item: len(item[1]))
        clicked = next(r for r in data.unique if r["event"] == "click" and r["sg_message_id"])
        results = {}
        for heading, sql in queries.items():
            sql = sql.replace(ADDRESS_PLACEHOLDER, address).replace(
                MESSAGE_PLACEHOLDER, clicked["sg_message_id"]
            )
            rows = await data.read(sql)
            assert rows, heading
            results[heading] = rows

        def column(heading: str, name: str) -> int:
            return sum(int(row[name]) for row in results[heading])

        assert (
            column("Events per day and type, exact across categories", "events")
            == expected["events"]
        )
        assert column("Delivery rate per day", "delivered") == expected["delivered"]
        assert column("Delivery rate per day", "processed") == expected["processed"]
        assert column("Bounce rate by classification", "bounces") == expected["bounces"]
        assert column("Why messages were dropped", "dropped") == expected["dropped"]
        assert column("Human and machine opens", "all_opens") == expected["opens"]
        assert len(results["One recipient's history"]) == len(history)
        (message,) = results["One message, from processed to click"]
        assert message["clicks"] == sum(
            r["event"] == "click" and r["sg_message_id"] == clicked["sg_message_id"]
            for r in data.unique
        )
        statuses = {
            row["delivery_status"]: row["messages"] for row in results["Where messages ended up"]
        }
        assert statuses["delivered"] > statuses.get("bounce", 0) > 0
        fields = {row["field"] for row in results["Fields SendGrid sent that could not be typed"]}
        assert {"attempt", "tls"} <= fields  # from the golden quirk events


# --- the Grafana dashboard -------------------------------------------------------------------


def expand_grafana(sql: str, start: int, end: int, interval_seconds: int = 3600) -> str:
    """The ClickHouse plugin's macros, as its documentation defines them, and the template
    variable (the seeded webhook selected)."""

    def day(seconds: int) -> str:
        return time.strftime("%Y-%m-%d", time.gmtime(seconds))

    sql = re.sub(
        r"\$__timeFilter\((\w+)\)",
        rf"\1 >= toDateTime({start}) AND \1 <= toDateTime({end})",
        sql,
    )
    sql = re.sub(
        r"\$__dateFilter\((\w+)\)",
        rf"\1 >= toDate('{day(start)}') AND \1 <= toDate('{day(end)}')",
        sql,
    )
    sql = re.sub(
        r"\$__timeInterval\((\w+)\)",
        rf"toStartOfInterval(toDateTime(\1), INTERVAL {interval_seconds} second)",
        sql,
    )
    sql = sql.replace("$__fromTime", f"toDateTime({start})").replace(
        "$__toTime", f"toDateTime({end})"
    )
    sql = sql.replace("${webhook:singlequote}", "'main'")
    assert "$" not in sql, sql
    return sql


def dashboard() -> dict[str, Any]:
    document: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return document


def test_the_dashboard_uses_the_plugin_and_its_variables() -> None:
    document = dashboard()
    panels = document["panels"]
    assert len({p["id"] for p in panels}) == len(panels) >= 12
    for panel in panels:
        assert panel["datasource"] == {
            "type": "grafana-clickhouse-datasource",
            "uid": "${datasource}",
        }
        (target,) = panel["targets"]
        assert target["editorType"] == "sql" and "${webhook:singlequote}" in target["rawSql"]
    variables = {v["name"]: v for v in document["templating"]["list"]}
    assert variables["datasource"]["query"] == "grafana-clickhouse-datasource"


async def test_every_dashboard_panel_runs_and_shows_the_streams_figures(tmp_path: Path) -> None:
    document = dashboard()
    end = int(time.time())
    start = end - 30 * 86_400
    async with seeded(tmp_path) as data:
        expected = truth(data.unique)
        (webhook,) = [v for v in document["templating"]["list"] if v["name"] == "webhook"]
        assert await data.read(webhook["query"]) == [{"webhook": "main"}]
        values: dict[str, list[dict[str, Any]]] = {}
        for panel in document["panels"]:
            rows = await data.read(expand_grafana(panel["targets"][0]["rawSql"], start, end))
            assert rows, panel["title"]
            values[panel["title"]] = rows
        assert values["Delivered"] == [{"delivered": expected["delivered"]}]
        (rate,) = values["Delivery rate"]
        assert rate["delivery_rate"] == pytest.approx(expected["delivered"] / expected["processed"])
        per_day = sum(int(row["events"]) for row in values["Events per day by type"])
        per_hour = sum(int(row["events"]) for row in values["Events per hour by type"])
        assert per_day == per_hour == expected["events"]


# --- the BI user cannot write ----------------------------------------------------------------

BI_WRITES = [
    "INSERT INTO email_events (sg_event_id, event) VALUES ('forged', 'delivered')",
    "INSERT INTO daily_event_counts_state SELECT * FROM daily_event_counts_state",
    "ALTER TABLE email_events DELETE WHERE 1",
    "DELETE FROM message_lifecycle_state WHERE 1",
    "ALTER TABLE email_events MODIFY TTL event_time + INTERVAL 1 DAY",
    "OPTIMIZE TABLE email_events FINAL",
    "TRUNCATE TABLE daily_bounce_counts_state",
    "DROP VIEW email_events_dedup",
    "DROP TABLE sgpipe_schema_migrations",
    "CREATE OR REPLACE VIEW email_events_dedup AS SELECT 1",
    "RENAME TABLE email_events TO email_events_old",
]


async def test_the_bi_user_reads_everything_and_changes_nothing(tmp_path: Path) -> None:
    async with seeded(tmp_path) as data:
        db = data.store.database
        before = await data.store.value(f"SELECT count() FROM {db}.email_events")
        for sql in BI_WRITES:
            with pytest.raises(DatabaseError, match=r"\b(497|164)\b"):
                await data.reader.command(sql)
        assert await data.store.value(f"SELECT count() FROM {db}.email_events") == before
        tables = await data.store.rows(
            "SELECT name FROM system.tables WHERE database = {db:String} ORDER BY name", db=db
        )
        for table in (t["name"] for t in tables):  # every table and view is readable
            (row,) = await data.read(f"SELECT count() AS n FROM {table}")
            assert row["n"] > 0 or table == "dead_letters", table  # no dead letter was seeded
