"""The stage loop writes its buffer as soon as its input is idle (a poll returns nothing),
instead of waiting out ``batch_max_seconds``; while records keep coming it still batches up to
``batch_max_records``. Fakes from tests/unit/test_stage_loop.py."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any

from aiokafka.structs import TopicPartition

from sgpipe.runtime.stage import StageLoop
from tests.unit.test_stage_loop import (
    FakeConsumer,
    FakeRecord,
    RecordingDeadLetters,
    RecordingWriter,
    echo,
    options,
    records,
)


async def run_until_written(
    loop: StageLoop[Any], writer: RecordingWriter, expected: int
) -> asyncio.Event:
    """Runs ``loop`` until ``expected`` outputs were written (deadline 10 s), then stops it;
    returns its stop event."""
    stop = asyncio.Event()
    task = asyncio.create_task(loop.run(stop))
    deadline = time.monotonic() + 10
    while sum(map(len, writer.written)) < expected and not task.done():
        assert time.monotonic() < deadline, f"{expected} outputs not written within 10 s"
        await asyncio.sleep(0.01)
    stop.set()
    await asyncio.wait_for(task, timeout=10)
    return stop


async def test_an_idle_input_flushes_the_buffer_without_waiting_out_the_window() -> None:
    # Mutation caught: flushing only when `_due()` (the batch then waits the hour's window
    # and is written by the stop, with `stop` already set).
    consumer = FakeConsumer(records(b"a", b"b", b"c"))
    stop = asyncio.Event()
    stopped_at_write: list[bool] = []
    writer = RecordingWriter(observe=lambda _: stopped_at_write.append(stop.is_set()))
    loop = StageLoop(
        options(batch_max_seconds=3600.0, batch_max_records=100),
        consumer,
        echo,
        writer,
        RecordingDeadLetters(),
    )
    task = asyncio.create_task(loop.run(stop))
    deadline = time.monotonic() + 10
    while not consumer.commits and not task.done() and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    committed_before_stop = list(consumer.commits)
    stop.set()
    await asyncio.wait_for(task, timeout=10)

    assert committed_before_stop == [3]
    assert writer.written == [[b"a", b"b", b"c"]]
    assert stopped_at_write == [False]


async def test_a_busy_input_still_fills_batches_up_to_the_record_limit() -> None:
    consumer = FakeConsumer(records(*(f"r{i}".encode() for i in range(250))))
    writer = RecordingWriter()
    loop = StageLoop(
        options(batch_max_seconds=3600.0, batch_max_records=100),
        consumer,
        echo,
        writer,
        RecordingDeadLetters(),
    )

    await run_until_written(loop, writer, 250)

    # Full batches while records keep coming; the rest as soon as the input went idle.
    assert [len(batch) for batch in writer.written] == [100, 100, 50]
    assert consumer.commits == [100, 200, 250]


async def test_flush_when_idle_false_batches_strictly_by_size_and_time() -> None:
    # What an operator (or a test that must catch a batch in the stage) asks with
    # flush_when_idle: false -- an idle input is held until batch_max_seconds or the stop.
    consumer = CountingConsumer(records(b"a", b"b", b"c"))
    stop = asyncio.Event()
    stopped_at_write: list[bool] = []
    writer = RecordingWriter(observe=lambda _: stopped_at_write.append(stop.is_set()))
    loop = StageLoop(
        options(batch_max_seconds=3600.0, batch_max_records=100, flush_when_idle=False),
        consumer,
        echo,
        writer,
        RecordingDeadLetters(),
    )
    task = asyncio.create_task(loop.run(stop))
    deadline = time.monotonic() + 10
    # Several polls found the input idle after the three records: each would have flushed.
    while consumer.empty_polls < 3 and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    assert consumer.empty_polls >= 3
    committed_before_stop = list(consumer.commits)
    stop.set()
    await asyncio.wait_for(task, timeout=10)

    assert committed_before_stop == []
    assert writer.written == [[b"a", b"b", b"c"]]
    assert stopped_at_write == [True]  # written by the stop, not by the idle poll


@dataclass
class CountingConsumer(FakeConsumer):
    """Counts the polls that found nothing after the log was read to its end."""

    empty_polls: int = 0

    async def getmany(
        self, *partitions: TopicPartition, timeout_ms: int = 0, max_records: int | None = None
    ) -> dict[TopicPartition, list[FakeRecord]]:
        polled = await super().getmany(*partitions, timeout_ms=timeout_ms, max_records=max_records)
        if not polled and self.position >= len(self.log):
            self.empty_polls += 1
        return polled
