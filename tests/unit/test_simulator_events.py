"""The simulator's event stream and POST bodies: SendGrid's shapes, quirks and duplicates."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from functools import cache
from itertools import islice
from typing import Any

import msgspec
import pytest

from processors.normalize import BatchContext, normalize_event
from sgpipe.simulator.batches import PlannedPost, PostPlanner, sendgrid_body
from sgpipe.simulator.events import EventStream

START = 1_735_689_600
SAMPLE = 30_000


def stream(seed: int, count: int, start: int = START) -> list[bytes]:
    return list(islice(iter(EventStream(seed, start, 1.0)), count))


@cache
def sample_events() -> tuple[dict[str, Any], ...]:
    return tuple(json.loads(event) for event in stream(7, SAMPLE))


def test_the_same_seed_gives_the_same_bytes_and_another_seed_does_not() -> None:
    assert stream(42, 5000) == stream(42, 5000)
    assert stream(42, 5000) != stream(43, 5000)
    # Timestamps come from start_time, never from the clock.
    first = json.loads(stream(42, 1, start=1_600_000_000)[0])
    assert int(first["timestamp"]) in (1_600_000_000, 1_600_000_000_000)


def test_event_ids_are_unique() -> None:
    ids = [event["sg_event_id"] for event in sample_events()]
    assert len(set(ids)) == len(ids) == SAMPLE


def test_every_event_is_compact_json_as_sendgrid_sends_it() -> None:
    for raw in stream(7, 2000):
        assert raw == msgspec.json.encode(json.loads(raw))  # compact, no whitespace
        assert b"\n" not in raw


def test_every_event_normalizes_in_the_pipeline() -> None:
    # Anything the simulator sends must be an event the processor keeps, not a dead letter.
    context = BatchContext(webhook="main", received_at_ms=0, request_id="r")
    for raw, event in zip(stream(7, SAMPLE), sample_events(), strict=True):
        normalized = normalize_event(event, raw.decode(), context)
        assert normalized.sg_event_id == event["sg_event_id"]
        # Every quirk the simulator sends is one the event contract types without loss.
        assert normalized.coercion_errors == ()


EVENT_TYPES = [
    "processed",
    "dropped",
    "delivered",
    "deferred",
    "bounce",
    "open",
    "click",
    "spamreport",
    "unsubscribe",
    "group_unsubscribe",
    "group_resubscribe",
    "account_status_change",
]


@pytest.mark.parametrize("event_type", EVENT_TYPES)
def test_every_event_type_occurs(event_type: str) -> None:
    assert any(event["event"] == event_type for event in sample_events())


def _is(event_type: str, predicate: Callable[[dict[str, Any]], bool]) -> Callable[..., bool]:
    return lambda event: event["event"] == event_type and predicate(event)


# Each documented field and type quirk (docs/sendgrid-event-webhook.md) that must show up.
QUIRKS: dict[str, Callable[[dict[str, Any]], bool]] = {
    "timestamp as int seconds": lambda e: (
        isinstance(e["timestamp"], int) and e["timestamp"] < 10**11
    ),
    "timestamp as a string": lambda e: isinstance(e["timestamp"], str),
    "timestamp in milliseconds (Single Send)": lambda e: (
        int(e["timestamp"]) > 10**11 and "singlesend_id" in e
    ),
    "category as a string": lambda e: isinstance(e.get("category"), str),
    "category as an array": lambda e: isinstance(e.get("category"), list),
    "no category": lambda e: "category" not in e and "email" in e,
    "custom args": lambda e: "userid" in e,
    "custom arg that is not a string": lambda e: isinstance(e.get("plan_id"), int),
    "tls as 1/0": lambda e: e.get("tls") in (0, 1) and not isinstance(e.get("tls"), bool),
    "tls as a string": lambda e: e.get("tls") in ("0", "1"),
    "url_offset object": lambda e: set(e.get("url_offset", {})) == {"index", "type"},
    "status 5.x.y": lambda e: str(e.get("status", "")).count(".") == 2,
    "status 550": lambda e: e.get("status") == "550",
    "ip unknown": lambda e: e.get("ip") == "unknown",
    "sg_message_id with a leading space": lambda e: e.get("sg_message_id", "x")[0] == " ",
    "async bounce without sg_message_id": _is("bounce", lambda e: "sg_message_id" not in e),
    "empty smtp-id": lambda e: e.get("smtp-id") == "",
    "asm_group_id above 32767": lambda e: e.get("asm_group_id", 0) > 32767,
    "sg_event_id over 100 characters": lambda e: len(e["sg_event_id"]) > 100,
    "invalid email": lambda e: "@" not in e.get("email", "@") or "@@" in e.get("email", ""),
    "pool object": lambda e: set(e.get("pool", {})) == {"name", "id"},
    "sg_machine_open true": _is("open", lambda e: e["sg_machine_open"] is True),
    "sg_machine_open false": _is("open", lambda e: e["sg_machine_open"] is False),
    "deferred attempt as a string": _is("deferred", lambda e: e["attempt"].isdigit()),
    "deferred domain and from": _is("deferred", lambda e: "domain" in e and "from" in e),
    "hard bounce": _is("bounce", lambda e: e["type"] == "bounce"),
    "blocked bounce": _is("bounce", lambda e: e["type"] == "blocked"),
    "bounce classification": _is("bounce", lambda e: bool(e["bounce_classification"])),
    "dropped reason": _is("dropped", lambda e: bool(e["reason"])),
    "click url": _is("click", lambda e: e["url"].startswith("http")),
    "group event asm_group_id": _is("group_unsubscribe", lambda e: "asm_group_id" in e),
    "account_status_change without email": _is(
        "account_status_change",
        lambda e: "email" not in e and e["type"].startswith(("compliance_", "reactivate")),
    ),
    "dynamic template": lambda e: str(e.get("sg_template_id", "")).startswith("d-"),
    "legacy marketing campaign": lambda e: "marketing_campaign_split_id" in e,
    "single send fields": lambda e: {"singlesend_name", "mc_stats", "phase_id"} <= set(e),
    "delivered response": _is("delivered", lambda e: e["response"].startswith("250")),
    "cert_err": lambda e: "cert_err" in e,
    "useragent": lambda e: "useragent" in e,
    "non-ASCII text": lambda e: "Zürich" in json.dumps(e.get("category"), ensure_ascii=False),
}


@pytest.mark.parametrize("quirk", sorted(QUIRKS))
def test_documented_quirk_occurs(quirk: str) -> None:
    assert any(QUIRKS[quirk](event) for event in sample_events()), quirk


def test_events_arrive_out_of_order_sometimes() -> None:
    # SendGrid's servers post independently: an open can arrive before its delivered.
    seen_messages: set[str] = set()
    early_engagement = 0
    for event in sample_events():
        message = event.get("sg_message_id", "").strip()
        if event["event"] == "delivered":
            seen_messages.add(message)
        elif event["event"] in ("open", "click") and message not in seen_messages:
            early_engagement += 1
    assert 0 < early_engagement < SAMPLE // 100


def test_lifecycles_hang_together() -> None:
    # Every open or click belongs to a message that was processed in the same stream (or will
    # be: the stream is cut at SAMPLE events). Most of them do within the sample.
    processed = {e["sg_message_id"].strip() for e in sample_events() if e["event"] == "processed"}
    engaged = [
        e["sg_message_id"].strip() for e in sample_events() if e["event"] in ("open", "click")
    ]
    assert sum(message in processed for message in engaged) > 0.95 * len(engaged)


def plan(**options: Any) -> list[PlannedPost]:
    events = EventStream(options.pop("seed", 5), START, 1.0)
    return list(PostPlanner(events, seed=5, **options))


def test_bodies_are_serialized_like_sendgrid() -> None:
    posts = plan(event_limit=3000, max_batch_bytes=64 * 1024)
    assert len(posts) > 5
    for post in posts:
        assert post.body.startswith(b'[{"')
        assert post.body.endswith(b"}]\r\n")
        items = post.body[1:-3].split(b",\r\n")
        assert len(items) == post.events
        assert [msgspec.json.encode(item) for item in json.loads(post.body)] == items
        assert len(post.body) <= 64 * 1024


def test_sendgrid_body_matches_the_official_vector_layout() -> None:
    from tests.sendgrid_vector import BODY

    event = json.loads(BODY)[0]
    assert sendgrid_body([json.dumps(event, separators=(",", ":")).encode()]) == BODY


def test_batches_fill_up_to_768_kb_without_passing_it() -> None:
    posts = plan(event_limit=6000)
    assert all(len(post.body) <= 768 * 1024 for post in posts)
    # Every batch but the last was closed because the next event did not fit.
    assert all(len(post.body) > 767 * 1024 for post in posts[:-1])


def test_a_rate_limits_events_per_batch_to_the_flush_interval() -> None:
    posts = plan(event_limit=1000, max_batch_events=math.ceil(50 * 2.0))
    assert [post.events for post in posts] == [100] * 10


def test_without_duplicates_every_event_is_posted_once() -> None:
    posts = plan(event_limit=5000, max_batch_bytes=32 * 1024)
    serials = [serial for post in posts for serial in post.serials]
    assert serials == list(range(5000))
    assert all(post.duplicate_events == 0 and post.resend_of is None for post in posts)


def test_duplicates_are_byte_identical_copies_of_events_and_whole_batches() -> None:
    posts = plan(event_limit=5000, max_batch_bytes=32 * 1024, duplicates=0.2)
    by_index = {post.index: post for post in posts}
    resent = [post for post in posts if post.resend_of is not None]
    assert resent, "whole batches are posted again"
    for post in resent:
        original = by_index[post.resend_of]  # type: ignore[index]
        assert post.body == original.body and post.index > original.index
        assert post.duplicate_events == post.events
    copies: dict[int, set[bytes]] = {}
    for post in posts:
        for serial, item in zip(post.serials, post.body[1:-3].split(b",\r\n"), strict=True):
            copies.setdefault(serial, set()).add(item)
    assert sorted(copies) == list(range(5000))  # every unique event, and no other
    assert all(len(versions) == 1 for versions in copies.values())  # copies are identical
    single_copies = sum(post.duplicate_events for post in posts if post.resend_of is None)
    assert single_copies > 0
    ids = [json.loads(post.body)[i]["sg_event_id"] for post in posts for i in range(post.events)]
    assert len(set(ids)) == 5000 < len(ids)


def test_duplicates_do_not_change_which_events_are_generated() -> None:
    def unique_bodies(duplicates: float) -> set[bytes]:
        posts = plan(event_limit=3000, duplicates=duplicates)
        return {item for post in posts for item in post.body[1:-3].split(b",\r\n")}

    assert unique_bodies(0.0) == unique_bodies(0.3)
