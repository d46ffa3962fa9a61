"""What is acknowledged but not yet written: counted in Kafka, for `sgpipe up`'s stop reports.

Everything the ingress acknowledged is in the raw topic; the processor commits a raw batch once
its events are on the events topic, the sink commits events once ClickHouse has them. So what is
left unwritten is exactly what lies past the committed offsets of the two groups: raw batches
past the processor's (and the events inside them) and events past the sink's. It is counted by
reading those records with a consumer outside the groups (nothing is committed), because the
end offsets tansu reports are not reliable (docs/embedded.md); the high-water mark of a fetch
is, and tells when a partition has been read to its end.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass

from aiokafka import AIOKafkaConsumer
from aiokafka.errors import KafkaConnectionError
from aiokafka.structs import TopicPartition

from processors.split import split_elements
from sgpipe.runtime.errors import describe
from sgpipe.runtime.kafka import create_admin, create_reader
from sgpipe.runtime.settings import Settings

_POLL_MS = 200
_CLOSE_SECONDS = 2.0


@dataclass(frozen=True, slots=True)
class Backlog:
    """Acknowledged and not yet written. ``exact`` False: counting ran out of time, these
    are lower bounds."""

    raw_batches: int = 0
    raw_events: int = 0  # elements of those raw batches
    events: int = 0  # normalized events not yet in ClickHouse
    exact: bool = True

    @property
    def empty(self) -> bool:
        return self.exact and self.raw_batches == 0 and self.events == 0


class BacklogUnknown(Exception):
    """The backlog could not be counted (the broker is unreachable): ``str`` says why."""


async def count_backlog(
    settings: Settings, timeout: float, *, before_ms: int | None = None
) -> Backlog:
    """Count the raw topic past the processor's committed offsets and the events topic past
    the sink's, within ``timeout`` seconds; with ``before_ms``, only records produced before
    that time (what a previous run left, not what arrived since). Raises BacklogUnknown."""
    deadline = time.monotonic() + timeout
    try:
        return await asyncio.wait_for(_count(settings, deadline, before_ms), timeout)
    except TimeoutError as exc:
        raise BacklogUnknown(f"the broker did not answer within {timeout:g} s") from exc
    except KafkaConnectionError as exc:
        raise BacklogUnknown("the broker is unreachable") from exc
    except Exception as exc:  # noqa: BLE001 - any failure means: not counted
        raise BacklogUnknown(describe(exc)) from exc


async def _count(settings: Settings, deadline: float, before_ms: int | None) -> Backlog:
    kafka = settings.kafka
    groups = {
        kafka.topics.raw: settings.processor.group_id,
        kafka.topics.events: settings.sink.group_id,
    }
    admin = create_admin(kafka)
    reader = create_reader(kafka)
    try:
        # Both closed whatever happens: a client whose start failed still holds connections.
        await admin.start()
        await reader.start()
        await reader.topics()  # metadata: which partitions each topic has
        starts: dict[TopicPartition, int | None] = {}
        for topic, group in groups.items():
            partitions = [
                TopicPartition(topic, number)
                for number in sorted(reader.partitions_for_topic(topic) or ())
            ]
            if not partitions:
                continue
            # Partitions named: tansu cannot list a group's offsets otherwise.
            committed = await admin.list_consumer_group_offsets(group, partitions=partitions)
            for partition in partitions:
                meta = committed.get(partition)
                starts[partition] = meta.offset if meta is not None and meta.offset >= 0 else None
        return await _read_to_end(reader, starts, kafka.topics.raw, deadline, before_ms)
    finally:
        # Bounded: this also runs when the count is cancelled for taking too long.
        with contextlib.suppress(Exception):
            await asyncio.wait_for(reader.stop(), _CLOSE_SECONDS)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(admin.close(), _CLOSE_SECONDS)


async def _read_to_end(
    reader: AIOKafkaConsumer[bytes, bytes],
    starts: dict[TopicPartition, int | None],
    raw_topic: str,
    deadline: float,
    before_ms: int | None = None,
) -> Backlog:
    if not starts:
        return Backlog()
    reader.assign(list(starts))
    never_committed = [partition for partition, offset in starts.items() if offset is None]
    if never_committed:
        await reader.seek_to_beginning(*never_committed)
    for partition, offset in starts.items():
        if offset is not None:
            reader.seek(partition, offset)
    raw_batches = raw_events = events = 0
    pending = set(starts)
    # Half a second is kept for leaving: a count cut short is still reported.
    while pending and time.monotonic() < deadline - 0.5:
        polled = await reader.getmany(timeout_ms=_POLL_MS)
        for partition, records in polled.items():
            if before_ms is not None:
                records = [record for record in records if record.timestamp < before_ms]
            if partition.topic == raw_topic:
                raw_batches += len(records)
                raw_events += sum(_elements(record.value) for record in records)
            else:
                events += len(records)
        for partition in list(pending):
            highwater = reader.highwater(partition)
            if highwater is not None and await reader.position(partition) >= highwater:
                pending.discard(partition)
    return Backlog(raw_batches, raw_events, events, exact=not pending)


def _elements(body: bytes | None) -> int:
    try:
        return len(split_elements(body or b""))
    except ValueError:  # not a JSON array: a dead letter as a whole, no events in it
        return 0
