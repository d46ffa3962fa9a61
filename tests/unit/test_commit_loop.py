"""CommitLoop's delivery contract, with a fake consumer at the edge: offsets are committed
only for what was flushed, and a stop never throws buffered records away silently."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, field

import pytest
from aiokafka.structs import OffsetAndMetadata, TopicPartition

from sgpipe.runtime.kafka import CommitLoop, DrainIncomplete, Record

TOPIC = "events"
PARTITION = TopicPartition(TOPIC, 0)


@dataclass
class FakeRecord:
    offset: int
    topic: str = TOPIC
    partition: int = 0
    value: bytes = b""
    headers: tuple[tuple[str, bytes], ...] = ()


@dataclass
class FakeConsumer:
    """Serves queued records a poll at a time and remembers every commit."""

    pending: list[FakeRecord] = field(default_factory=list)
    commits: list[dict[TopicPartition, int]] = field(default_factory=list)
    polls_after_stop: int = 0

    async def getmany(
        self, timeout_ms: int = 0, max_records: int | None = None
    ) -> dict[TopicPartition, list[FakeRecord]]:
        if not self.pending:
            await asyncio.sleep(min(timeout_ms, 20) / 1000)
            return {}
        count = max_records or len(self.pending)
        taken, self.pending = self.pending[:count], self.pending[count:]
        return {PARTITION: taken}

    async def commit(self, offsets: dict[TopicPartition, OffsetAndMetadata]) -> None:
        self.commits.append({tp: meta.offset for tp, meta in offsets.items()})


@dataclass
class FlakyFlush:
    """Fails the first ``failures`` calls (or always, with -1), records what it wrote."""

    failures: int = 0
    written: list[list[int]] = field(default_factory=list)
    calls: int = 0

    async def __call__(self, records: Sequence[Record]) -> None:
        self.calls += 1
        if self.failures < 0 or self.calls <= self.failures:
            raise ConnectionError("downstream unavailable")
        self.written.append([record.offset for record in records])


def loop_for(consumer: FakeConsumer, flush: FlakyFlush, max_records: int = 100) -> CommitLoop:
    return CommitLoop(
        consumer,
        flush,
        name="test",
        max_records=max_records,
        max_seconds=0.0,
        retry_backoff_max_seconds=0.05,
    )


def records(*offsets: int) -> list[FakeRecord]:
    return [FakeRecord(offset) for offset in offsets]


async def run_until_consumed(loop: CommitLoop, consumer: FakeConsumer, **kwargs: object) -> None:
    stop = asyncio.Event()
    task = asyncio.create_task(loop.run(stop, **kwargs))  # type: ignore[arg-type]
    for _ in range(200):
        if not consumer.pending and consumer.commits:
            break
        await asyncio.sleep(0.01)
    stop.set()
    await asyncio.wait_for(task, timeout=10)


async def test_a_failing_flush_is_retried_and_commits_only_after_it_succeeds() -> None:
    consumer = FakeConsumer(records(0, 1, 2))
    flush = FlakyFlush(failures=2)
    await run_until_consumed(loop_for(consumer, flush), consumer)
    assert flush.calls == 3
    assert flush.written == [[0, 1, 2]]
    assert consumer.commits == [{PARTITION: 3}]


async def test_records_are_flushed_in_batches_of_max_records() -> None:
    consumer = FakeConsumer(records(0, 1, 2, 3, 4))
    flush = FlakyFlush()
    await run_until_consumed(loop_for(consumer, flush, max_records=2), consumer)
    assert flush.written == [[0, 1], [2, 3], [4]]
    assert consumer.commits[-1] == {PARTITION: 5}


async def test_drain_consumes_everything_left_before_returning() -> None:
    consumer = FakeConsumer()
    flush = FlakyFlush()
    stop = asyncio.Event()
    stop.set()
    consumer.pending = records(0, 1, 2, 3)
    await loop_for(consumer, flush, max_records=3).run(stop, drain=True, stop_timeout=5)
    assert [offset for batch in flush.written for offset in batch] == [0, 1, 2, 3]
    assert consumer.commits[-1] == {PARTITION: 4}


async def test_drain_retries_a_failing_flush_instead_of_dropping_it() -> None:
    # Found in review: a flush failing during the drain used to clear its buffer and let a
    # later successful flush commit past the records it had dropped.
    consumer = FakeConsumer()
    flush = FlakyFlush(failures=1)
    stop = asyncio.Event()
    stop.set()
    consumer.pending = records(0, 1, 2)
    await loop_for(consumer, flush, max_records=2).run(stop, drain=True, stop_timeout=5)
    assert flush.written == [[0, 1], [2]]
    assert consumer.commits == [{PARTITION: 2}, {PARTITION: 3}]


async def test_drain_that_cannot_write_raises_and_commits_nothing() -> None:
    consumer = FakeConsumer()
    flush = FlakyFlush(failures=-1)
    stop = asyncio.Event()
    stop.set()
    consumer.pending = records(0, 1, 2)
    with pytest.raises(DrainIncomplete, match="2 records not written"):
        await loop_for(consumer, flush, max_records=2).run(stop, drain=True, stop_timeout=0.3)
    assert consumer.commits == []
    # It stopped polling once a flush could not be written: record 2 was never taken.
    assert [record.offset for record in consumer.pending] == [2]


async def test_stop_without_drain_leaves_unwritten_records_uncommitted() -> None:
    consumer = FakeConsumer(records(0, 1))
    flush = FlakyFlush(failures=-1)
    stop = asyncio.Event()
    loop = loop_for(consumer, flush)
    task = asyncio.create_task(loop.run(stop, stop_timeout=0.2))
    await asyncio.sleep(0.1)
    stop.set()
    await asyncio.wait_for(task, timeout=5)  # returns: Kafka will redeliver
    assert flush.written == []
    assert consumer.commits == []


async def test_flush_before_revoke_commits_the_buffer() -> None:
    consumer = FakeConsumer()
    flush = FlakyFlush()
    loop = loop_for(consumer, flush)
    loop._buffer.extend(records(5, 6))  # what a poll had buffered when the rebalance began
    await loop.rebalance_listener().on_partitions_revoked([PARTITION])
    assert flush.written == [[5, 6]]
    assert consumer.commits == [{PARTITION: 7}]
