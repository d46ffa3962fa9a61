"""``GroupMemberConsumer``'s commit, without a broker: a stand-in group coordinator."""

from __future__ import annotations

import asyncio
import gc
from typing import Any

import pytest
from aiokafka.errors import UnknownMemberIdError, UnknownTopicOrPartitionError
from aiokafka.structs import TopicPartition

from sgpipe.runtime.kafka import CommittedTopicMissing, commit_as_member

OFFSETS = {TopicPartition("events", 0): 1}


class StandInCoordinator:
    """A member's coordinator whose commit request is answered, once ``answer`` is set,
    with UnknownTopicOrPartition (the broker no longer lists the topic)."""

    def __init__(self, *, member: bool = True) -> None:
        self.group_id = "sink"
        self.generation = 1 if member else -1
        self.member_id = "sink-1" if member else ""
        self.answer = asyncio.Event()
        self.sent = 0

    async def _do_commit_offsets(self, assignment: Any, offsets: Any) -> None:
        self.sent += 1
        await self.answer.wait()
        raise UnknownTopicOrPartitionError()


async def test_a_commit_that_fails_after_its_caller_gave_up_logs_no_unretrieved_exception() -> None:
    # aiokafka awaits the commit under asyncio.shield, and the stage cancels its wait when a
    # revocation comes first (StageLoop._commit_unless_revoked); the commit runs on, and when
    # it failed, asyncio logged "Task exception was never retrieved" (an error line in the
    # sink's log at such rejoins; the memory-broker fault). Mutation caught: the task's
    # failure not marked retrieved (one such report).
    loop = asyncio.get_running_loop()
    reports: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _loop, context: reports.append(context))
    coordinator = StandInCoordinator()
    try:
        waiter = asyncio.ensure_future(asyncio.shield(commit_as_member(coordinator)(None, OFFSETS)))
        await asyncio.sleep(0)
        waiter.cancel()  # the stage gave up
        await asyncio.gather(waiter, return_exceptions=True)
        coordinator.answer.set()  # then the broker answers
        for _ in range(3):
            await asyncio.sleep(0)
        del waiter
        gc.collect()
        await asyncio.sleep(0)
    finally:
        loop.set_exception_handler(None)
    assert coordinator.sent == 1
    assert reports == []


async def test_whoever_awaits_the_commit_gets_its_failure() -> None:
    member = StandInCoordinator()
    member.answer.set()
    with pytest.raises(CommittedTopicMissing, match="does not list"):
        await commit_as_member(member)(None, OFFSETS)
    rejoining = StandInCoordinator(member=False)
    with pytest.raises(UnknownMemberIdError, match="not a member of the group"):
        await commit_as_member(rejoining)(None, OFFSETS)
    assert rejoining.sent == 0, "a group-less commit was sent"
