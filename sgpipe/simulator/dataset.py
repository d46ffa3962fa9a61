"""Seeded data sets for the store: simulated SendGrid posts, processed by the real processor
into the records the sink writes.

No network, no Kafka: each post is turned into the raw-batch record the ingress would have
published, run through ``process_raw_record`` (split, normalize, PII policy, Avro encode) and
decoded as the sink decodes it. Tests, benchmarks and demos seed ClickHouse with it:

    posts = simulated_posts(20_000, seed=7, duplicates=0.05)
    records = sink_records(posts)          # one list per post, copies included
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from processors.pii import PiiPolicy
from processors.pipeline import process_raw_record
from schemas.email_event import EmailEventCodec
from schemas.raw_batch import RawBatch, raw_batch_headers
from sgpipe.runtime.messages import Message
from sgpipe.simulator.batches import PlannedPost, PostPlanner
from sgpipe.simulator.events import EventStream
from sgpipe.simulator.simulation import SEEDED_START_TIME

# Simulated time passes one second per message: whole lifecycles (deferrals, opens minutes
# after delivery) fit in a short stream.
MESSAGES_PER_SECOND = 1.0
# A post is received this long after its last event's timestamp (SendGrid batches for ~30 s).
_RECEIVE_DELAY_MS = 30_000


def simulated_posts(
    events: int,
    *,
    seed: int,
    duplicates: float = 0.0,
    start_time: int = SEEDED_START_TIME,
    max_batch_events: int | None = None,
) -> list[PlannedPost]:
    """The POST bodies ``sgpipe simulate --seed SEED --events EVENTS`` would send, in order
    (``duplicates``: share of extra copies, single events and whole re-sent posts)."""
    stream = EventStream(seed, start_time, MESSAGES_PER_SECOND)
    planner = PostPlanner(
        stream,
        seed=seed,
        duplicates=duplicates,
        event_limit=events,
        max_batch_events=max_batch_events,
    )
    return list(planner)


def sink_records(
    posts: Iterable[PlannedPost],
    *,
    webhook: str = "main",
    codec: EmailEventCodec | None = None,
    pii: PiiPolicy | None = None,
    start_time: int = SEEDED_START_TIME,
) -> list[list[dict[str, Any]]]:
    """Per post, the decoded records the sink receives for it (as ``ClickHouseWriter.write``
    takes them). Every element of a simulated post is a valid event: a rejection is a bug."""
    codec = codec or EmailEventCodec()
    batches: list[list[dict[str, Any]]] = []
    for post in posts:
        # Received a little after its events: deterministic, like the bodies themselves.
        received_at_ms = (start_time + post.stream_position) * 1000 + _RECEIVE_DELAY_MS
        raw = RawBatch(webhook, post.body, received_at_ms, f"req-{post.index}", None, "signature")
        message = Message(
            "sgpipe.raw", 0, post.index, received_at_ms, None, post.body, raw_batch_headers(raw)
        )
        processed = process_raw_record(message, codec, pii=pii)
        if processed.rejections:
            raise ValueError(f"post {post.index}: {processed.rejections[0]}")
        batches.append([codec.decode(event.value) for event in processed.events])
    return batches
