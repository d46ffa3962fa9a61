"""Kafka plumbing shared by every stage: clients from settings, topics, and writers.

Production code stays broker-agnostic (Apache Kafka, MSK, Redpanda, Confluent, tansu); nothing
here assumes the embedded broker.
"""

from __future__ import annotations

import asyncio
import contextvars
import inspect
import random
import ssl
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeAlias, TypeVar

import structlog
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import (
    KafkaError,
    TopicAuthorizationFailedError,
    UnknownMemberIdError,
    UnknownTopicOrPartitionError,
)
from aiokafka.protocol.metadata import MetadataRequest
from aiokafka.structs import ConsumerRecord, TopicPartition

from schemas.dead_letter import DeadLetter, dead_letter_headers
from sgpipe.runtime.settings import KafkaSettings

log = structlog.get_logger(__name__)

# aiokafka ships no type information: a consumed record is ConsumerRecord[bytes, bytes].
Record: TypeAlias = ConsumerRecord
Headers = list[tuple[str, bytes]]
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class OutgoingRecord:
    topic: str
    value: bytes
    key: bytes | None = None
    headers: Headers | None = None


def _connection_options(settings: KafkaSettings) -> dict[str, Any]:
    if settings.bootstrap_servers is None:
        raise ValueError("kafka.bootstrap_servers is not set")
    options: dict[str, Any] = {
        "bootstrap_servers": [host.strip() for host in settings.bootstrap_servers.split(",")],
        "client_id": settings.client_id,
        "security_protocol": settings.security_protocol,
        "request_timeout_ms": settings.request_timeout_ms,
        "metadata_max_age_ms": settings.metadata_max_age_ms,
    }
    if settings.security_protocol in ("SSL", "SASL_SSL"):
        options["ssl_context"] = ssl.create_default_context(
            cafile=str(settings.ssl_cafile) if settings.ssl_cafile else None
        )
    if settings.sasl_mechanism is not None:
        options["sasl_mechanism"] = settings.sasl_mechanism
        options["sasl_plain_username"] = settings.sasl_username
        options["sasl_plain_password"] = (
            settings.sasl_password.get_secret_value() if settings.sasl_password else None
        )
    return options


def create_producer(settings: KafkaSettings) -> AIOKafkaProducer[bytes, bytes]:
    """``acks=all``: a record counts as written only once every in-sync replica has it."""
    return AIOKafkaProducer(
        **_connection_options(settings),
        acks="all",
        enable_idempotence=settings.enable_idempotence,
        compression_type=None if settings.compression_type == "none" else settings.compression_type,
        linger_ms=settings.linger_ms,
        max_request_size=settings.max_request_size,
        max_batch_size=min(settings.max_request_size, 1_048_576),
    )


def create_reader(settings: KafkaSettings) -> AIOKafkaConsumer[bytes, bytes]:
    """A consumer outside any group, for reading partitions by hand (``assign``, ``seek``):
    nothing it reads is committed. `sgpipe up` counts what is left unwritten with it."""
    return AIOKafkaConsumer(
        **_connection_options(settings),
        group_id=None,
        enable_auto_commit=False,
        fetch_max_wait_ms=100,
        max_partition_fetch_bytes=settings.max_request_size,
        fetch_max_bytes=max(settings.max_request_size, 52_428_800),
    )


def create_admin(settings: KafkaSettings) -> AIOKafkaAdminClient:
    return AIOKafkaAdminClient(**_connection_options(settings))


class GroupMemberConsumer(AIOKafkaConsumer):  # type: ignore[misc]
    """An AIOKafkaConsumer whose commits always carry the group membership they were made in.

    When the coordinator forgets a member (a session that expired, a broker that restarted
    empty), aiokafka resets the member's generation to -1 and its id to "" until it rejoins;
    a commit sent meanwhile is a *group-less* commit, which a broker accepts when the group
    has no active member. tansu did exactly that after restarting empty: the sink's last
    batch of the lost log was committed into the new one, the sink resumed there after its
    rejoin, and every record the new log had below that offset was skipped (issue 21's ~998
    acknowledged events). Such a commit is refused before it is sent -- as the coordinator
    itself would refuse a forgotten member's, with UnknownMemberIdError, which aiokafka
    reports as CommitFailedError: a rejoin, for the stage.

    Nor does a commit outlive the membership it was started in (``MemberCommits``). A broker
    that restarted empty can hand a rejoining member its old identity back: tansu accepts
    the JoinGroup of the forgotten member id and numbers the new group's generation from 0
    again, so (generation, member id) are the old ones, and a commit of the old log's offsets
    still in flight -- aiokafka retries it, and sends its attempt under ``asyncio.shield``,
    past the stage giving up on it -- was accepted into the new group. The sink resumed at
    the old log's end in the new one: the first 188 and 158 records of its two partitions
    never read (issue 21, the memory-broker fault). A rejoin therefore cancels the commit
    requests still unsent and refuses every commit started before it, before the JoinGroup
    leaves (aiokafka awaits the rebalance listener's ``on_partitions_revoked`` first).

    A commit answered UnknownTopicOrPartition -- the broker does not list the topic: it was
    deleted, or it restarted empty and the records read came from a log it keeps but does not
    list (tansu's in-memory store after a restart) -- is raised as ``CommittedTopicMissing``.
    aiokafka would retry it forever, the stage's commit with it, and the stage would stall
    (issue 21: ~3,000 acknowledged events never stored); the stage starts the topic over
    instead (``StageLoop._commit``).

    aiokafka has no public hook for these: the checks wrap the group coordinator's commit
    loop and its request builder, the last step before the request leaves.
    """

    _member_commits: MemberCommits | None = None

    async def start(self) -> None:
        await super().start()
        coordinator = getattr(self, "_coordinator", None)
        if coordinator is None or getattr(coordinator, "_do_commit_offsets", None) is None:
            return  # no group (group_id None)
        self._member_commits = member_commits(coordinator)

    def subscribe(
        self, topics: Sequence[str] = (), pattern: str | None = None, listener: Any = None
    ) -> None:
        super().subscribe(topics, pattern=pattern, listener=_CommitsEndAtRejoin(self, listener))


# Which membership (MemberCommits.incarnation) a commit was started in: set by the commit
# loop's wrapper, read by each of its attempts (tasks copy the context they are created in).
_STARTED_IN: contextvars.ContextVar[tuple[MemberCommits, int]] = contextvars.ContextVar(
    "sgpipe_commit_started_in"
)


class MemberCommits:
    """The group coordinator's request builder, wrapped as ``GroupMemberConsumer`` says: each
    call starts one commit attempt, sent only by a current member, in the membership its
    commit was started in, and never once a rejoin began (``end_all``).

    aiokafka awaits the attempt under ``asyncio.shield``: when the stage's commit is cancelled
    (a revocation came first, ``StageLoop._commit_unless_revoked``) the attempt runs on, and
    its failure -- a refusal here, or the broker's answer -- was logged as "Task exception was
    never retrieved" (an error line in the sink's log at such rejoins). The attempt's failure
    is marked retrieved; whoever awaits it still gets it."""

    def __init__(self, coordinator: Any) -> None:
        self._coordinator = coordinator
        self._send_commit = coordinator._do_commit_offsets
        # Counts the rejoins begun: a commit started in an earlier one is never sent.
        self.incarnation = 0
        self.rejoining = False
        self._sends: set[asyncio.Future[Any]] = set()

    def __call__(self, assignment: Any, offsets: Any) -> asyncio.Future[Any]:
        task = asyncio.ensure_future(self._commit(assignment, offsets))
        task.add_done_callback(_mark_retrieved)
        return task

    def tag(self, commit_offsets: Callable[..., Any]) -> Callable[..., Any]:
        """aiokafka's commit loop (``commit_offsets``), its attempts tagged with the
        membership the commit was started in."""

        async def tagged(assignment: Any, offsets: Any) -> Any:
            _STARTED_IN.set((self, self.incarnation))
            return await commit_offsets(assignment, offsets)

        return tagged

    async def end_all(self) -> None:
        """A rejoin begins: commits started before it are refused from now on, and the
        requests still unsent are cancelled (their commits fail with UnknownMemberIdError).
        Returns once none is left."""
        self.incarnation += 1
        self.rejoining = True
        sends = list(self._sends)
        for send in sends:
            send.cancel()
        await asyncio.gather(*sends, return_exceptions=True)

    def joined(self) -> None:
        self.rejoining = False

    async def _commit(self, assignment: Any, offsets: Any) -> Any:
        coordinator = self._coordinator
        if coordinator.generation < 0 or not coordinator.member_id:
            raise UnknownMemberIdError(
                f"{coordinator.group_id}: not a member of the group (rejoining); "
                "a commit now would be a group-less one"
            )
        membership = (self, self.incarnation)
        if self.rejoining or _STARTED_IN.get(membership) != membership:
            raise _left_behind(coordinator.group_id)
        send = asyncio.ensure_future(self._send_commit(assignment, offsets))
        self._sends.add(send)
        try:
            return await send
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if send.cancelled() and (current is None or not current.cancelling()):
                raise _left_behind(coordinator.group_id) from None
            raise
        except UnknownTopicOrPartitionError as exc:
            topics = sorted({partition.topic for partition in offsets})
            raise CommittedTopicMissing(
                f"{coordinator.group_id}: the broker does not list {topics}; "
                "the offsets read from it cannot be committed"
            ) from exc
        finally:
            self._sends.discard(send)


def member_commits(coordinator: Any) -> MemberCommits:
    """Wires ``MemberCommits`` into aiokafka's group ``coordinator``: its request builder
    (each attempt) and its commit loop (which tags the attempts with the membership the
    commit was started in)."""
    commits = MemberCommits(coordinator)
    coordinator._do_commit_offsets = commits
    coordinator.commit_offsets = commits.tag(coordinator.commit_offsets)
    return commits


def _left_behind(group_id: str) -> UnknownMemberIdError:
    return UnknownMemberIdError(
        f"{group_id}: the group is being rejoined since this commit was started; its offsets "
        "belong to the membership before"
    )


class _CommitsEndAtRejoin(ConsumerRebalanceListener):  # type: ignore[misc]
    """The stage's rebalance listener, and ``MemberCommits.end_all`` at each revocation
    (aiokafka awaits it before it sends the JoinGroup)."""

    def __init__(self, consumer: GroupMemberConsumer, listener: Any) -> None:
        self._consumer = consumer
        self._listener = listener

    async def on_partitions_revoked(self, revoked: Any) -> None:
        try:
            if self._listener is not None:
                await _maybe_await(self._listener.on_partitions_revoked(revoked))
        finally:  # whatever the stage's listener did (aiokafka only logs its failure)
            commits = self._consumer._member_commits
            if commits is not None:
                await commits.end_all()

    async def on_partitions_assigned(self, assigned: Any) -> None:
        commits = self._consumer._member_commits
        if commits is not None:
            commits.joined()
        if self._listener is not None:
            await _maybe_await(self._listener.on_partitions_assigned(assigned))


async def _maybe_await(result: Any) -> None:
    if inspect.isawaitable(result):
        await result


def _mark_retrieved(task: asyncio.Future[Any]) -> None:
    if not task.cancelled():
        task.exception()


class CommittedTopicMissing(KafkaError):  # type: ignore[misc]
    """A commit named a topic the broker does not list (see ``GroupMemberConsumer``); not
    retriable, so that aiokafka hands it to the stage instead of retrying it forever."""

    retriable = False


def create_consumer(settings: KafkaSettings, *, group_id: str) -> AIOKafkaConsumer[bytes, bytes]:
    """Offsets are committed by the stage after its output is durable, never automatically,
    and only by a current member of the group (``GroupMemberConsumer``).

    ``auto_offset_reset="none"``: the stage loop resets by itself, so that a committed offset
    found out of range (the broker lost or deleted data) is logged and counted, and always
    reset to the earliest offset. The caller subscribes, with the loop's rebalance listener.
    """
    return GroupMemberConsumer(
        **_connection_options(settings),
        group_id=group_id,
        enable_auto_commit=False,
        auto_offset_reset="none",
        session_timeout_ms=settings.session_timeout_ms,
        heartbeat_interval_ms=settings.heartbeat_interval_ms,
        max_partition_fetch_bytes=settings.max_request_size,
        fetch_max_bytes=max(settings.max_request_size, 52_428_800),
    )


async def ensure_topics(settings: KafkaSettings, *, create: bool = True) -> list[str]:
    """Create the pipeline's topics that do not exist yet; returns the names created (with
    ``create=False``, only the names that are missing: `sgpipe migrate --dry-run`).

    Explicit creation matters: brokers that auto-create (tansu does, with 4 partitions) would
    otherwise pick partition counts nobody chose.
    """
    topics = settings.topics
    wanted = [topics.raw, topics.events, topics.dead_letter]
    admin = AIOKafkaAdminClient(**_connection_options(settings))
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        missing = [name for name in wanted if name not in existing]
        if missing and create:
            await admin.create_topics(
                [
                    NewTopic(
                        name=name,
                        num_partitions=topics.partitions,
                        replication_factor=topics.replication_factor,
                    )
                    for name in missing
                ]
            )
            await _wait_for_topics(admin, missing)
        return missing
    finally:
        await admin.close()


async def _wait_for_topics(admin: AIOKafkaAdminClient, names: list[str]) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if set(names) <= set(await admin.list_topics()):
            return
        await asyncio.sleep(0.1)
    raise KafkaError(f"topics {names} were not created within 30 s")


_UNKNOWN_TOPIC_OR_PARTITION = 3


@dataclass(frozen=True, slots=True)
class TopicHealth:
    ok: bool
    detail: str
    missing: bool = False


def topic_health(topics: Any, topic: str, elapsed: float) -> TopicHealth:
    """Read a Metadata response's topic entries; every version puts the error code first, the
    name second and the partitions last, each partition as (error, id, leader, ...)."""
    for entry in topics:
        if entry[1] != topic:
            continue
        if entry[0] == _UNKNOWN_TOPIC_OR_PARTITION:
            return TopicHealth(False, f"topic {topic} does not exist", missing=True)
        if entry[0] != 0:
            return TopicHealth(False, f"topic {topic}: error code {entry[0]}")
        partitions = entry[-1]
        if not partitions:
            return TopicHealth(False, f"topic {topic} has no partitions", missing=True)
        leaderless = [partition[1] for partition in partitions if partition[2] < 0]
        if leaderless:
            return TopicHealth(
                False, f"topic {topic}: partitions without a leader {sorted(leaderless)}"
            )
        return TopicHealth(True, f"topic {topic} led; broker answered in {elapsed * 1000:.0f} ms")
    return TopicHealth(False, f"topic {topic} missing from the broker's answer", missing=True)


async def probe_topics(
    producer: AIOKafkaProducer[bytes, bytes], topics: Sequence[str]
) -> dict[str, TopicHealth]:
    """Ask one broker for ``topics``' metadata, with auto-creation off: the request never
    creates a topic. Raises the client's error when no broker answers."""
    started = time.monotonic()
    client: Any = producer.client
    node = client.get_random_node()
    if node is None:
        raise KafkaError("no broker known")
    request = MetadataRequest(list(topics), allow_auto_topic_creation=False)
    response = await client.send(node, request)
    elapsed = time.monotonic() - started
    return {topic: topic_health(response.topics, topic, elapsed) for topic in topics}


async def confirm_topics(producer: AIOKafkaProducer[bytes, bytes], topics: Sequence[str]) -> None:
    """Raise UnknownTopicOrPartitionError unless the broker lists every one of ``topics``."""
    health = await probe_topics(producer, topics)
    missing = sorted(topic for topic, state in health.items() if state.missing)
    if missing:
        raise UnknownTopicOrPartitionError(f"the broker does not list topic(s) {missing}")


async def send_all_confirmed(
    producer: AIOKafkaProducer[bytes, bytes],
    records: Sequence[OutgoingRecord],
    read_back: ReadBack,
) -> None:
    """``send_all``, between two checks that the broker lists the topics written to (each
    raises UnknownTopicOrPartitionError: a retriable failure of the write, on which a stage
    re-creates its topics and writes again), then ``read_back`` of what needs it.

    Why: a broker that restarted empty may acknowledge writes to a topic it no longer lists.
    tansu's in-memory store does: the records land in a log that consumers can read from but
    cannot commit (UnknownTopicOrPartition). A producer writes there with its cached metadata
    -- or aiokafka resends a batch that was in flight when the broker died, acknowledged as if
    nothing happened. The check before keeps the first from happening; the check after the
    acknowledgement catches the second. That log stays in the way once the topic is created
    again, and what is written into it is acknowledged and never served: ``ReadBack`` finds it.
    """
    if not records:
        return
    topics = sorted({record.topic for record in records})
    try:
        await confirm_topics(producer, topics)
        written = await send_all(producer, records)
        await confirm_topics(producer, topics)
    except UnknownTopicOrPartitionError:
        for topic in topics:
            read_back.forget(topic)
        raise
    for first in written:
        read_back.acknowledged(first.partition, first.offset)
    await read_back.confirm(written)


@dataclass(frozen=True, slots=True)
class Written:
    """The first record of a batch the broker acknowledged, where it said it wrote it."""

    partition: TopicPartition
    offset: int
    record: OutgoingRecord


class NotServed(KafkaError):  # type: ignore[misc]
    """The broker acknowledged a record at an offset where it serves another one: the write is
    lost. Retriable: a stage writes again, the ingress answers 503 (and SendGrid retries)."""

    retriable = True


# Past this many records before a write, a partition's log is not a new one (ReadBack).
READ_BACK_MAX_RECORDS = 1_000
# A read back that gets nothing for this long, below the partition's end, is served nothing.
READ_BACK_STALL_SECONDS = 2.0


class ReadBack:
    """Reads acknowledged records back as a consumer would, once a topic's log may have been
    replaced, until the broker shows that it serves what it acknowledges.

    Why: tansu 0.6 on ``memory://``, restarted, keeps the records written to a topic it no
    longer lists (a "ghost" log, see ``send_all_confirmed``). Once the topic is created again,
    that log's batches stay at the new log's first offsets, while the new log's writes also
    begin at offset 0, beside them: a write acknowledged at an offset a ghost batch spans is
    never delivered to a consumer reading the partition in order (it is served the ghost's
    record at that offset, and skips the rest) -- the write is lost, and nothing says so
    (issue 21: 559 acknowledged events lost in one full run; tests/faults). Fetching the
    acknowledged offset itself does not show it (tansu answers with the batch that starts
    there); reading the partition from its start does, and needs no knowledge of the broker.

    When: only once the log may have been replaced -- the topic was seen missing
    (``forget``), an acknowledgement came at an offset not above the one before it
    (``acknowledged``: a new log), or it is the first acknowledgement on a partition this
    writer has had (a writer started after the broker restarted -- a stage process restarted
    meanwhile -- has seen neither the old log nor the topic missing; a fault test lost such a
    writer's acknowledged records before it doubted them). Then each acknowledged write's
    first record is read back from the partition's start (``NotServed`` unless the record a
    consumer gets at its offset is ours) until one is served: every later offset is then past
    whatever the log kept. A partition with more than ``READ_BACK_MAX_RECORDS`` before the
    write is trusted without a read: that log was not created moments ago (what tansu keeps
    is what was written around its restart; a read of a long partition from its start would
    cost far more than it proves). So a healthy broker costs, per writer and partition, one
    ListOffsets request at the first write, and on a partition shorter than that one read of
    it; nothing after. Not covered: a writer that did not see the topic missing and whose
    first write to the new log lands above its last one in the old.
    A principal not allowed to read the topic (Kafka ACLs: a producer-only ingress) cannot
    read back: the check is then skipped, with a warning once -- no broker with ACLs keeps
    such logs.

    Written by hand: no Kafka client offers a "read your write" check.
    """

    def __init__(
        self,
        settings: KafkaSettings,
        *,
        new_reader: Callable[[], AIOKafkaConsumer[bytes, bytes]] | None = None,
    ) -> None:
        self._settings = settings
        self._new_reader = new_reader or (lambda: create_reader(settings))
        self._reader: AIOKafkaConsumer[bytes, bytes] | None = None
        self._lock = asyncio.Lock()
        self._doubted_topics: set[str] = set()
        self._doubted_partitions: set[TopicPartition] = set()
        # Doubted only as a partition's first acknowledgement (read back at debug level).
        self._first_doubts: set[TopicPartition] = set()
        # Per doubted partition: the lowest offset found served since the doubt; offsets from
        # there on are past what the log kept. Below it (or with no entry), read back.
        self._served_from: dict[TopicPartition, int] = {}
        self._last_acknowledged: dict[TopicPartition, int] = {}
        self._refused = False

    def needed(self, partition: TopicPartition, offset: int) -> bool:
        if self._refused or (
            partition.topic not in self._doubted_topics
            and partition not in self._doubted_partitions
        ):
            return False
        served_from = self._served_from.get(partition)
        return served_from is None or offset < served_from

    def acknowledged(self, partition: TopicPartition, offset: int) -> None:
        """Called for each acknowledgement, in the order they came (a partition's come in
        offset order): one not above the last means a new log; a partition's first one may
        be in a new log already (this writer started after the broker restarted)."""
        last = self._last_acknowledged.get(partition)
        if last is None or offset <= last:
            self._doubted_partitions.add(partition)
            self._served_from.pop(partition, None)
            if last is None:
                self._first_doubts.add(partition)
            else:
                self._first_doubts.discard(partition)
                log.info(
                    "acknowledged at or below the last acknowledgement: a new log; reading "
                    "writes back until the broker serves them",
                    topic=partition.topic,
                    partition=partition.partition,
                    offset=offset,
                    last=last,
                )
        self._last_acknowledged[partition] = offset

    def forget(self, topic: str) -> None:
        """Doubt every partition of ``topic``: the broker was seen not listing it."""
        self._doubted_topics.add(topic)
        self._first_doubts = {p for p in self._first_doubts if p.topic != topic}
        for partition in [p for p in self._served_from if p.topic == topic]:
            del self._served_from[partition]

    async def confirm(self, written: Sequence[Written]) -> None:
        """Raise NotServed unless each record that needs it is served where acknowledged."""
        for first in written:
            if self.needed(first.partition, first.offset):
                await self._confirm_one(first)

    async def _confirm_one(self, first: Written) -> None:
        async with self._lock:
            partition, offset = first.partition, first.offset
            if not self.needed(partition, offset):  # read back meanwhile, by another writer
                return
            try:
                start = await self._beginning(partition)
                if offset - start > READ_BACK_MAX_RECORDS:  # not a new log: trusted
                    self._served_from[partition] = offset
                    return
                served = await self._read(partition, start, offset)
            except TopicAuthorizationFailedError:
                self._refused = True
                log.warning(
                    "not allowed to read the topics written to; acknowledged writes are not "
                    "read back",
                    topic=partition.topic,
                )
                return
            record = first.record
            if served is None or (served.offset, served.key, served.value) != (
                offset,
                record.key,
                record.value,
            ):
                found = "nothing" if served is None else "another record"
                raise NotServed(
                    f"{partition.topic}/{partition.partition}: acknowledged at offset {offset}, "
                    f"but a reader from the start is served {found} there"
                )
            served_from = self._served_from.get(partition)
            self._served_from[partition] = (
                offset if served_from is None else min(served_from, offset)
            )
            # What a post-mortem of a lost write needs: from where this writer trusts the log.
            (log.debug if partition in self._first_doubts else log.info)(
                "acknowledged write read back: served; later ones are trusted",
                topic=partition.topic,
                partition=partition.partition,
                offset=offset,
                log_start=start,
            )

    async def _beginning(self, partition: TopicPartition) -> int:
        reader = await self._started_reader()
        start: int = (await reader.beginning_offsets([partition]))[partition]
        return start

    async def _started_reader(self) -> AIOKafkaConsumer[bytes, bytes]:
        if self._reader is None:
            reader = self._new_reader()
            try:
                await reader.start()
            except BaseException:
                await reader.stop()
                raise
            self._reader = reader
        return self._reader

    async def _read(self, partition: TopicPartition, start: int, offset: int) -> Record | None:
        """The first record at or past ``offset`` a reader from the partition's ``start``
        gets; None when it gets none: it read to the end, or got nothing for
        ``READ_BACK_STALL_SECONDS`` below the end (tansu serves no batch of a new log's kept
        records until the log's end passes the batch's: a writer would otherwise wait the
        whole request timeout, 30 s, for nothing; a false None only makes it write again)."""
        reader = await self._started_reader()
        reader.assign([partition])
        try:
            reader.seek(partition, start)
            end = (await reader.end_offsets([partition]))[partition]
            deadline = time.monotonic() + self._settings.request_timeout_ms / 1000
            progressed = time.monotonic()
            while time.monotonic() < deadline:
                fetched = await reader.getmany(partition, timeout_ms=200)
                for record in fetched.get(partition, []):
                    if record.offset >= offset:
                        return record
                if fetched:
                    progressed = time.monotonic()
                elif await reader.position(partition) >= end:
                    return None  # read to the end, and skipped past it
                elif time.monotonic() - progressed > READ_BACK_STALL_SECONDS:
                    return None
            return None
        finally:
            # Else aiokafka goes on fetching the partition in the background.
            reader.unsubscribe()

    async def stop(self) -> None:
        reader, self._reader = self._reader, None
        if reader is None:
            return
        try:
            await reader.stop()
        except asyncio.CancelledError:
            # aiokafka's fetcher can let the cancellation of its own fetch task out of stop().
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise
        except Exception as exc:  # noqa: BLE001 - a reader that does not close cleanly is gone
            log.warning("the read-back reader did not stop cleanly", error=repr(exc))


# Records above this size are sent one by one (``producer.send``): aiokafka checks them
# against the request limit (MessageSizeTooLargeError, as for any record) and gives them a batch
# of their own. Everything smaller goes into per-partition batches.
BULK_RECORD_MAX_BYTES = 262_144


def partition_for_key(key: bytes, partition_count: int) -> int:
    """The partition of a keyed record: ``zlib.crc32(key) % partition_count``.

    Same key -> same partition for as long as the partition count is unchanged (what consumers
    may rely on: docs/consuming.md). CRC-32 rather than Kafka's murmur2: it runs in C, where
    aiokafka's murmur2 is pure Python and was half of the processor's produce cost; nothing
    downstream computes partitions itself, so the choice of hash is free.
    """
    return zlib.crc32(key) % partition_count


async def send_all(
    producer: AIOKafkaProducer[bytes, bytes], records: Sequence[OutgoingRecord]
) -> list[Written]:
    """Send every record and wait until each is acknowledged; raises the first failure.

    In bulk: each record's partition is chosen once (``partition_for_key``; records without a
    key all go to one partition per call, chosen at random), the records of a partition are
    appended to aiokafka batches (``create_batch``, several when one fills up) and each batch is
    submitted with ``send_batch``: one future per batch, not per record, and no per-record
    partitioner. A batch is written with the producer's acks (``all``), so awaiting every
    batch's future is awaiting every record's acknowledgement. Within a partition, records keep
    their order. Returns where each batch's first record was acknowledged, in the order sent.
    """
    by_partition: dict[tuple[str, int], list[OutgoingRecord]] = {}
    partitions_by_topic: dict[str, list[int]] = {}
    # Unkeyed records of one call share one partition, chosen at random per call (fewer,
    # fuller batches; Kafka's sticky partitioner does the same).
    unkeyed_partition: dict[str, int] = {}
    for record in records:
        partitions = partitions_by_topic.get(record.topic)
        if partitions is None:
            partitions = sorted(await producer.partitions_for(record.topic))
            partitions_by_topic[record.topic] = partitions
        if record.key is None:
            index = unkeyed_partition.setdefault(record.topic, random.randrange(len(partitions)))
        else:
            index = partition_for_key(record.key, len(partitions))
        by_partition.setdefault((record.topic, partitions[index]), []).append(record)

    pending: list[asyncio.Future[Any]] = []
    firsts: list[OutgoingRecord] = []  # each pending batch's first record
    for (topic, partition), partition_records in by_partition.items():
        batch = producer.create_batch()
        first: OutgoingRecord | None = None
        for record in partition_records:
            headers = record.headers or []
            if len(record.value) > BULK_RECORD_MAX_BYTES:
                if first is not None:
                    pending.append(await _submit(producer, batch, topic, partition))
                    firsts.append(first)
                    batch, first = producer.create_batch(), None
                pending.append(
                    await producer.send(
                        topic, record.value, key=record.key, headers=headers, partition=partition
                    )
                )
                firsts.append(record)
            elif not batch.append(
                timestamp=None, key=record.key, value=record.value, headers=headers
            ):
                # Full: submit it and start the next one (a first record always fits).
                assert first is not None  # noqa: S101 - the batch held a record, or append fit
                pending.append(await _submit(producer, batch, topic, partition))
                firsts.append(first)
                batch, first = producer.create_batch(), record
                batch.append(timestamp=None, key=record.key, value=record.value, headers=headers)
            elif first is None:
                first = record
        if first is not None:
            pending.append(await _submit(producer, batch, topic, partition))
            firsts.append(first)
    acknowledged = await asyncio.gather(*pending) if pending else []
    return [
        Written(metadata.topic_partition, metadata.offset, record)
        for metadata, record in zip(acknowledged, firsts, strict=True)
    ]


async def _submit(
    producer: AIOKafkaProducer[bytes, bytes], batch: Any, topic: str, partition: int
) -> asyncio.Future[Any]:
    # Closed first, so that no other ``producer.send`` appends to it while it waits to go out.
    batch.close()
    future: asyncio.Future[Any] = await producer.send_batch(batch, topic, partition=partition)
    return future


# Room left in a Kafka request for a record's headers and the batch framing.
RECORD_HEADROOM_BYTES = 65_536


def max_record_bytes(settings: KafkaSettings) -> int:
    """The largest record value sgpipe produces: the request limit minus the headroom."""
    return settings.max_request_size - RECORD_HEADROOM_BYTES


class TopicWriter(Generic[T]):
    """A stage writer producing each output as one record to ``topic`` (acks=all) on the
    stage's shared producer; ``write`` returns once every record is acknowledged."""

    def __init__(
        self,
        producer: AIOKafkaProducer[bytes, bytes],
        topic: str,
        to_record: Callable[[T], OutgoingRecord],
        *,
        output: str,
        read_back: ReadBack,
    ) -> None:
        self._producer = producer
        self._topic = topic
        self._to_record = to_record
        self._read_back = read_back
        self.output = output
        self.destination = f"Kafka topic {topic}"

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        await self._read_back.stop()

    async def write(self, outputs: Sequence[T], batch: object) -> None:
        await send_all_confirmed(
            self._producer, [self._to_record(output) for output in outputs], self._read_back
        )

    async def probe(self) -> None:
        await self._producer.partitions_for(self._topic)


class DeadLetterTopicWriter:
    """Writes dead letters to the dead-letter topic: the offending bytes as the value, the
    reason and origin in headers (schemas.dead_letter)."""

    def __init__(
        self, producer: AIOKafkaProducer[bytes, bytes], topic: str, read_back: ReadBack
    ) -> None:
        self._producer = producer
        self._topic = topic
        self._read_back = read_back

    async def write(self, letters: Sequence[DeadLetter]) -> None:
        await send_all_confirmed(
            self._producer,
            [
                OutgoingRecord(self._topic, letter.payload, headers=dead_letter_headers(letter))
                for letter in letters
            ],
            self._read_back,
        )

    async def stop(self) -> None:
        await self._read_back.stop()
