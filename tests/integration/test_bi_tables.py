"""The BI tables on the real engine: events delivered twice (in two batches; an insert retried
with the same token) are counted once in email_events_dedup and in every aggregate, a retried
insert is stored and fed to the views once, and each message's lifecycle is the same whatever
order, and however often, its events arrive."""

from __future__ import annotations

import json
import random
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from schemas.email_event import EmailEventCodec
from sgpipe.runtime.messages import Message
from sgpipe.runtime.migrations import apply_migrations
from sgpipe.runtime.stage import BatchInfo, batch_info_of
from tests.golden import encoded_events
from tests.integration.bi_support import (
    Store,
    aggregate_mismatches,
    batch_info,
    seeded_batches,
    store,
)

pytest.importorskip("chdb")

pytestmark = pytest.mark.clickhouse

STATE_TABLES = (
    "daily_event_counts_state",
    "daily_domain_counts_state",
    "daily_template_counts_state",
    "daily_campaign_counts_state",
    "daily_bounce_counts_state",
    "message_lifecycle_state",
)


def unique_records(events: int, seed: int) -> list[dict[str, Any]]:
    """Simulated events, each once."""
    seen: dict[str, dict[str, Any]] = {}
    for batch in seeded_batches(events=events, seed=seed, duplicates=0.0):
        for record in batch:
            seen.setdefault(record["sg_event_id"], record)
    return list(seen.values())


async def stored_rows(s: Store) -> dict[str, int]:
    """Rows physically stored per table (copies included: no FINAL, no merge)."""
    counts = {}
    for table in ("email_events", *STATE_TABLES):
        counts[table] = int(await s.value(f"SELECT count() FROM {s.database}.{table}"))
    return counts


async def totals(s: Store) -> dict[str, int]:
    db = s.database
    return {
        "dedup": await s.value(f"SELECT count() FROM {db}.email_events_dedup"),
        "events": await s.value(
            f"SELECT uniqExactMerge(events) FROM {db}.daily_event_counts_state"
        ),
        "by_domain": await s.value(f"SELECT sum(events) FROM {db}.daily_domain_counts"),
        "bounces": await s.value(f"SELECT sum(events) FROM {db}.daily_bounce_counts"),
        "opens": await s.value(f"SELECT sum(opens) FROM {db}.message_lifecycle"),
        "clicks": await s.value(f"SELECT sum(clicks) FROM {db}.message_lifecycle"),
        "messages": await s.value(f"SELECT count() FROM {db}.message_lifecycle"),
        "template_events": await s.value(f"SELECT sum(events) FROM {db}.daily_template_counts"),
        "campaign_events": await s.value(f"SELECT sum(events) FROM {db}.daily_campaign_counts"),
    }


def expected_totals(records: list[dict[str, Any]]) -> dict[str, int]:
    kinds = Counter(r["event"] for r in records)
    with_message = [r for r in records if r["sg_message_id"] is not None]
    return {
        "dedup": len(records),
        "events": len(records),
        "by_domain": len(records),
        "bounces": kinds["bounce"],
        "opens": sum(r["event"] == "open" for r in with_message),
        "clicks": sum(r["event"] == "click" for r in with_message),
        "messages": len({r["sg_message_id"] for r in with_message}),
        "template_events": sum(bool(r["sg_template_id"] or r["sg_template_name"]) for r in records),
        "campaign_events": sum(
            bool(r["marketing_campaign_id"] or r["marketing_campaign_name"] or r["singlesend_id"])
            for r in records
        ),
    }


async def test_events_delivered_twice_are_counted_once_everywhere(tmp_path: Path) -> None:
    records = unique_records(events=1500, seed=21)
    expected = expected_totals(records)
    assert expected["bounces"] and expected["opens"] and expected["template_events"]
    async with store(tmp_path) as s:
        await s.insert(records, batch=batch_info("sgpipe.events", 0, 0, len(records) - 1))
        assert await totals(s) == expected
        # SendGrid delivers every one of them again, hours later, in other batches (other
        # offsets): stored twice, counted once.
        halves = (records[::2], records[1::2])
        for index, half in enumerate(halves):
            await s.insert(
                half,
                batch=batch_info("sgpipe.events", 1, index * 10_000, index * 10_000 + len(half)),
            )
        assert (await stored_rows(s))["email_events"] == 2 * len(records)
        assert await totals(s) == expected
        assert await aggregate_mismatches(s) == {}
        # Merges change nothing either.
        for table in ("email_events", *STATE_TABLES):
            await s.client.command(f"OPTIMIZE TABLE {s.database}.{table} FINAL")
        assert (await stored_rows(s))["email_events"] == len(records)
        assert await totals(s) == expected
        assert await aggregate_mismatches(s) == {}


async def test_a_retried_insert_is_stored_once_and_feeds_the_views_once(tmp_path: Path) -> None:
    """The sink's token (Kafka offsets of the batch) makes a retried insert -- one ClickHouse
    stored although the sink saw it fail -- a no-op in email_events and in every view's table."""
    records = unique_records(events=800, seed=22)
    batch = batch_info("sgpipe.events", 2, 500, 500 + len(records) - 1)
    async with store(tmp_path) as s:
        await s.insert(records, batch=batch)
        once = await stored_rows(s)
        assert all(once.values()), once
        await s.insert(records, batch=batch)  # the retry
        assert await stored_rows(s) == once
        assert await totals(s) == expected_totals(records)
        # Not a coincidence: another batch (other offsets) with the same rows is stored.
        await s.insert(records, batch=batch_info("sgpipe.events", 2, 5000, 5000 + len(records) - 1))
        assert (await stored_rows(s))["email_events"] == 2 * once["email_events"]


async def test_a_new_log_at_the_same_offsets_is_stored_not_taken_for_a_retry(
    tmp_path: Path,
) -> None:
    """A broker that came back empty (or a topic deleted and re-created) numbers its new log
    from offset 0 again: the sink's batches of the new log have the offsets of batches it
    inserted from the old one. Their tokens must differ (the records' digest, BatchInfo), or
    ClickHouse drops the new events as retries -- acknowledged, never stored (issue 21's
    memory-broker restart). The same records read again still give the same token."""
    old_log = unique_records(events=300, seed=23)
    new_log = unique_records(events=300, seed=24)

    def read(records: list[dict[str, Any]]) -> BatchInfo:
        # The sink's view of them: Kafka records of sgpipe.events/1 from offset 0.
        return batch_info_of(
            [
                Message("sgpipe.events", 1, offset, 1_735_689_600_000 + offset, None, body)
                for offset, body in enumerate(
                    json.dumps(record, default=str, sort_keys=True).encode() for record in records
                )
            ]
        )

    async with store(tmp_path) as s:
        await s.insert(old_log, batch=read(old_log))
        await s.insert(new_log, batch=read(new_log))
        assert (await stored_rows(s))["email_events"] == len(old_log) + len(new_log)
        assert await totals(s) == expected_totals(old_log + new_log)
        await s.insert(new_log, batch=read(new_log))  # the new log's batch retried
        assert (await stored_rows(s))["email_events"] == len(old_log) + len(new_log)


# --- message lifecycles ----------------------------------------------------------------------

T0 = 1_735_689_600  # 2025-01-01T00:00:00Z


def event(kind: str, message: str | None, serial: int, at: int, **fields: Any) -> bytes:
    document: dict[str, Any] = {
        "email": f"{message or 'async'}@example.com",
        "event": kind,
        "sg_event_id": f"{message}-{kind}-{serial}",
        "timestamp": T0 + at,
        **fields,
    }
    if message is not None:
        document["sg_message_id"] = f"{message}.filterdrecv-1.0"
    return json.dumps(document).encode()


LIFECYCLE_EVENTS = [
    # m1: deferred twice, delivered, opened (once by a privacy proxy), clicked twice.
    event("processed", "m1", 1, 0),
    event("deferred", "m1", 2, 30, attempt="1"),
    event("deferred", "m1", 3, 90, attempt="2"),
    event("delivered", "m1", 4, 150),
    event("open", "m1", 5, 200, sg_machine_open=True),
    event("open", "m1", 6, 300, sg_machine_open=False),
    event("click", "m1", 7, 310, url="https://shop.example/"),
    event("click", "m1", 8, 400, url="https://shop.example/"),
    # m2: blocked.
    event("processed", "m2", 1, 0),
    event("bounce", "m2", 2, 5, type="blocked", bounce_classification="Reputation"),
    # m3: dropped in the second it was processed (a tie SendGrid's timestamps make common).
    event("processed", "m3", 1, 10),
    event("dropped", "m3", 2, 10, reason="Bounced Address"),
    # m4: delivered in the second it was processed, opened, then unsubscribed.
    event("processed", "m4", 1, 20),
    event("delivered", "m4", 2, 20),
    event("open", "m4", 3, 21),
    event("unsubscribe", "m4", 4, 50),
    # An asynchronous bounce has no message id: no lifecycle row.
    event("bounce", None, 1, 600, type="bounce", bounce_classification="Invalid Address"),
]


def at(seconds: int) -> datetime:
    return datetime.fromtimestamp(T0 + seconds, UTC).replace(tzinfo=None)


EXPECTED_LIFECYCLES = [
    {
        "sg_message_id": "m1.filterdrecv-1.0",
        "processed_at": at(0),
        "first_deferred_at": at(30),
        "delivered_at": at(150),
        "bounced_at": None,
        "dropped_at": None,
        "first_open_at": at(200),
        "first_click_at": at(310),
        "last_event_at": at(400),
        "last_event": "click",
        "delivery_status": "delivered",
        "bounce_type": None,
        "bounce_classification": None,
        "deferrals": 2,
        "opens": 2,
        "machine_opens": 1,
        "clicks": 2,
    },
    {
        "sg_message_id": "m2.filterdrecv-1.0",
        "processed_at": at(0),
        "first_deferred_at": None,
        "delivered_at": None,
        "bounced_at": at(5),
        "dropped_at": None,
        "first_open_at": None,
        "first_click_at": None,
        "last_event_at": at(5),
        "last_event": "bounce",
        "delivery_status": "bounce",
        "bounce_type": "blocked",
        "bounce_classification": "Reputation",
        "deferrals": 0,
        "opens": 0,
        "machine_opens": 0,
        "clicks": 0,
    },
    {
        "sg_message_id": "m3.filterdrecv-1.0",
        "processed_at": at(10),
        "first_deferred_at": None,
        "delivered_at": None,
        "bounced_at": None,
        "dropped_at": at(10),
        "first_open_at": None,
        "first_click_at": None,
        "last_event_at": at(10),
        "last_event": "dropped",
        "delivery_status": "dropped",
        "bounce_type": None,
        "bounce_classification": None,
        "deferrals": 0,
        "opens": 0,
        "machine_opens": 0,
        "clicks": 0,
    },
    {
        "sg_message_id": "m4.filterdrecv-1.0",
        "processed_at": at(20),
        "first_deferred_at": None,
        "delivered_at": at(20),
        "bounced_at": None,
        "dropped_at": None,
        "first_open_at": at(21),
        "first_click_at": None,
        "last_event_at": at(50),
        "last_event": "unsubscribe",
        "delivery_status": "delivered",
        "bounce_type": None,
        "bounce_classification": None,
        "deferrals": 0,
        "opens": 1,
        "machine_opens": 0,
        "clicks": 0,
    },
]
LIFECYCLE_COLUMNS = ", ".join(EXPECTED_LIFECYCLES[0])


async def lifecycles(s: Store) -> list[dict[str, Any]]:
    return await s.rows(
        f"SELECT {LIFECYCLE_COLUMNS} FROM {s.database}.message_lifecycle ORDER BY sg_message_id"
    )


@pytest.mark.parametrize("seed", range(6))
async def test_lifecycles_are_right_whatever_order_and_copies_the_events_arrive_in(
    tmp_path: Path, seed: int
) -> None:
    codec = EmailEventCodec()
    records = [codec.decode(value) for value in encoded_events(LIFECYCLE_EVENTS, codec)]
    arrival = random.Random(seed)
    order = records[::-1] if seed == 0 else arrival.sample(records, len(records))
    # SendGrid re-sends some of them later; each post is its own insert.
    order += arrival.sample(records, len(records) // 3)
    async with store(tmp_path) as s:
        for offset, record in enumerate(order):
            await s.insert([record], batch=batch_info("sgpipe.events", 0, offset, offset))
        assert await lifecycles(s) == EXPECTED_LIFECYCLES
        await s.client.command(f"OPTIMIZE TABLE {s.database}.message_lifecycle_state FINAL")
        assert await lifecycles(s) == EXPECTED_LIFECYCLES
        assert await aggregate_mismatches(s) == {}


async def test_lifecycles_are_right_when_backfilled_from_stored_events(tmp_path: Path) -> None:
    """The migration fills the lifecycle from events stored before it (same result)."""
    codec = EmailEventCodec()
    records = [codec.decode(value) for value in encoded_events(LIFECYCLE_EVENTS, codec)]
    async with store(tmp_path, migrate=False) as s:
        from sgpipe.runtime.migrations import shipped_migrations

        await apply_migrations(s.client, s.database, migrations=shipped_migrations()[:3])
        await s.insert(records[::-1], batch=batch_info("sgpipe.events", 0, 0, 99))
        await s.insert(records[:5], batch=batch_info("sgpipe.events", 0, 100, 104))
        await apply_migrations(s.client, s.database)
        assert await lifecycles(s) == EXPECTED_LIFECYCLES


async def test_look_ups_by_recipient_and_message_use_the_bloom_filters(tmp_path: Path) -> None:
    """Through the view BI tools query (FINAL included), and for a message's lifecycle."""
    records = unique_records(events=300, seed=23)
    async with store(tmp_path) as s:
        await s.insert(records, batch=batch_info("sgpipe.events", 0, 0, len(records) - 1))
        db = s.database
        plans = {
            "email_bloom": "email = 'a@b.c'",
            "sg_message_id_bloom": "sg_message_id = 'm'",
        }
        for index, where in plans.items():
            sql = f"SELECT * FROM {db}.email_events_dedup WHERE {where}"
            result = await s.client.query(f"EXPLAIN indexes = 1 {sql}")
            plan = "\n".join(row[0] for row in result.result_rows)
            assert f"Name: {index}" in plan, plan
        result = await s.client.query(
            f"EXPLAIN indexes = 1 SELECT * FROM {db}.message_lifecycle WHERE sg_message_id = 'm'"
        )
        plan = "\n".join(row[0] for row in result.result_rows)
        # The view's GROUP BY key filter reaches the state table's primary key.
        assert "Condition: (sg_message_id in ['m', 'm'])" in plan, plan
