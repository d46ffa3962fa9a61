"""The stage loop through rebalances, with a fake group consumer that behaves like aiokafka's
where it matters: partitions move between members, a commit of a partition the consumer does
not hold raises, the highwater of one asserts, and the coordinator can refuse a commit
because the group moved on.

The contract (sgpipe/runtime/stage.py): revoked partitions are abandoned uncommitted, a commit
names only partitions still owned since their records were read, a refused commit is a
rejoin, and nothing about a rebalance stops the stage. Each test names the mutation it
catches."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiokafka.errors import (
    CommitFailedError,
    IllegalGenerationError,
    IllegalStateError,
    NoOffsetForPartitionError,
    OffsetOutOfRangeError,
    RebalanceInProgressError,
    UnknownMemberIdError,
)
from aiokafka.structs import OffsetAndMetadata, TopicPartition

from sgpipe.runtime import metrics
from sgpipe.runtime.stage import BatchInfo, StageLoop
from tests.unit.test_stage_loop import (
    FakeRecord,
    RecordingDeadLetters,
    RecordingWriter,
    echo,
    options,
)

TOPIC = "raw"
P0 = TopicPartition(TOPIC, 0)
P1 = TopicPartition(TOPIC, 1)


@dataclass
class GroupConsumer:
    """Two partitions' logs, this member's assignment, per-partition positions and the group's
    committed offsets. Like aiokafka: getmany reads only assigned partitions; commit raises
    IllegalStateError for a partition not assigned; highwater and seek assert assignment."""

    logs: dict[TopicPartition, list[FakeRecord]] = field(default_factory=dict)
    assigned: set[TopicPartition] = field(default_factory=lambda: {P0, P1})
    positions: dict[TopicPartition, int] = field(default_factory=dict)
    committed: dict[TopicPartition, int] = field(default_factory=dict)
    commit_errors: list[BaseException] = field(default_factory=list)
    poll_errors: list[BaseException] = field(default_factory=list)
    seeks: list[TopicPartition] = field(default_factory=list)
    paused: set[TopicPartition] = field(default_factory=set)
    # While set, a commit hangs until it is cleared (a broker busy with a JoinGroup).
    commits_hang: bool = False

    def append(self, partition: TopicPartition, *values: bytes) -> None:
        log = self.logs.setdefault(partition, [])
        for value in values:
            log.append(FakeRecord(len(log), value, partition=partition.partition))

    async def getmany(
        self, *partitions: TopicPartition, timeout_ms: int = 0, max_records: int | None = None
    ) -> dict[TopicPartition, list[FakeRecord]]:
        if self.poll_errors:
            raise self.poll_errors.pop(0)
        polled: dict[TopicPartition, list[FakeRecord]] = {}
        for partition in sorted(self.assigned):
            position = self.positions.get(partition, 0)
            pending = self.logs.get(partition, [])[position:]
            if pending:
                polled[partition] = pending
                self.positions[partition] = position + len(pending)
        if not polled:
            await asyncio.sleep(min(timeout_ms, 20) / 1000)
        return polled

    async def commit(self, offsets: dict[TopicPartition, OffsetAndMetadata]) -> None:
        for partition in offsets:
            if partition not in self.assigned:
                raise IllegalStateError(f"Partition {partition} is not assigned")
        if self.commit_errors:
            raise self.commit_errors.pop(0)
        while self.commits_hang:
            await asyncio.sleep(0.005)
        for partition, offset in offsets.items():
            self.committed[partition] = offset.offset

    def assignment(self) -> set[TopicPartition]:
        return set(self.assigned)

    def highwater(self, partition: TopicPartition) -> int | None:
        assert partition in self.assigned, "Partition is not assigned"
        return len(self.logs.get(partition, []))

    async def seek_to_beginning(self, *partitions: TopicPartition) -> bool:
        for partition in partitions or tuple(self.assigned):
            if partition not in self.assigned:
                raise IllegalStateError(f"No current assignment for partition {partition}")
            self.seeks.append(partition)
            self.positions[partition] = 0
        return True

    def pause(self, *partitions: TopicPartition) -> None:
        self.paused.update(partitions)

    def seek(self, partition: TopicPartition, offset: int) -> None:
        if partition not in self.assigned:
            raise IllegalStateError(f"No current assignment for partition {partition}")
        self.positions[partition] = offset

    async def rebalance(self, loop: StageLoop[Any], assigned: set[TopicPartition]) -> None:
        """What aiokafka does around a rejoin: revoke everything held, take the new
        assignment, and read each partition on from the group's committed offset."""
        listener = loop.rebalance_listener()
        await listener.on_partitions_revoked(sorted(self.assigned))
        self.assigned = set(assigned)
        for partition in self.assigned:
            self.positions[partition] = self.committed.get(partition, 0)
        await listener.on_partitions_assigned(sorted(self.assigned))


@dataclass
class GatedWriter(RecordingWriter):
    """A writer whose next write waits until ``release`` is set (a write in flight)."""

    entered: asyncio.Event = field(default_factory=asyncio.Event)
    release: asyncio.Event = field(default_factory=asyncio.Event)

    async def write(self, outputs: Sequence[Any], batch: BatchInfo) -> None:
        self.entered.set()
        await self.release.wait()
        await super().write(outputs, batch)


async def until(condition: Callable[[], bool], what: str, timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        if asyncio.get_running_loop().time() >= deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        await asyncio.sleep(0.005)


def rebalances(stage: str) -> float:
    return metrics.REGISTRY.get_sample_value("sgpipe_rebalances_total", {"stage": stage}) or 0.0


class Running:
    """A StageLoop.run in a task, stopped (and its error raised) on exit."""

    def __init__(self, loop: StageLoop[Any]) -> None:
        self.loop = loop
        self.stop = asyncio.Event()
        self.task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Running:
        self.task = asyncio.create_task(self.loop.run(self.stop))
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        assert self.task is not None
        self.stop.set()
        await asyncio.wait_for(self.task, 10)

    def alive(self) -> bool:
        assert self.task is not None
        if self.task.done():
            self.task.result()  # raises what stopped it
            return False
        return True


# --- revocation -------------------------------------------------------------------------------


async def test_a_partition_revoked_during_a_write_is_never_committed() -> None:
    # Mutation caught: dropping the ownership filter in StageLoop._commit (committing a revoked
    # partition's batch: aiokafka raises IllegalStateError, or, while it still lists the
    # partition, the commit lands behind the new owner's back).
    consumer = GroupConsumer()
    consumer.append(P0, b"a0", b"b0")
    consumer.append(P1, b"a1", b"b1")
    writer = GatedWriter()
    loop = StageLoop(options(name="revoke-test"), consumer, echo, writer, RecordingDeadLetters())
    before = rebalances("revoke-test")

    async with Running(loop) as running:
        await asyncio.wait_for(writer.entered.wait(), 5)
        # Another member joined while the batch of both partitions was being written; P1 moves
        # to it. aiokafka still lists P1 as assigned while the listener runs.
        await loop.rebalance_listener().on_partitions_revoked([P0, P1])
        writer.release.set()
        await until(lambda: writer.written != [], "the write in flight finished")
        consumer.assigned = {P0}
        consumer.positions[P0] = consumer.committed.get(P0, 0)
        await loop.rebalance_listener().on_partitions_assigned([P0])

        # The stage goes on with what it owns: P0 from the last commit.
        await until(lambda: consumer.committed.get(P0) == 2, "P0 committed after re-reading")
        consumer.append(P0, b"c0")
        await until(lambda: consumer.committed.get(P0) == 3, "the next batch of P0 committed")
        assert running.alive()

    assert P1 not in consumer.committed
    assert writer.written[0] == [b"a0", b"b0", b"a1", b"b1"]  # finished, not committed
    assert rebalances("revoke-test") - before == 1


async def test_records_of_revoked_partitions_leave_the_buffer_uncommitted() -> None:
    consumer = GroupConsumer()
    consumer.append(P0, b"a0")
    consumer.append(P1, b"a1")
    writer = RecordingWriter()
    loop = StageLoop(options(), consumer, echo, writer, RecordingDeadLetters())
    await loop._poll(0, None)

    await consumer.rebalance(loop, {P0})
    # What is buffered was read before the rebalance: nothing of it is written or committed;
    # P0 is read again from its last commit.
    async with Running(loop):
        await until(lambda: consumer.committed.get(P0) == 1, "P0 re-read and committed")

    assert writer.written == [[b"a0"]]
    assert consumer.committed == {P0: 1}


async def test_a_batch_read_before_a_rejoin_is_not_committed_after_it() -> None:
    # A broker that restarted empty: the member is forgotten, rejoins and gets the same
    # partitions back, now a new log. The write in flight from the old log may finish, but
    # committing its offsets would point the group past records of the new log that nobody
    # read (tansu answers a fetch beyond the end with nothing, not out-of-range) -- the
    # stale commit behind issue 21's ~998 lost events, there sent before the rejoin (see
    # tests/integration/test_rebalance.py), here after it. Mutation caught: ignoring the
    # batch's epoch in StageLoop._commit.
    consumer = GroupConsumer()
    consumer.append(P0, *[b"old-%d" % i for i in range(5)])
    writer = GatedWriter()
    loop = StageLoop(options(), consumer, echo, writer, RecordingDeadLetters())

    async with Running(loop) as running:
        await asyncio.wait_for(writer.entered.wait(), 5)
        # The broker comes back empty; the same member gets P0 again.
        consumer.logs = {}
        consumer.committed = {}
        await consumer.rebalance(loop, {P0, P1})
        writer.release.set()
        await until(lambda: writer.written != [], "the old batch's write finished")
        assert consumer.committed == {}
        consumer.append(P0, b"new-0", b"new-1")
        await until(lambda: consumer.committed.get(P0) == 2, "the new log committed")
        assert running.alive()

    assert writer.written[-1] == [b"new-0", b"new-1"]


async def test_a_partition_that_moved_away_does_not_crash_the_lag_report() -> None:
    # The crash of issue 16: `AssertionError: Partition is not assigned` from highwater() of a
    # partition polled before it moved to a new member. Mutation caught: asking the highwater
    # of every partition ever polled in StageLoop._update_lag.
    consumer = GroupConsumer()
    consumer.append(P0, b"a0")
    consumer.append(P1, b"a1")
    loop = StageLoop(options(), consumer, echo, RecordingWriter(), RecordingDeadLetters())
    async with Running(loop) as running:
        await until(lambda: consumer.committed == {P0: 1, P1: 1}, "both partitions committed")
        # P1 moves to another member without passing through this stage's listener first
        # (aiokafka updates the assignment before it calls on_partitions_assigned).
        consumer.assigned = {P0}
        consumer.append(P0, b"b0")
        await until(lambda: consumer.committed.get(P0) == 2, "P0 goes on")
        assert running.alive()


async def test_a_reset_never_seeks_a_partition_the_stage_does_not_own() -> None:
    consumer = GroupConsumer(assigned={P0})
    consumer.append(P0, b"a0")
    consumer.poll_errors = [
        NoOffsetForPartitionError(P1),  # reported for a partition that has just moved away
        OffsetOutOfRangeError({P1: 7}),
    ]
    loop = StageLoop(options(), consumer, echo, RecordingWriter(), RecordingDeadLetters())
    async with Running(loop) as running:
        await until(lambda: consumer.committed.get(P0) == 1, "P0 committed")
        assert running.alive()
    # Neither P1 nor (by seek_to_beginning() without partitions) every owned partition.
    assert consumer.seeks == []


# --- a commit the group refuses ----------------------------------------------------------------


@pytest.mark.parametrize(
    "refusal",
    [
        pytest.param(lambda: CommitFailedError("the group rebalanced"), id="commit_failed"),
        pytest.param(lambda: IllegalGenerationError("g"), id="illegal_generation"),
        pytest.param(lambda: UnknownMemberIdError("g"), id="unknown_member"),
        pytest.param(lambda: RebalanceInProgressError("g"), id="rebalance_in_progress"),
    ],
)
async def test_a_refused_commit_is_a_rejoin_not_a_crash(
    refusal: Callable[[], BaseException],
) -> None:
    # Mutation caught: letting CommitFailedError out of StageLoop._commit (fatal: the stage
    # stopped at every scale event).
    consumer = GroupConsumer(assigned={P0}, commit_errors=[refusal()])
    consumer.append(P0, b"a0", b"b0")
    writer = RecordingWriter()
    loop = StageLoop(options(), consumer, echo, writer, RecordingDeadLetters())

    async with Running(loop) as running:
        await until(lambda: writer.written == [[b"a0", b"b0"]], "the first batch written")
        # The refused batch is not committed; its partition's next owner (here: this member,
        # after the rejoin) reads it again.
        await consumer.rebalance(loop, {P0})
        await until(lambda: consumer.committed.get(P0) == 2, "re-read and committed")
        consumer.append(P0, b"c0")
        await until(lambda: consumer.committed.get(P0) == 3, "the next batch committed")
        assert running.alive()

    assert writer.written == [[b"a0", b"b0"], [b"a0", b"b0"], [b"c0"]]


async def test_the_group_moving_on_under_a_poll_is_a_rejoin_not_a_crash() -> None:
    consumer = GroupConsumer(assigned={P0}, poll_errors=[UnknownMemberIdError("g")])
    consumer.append(P0, b"a0")
    loop = StageLoop(options(), consumer, echo, RecordingWriter(), RecordingDeadLetters())
    async with Running(loop) as running:
        await until(lambda: consumer.committed.get(P0) == 1, "P0 committed")
        assert running.alive()


# --- a log that vanished under the consumer ----------------------------------------------------


async def test_a_log_shorter_than_the_position_read_is_read_again_from_its_beginning() -> None:
    # The broker came back empty, the topic was re-created at offset 0, and tansu answers a
    # fetch past the new end with nothing (not OffsetOutOfRange) while reporting the new
    # highwater. A consumer still at its old position waited for the new log to grow past it
    # and went on from there, every record before it skipped (with a stale commit, this is how
    # tests/faults' memory-broker restart lost ~998 acknowledged events). Mutation caught: not
    # calling `_reset_lost_logs` in StageLoop._poll.
    before = metrics.REGISTRY.get_sample_value(
        "sgpipe_offset_resets_total", {"stage": "lost-log-test"}
    )
    consumer = GroupConsumer(assigned={P0})
    consumer.append(P0, *[b"old-%d" % i for i in range(5)])
    writer = RecordingWriter()
    loop = StageLoop(options(name="lost-log-test"), consumer, echo, writer, RecordingDeadLetters())

    async with Running(loop) as running:
        await until(lambda: consumer.committed.get(P0) == 5, "the old log committed")
        # The broker restarts empty; no rebalance reaches this member.
        consumer.logs = {}
        consumer.committed = {}
        consumer.append(P0, b"new-0", b"new-1")
        await until(lambda: consumer.committed.get(P0) == 2, "the new log read from offset 0")
        consumer.append(P0, *[b"new-%d" % i for i in range(2, 7)])
        await until(lambda: consumer.committed.get(P0) == 7, "the new log read on")
        assert running.alive()

    assert [value for batch in writer.written[1:] for value in batch] == [
        b"new-%d" % i for i in range(7)
    ]
    after = metrics.REGISTRY.get_sample_value(
        "sgpipe_offset_resets_total", {"stage": "lost-log-test"}
    )
    assert (after or 0) - (before or 0) == 1


async def test_a_poll_a_rebalance_interrupted_keeps_only_what_the_stage_still_owns() -> None:
    # aiokafka may hand out records of a partition revoked while the poll waited (dropped:
    # its next owner reads them), and records of the new assignment it has already moved
    # past (kept: dropping them would skip them). Mutations caught: keeping every record
    # (P1 is committed behind its new owner's back), or dropping every record of an
    # interrupted poll (P0's record is never written).
    consumer = GroupConsumer(assigned={P0, P1})
    consumer.append(P0, b"a0")
    consumer.append(P1, b"a1")
    writer = RecordingWriter()
    loop = StageLoop(options(), consumer, echo, writer, RecordingDeadLetters())
    plain_getmany = consumer.getmany

    async def getmany_during_a_rebalance(
        *partitions: TopicPartition, timeout_ms: int = 0, max_records: int | None = None
    ) -> dict[TopicPartition, list[FakeRecord]]:
        polled = await plain_getmany(timeout_ms=timeout_ms, max_records=max_records)
        await loop.rebalance_listener().on_partitions_revoked([P0, P1])
        consumer.assigned = {P0}
        await loop.rebalance_listener().on_partitions_assigned([P0])
        return polled

    consumer.getmany = getmany_during_a_rebalance  # type: ignore[method-assign]
    assert await loop._poll(0, None) == 1
    assert await loop.flush_and_commit() == 1
    assert writer.written == [[b"a0"]]
    assert consumer.committed == {P0: 1}


async def test_a_commit_stuck_behind_a_rebalance_is_abandoned_when_the_partitions_are_revoked() -> (
    None
):
    # During a rebalance the broker answers a member's commit only once the group's JoinGroup
    # completed; a SIGTERM'd sink waited out its whole stop deadline there. Mutation caught:
    # awaiting consumer.commit directly in StageLoop._commit.
    consumer = GroupConsumer(assigned={P0}, commits_hang=True)
    consumer.append(P0, b"a0")
    writer = RecordingWriter()
    loop = StageLoop(options(), consumer, echo, writer, RecordingDeadLetters())
    assert await loop._poll(0, None) == 1
    flush = asyncio.ensure_future(loop.flush_and_commit())
    await until(lambda: writer.written != [], "the batch written, its commit hanging")
    await loop.rebalance_listener().on_partitions_revoked([P0])
    # It returns (nothing committed) instead of waiting for the rebalance to complete.
    assert await asyncio.wait_for(flush, 5) == 0
    consumer.commits_hang = False
    assert consumer.committed == {}
