"""The consume -> steps -> write -> commit loop every consuming stage runs.

A stage is *declared* (``ConsumerStage``): the topic it reads, a pure ``transform`` of one
record into outputs and rejections, an optional ``filter`` and a ``writer``. The runtime does
the rest, in this order for every batch, and these orders are its guarantees:

1. poll until ``batch_max_records`` or ``batch_max_seconds`` since the first buffered record;
2. run the steps: ``transform`` each record (a pure step that raises makes that record poison:
   it is rejected, the others go on), then ``filter.select`` the outputs -- in a worker thread,
   so that a record that takes seconds does not stop the consumer's heartbeats;
3. admit the batch to the ``DeadLetterBudget`` (which counts source records with dead letters)
   -- past the limit the stage **pauses** before anything of the batch is written: it holds the
   batch (never written, never committed), stops fetching, and reports not ready
   (``dead_letter_limit`` in ``/readyz``, ``sgpipe_dead_letter_limit_tripped``) until it is
   restarted; a restart re-reads the held batch (docs/dead-letters.md);
4. ``writer.write`` the outputs and wait for the acknowledgement;
5. ``filter.written`` -- **remember after the ack**: a filter (the processor's dedup window)
   learns about outputs only once they are durable, so a failed write is never mistaken for
   a duplicate when it is retried or redelivered;
6. write the dead letters to the dead-letter topic and wait for the acknowledgement;
7. **commit after the write**: only now are the batch's offsets committed.

Retriable failures of 4, 6 and 7 are retried with capped backoff, holding the batch (the
steps are not re-run); fatal ones stop the stage with FatalStageError and nothing committed.
Whatever a record holds, it is at worst poison: a record the Kafka client itself cannot parse
is dead-lettered and stepped over too (``sgpipe.runtime.unreadable``).

Rebalances (a consumer joining, leaving, dying or timing out) are routine, never a crash:

* when partitions are revoked, their records are dropped from the buffer at once, uncommitted
  (a write already in flight may finish, but its offsets for them are never committed): the
  partition's next owner -- maybe this stage again -- re-reads them from the last commit, and
  the processor's dedup window and ClickHouse's insert tokens / ReplacingMergeTree absorb the
  overlap. Waiting for a flush instead would hold the whole group's rebalance for as long as
  a write hangs, and committing then could land offsets of a log the broker no longer has;
* a commit only names partitions the consumer holds now and that were not revoked since their
  records were read, filtered right before the call;
* a commit refused because the group moved on (``GROUP_MOVED_ON``) drops the batch's offsets
  (its outputs were written; the next owner re-reads and the overlap is absorbed) and the
  stage goes on polling, which rejoins the group;
* the stage never seeks or reads the position of a partition it does not hold;
* a commit the broker refuses because it does not list the topic (``CommittedTopicMissing``:
  deleted, or a broker that restarted empty and still serves a log it does not list) drops
  the batch's offsets too; the topic is re-created and read again from its beginning;
* a partition whose log ends below what the stage read from it (a broker that lost the log
  and re-created the topic at offset 0, answering fetches past the end with nothing instead
  of OffsetOutOfRange) is read again from its beginning, like an out-of-range offset, and
  nothing read from the old log is committed.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import struct
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar

import structlog
from aiokafka.abc import ConsumerRebalanceListener
from aiokafka.errors import (
    CommitFailedError,
    IllegalGenerationError,
    IllegalStateError,
    NoOffsetForPartitionError,
    OffsetOutOfRangeError,
    RebalanceInProgressError,
    UnknownMemberIdError,
    UnknownTopicOrPartitionError,
)
from aiokafka.structs import OffsetAndMetadata, TopicPartition

from schemas.dead_letter import DeadLetter
from schemas.email_event import UnknownWriterSchema
from sgpipe.runtime import metrics
from sgpipe.runtime.dead_letters import (
    MAX_REJECTIONS_PER_RECORD,
    DeadLetterBudget,
    Rejection,
    SourceRecord,
    build_dead_letter,
    too_many_rejections,
)
from sgpipe.runtime.errors import (
    ErrorClass,
    FatalStageError,
    InvalidMessage,
    classify,
    describe,
    step_error_class,
)
from sgpipe.runtime.health import Progress, Readiness
from sgpipe.runtime.kafka import CommittedTopicMissing
from sgpipe.runtime.messages import Message
from sgpipe.runtime.progress import ProgressLog
from sgpipe.runtime.retry import Backoff, sleep_unless_stopped
from sgpipe.runtime.settings import DeadLetterLimit, StageSettings
from sgpipe.runtime.unreadable import UNREADABLE_ERRORS, Unreadable

log = structlog.get_logger(__name__)

T = TypeVar("T")
T_contra = TypeVar("T_contra", contravariant=True)

# What the consumer raises when the group moved on without this member (a rebalance, a
# session that expired, a coordinator that forgot it): the member rejoins by polling on,
# nothing is wrong with the stage. aiokafka wraps the last three in CommitFailedError.
GROUP_MOVED_ON: tuple[type[BaseException], ...] = (
    CommitFailedError,
    IllegalGenerationError,
    UnknownMemberIdError,
    RebalanceInProgressError,
)

# How long a draining consumer waits for more records before it calls its topic empty.
_DRAIN_POLL_MS = 1000
_IDLE_POLL_MS = 500
# The dead-letter reason of a record the Kafka client cannot parse (sgpipe.runtime.unreadable).
UNREADABLE_RECORD = "unreadable_record"
# The dead-letter reason of a record naming a writer schema nobody here can find.
UNKNOWN_SCHEMA = "unknown_schema"
# The readiness check that fails while the dead-letter limit holds the stage paused.
_LIMIT_CHECK = "dead_letter_limit"


@dataclass(slots=True)
class Transformed(Generic[T]):
    """What one record became: outputs to write and rejections to dead-letter."""

    outputs: list[T] = field(default_factory=list)
    rejections: list[Rejection] = field(default_factory=list)


Transform = Callable[[Message], Transformed[T]]
# An asynchronous step run once on a batch before its pure steps (the sink fetches the writer
# schemas the batch names from the registry). What it raises is classified like a write.
BeforeSteps = Callable[[Sequence[Message]], Awaitable[None]]


class Filter(Protocol[T]):
    """A stateful filter step: drops outputs, and learns only from what was written."""

    def select(self, outputs: Sequence[T]) -> list[T]:
        """The outputs to write; the rest are dropped (their offsets still advance)."""

    def written(self, outputs: Sequence[T]) -> None:
        """Called with the selected outputs once their write was acknowledged, never before."""

    def forget(self) -> None:
        """The broker lost data (offsets out of range, a group's offsets gone): what was
        acknowledged as written may be gone too, so nothing remembered may drop an output."""


@dataclass(frozen=True, slots=True)
class BatchInfo:
    """Where a batch came from: per (topic, partition), its first and last offset, and (for
    a batch read by a stage) its records, whose ``digest`` writers derive idempotency tokens
    from with the offsets.

    Offsets alone do not name a batch: a topic deleted and re-created, or an in-memory broker
    that came back empty, numbers a new log from 0 again, and a token made of offsets only
    would take the new log's batches for retries of the old one's (ClickHouse then drops
    them silently: acknowledged, never stored -- the memory-broker fault of issue 21)."""

    offsets: dict[tuple[str, int], tuple[int, int]]
    records: Sequence[Message] = field(default=(), compare=False, repr=False)

    @property
    def digest(self) -> str:
        """A digest of what the records hold (offset, timestamp, key and value of each): the
        same records read again -- a retried write, a redelivery of the same offsets -- give
        the same digest; other records at the same offsets another. "" without records.
        Computed when a writer asks (the sink's token), not for every batch of every stage."""
        if not self.records:
            return ""
        digest = hashlib.blake2b(digest_size=16)
        for record in self.records:
            record_key = record.key or b""
            value = record.value or b""
            digest.update(
                _RECORD_PREFIX.pack(
                    record.partition,
                    record.offset,
                    record.timestamp_ms,
                    len(record_key),
                    len(value),
                )
            )
            digest.update(record_key)
            digest.update(value)
        return digest.hexdigest()


def batch_info_of(records: Sequence[Message]) -> BatchInfo:
    """The offsets of ``records`` per partition, with the records for ``BatchInfo.digest``."""
    ranges: dict[tuple[str, int], tuple[int, int]] = {}
    for record in records:
        key = (record.topic, record.partition)
        first = ranges.get(key, (record.offset, record.offset))[0]
        ranges[key] = (first, record.offset)
    # A copy: the stage's buffer the records came from changes after the batch is read.
    return BatchInfo(ranges, tuple(records))


# Each record's fixed-size fields, length-prefixing its key and value so that no two different
# batches hash the same bytes.
_RECORD_PREFIX = struct.Struct(">iqqii")


class Writer(Protocol[T_contra]):
    """Where a stage's outputs go. ``write`` returns once they are durable (Kafka acked, the
    ClickHouse insert returned) and raises otherwise; the runtime classifies what it raises."""

    output: str  # the metric label of what it writes (a topic role or a table)
    destination: str  # for people: "ClickHouse", "Kafka topic sgpipe.events"

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    async def write(self, outputs: Sequence[T_contra], batch: BatchInfo) -> None: ...

    async def probe(self) -> None:
        """Raise if the destination is unreachable now (readiness)."""


class DeadLetterWriter(Protocol):
    async def write(self, letters: Sequence[DeadLetter]) -> None:
        """Return once every letter is durable; raise otherwise."""


class Consumer(Protocol):
    """The slice of AIOKafkaConsumer the loop uses (tests substitute a fake at this edge)."""

    async def getmany(
        self, *partitions: TopicPartition, timeout_ms: int = 0, max_records: int | None = None
    ) -> dict[TopicPartition, list[Any]]: ...

    async def commit(self, offsets: dict[TopicPartition, OffsetAndMetadata]) -> None: ...

    def assignment(self) -> set[TopicPartition]: ...

    def highwater(self, partition: TopicPartition) -> int | None: ...

    async def seek_to_beginning(self, *partitions: TopicPartition) -> bool: ...

    def pause(self, *partitions: TopicPartition) -> None: ...

    def seek(self, partition: TopicPartition, offset: int) -> None: ...


@dataclass(frozen=True, slots=True)
class StageOptions:
    """How the loop batches, retries, stops and limits dead letters (from a stage's settings)."""

    name: str
    batch_max_records: int
    batch_max_seconds: float
    retry_backoff_initial_seconds: float
    retry_backoff_max_seconds: float
    stall_timeout_seconds: float
    stop_timeout_seconds: float
    dead_letters: DeadLetterLimit
    max_dead_letter_payload_bytes: int
    progress_log_seconds: float = 30.0
    flush_when_idle: bool = True

    @classmethod
    def from_settings(
        cls, name: str, section: StageSettings, *, max_dead_letter_payload_bytes: int
    ) -> StageOptions:
        return cls(
            name=name,
            batch_max_records=section.batch_max_records,
            batch_max_seconds=section.batch_max_seconds,
            retry_backoff_initial_seconds=section.retry_backoff_initial_seconds,
            retry_backoff_max_seconds=section.retry_backoff_max_seconds,
            stall_timeout_seconds=section.stall_timeout_seconds,
            stop_timeout_seconds=section.stop_timeout_seconds,
            dead_letters=section.dead_letters,
            max_dead_letter_payload_bytes=max_dead_letter_payload_bytes,
            progress_log_seconds=section.progress_log_seconds,
            flush_when_idle=section.flush_when_idle,
        )


class _Interrupted(Exception):
    """A write attempt was abandoned because a stop was requested."""


class DrainIncomplete(RuntimeError):
    """A draining stage stopped with records it could not write: with an in-memory broker
    they are lost, so the process must not report a clean stop."""


@dataclass(slots=True)
class _Prepared(Generic[T]):
    outputs: list[T]
    dead_letters: list[DeadLetter]
    offsets: dict[TopicPartition, OffsetAndMetadata]
    info: BatchInfo
    # The stage's assignment epoch when the batch was read (see StageLoop._epoch).
    epoch: int
    outputs_written: bool = False
    dead_letters_written: bool = False
    # Per source record, whether it had dead letters: what the dead-letter limit counts.
    outcomes: dict[SourceRecord, bool] = field(default_factory=dict)
    # Why the dead-letter limit refused the batch; None: within the limit.
    held: str | None = None


class StageLoop(Generic[T]):
    """Runs one declared stage over a started consumer; see the module docstring."""

    def __init__(
        self,
        options: StageOptions,
        consumer: Consumer,
        transform: Transform[T],
        writer: Writer[T],
        dead_letter_writer: DeadLetterWriter,
        *,
        filter_step: Filter[T] | None = None,
        readiness: Readiness | None = None,
        on_missing_topic: Callable[[], Awaitable[None]] | None = None,
        before_steps: BeforeSteps | None = None,
        find_unreadable: Callable[[], Awaitable[Unreadable | None]] | None = None,
    ) -> None:
        self._options = options
        self._before_steps = before_steps
        self._find_unreadable = find_unreadable
        self._consumer = consumer
        self._transform = transform
        self._writer = writer
        self._dead_letter_writer = dead_letter_writer
        self._filter = filter_step
        self._on_missing_topic = on_missing_topic
        self._stage = options.name
        self._budget = DeadLetterBudget(options.dead_letters, stage=options.name)
        self._buffer: list[Message] = []
        self._buffer_started = 0.0
        self._prepared: _Prepared[T] | None = None
        self._positions: dict[TopicPartition, int] = {}
        # Revoked and not assigned again since: never committed, even if a write in flight
        # when they were revoked completes (aiokafka still lists them as assigned until the
        # rebalance completes).
        self._revoked: set[TopicPartition] = set()
        # Assigned and not read from since: the first records of each say where it resumed.
        self._resuming: set[TopicPartition] = set()
        # Counts revocations and lost logs (``_abandon``). aiokafka revokes everything at each
        # rebalance, so a batch read in an earlier epoch holds only records of abandoned
        # partitions: never committed, even when they are assigned back (after a broker that
        # lost its log, those offsets would point into a new log, past records nobody read).
        self._epoch = 0
        # Set by each revocation (then replaced): a commit in flight stops waiting for it.
        self._revocation = asyncio.Event()
        self._lock = asyncio.Lock()
        # When the stage last had work it could not finish; None while it keeps up.
        self.busy_since: float | None = None
        self._progress = ProgressLog(options.progress_log_seconds)
        self._lag: int | None = None
        self.readiness = readiness or Readiness(options.name)
        # Why the stage is paused by the dead-letter limit; None while it consumes.
        self.paused: str | None = None
        self.readiness.set(_LIMIT_CHECK, True, "within the dead-letter limit")
        metrics.DEAD_LETTER_LIMIT_TRIPPED.labels(self._stage).set(0)
        progress = Progress(options.stall_timeout_seconds)
        self.readiness.add_check("progress", lambda: progress.check(self.busy_since))

    def rebalance_listener(self) -> ConsumerRebalanceListener:
        return _AbandonOnRevoke(self)

    # --- the loop ------------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event, *, drain: bool = False) -> None:
        """Until ``stop`` is set; then write what is buffered (retrying until the stop
        timeout) and, with ``drain``, keep consuming until a poll comes back empty.

        Raises FatalStageError (nothing of the failing batch committed) and, with ``drain``,
        DrainIncomplete when records were left unwritten. Paused by the dead-letter limit, it
        writes nothing more, not even on stop: the held batch stays uncommitted.
        """
        while not stop.is_set():
            if self.paused is not None:
                await self._hold(stop)
                continue
            received = await self._poll(self._poll_timeout_ms(), stop)
            # An empty poll means the input is idle: waiting out batch_max_seconds would only
            # delay what is buffered (issue 16), so it is written now.
            idle = received == 0 and self._options.flush_when_idle
            if self._buffer and (idle or self._due()):
                await self._flush(stop=stop)

        deadline = time.monotonic() + self._options.stop_timeout_seconds
        drained = not drain
        while self.paused is None and (not self._buffer or await self._flush(deadline=deadline)):
            if drained or self.paused is not None or time.monotonic() >= deadline:
                break
            drained = await self._poll(_DRAIN_POLL_MS, None) == 0

        if self.paused is not None and self._buffer:
            held = len(self._buffer)
            self._clear_buffer()
            if drain:
                raise DrainIncomplete(
                    f"{self._stage}: stopped paused by the dead-letter limit with {held} "
                    "records held, not written"
                )
            log.warning(
                "stopping paused by the dead-letter limit; the held records were not written "
                "or committed, and are read again at the next start",
                stage=self._stage,
                records=held,
            )
        elif self._buffer or not drained:
            unwritten = len(self._buffer)
            self._clear_buffer()
            if drain:
                raise DrainIncomplete(
                    f"{self._stage}: stopped after {self._options.stop_timeout_seconds:.0f} s "
                    f"with {unwritten} records not written and the topic not drained"
                )
            log.warning(
                "stopping with records not written; Kafka will redeliver them",
                stage=self._stage,
                records=unwritten,
            )

    async def _hold(self, stop: asyncio.Event) -> None:
        """One turn of a paused stage: poll with every owned partition paused, so nothing is
        fetched but the consumer stays in its group (one that stops polling is dropped from it
        after ``max_poll_interval_ms`` and its partitions -- the held batch -- handed to another
        consumer). Whatever a poll still returns is ignored: nothing is committed while paused,
        so it is read again after the restart."""
        assigned = self._consumer.assignment()
        if assigned:
            self._consumer.pause(*assigned)
        try:
            await self._consumer.getmany(timeout_ms=_IDLE_POLL_MS)
        except Exception as exc:  # noqa: BLE001 - nothing is consumed while paused
            log.warning("poll while paused failed", stage=self._stage, error=describe(exc))
            await sleep_unless_stopped(stop, self._options.retry_backoff_initial_seconds)

    def _pause(self, reason: str) -> None:
        self.paused = reason
        self.readiness.set(
            _LIMIT_CHECK,
            False,
            f"{reason}; paused, holding the batch unwritten and uncommitted: fix the cause "
            "and restart the stage (docs/dead-letters.md)",
        )
        metrics.DEAD_LETTER_LIMIT_TRIPPED.labels(self._stage).set(1)
        self.readiness.evaluate()  # refreshes the sgpipe_ready gauge now
        log.error(
            "dead-letter limit reached; the stage is paused until it is restarted",
            stage=self._stage,
            error=reason,
            records_held=len(self._buffer),
        )

    async def _poll(self, timeout_ms: int, stop: asyncio.Event | None) -> int:
        max_records = max(1, self._options.batch_max_records - len(self._buffer))
        epoch = self._epoch
        try:
            polled = await self._consumer.getmany(timeout_ms=timeout_ms, max_records=max_records)
        except OffsetOutOfRangeError as exc:
            self._forget_written()
            await self._reset_out_of_range(exc)
            return 0
        except NoOffsetForPartitionError as exc:
            # A new group (or a partition never committed): start at the beginning. Also what
            # a broker that restarted empty looks like: its acknowledgements are void.
            partitions = self._owned([p for p in exc.args if isinstance(p, TopicPartition)])
            self._forget_written()
            if partitions:  # with none, aiokafka would rewind every assigned partition
                log.info(
                    "no committed offset; reading from the beginning",
                    stage=self._stage,
                    partitions=sorted(f"{p.topic}/{p.partition}" for p in partitions),
                )
                await self._consumer.seek_to_beginning(*partitions)
            return 0
        except GROUP_MOVED_ON as exc:
            # Reported by the group coordinator through the poll: the next poll rejoins.
            log.warning("the group moved on; rejoining", stage=self._stage, error=describe(exc))
            return 0
        except UNREADABLE_ERRORS as exc:
            # A record the client cannot parse: record content, never fatal.
            return await self._step_over_unreadable(exc, stop)
        except Exception as exc:  # noqa: BLE001 - classified below
            if classify(exc) is not ErrorClass.RETRIABLE:
                self._fail(exc, "polling failed")
            metrics.ERRORS.labels(self._stage, ErrorClass.RETRIABLE).inc()
            log.warning("poll failed; retrying", stage=self._stage, error=describe(exc))
            if stop is not None:
                await sleep_unless_stopped(stop, self._options.retry_backoff_initial_seconds)
            return 0
        if epoch != self._epoch:
            # A rebalance ran while this poll waited: keep only what comes from partitions
            # held now (aiokafka has already moved their position past it); records of a
            # partition revoked meanwhile are read again by its next owner.
            owned = set(self._owned(list(polled)))
            polled = {partition: polled[partition] for partition in polled if partition in owned}
        received = 0
        for partition, records in polled.items():
            if not records:
                continue
            if not self._buffer:
                self._buffer_started = time.monotonic()
            self._buffer.extend(_message(record) for record in records)
            self._positions[partition] = records[-1].offset + 1
            if partition in self._resuming:
                self._resuming.discard(partition)
                log.info(
                    "reading a partition assigned to this stage",
                    stage=self._stage,
                    topic=partition.topic,
                    partition=partition.partition,
                    first_offset=records[0].offset,
                )
            received += len(records)
        if received:
            metrics.RECORDS_CONSUMED.labels(self._stage).inc(received)
        await self._reset_lost_logs()
        self._update_lag()
        return received

    async def _step_over_unreadable(self, exc: Exception, stop: asyncio.Event | None) -> int:
        """Find the record the client cannot read (sgpipe.runtime.unreadable), buffer the
        readable ones before it, dead-letter it (with where it is: the client never had its
        bytes) and seek past it. Anything failing on the way is retried at the next poll."""
        found = None
        if self._find_unreadable is not None:
            try:
                found = await self._find_unreadable()
            except Exception as error:  # noqa: BLE001 - retried at the next poll
                log.warning(
                    "could not locate an unreadable record",
                    stage=self._stage,
                    error=describe(error),
                )
        if found is None:
            log.warning("poll met a record it cannot read; retrying", error=describe(exc))
            if stop is not None:
                await sleep_unless_stopped(stop, self._options.retry_backoff_initial_seconds)
            return 0
        where = found.partition
        letter = DeadLetter(
            reason=UNREADABLE_RECORD,
            detail=(
                f"the Kafka client cannot read the record at offset {found.first} "
                f"({found.error}); offsets {found.first}..{found.resume - 1} were stepped "
                f"over: read them at {where.topic}/{where.partition} with another client"
            ),
            stage=self._stage,
            payload=b"",
            original_topic=where.topic,
            original_partition=where.partition,
            original_offset=found.first,
        )
        try:
            await self._dead_letter_writer.write([letter])
        except FatalStageError as error:
            # The dead-letter sink reads the dead-letter topic and cannot write to it: the
            # record stays on the topic, said here (the record is unreadable to it either way).
            log.error("stepping over an unreadable record", stage=self._stage, error=str(error))
        except Exception as error:  # noqa: BLE001 - the next poll meets it again
            log.warning(
                "could not dead-letter an unreadable record; retrying",
                stage=self._stage,
                error=describe(error),
            )
            return 0
        metrics.DEAD_LETTERS.labels(self._stage, UNREADABLE_RECORD).inc()
        log.warning(
            "stepped over records the Kafka client cannot read",
            stage=self._stage,
            topic=where.topic,
            partition=where.partition,
            first=found.first,
            resume=found.resume,
            error=found.error,
        )
        if found.readable and not self._buffer:
            self._buffer_started = time.monotonic()
        self._buffer.extend(_message(record) for record in found.readable)
        self._consumer.seek(where, found.resume)
        self._positions[where] = found.resume
        return len(found.readable)

    async def _reset_out_of_range(self, exc: OffsetOutOfRangeError) -> None:
        # The committed offset is past the end of the log (the broker lost or deleted data):
        # start again at the earliest offset, never skip ahead. Duplicates are absorbed by
        # ClickHouse; skipped events would be lost.
        offsets = exc.args[0] if exc.args and isinstance(exc.args[0], dict) else {}
        partitions = self._owned([p for p in offsets if isinstance(p, TopicPartition)])
        for partition in partitions:
            metrics.OFFSET_RESETS.labels(self._stage).inc()
            log.warning(
                "committed offset out of range; resetting to the earliest offset",
                stage=self._stage,
                topic=partition.topic,
                partition=partition.partition,
                offset=offsets[partition],
            )
        if partitions:
            await self._consumer.seek_to_beginning(*partitions)

    async def _reset_lost_logs(self) -> None:
        # A partition whose end (the highwater of the last fetch) is below the position this
        # stage read up to lost its log under us: a broker that came back empty and had the
        # topic re-created at offset 0. Kafka answers OffsetOutOfRange then; tansu answers an
        # empty fetch, and the consumer would wait, unnoticed, for the new log to grow past
        # the old position and go on from there, skipping every record before it: what turned
        # a stale commit into the ~998 acknowledged events tests/faults' memory-broker restart
        # lost (issue 21). Start the new log at its beginning, and never commit what was read
        # from the old one.
        lost = []
        for partition in self._owned(list(self._positions)):
            highwater = self._consumer.highwater(partition)
            if highwater is not None and highwater < self._positions[partition]:
                lost.append(partition)
                metrics.OFFSET_RESETS.labels(self._stage).inc()
                log.warning(
                    "partition's log is shorter than what was read from it (the broker lost "
                    "it); resetting to the earliest offset",
                    stage=self._stage,
                    topic=partition.topic,
                    partition=partition.partition,
                    position=self._positions[partition],
                    highwater=highwater,
                )
        if lost:
            self._abandon(set(lost))
            self._forget_written()
            await self._consumer.seek_to_beginning(*lost)

    def _forget_written(self) -> None:
        # A filter that kept trusting the lost writes would drop the redelivered copies of
        # acknowledged events as duplicates: acknowledged, never stored.
        if self._filter is not None:
            self._filter.forget()

    def _owned(self, partitions: Sequence[TopicPartition]) -> list[TopicPartition]:
        """Those of ``partitions`` the consumer holds now and that were not revoked."""
        assigned = self._consumer.assignment()
        return [p for p in partitions if p in assigned and p not in self._revoked]

    def _update_lag(self) -> None:
        oldest_ms = self._buffer[0].timestamp_ms if self._buffer else None
        metrics.OLDEST_UNWRITTEN_SECONDS.labels(self._stage).set(
            max(time.time() - oldest_ms / 1000, 0.0) if oldest_ms else 0.0
        )
        lag: int | None = None
        # aiokafka asserts on the highwater of a partition it does not hold: ask only for
        # those held now (a rebalance may have moved the others since they were polled).
        for partition in self._owned(list(self._positions)):
            position = self._positions[partition]
            highwater = self._consumer.highwater(partition)
            if highwater is not None:
                behind = max(highwater - position, 0)
                metrics.CONSUMER_LAG.labels(self._stage, str(partition.partition)).set(behind)
                lag = (lag or 0) + behind
        self._lag = lag

    def _poll_timeout_ms(self) -> int:
        if not self._buffer:
            return _IDLE_POLL_MS
        remaining = self._options.batch_max_seconds - (time.monotonic() - self._buffer_started)
        return max(0, min(_IDLE_POLL_MS, int(remaining * 1000)))

    def _due(self) -> bool:
        return (
            len(self._buffer) >= self._options.batch_max_records
            or time.monotonic() - self._buffer_started >= self._options.batch_max_seconds
        )

    # --- one batch -----------------------------------------------------------------------------

    async def _flush(
        self, *, stop: asyncio.Event | None = None, deadline: float | None = None
    ) -> bool:
        """Write the buffer and commit it, retrying retriable failures until it succeeds
        (True) or ``stop`` is set / ``deadline`` passes (False: the buffer is kept, nothing
        committed). Raises FatalStageError."""
        backoff = Backoff(
            self._options.retry_backoff_initial_seconds, self._options.retry_backoff_max_seconds
        )
        started = time.monotonic()
        while True:
            try:
                records = await self._attempt(stop, deadline)
            except _Interrupted:
                log.warning(
                    "stop requested during a write; giving up for now",
                    stage=self._stage,
                    records=len(self._buffer),
                )
                return False
            except Exception as exc:  # noqa: BLE001 - classified below
                if classify(exc) is not ErrorClass.RETRIABLE:
                    self._fail(exc, "writing a batch failed")
                if isinstance(exc, UnknownTopicOrPartitionError):
                    await self._recreate_topics()
                if self.busy_since is None:
                    self.busy_since = started
                metrics.ERRORS.labels(self._stage, ErrorClass.RETRIABLE).inc()
                wait = backoff.next_delay()
                if deadline is not None:
                    wait = min(wait, deadline - time.monotonic())
                if (stop is not None and stop.is_set()) or wait <= 0:
                    log.warning(
                        "write failed; giving up for now",
                        stage=self._stage,
                        records=len(self._buffer),
                        error=describe(exc),
                    )
                    return False
                log.warning(
                    "write failed; retrying",
                    stage=self._stage,
                    records=len(self._buffer),
                    retry_in_seconds=round(wait, 2),
                    error=describe(exc),
                )
                metrics.RETRIES.labels(self._stage).inc()
                if stop is None:
                    await asyncio.sleep(wait)
                else:
                    await sleep_unless_stopped(stop, wait)
                continue
            self.busy_since = None
            if records:
                metrics.FLUSH_RECORDS.labels(self._stage).observe(records)
                metrics.FLUSH_SECONDS.labels(self._stage).observe(time.monotonic() - started)
            return True

    async def _attempt(self, stop: asyncio.Event | None, deadline: float | None) -> int:
        """One ``flush_and_commit``, abandoned when ``stop`` is set (raising _Interrupted) or
        when ``deadline`` passes (TimeoutError), so that a write hanging on a dead broker
        cannot hold a stop past its deadline. An abandoned attempt committed nothing; what
        it may have written is written again by the next attempt (duplicates are absorbed
        downstream)."""
        if deadline is not None:
            return await asyncio.wait_for(
                self.flush_and_commit(), max(deadline - time.monotonic(), 0.001)
            )
        if stop is None:
            return await self.flush_and_commit()
        attempt = asyncio.ensure_future(self.flush_and_commit())
        stopped = asyncio.ensure_future(stop.wait())
        try:
            await asyncio.wait({attempt, stopped}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopped.cancel()
        if attempt.done():
            return attempt.result()
        attempt.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await attempt
        raise _Interrupted

    async def flush_and_commit(self) -> int:
        """One attempt at the buffered batch: steps (once per batch), write, dead letters,
        commit. Returns the records committed; raises what a write or the commit raises."""
        async with self._lock:
            if not self._buffer or self.paused is not None:
                return 0
            prepared = self._prepared
            if prepared is None:
                if self._before_steps is not None:
                    await self._before_steps(self._buffer)
                # The pure steps in a worker thread: one hostile record can take them many
                # seconds (2,000,000 elements: ~25 s), and the event loop must keep heartbeating
                # to the group meanwhile -- a consumer dropped from it re-reads the batch
                # forever. The filter and the budget hold state: they stay on the loop.
                epoch = self._epoch
                stepped = await asyncio.to_thread(self._run_steps, self._buffer, epoch)
                if epoch != self._epoch:
                    # A rebalance abandoned partitions while the steps ran: the buffer is not
                    # what was stepped. Nothing is written; the next flush steps what is left.
                    return 0
                prepared = self._prepared = self._select_and_admit(stepped)
            if prepared.held is not None:
                self._pause(prepared.held)
                return 0
            if not prepared.outputs_written:
                if prepared.outputs:
                    await self._writer.write(prepared.outputs, prepared.info)
                    metrics.RECORDS_PRODUCED.labels(self._stage, self._writer.output).inc(
                        len(prepared.outputs)
                    )
                prepared.outputs_written = True
                # Remember after the ack: only now may the filter count them as written.
                if self._filter is not None:
                    self._filter.written(prepared.outputs)
            if not prepared.dead_letters_written:
                if prepared.dead_letters:
                    await self._dead_letter_writer.write(prepared.dead_letters)
                    for letter in prepared.dead_letters:
                        metrics.DEAD_LETTERS.labels(self._stage, letter.reason).inc()
                prepared.dead_letters_written = True
            await self._commit(prepared.offsets, prepared.epoch)
            committed = len(self._buffer)
            self._clear_buffer()
            progress = self._progress.record(committed, self._lag)
            if progress is not None:
                log.info("wrote", stage=self._stage, output=self._writer.output, **progress)
            return committed

    def _run_steps(self, records: Sequence[Message], epoch: int) -> _Prepared[T]:
        """The pure steps of a batch and its dead letters (no shared state: a worker thread
        runs this)."""
        outputs: list[T] = []
        dead_letters: list[DeadLetter] = []
        offsets: dict[TopicPartition, OffsetAndMetadata] = {}
        # Per source record, whether it had dead letters: what the dead-letter limit counts.
        outcomes: dict[SourceRecord, bool] = {}
        for record in records:
            try:
                transformed = run_steps(self._transform, record)
            except Exception as exc:  # noqa: BLE001 - only what stops the stage gets here
                self._fail(exc, f"processing {record.topic}/{record.partition}/{record.offset}")
            outputs.extend(transformed.outputs)
            outcomes[(record.topic, record.partition, record.offset)] = bool(transformed.rejections)
            for rejection in transformed.rejections:
                dead_letters.append(
                    build_dead_letter(
                        record,
                        rejection,
                        stage=self._stage,
                        max_payload_bytes=self._options.max_dead_letter_payload_bytes,
                    )
                )
            offsets[TopicPartition(record.topic, record.partition)] = OffsetAndMetadata(
                record.offset + 1, ""
            )
        return _Prepared(
            outputs, dead_letters, offsets, batch_info_of(records), epoch, outcomes=outcomes
        )

    def _select_and_admit(self, prepared: _Prepared[T]) -> _Prepared[T]:
        """The filter step, then the dead-letter limit: past it, the batch is held (never
        written) and the stage pauses."""
        before = len(prepared.outputs)
        if self._filter is not None:
            prepared.outputs = self._filter.select(prepared.outputs)
            dropped = before - len(prepared.outputs)
            if dropped:
                metrics.DUPLICATES_DROPPED.labels(self._stage).inc(dropped)
        prepared.held = self._budget.admit(prepared.outcomes)
        dead_letters = prepared.dead_letters
        if dead_letters and prepared.held is None:
            metrics.ERRORS.labels(self._stage, ErrorClass.POISON).inc(len(dead_letters))
            reasons = Counter(letter.reason for letter in dead_letters)
            log.info("dead-lettering records", stage=self._stage, reasons=dict(reasons))
        return prepared

    async def _commit(self, offsets: dict[TopicPartition, OffsetAndMetadata], epoch: int) -> None:
        """Commit ``offsets`` (of a batch read in ``epoch``) of the partitions still owned
        since; a refusal because the group moved on is a rejoin, not a failure (see the
        module docstring)."""
        owned = set(self._owned(list(offsets))) if epoch == self._epoch else set()
        committable = {partition: offsets[partition] for partition in offsets if partition in owned}
        if len(committable) < len(offsets):
            log.info(
                "not committing partitions this stage no longer owns; their next owner "
                "re-reads them",
                stage=self._stage,
                partitions=sorted(f"{p.topic}/{p.partition}" for p in offsets if p not in owned),
            )
        if not committable:
            return
        try:
            committed = await self._commit_unless_revoked(committable)
        except CommittedTopicMissing as exc:
            await self._start_missing_topic_over(set(committable), exc)
            return
        except (*GROUP_MOVED_ON, IllegalStateError) as exc:
            # IllegalStateError: the partitions were taken away in the instant between the
            # ownership check and the call (the same rejoin, seen from the client's side).
            # The group rebalanced while we wrote: the batch was written, its offsets are not
            # committed; the next owner of its partitions re-reads them and the duplicates
            # are absorbed downstream. Polling on rejoins the group.
            log.warning(
                "commit refused: the group moved on; rejoining",
                stage=self._stage,
                error=describe(exc),
            )
            return
        if not committed:
            log.warning(
                "partitions revoked while committing; the commit is abandoned", stage=self._stage
            )
            return
        metrics.LAST_COMMIT.labels(self._stage).set(time.time())

    async def _start_missing_topic_over(
        self, partitions: set[TopicPartition], exc: CommittedTopicMissing
    ) -> None:
        """The broker does not list the topic the batch was read from (see
        ``GroupMemberConsumer``): what was read is written but never committed -- once the
        topic exists again, those offsets would point into its new log, past records nobody
        read. The topic is re-created (with ``kafka.create_topics``) and read from its
        beginning; ClickHouse and the dedup window absorb what is read twice."""
        metrics.OFFSET_RESETS.labels(self._stage).inc(len(partitions))
        log.warning(
            "the broker does not list the topic read from; not committing, re-reading it "
            "from its beginning",
            stage=self._stage,
            partitions=sorted(f"{p.topic}/{p.partition}" for p in partitions),
            error=describe(exc),
        )
        self._abandon(partitions)
        self._forget_written()
        await self._recreate_topics()
        owned = self._owned(list(partitions))
        if owned:
            await self._consumer.seek_to_beginning(*owned)

    async def _commit_unless_revoked(
        self, offsets: dict[TopicPartition, OffsetAndMetadata]
    ) -> bool:
        """Commit, unless a revocation comes first (False): during a rebalance the broker
        answers a member's commit only after the group's JoinGroup completed (requests on
        one connection are served in order), which can take as long as the slowest member
        takes to rejoin; a stop must not wait for that, and the outcome no longer matters
        (the partitions' next owner re-reads what is not committed)."""
        revoked = self._revocation
        commit = asyncio.ensure_future(self._consumer.commit(offsets))
        waiting = asyncio.ensure_future(revoked.wait())
        try:
            await asyncio.wait({commit, waiting}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiting.cancel()
            if not commit.done():
                commit.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await commit
        if commit.cancelled():
            return False
        commit.result()  # raises what the commit raised
        return True

    async def _recreate_topics(self) -> None:
        if self._on_missing_topic is None:
            return
        try:
            await self._on_missing_topic()
        except Exception as exc:  # noqa: BLE001 - the write is retried anyway
            log.warning("could not re-create topics", stage=self._stage, error=describe(exc))

    def _fail(self, exc: BaseException, what: str) -> None:
        metrics.ERRORS.labels(self._stage, ErrorClass.FATAL).inc()
        if isinstance(exc, FatalStageError):
            raise exc
        raise FatalStageError(
            f"{self._stage}: {what}: {describe(exc)} (fatal: fix the cause and restart; "
            "nothing of the batch was committed)"
        ) from exc

    def _clear_buffer(self) -> None:
        self._buffer = []
        self._prepared = None

    def partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        """Abandon the revoked partitions, at once and without waiting for a write in flight:
        their records leave the buffer uncommitted and their offsets are never committed
        until they are assigned to this stage again (then read again from the last commit)."""
        metrics.REBALANCES.labels(self._stage).inc()
        self._revocation.set()
        self._revocation = asyncio.Event()
        self._revoked |= revoked
        abandoned = self._abandon(revoked)
        for partition in revoked:
            with contextlib.suppress(KeyError):  # no lag was reported for it yet
                metrics.CONSUMER_LAG.remove(self._stage, str(partition.partition))
        log.info(
            "partitions revoked; their uncommitted records are left to their next owner",
            stage=self._stage,
            partitions=sorted(f"{p.topic}/{p.partition}" for p in revoked),
            records_abandoned=abandoned,
        )

    def _abandon(self, partitions: set[TopicPartition]) -> int:
        """Drop the buffered records of ``partitions`` and start a new epoch, so that no batch
        read before -- a write in flight included -- is ever committed. Returns the number
        of records dropped."""
        self._epoch += 1
        kept = [
            record
            for record in self._buffer
            if TopicPartition(record.topic, record.partition) not in partitions
        ]
        abandoned = len(self._buffer) - len(kept)
        if abandoned:
            self._buffer = kept
            # The steps are run again for what stays (a write in flight keeps its own copy).
            self._prepared = None
        for partition in partitions:
            self._positions.pop(partition, None)
        return abandoned

    def partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        """``assigned`` are this stage's again; the consumer reads them from the last commit."""
        self._revoked -= assigned
        self._resuming = set(assigned)
        log.info(
            "partitions assigned",
            stage=self._stage,
            partitions=sorted(f"{p.topic}/{p.partition}" for p in assigned),
        )


def run_steps(transform: Transform[T], record: Message) -> Transformed[T]:
    """What a stage's pure steps make of one record: the transform's outputs and rejections,
    or, when it raises, a rejection of the whole record (a pure step is deterministic: it would
    raise again). More than ``MAX_REJECTIONS_PER_RECORD`` rejections become one of the whole
    record. Raises only what says the stage cannot go on (``step_error_class``)."""
    try:
        result = transform(record)
    except Exception as exc:
        if step_error_class(exc) is ErrorClass.FATAL:
            raise
        return Transformed(rejections=[_rejection_for(exc)])
    if len(result.rejections) > MAX_REJECTIONS_PER_RECORD:
        reasons = Counter(rejection.reason for rejection in result.rejections)
        result.rejections = [too_many_rejections(reasons)]
    return result


def _rejection_for(exc: Exception) -> Rejection:
    if isinstance(exc, InvalidMessage):
        return Rejection(exc.reason, exc.detail)
    if isinstance(exc, UnknownWriterSchema):
        return Rejection(UNKNOWN_SCHEMA, str(exc))
    # A pure step is deterministic: what raised for this record will always raise for it.
    return Rejection("processing_error", describe(exc))


def _message(record: Any) -> Message:
    return Message(
        topic=record.topic,
        partition=record.partition,
        offset=record.offset,
        timestamp_ms=record.timestamp,
        key=record.key,
        value=record.value,
        headers=tuple(record.headers or ()),
    )


class _AbandonOnRevoke(ConsumerRebalanceListener):  # type: ignore[misc]
    """aiokafka calls these from its group coordinator: before a rejoin (``revoked``: what
    this member held) and after it (``assigned``). Neither waits for the stage's writes."""

    def __init__(self, loop: StageLoop[Any]) -> None:
        self._loop = loop

    async def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        self._loop.partitions_revoked(set(revoked))

    async def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        self._loop.partitions_assigned(set(assigned))


@dataclass(frozen=True)
class ConsumerStage(Generic[T]):
    """A consuming stage, declared: what it reads, its pure steps, and where it writes.

    ``writer`` is built with the stage's Kafka producer (which the runtime starts, shares with
    the dead-letter writer, and stops); ``filter_step`` is stateful, so a stage builds a fresh
    declaration per run. ``before_steps``: an asynchronous step run on each batch before its
    pure steps (a retriable failure holds the batch and is retried). ``writes_dead_letters``
    False is for a stage that reads the dead-letter topic: a dead letter of its own would come
    back to it, so a rejection stops it (fatal, nothing of the batch committed) instead.
    ``ready_without_partitions`` is for a stage that runs next to another in every replica of
    a process and whose topic may have fewer partitions than there are replicas: owning none
    is then normal, not unreadiness.
    """

    name: str
    topic: str
    group_id: str
    options: StageOptions
    transform: Transform[T]
    writer: Callable[[Any], Writer[T]]
    filter_step: Filter[T] | None = None
    before_steps: BeforeSteps | None = None
    writes_dead_letters: bool = True
    ready_without_partitions: bool = False
