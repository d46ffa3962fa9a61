"""The consume -> steps -> write -> commit loop every consuming stage runs.

A stage is *declared* (``ConsumerStage``): the topic it reads, a pure ``transform`` of one
record into outputs and rejections, an optional ``filter`` and a ``writer``. The runtime does
the rest, in this order for every batch, and these orders are its guarantees:

1. poll until ``batch_max_records`` or ``batch_max_seconds`` since the first buffered record;
2. run the steps: ``transform`` each record (a pure step that raises makes that record poison:
   it is rejected, the others go on), then ``filter.select`` the outputs;
3. admit the batch's dead letters to the ``DeadLetterBudget`` -- past the limit the stage stops
   (fatal) before anything of the batch is written;
4. ``writer.write`` the outputs and wait for the acknowledgement;
5. ``filter.written`` -- **remember after the ack**: a filter (the processor's dedup window)
   learns about outputs only once they are durable, so a failed write is never mistaken for
   a duplicate when it is retried or redelivered;
6. write the dead letters to the dead-letter topic and wait for the acknowledgement;
7. **commit after the write**: only now are the batch's offsets committed.

Retriable failures of 4, 6 and 7 are retried with capped backoff, holding the batch (the
steps are not re-run); fatal ones stop the stage with FatalStageError and nothing committed.
Before partitions are revoked in a rebalance the buffer is flushed; if that fails, the
revoked records are dropped from the buffer uncommitted, for their new owner to read.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar

import structlog
from aiokafka.abc import ConsumerRebalanceListener
from aiokafka.errors import (
    CommitFailedError,
    NoOffsetForPartitionError,
    OffsetOutOfRangeError,
    UnknownTopicOrPartitionError,
)
from aiokafka.structs import OffsetAndMetadata, TopicPartition

from schemas.dead_letter import DeadLetter
from sgpipe.runtime import metrics
from sgpipe.runtime.dead_letters import DeadLetterBudget, Rejection, build_dead_letter
from sgpipe.runtime.errors import (
    ErrorClass,
    FatalStageError,
    InvalidMessage,
    classify,
    describe,
    step_error_class,
)
from sgpipe.runtime.health import Progress, Readiness
from sgpipe.runtime.messages import Message
from sgpipe.runtime.retry import Backoff, sleep_unless_stopped
from sgpipe.runtime.settings import DeadLetterLimit, StageSettings

log = structlog.get_logger(__name__)

T = TypeVar("T")
T_contra = TypeVar("T_contra", contravariant=True)

# How long a draining consumer waits for more records before it calls its topic empty.
_DRAIN_POLL_MS = 1000
_IDLE_POLL_MS = 500


@dataclass(slots=True)
class Transformed(Generic[T]):
    """What one record became: outputs to write and rejections to dead-letter."""

    outputs: list[T] = field(default_factory=list)
    rejections: list[Rejection] = field(default_factory=list)


Transform = Callable[[Message], Transformed[T]]


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
    """Where a batch came from: per (topic, partition), its first and last offset.
    Writers derive idempotency tokens from it."""

    offsets: dict[tuple[str, int], tuple[int, int]]


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
    outputs_written: bool = False
    dead_letters_written: bool = False


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
    ) -> None:
        self._options = options
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
        self._lock = asyncio.Lock()
        # When the stage last had work it could not finish; None while it keeps up.
        self.busy_since: float | None = None
        self.readiness = readiness or Readiness(options.name)
        progress = Progress(options.stall_timeout_seconds)
        self.readiness.add_check("progress", lambda: progress.check(self.busy_since))

    def rebalance_listener(self) -> ConsumerRebalanceListener:
        return _FlushOnRevoke(self)

    # --- the loop ------------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event, *, drain: bool = False) -> None:
        """Until ``stop`` is set; then write what is buffered (retrying until the stop
        timeout) and, with ``drain``, keep consuming until a poll comes back empty.

        Raises FatalStageError (nothing of the failing batch committed) and, with ``drain``,
        DrainIncomplete when records were left unwritten.
        """
        while not stop.is_set():
            received = await self._poll(self._poll_timeout_ms(), stop)
            # An empty poll means the input is idle: waiting out batch_max_seconds would only
            # delay what is buffered (issue 16), so it is written now.
            if self._buffer and (received == 0 or self._due()):
                await self._flush(stop=stop)

        deadline = time.monotonic() + self._options.stop_timeout_seconds
        drained = not drain
        while not self._buffer or await self._flush(deadline=deadline):
            if drained or time.monotonic() >= deadline:
                break
            drained = await self._poll(_DRAIN_POLL_MS, None) == 0

        if self._buffer or not drained:
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

    async def _poll(self, timeout_ms: int, stop: asyncio.Event | None) -> int:
        max_records = max(1, self._options.batch_max_records - len(self._buffer))
        try:
            polled = await self._consumer.getmany(timeout_ms=timeout_ms, max_records=max_records)
        except OffsetOutOfRangeError as exc:
            self._forget_written()
            await self._reset_out_of_range(exc)
            return 0
        except NoOffsetForPartitionError as exc:
            # A new group (or a partition never committed): start at the beginning. Also what
            # a broker that restarted empty looks like: its acknowledgements are void.
            partitions = [p for p in exc.args if isinstance(p, TopicPartition)]
            self._forget_written()
            await self._consumer.seek_to_beginning(*partitions)
            return 0
        except Exception as exc:  # noqa: BLE001 - classified below
            if classify(exc) is not ErrorClass.RETRIABLE:
                self._fail(exc, "polling failed")
            metrics.ERRORS.labels(self._stage, ErrorClass.RETRIABLE).inc()
            log.warning("poll failed; retrying", stage=self._stage, error=describe(exc))
            if stop is not None:
                await sleep_unless_stopped(stop, self._options.retry_backoff_initial_seconds)
            return 0
        received = 0
        for partition, records in polled.items():
            if not records:
                continue
            if not self._buffer:
                self._buffer_started = time.monotonic()
            self._buffer.extend(_message(record) for record in records)
            self._positions[partition] = records[-1].offset + 1
            received += len(records)
        if received:
            metrics.RECORDS_CONSUMED.labels(self._stage).inc(received)
        self._update_lag()
        return received

    async def _reset_out_of_range(self, exc: OffsetOutOfRangeError) -> None:
        # The committed offset is past the end of the log (the broker lost or deleted data):
        # start again at the earliest offset, never skip ahead. Duplicates are absorbed by
        # ClickHouse; skipped events would be lost.
        offsets = exc.args[0] if exc.args and isinstance(exc.args[0], dict) else {}
        partitions = [p for p in offsets if isinstance(p, TopicPartition)]
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

    def _forget_written(self) -> None:
        # A filter that kept trusting the lost writes would drop the redelivered copies of
        # acknowledged events as duplicates: acknowledged, never stored.
        if self._filter is not None:
            self._filter.forget()

    def _update_lag(self) -> None:
        for partition, position in self._positions.items():
            highwater = self._consumer.highwater(partition)
            if highwater is not None:
                metrics.CONSUMER_LAG.labels(self._stage, str(partition.partition)).set(
                    max(highwater - position, 0)
                )

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
            if not self._buffer:
                return 0
            prepared = self._prepared
            if prepared is None:
                prepared = self._prepared = self._prepare(self._buffer)
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
            await self._commit(prepared.offsets)
            committed = len(self._buffer)
            self._clear_buffer()
            return committed

    def _prepare(self, records: Sequence[Message]) -> _Prepared[T]:
        outputs: list[T] = []
        dead_letters: list[DeadLetter] = []
        offsets: dict[TopicPartition, OffsetAndMetadata] = {}
        ranges: dict[tuple[str, int], tuple[int, int]] = {}
        for record in records:
            try:
                transformed = self._transform(record)
            except Exception as exc:  # noqa: BLE001 - classified below
                if step_error_class(exc) is ErrorClass.FATAL:
                    self._fail(exc, f"processing {record.topic}/{record.partition}/{record.offset}")
                transformed = Transformed(rejections=[_rejection_for(exc)])
            outputs.extend(transformed.outputs)
            for rejection in transformed.rejections:
                dead_letters.append(
                    build_dead_letter(
                        record,
                        rejection,
                        stage=self._stage,
                        max_payload_bytes=self._options.max_dead_letter_payload_bytes,
                    )
                )
            key = (record.topic, record.partition)
            first = ranges.get(key, (record.offset, record.offset))[0]
            ranges[key] = (first, record.offset)
            offsets[TopicPartition(record.topic, record.partition)] = OffsetAndMetadata(
                record.offset + 1, ""
            )
        before = len(outputs)
        if self._filter is not None:
            outputs = self._filter.select(outputs)
            dropped = before - len(outputs)
            if dropped:
                metrics.DUPLICATES_DROPPED.labels(self._stage).inc(dropped)
        if dead_letters:
            metrics.ERRORS.labels(self._stage, ErrorClass.POISON).inc(len(dead_letters))
            reasons = Counter(letter.reason for letter in dead_letters)
            log.info("dead-lettering records", stage=self._stage, reasons=dict(reasons))
        # Raises DeadLetterLimitExceeded before anything of this batch is written.
        self._budget.admit(before + len(dead_letters), len(dead_letters))
        return _Prepared(outputs, dead_letters, offsets, BatchInfo(ranges))

    async def _commit(self, offsets: dict[TopicPartition, OffsetAndMetadata]) -> None:
        try:
            await self._consumer.commit(offsets)
        except CommitFailedError as exc:
            # The group rebalanced while we wrote: the new owner re-reads these records, and
            # the duplicates are absorbed downstream.
            log.warning("commit failed after a rebalance", stage=self._stage, error=describe(exc))
            return
        metrics.LAST_COMMIT.labels(self._stage).set(time.time())

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

    async def discard_revoked(self, revoked: set[TopicPartition]) -> None:
        async with self._lock:
            self._buffer = [
                record
                for record in self._buffer
                if TopicPartition(record.topic, record.partition) not in revoked
            ]
            # Steps are re-run for what stays; nothing of it was committed.
            self._prepared = None
            for partition in revoked:
                self._positions.pop(partition, None)


def _rejection_for(exc: Exception) -> Rejection:
    if isinstance(exc, InvalidMessage):
        return Rejection(exc.reason, exc.detail)
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


class _FlushOnRevoke(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, loop: StageLoop[Any]) -> None:
        self._loop = loop

    async def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        try:
            await self._loop.flush_and_commit()
        except Exception as exc:  # noqa: BLE001 - the new owner re-reads what we could not write
            log.warning(
                "flush before revoke failed; records will be redelivered", error=describe(exc)
            )
            await self._loop.discard_revoked(set(revoked))

    async def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        return None


@dataclass(frozen=True)
class ConsumerStage(Generic[T]):
    """A consuming stage, declared: what it reads, its pure steps, and where it writes.

    ``writer`` is built with the stage's Kafka producer (which the runtime starts, shares with
    the dead-letter writer, and stops); ``filter_step`` is stateful, so a stage builds a fresh
    declaration per run. ``writes_dead_letters`` False is for a stage that reads the
    dead-letter topic: a dead letter of its own would come back to it, so a rejection stops
    it (fatal, nothing of the batch committed) instead. ``ready_without_partitions`` is for a
    stage that runs next to another in every replica of a process and whose topic may have
    fewer partitions than there are replicas: owning none is then normal, not unreadiness.
    """

    name: str
    topic: str
    group_id: str
    options: StageOptions
    transform: Transform[T]
    writer: Callable[[Any], Writer[T]]
    filter_step: Filter[T] | None = None
    writes_dead_letters: bool = True
    ready_without_partitions: bool = False
