"""``GroupMemberConsumer``'s commit, without a broker: a stand-in group coordinator."""

from __future__ import annotations

import asyncio
import gc
from typing import Any

import pytest
from aiokafka import ConsumerRebalanceListener
from aiokafka.errors import (
    RequestTimedOutError,
    UnknownMemberIdError,
    UnknownTopicOrPartitionError,
)
from aiokafka.structs import TopicPartition

from sgpipe.runtime.kafka import (
    CommittedTopicMissing,
    GroupMemberConsumer,
    MemberCommits,
    member_commits,
)

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
        waiter = asyncio.ensure_future(asyncio.shield(MemberCommits(coordinator)(None, OFFSETS)))
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
        await MemberCommits(member)(None, OFFSETS)
    rejoining = StandInCoordinator(member=False)
    with pytest.raises(UnknownMemberIdError, match="not a member of the group"):
        await MemberCommits(rejoining)(None, OFFSETS)
    assert rejoining.sent == 0, "a group-less commit was sent"


class UnsentCoordinator:
    """A member's coordinator whose commit request leaves only once ``connected`` is set
    (a connection to a restarted broker being made); ``sent`` counts the requests that left."""

    def __init__(self) -> None:
        self.group_id = "sink"
        # What tansu hands back to a member rejoining after it restarted empty: the same
        # generation and member id as before.
        self.generation = 0
        self.member_id = "sink-1"
        self.connected = asyncio.Event()
        self.sent = 0

    async def _do_commit_offsets(self, assignment: Any, offsets: Any) -> None:
        await self.connected.wait()
        self.sent += 1


async def test_a_rejoin_cancels_a_commit_request_not_yet_sent() -> None:
    # The memory-broker fault's last loss (issue 21): the sink's commit of the old log's
    # offsets was still on its way when the broker came back empty and the sink rejoined with
    # its old identity; the new group took it, and the sink skipped the new log's first
    # records. Mutation caught: end_all not cancelling the unsent requests (one is sent).
    coordinator = UnsentCoordinator()
    commits = MemberCommits(coordinator)
    attempt = commits(None, OFFSETS)
    await asyncio.sleep(0)
    # The rejoin begins (before its JoinGroup leaves); it must not wait on the broker.
    await asyncio.wait_for(commits.end_all(), 5)
    assert attempt.done(), "the rejoin went on with a commit request still unsent"
    with pytest.raises(UnknownMemberIdError, match="being rejoined"):
        attempt.result()
    coordinator.connected.set()
    for _ in range(3):
        await asyncio.sleep(0)
    assert coordinator.sent == 0


class RetryingCoordinator(UnsentCoordinator):
    """A coordinator whose commit loop retries like aiokafka's: the first attempt is lost
    with the broker, the next one goes once a coordinator is found again."""

    def __init__(self) -> None:
        super().__init__()
        self.connected.set()
        self.coordinator_found = asyncio.Event()
        self.attempts = 0

    async def _do_commit_offsets(self, assignment: Any, offsets: Any) -> None:
        self.attempts += 1
        if self.attempts == 1:
            raise RequestTimedOutError()  # the broker died under it
        self.sent += 1

    async def commit_offsets(self, assignment: Any, offsets: Any) -> Any:
        while True:
            try:
                return await asyncio.shield(self._do_commit_offsets(assignment, offsets))
            except RequestTimedOutError:
                await self.coordinator_found.wait()


async def test_a_commit_started_before_a_rejoin_is_never_sent_after_it() -> None:
    # aiokafka retries a commit (a lost coordinator: find the new one, send again); a retry
    # after the rejoin carries the new membership -- with tansu restarted empty, the old
    # generation and member id -- and the old offsets. Mutations caught: no check of the
    # membership a commit was started in, the commit loop not tagged (member_commits), no
    # check while rejoining (the old offsets are sent after the rejoin).
    coordinator = RetryingCoordinator()
    commits = member_commits(coordinator)
    old = asyncio.ensure_future(coordinator.commit_offsets(None, OFFSETS))
    for _ in range(3):
        await asyncio.sleep(0)
    assert coordinator.attempts == 1
    await commits.end_all()  # the rejoin begins
    with pytest.raises(UnknownMemberIdError, match="being rejoined"):
        await commits(None, OFFSETS)  # between the revocation and the new assignment
    commits.joined()
    coordinator.coordinator_found.set()
    with pytest.raises(UnknownMemberIdError, match="being rejoined"):
        await asyncio.wait_for(old, 5)
    assert coordinator.sent == 0
    await coordinator.commit_offsets(None, OFFSETS)  # a commit of the new membership
    assert coordinator.sent == 1


async def test_the_stages_rebalance_listener_ends_the_commits_before_the_rejoin() -> None:
    # The wiring: GroupMemberConsumer.subscribe puts end_all behind the stage's listener, and
    # aiokafka awaits on_partitions_revoked before its JoinGroup. Mutation caught: the
    # listener not ending the commits (the unsent request survives the revocation).
    calls: list[str] = []
    consumer = GroupMemberConsumer(bootstrap_servers="127.0.0.1:9", group_id="sink")
    try:
        await _ends_commits_at_revocation(consumer, calls)
    finally:
        await consumer.stop()


async def _ends_commits_at_revocation(consumer: GroupMemberConsumer, calls: list[str]) -> None:
    class StageListener(ConsumerRebalanceListener):  # type: ignore[misc]
        async def on_partitions_revoked(self, revoked: Any) -> None:
            calls.append("revoked")

        async def on_partitions_assigned(self, assigned: Any) -> None:
            calls.append("assigned")

    coordinator = UnsentCoordinator()
    consumer._member_commits = MemberCommits(coordinator)
    consumer.subscribe(["events"], listener=StageListener())
    listener = consumer._subscription.listener  # what aiokafka calls at a rebalance
    attempt = consumer._member_commits(None, OFFSETS)
    await asyncio.sleep(0)
    await asyncio.wait_for(listener.on_partitions_revoked(set()), 5)
    assert attempt.done() and isinstance(attempt.exception(), UnknownMemberIdError)
    await listener.on_partitions_assigned(set())
    assert calls == ["revoked", "assigned"]
    assert not consumer._member_commits.rejoining
    coordinator.connected.set()
    await asyncio.sleep(0)
    assert coordinator.sent == 0
