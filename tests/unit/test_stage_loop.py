"""The stage loop's contract, with fakes only at the edges (consumer, writer, dead-letter
writer): commit after the write, remember after the ack, dead letters before the commit,
poison isolated, fatal errors stop without committing, the dead-letter limit, draining.

Each ordering test names the mutation of ``sgpipe/runtime/stage.py`` it catches."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiokafka.errors import (
    KafkaConnectionError,
    NoOffsetForPartitionError,
    OffsetOutOfRangeError,
    TopicAuthorizationFailedError,
)
from aiokafka.structs import OffsetAndMetadata, TopicPartition

from processors.dedup import DuplicateEventFilter
from processors.pipeline import EncodedEvent
from schemas.dead_letter import DeadLetter
from schemas.email_event import UnknownWriterSchema
from sgpipe.runtime import metrics
from sgpipe.runtime.dead_letters import Rejection
from sgpipe.runtime.errors import FatalStageError, InvalidMessage
from sgpipe.runtime.health import Readiness
from sgpipe.runtime.kafka import CommittedTopicMissing
from sgpipe.runtime.messages import Message
from sgpipe.runtime.runner import RefusedDeadLetters
from sgpipe.runtime.settings import DeadLetterLimit
from sgpipe.runtime.stage import (
    BatchInfo,
    DrainIncomplete,
    Filter,
    StageLoop,
    StageOptions,
    Transformed,
)
from sgpipe.runtime.unreadable import Unreadable

TOPIC = "raw"
PARTITION = TopicPartition(TOPIC, 0)


@dataclass
class FakeRecord:
    """Shaped like aiokafka's ConsumerRecord."""

    offset: int
    value: bytes = b""
    topic: str = TOPIC
    partition: int = 0
    timestamp: int = 0
    key: bytes | None = None
    headers: tuple[tuple[str, bytes], ...] = ()


@dataclass
class FakeConsumer:
    """A one-partition log with a read position and committed offsets, like Kafka's."""

    log: list[FakeRecord] = field(default_factory=list)
    position: int = 0
    committed: int = 0
    commits: list[int] = field(default_factory=list)
    poll_errors: list[BaseException] = field(default_factory=list)
    seeks: int = 0
    paused: set[TopicPartition] = field(default_factory=set)

    async def getmany(
        self, *partitions: TopicPartition, timeout_ms: int = 0, max_records: int | None = None
    ) -> dict[TopicPartition, list[FakeRecord]]:
        if self.poll_errors:
            raise self.poll_errors.pop(0)
        pending = self.log[self.position :]
        if not pending or PARTITION in self.paused:
            await asyncio.sleep(min(timeout_ms, 20) / 1000)
            return {}
        taken = pending[: max_records or len(pending)]
        self.position += len(taken)
        return {PARTITION: taken}

    async def commit(self, offsets: dict[TopicPartition, OffsetAndMetadata]) -> None:
        self.committed = offsets[PARTITION].offset
        self.commits.append(self.committed)

    def assignment(self) -> set[TopicPartition]:
        return {PARTITION}

    def highwater(self, partition: TopicPartition) -> int | None:
        return len(self.log)

    async def seek_to_beginning(self, *partitions: TopicPartition) -> bool:
        self.seeks += 1
        self.position = 0
        return True

    def pause(self, *partitions: TopicPartition) -> None:
        self.paused.update(partitions)

    def seek(self, partition: TopicPartition, offset: int) -> None:
        self.position = offset

    def redeliver(self) -> None:
        """What a new owner of the partition does: read on from the committed offset."""
        self.position = self.committed


@dataclass
class RecordingWriter:
    """Raises the queued errors on successive calls, then records what it wrote.
    ``observe`` runs at the start of every call, to check the state at write time."""

    errors: list[BaseException] = field(default_factory=list)
    written: list[list[Any]] = field(default_factory=list)
    calls: int = 0
    observe: Callable[[Sequence[Any]], None] | None = None
    output: str = "test-output"
    destination: str = "the test destination"

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        return None

    async def probe(self) -> None:
        return None

    async def write(self, outputs: Sequence[Any], batch: BatchInfo) -> None:
        self.calls += 1
        if self.observe is not None:
            self.observe(outputs)
        if self.errors:
            raise self.errors.pop(0)
        self.written.append(list(outputs))


@dataclass
class RecordingDeadLetters:
    errors: list[BaseException] = field(default_factory=list)
    written: list[DeadLetter] = field(default_factory=list)
    observe: Callable[[], None] | None = None

    async def write(self, letters: Sequence[DeadLetter]) -> None:
        if self.observe is not None:
            self.observe()
        if self.errors:
            raise self.errors.pop(0)
        self.written.extend(letters)


def options(**overrides: Any) -> StageOptions:
    values: dict[str, Any] = {
        "name": "test",
        "batch_max_records": 100,
        "batch_max_seconds": 0.0,
        "retry_backoff_initial_seconds": 0.01,
        "retry_backoff_max_seconds": 0.02,
        "stall_timeout_seconds": 60.0,
        "stop_timeout_seconds": 2.0,
        "dead_letters": DeadLetterLimit(max_ratio=1.0, max_count=0),
        "max_dead_letter_payload_bytes": 1_000_000,
    }
    values.update(overrides)
    return StageOptions(**values)


def echo_or_zero(message: Message) -> Transformed[bytes]:
    """``echo``, with b"0" poison."""
    if message.value == b"0":
        raise InvalidMessage("zero", "the value is zero")
    return Transformed([message.value or b""])


async def wait_for_condition(condition: Callable[[], bool], what: str, limit: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + limit
    while not condition():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out after {limit} s waiting for {what}")
        await asyncio.sleep(0.01)


def echo(message: Message) -> Transformed[bytes]:
    """A transform: the value is the output; b"bad" is poison."""
    if message.value == b"bad":
        raise InvalidMessage("bad_value", "the value is bad")
    return Transformed([message.value or b""])


def records(*values: bytes) -> list[FakeRecord]:
    return [FakeRecord(offset, value) for offset, value in enumerate(values)]


async def run_until(
    loop: StageLoop[Any], done: Callable[[], bool], *, drain: bool = False, limit: float = 5.0
) -> None:
    stop = asyncio.Event()
    task = asyncio.create_task(loop.run(stop, drain=drain))
    waited = 0.0
    while not done() and not task.done() and waited < limit:
        await asyncio.sleep(0.01)
        waited += 0.01
    stop.set()
    await asyncio.wait_for(task, timeout=10)


def sample(name: str, **labels: str) -> float:
    value = metrics.REGISTRY.get_sample_value(name, labels)
    return value or 0.0


# --- commit after the write --------------------------------------------------------------------


async def test_commit_happens_only_after_the_write_succeeded() -> None:
    # Mutation caught: committing before `writer.write` in flush_and_commit (the commit is
    # then seen by the first, failing write).
    consumer = FakeConsumer(records(b"a", b"b", b"c"))
    commits_seen_by_writer: list[list[int]] = []
    writer = RecordingWriter(
        errors=[ConnectionError("down"), ConnectionError("down")],
        observe=lambda _: commits_seen_by_writer.append(list(consumer.commits)),
    )
    loop = StageLoop(options(), consumer, echo, writer, RecordingDeadLetters())

    await run_until(loop, lambda: bool(consumer.commits))

    assert writer.calls == 3
    assert commits_seen_by_writer == [[], [], []]
    assert writer.written == [[b"a", b"b", b"c"]]
    assert consumer.commits == [3]


async def test_a_batch_whose_write_never_succeeds_is_never_committed() -> None:
    consumer = FakeConsumer(records(b"a", b"b"))
    writer = RecordingWriter(errors=[ConnectionError("down")] * 1000)
    loop = StageLoop(
        options(stop_timeout_seconds=0.1), consumer, echo, writer, RecordingDeadLetters()
    )

    await run_until(loop, lambda: writer.calls >= 3)

    assert writer.written == []
    assert consumer.commits == []


# --- remember after the ack ----------------------------------------------------------------


def encoded(message: Message) -> Transformed[EncodedEvent]:
    sg_event_id = (message.value or b"").decode()
    return Transformed([EncodedEvent(sg_event_id, "delivered", b"avro", sg_event_id.encode())])


async def test_the_filter_learns_ids_only_after_the_write_was_acknowledged() -> None:
    # Mutation caught: calling `filter.written` before `writer.write` (the failing first
    # write then sees its own ids already remembered).
    dedup = DuplicateEventFilter(capacity=100)
    known_at_write: list[list[bool]] = []
    consumer = FakeConsumer(records(b"ev-1", b"ev-2"))
    writer = RecordingWriter(
        errors=[ConnectionError("down")],
        observe=lambda outputs: known_at_write.append(
            [e.sg_event_id in dedup.recent for e in outputs]
        ),
    )
    loop = StageLoop(
        options(), consumer, encoded, writer, RecordingDeadLetters(), filter_step=dedup
    )

    await run_until(loop, lambda: bool(consumer.commits))

    assert known_at_write == [[False, False], [False, False]]
    assert "ev-1" in dedup.recent and "ev-2" in dedup.recent


async def test_events_whose_write_failed_before_a_rebalance_are_written_when_redelivered() -> None:
    # The consequence of remembering too early: a batch that could not be written before its
    # partition was revoked comes back (here, to the same consumer) and must not be taken
    # for duplicates. Mutation caught: `filter.written` before `writer.write`.
    dedup = DuplicateEventFilter(capacity=100)
    consumer = FakeConsumer(records(b"ev-1", b"ev-2"))
    writer = RecordingWriter(errors=[ConnectionError("down during the rebalance")])
    loop: StageLoop[EncodedEvent] = StageLoop(
        options(), consumer, encoded, writer, RecordingDeadLetters(), filter_step=dedup
    )
    await loop._poll(0, None)
    await loop.rebalance_listener().on_partitions_revoked([PARTITION])
    assert consumer.commits == []
    consumer.redeliver()
    await loop.rebalance_listener().on_partitions_assigned([PARTITION])

    await run_until(loop, lambda: bool(consumer.commits))

    assert [[e.sg_event_id for e in batch] for batch in writer.written] == [["ev-1", "ev-2"]]
    assert consumer.commits == [2]


async def test_duplicates_within_and_across_batches_are_dropped_and_counted() -> None:
    before = sample("sgpipe_duplicates_dropped_total", stage="dedup-test")
    dedup = DuplicateEventFilter(capacity=100)
    consumer = FakeConsumer(records(b"ev-1", b"ev-1", b"ev-2"))
    writer = RecordingWriter()
    loop = StageLoop(
        options(name="dedup-test", batch_max_records=2),
        consumer,
        encoded,
        writer,
        RecordingDeadLetters(),
        filter_step=dedup,
    )
    await run_until(loop, lambda: consumer.committed == 3)
    consumer.log.append(FakeRecord(3, b"ev-2"))
    await run_until(loop, lambda: consumer.committed == 4)

    assert [[e.sg_event_id for e in batch] for batch in writer.written] == [["ev-1"], ["ev-2"]]
    assert sample("sgpipe_duplicates_dropped_total", stage="dedup-test") - before == 2


# --- dead letters --------------------------------------------------------------------------


async def test_a_poison_record_is_dead_lettered_and_the_next_valid_one_lands() -> None:
    consumer = FakeConsumer(records(b"a", b"bad", b"c"))
    writer = RecordingWriter()
    letters = RecordingDeadLetters()
    loop = StageLoop(options(), consumer, echo, writer, letters)

    await run_until(loop, lambda: bool(consumer.commits))

    assert writer.written == [[b"a", b"c"]]
    assert [(d.reason, d.detail, d.payload, d.original_offset) for d in letters.written] == [
        ("bad_value", "the value is bad", b"bad", 1)
    ]
    assert letters.written[0].stage == "test"
    assert letters.written[0].original_topic == TOPIC
    assert consumer.commits == [3]


async def test_an_unexpected_exception_in_a_pure_step_dead_letters_only_that_record() -> None:
    def fragile(message: Message) -> Transformed[bytes]:
        if message.value == b"boom":
            raise KeyError("a bug this record triggers")
        return Transformed([message.value or b""])

    consumer = FakeConsumer(records(b"a", b"boom", b"c"))
    writer = RecordingWriter()
    letters = RecordingDeadLetters()
    await run_until(
        StageLoop(options(), consumer, fragile, writer, letters), lambda: bool(consumer.commits)
    )

    assert writer.written == [[b"a", b"c"]]
    assert [(d.reason, d.original_offset) for d in letters.written] == [("processing_error", 1)]
    assert "KeyError" in letters.written[0].detail


async def test_rejections_carry_the_element_bytes_and_index() -> None:
    def split(message: Message) -> Transformed[bytes]:
        return Transformed(
            [b"ok"], [Rejection("not_an_object", "element 1 is a string", b'"x"', 1)]
        )

    consumer = FakeConsumer(
        [FakeRecord(0, b'[{"a":1},"x"]', headers=(("sgpipe-webhook", b"main"),))]
    )
    letters = RecordingDeadLetters()
    await run_until(
        StageLoop(options(), consumer, split, RecordingWriter(), letters),
        lambda: bool(consumer.commits),
    )

    (letter,) = letters.written
    assert (letter.reason, letter.payload, letter.event_index) == ("not_an_object", b'"x"', 1)
    assert tuple(letter.context_headers) == (("sgpipe-webhook", b"main"),)


async def test_dead_letters_are_written_before_the_commit() -> None:
    # Mutations caught: not writing the dead letters at all, or committing before they are
    # acknowledged (the failing dead-letter write then sees a commit).
    consumer = FakeConsumer(records(b"a", b"bad"))
    commits_seen: list[list[int]] = []
    letters = RecordingDeadLetters(
        errors=[KafkaConnectionError("dead-letter topic unavailable")],
        observe=lambda: commits_seen.append(list(consumer.commits)),
    )
    writer = RecordingWriter()
    await run_until(
        StageLoop(options(), consumer, echo, writer, letters), lambda: bool(consumer.commits)
    )

    assert commits_seen == [[], []]
    assert [d.payload for d in letters.written] == [b"bad"]
    # The outputs were written once: a retry of the dead letters does not rewrite them.
    assert writer.written == [[b"a"]]
    assert consumer.commits == [2]


async def test_too_big_a_payload_is_left_out_of_the_dead_letter_with_its_origin() -> None:
    consumer = FakeConsumer(records(b"bad"))
    letters = RecordingDeadLetters()
    await run_until(
        StageLoop(
            options(max_dead_letter_payload_bytes=2), consumer, echo, RecordingWriter(), letters
        ),
        lambda: bool(consumer.commits),
    )
    (letter,) = letters.written
    assert letter.payload == b""
    assert "payload of 3 bytes omitted: read it at raw/0/0" in letter.detail


# --- the dead-letter limit: counted per source record, pauses instead of stopping ------------


def explode(message: Message) -> Transformed[bytes]:
    """A transform that splits a record like the processor splits a raw batch: each comma-
    separated element is an output, or a rejection when it is "0" (``[0,0,...]``)."""
    result: Transformed[bytes] = Transformed()
    for index, element in enumerate((message.value or b"").split(b",")):
        if element == b"0":
            result.rejections.append(Rejection("not_an_object", "a zero", element, index))
        else:
            result.outputs.append(element)
    return result


async def test_a_batch_of_101_bad_elements_counts_once_and_is_dead_lettered() -> None:
    # The case: one raw batch of 101 zeros, the defaults (max_ratio 0.5 once
    # min_records source records were seen). Mutation caught: counting dead letters (elements)
    # instead of source records -- 101 of 101 is over the ratio, the stage pauses.
    zeros = b",".join([b"0"] * 101)
    consumer = FakeConsumer(records(zeros, b"a,b"))
    letters = RecordingDeadLetters()
    writer = RecordingWriter()
    loop = StageLoop(
        options(dead_letters=DeadLetterLimit(max_ratio=0.5, min_records=1)),
        consumer,
        explode,
        writer,
        letters,
        readiness=Readiness("test"),
    )
    await run_until(loop, lambda: consumer.committed == 2)
    assert loop.paused is None
    assert len(letters.written) == 101 and writer.written == [[b"a", b"b"]]
    assert consumer.commits == [2]


async def test_past_the_limit_the_stage_pauses_holds_the_batch_and_is_not_ready() -> None:
    consumer = FakeConsumer(records(b"a", b"0", b"0", b"0", b"b"))
    writer = RecordingWriter()
    letters = RecordingDeadLetters()
    readiness = Readiness("test")
    loop = StageLoop(
        options(dead_letters=DeadLetterLimit(max_ratio=0.5, min_records=4, window_records=10)),
        consumer,
        echo_or_zero,
        writer,
        letters,
        readiness=readiness,
    )
    stop = asyncio.Event()
    task = asyncio.create_task(loop.run(stop))
    await wait_for_condition(lambda: loop.paused is not None, "the stage to pause")
    # It keeps running (no FatalStageError), consumes nothing more, writes and commits nothing.
    await asyncio.sleep(0.1)
    assert not task.done()
    assert consumer.paused == {PARTITION}
    assert writer.written == [] and letters.written == [] and consumer.commits == []
    checks = readiness.evaluate()
    ok, detail = checks["dead_letter_limit"]
    assert not ok and not readiness.ready
    assert detail.startswith("test: 3 of the last 5 source records had dead letters, over ")
    assert "restart the stage" in detail
    assert sample("sgpipe_dead_letter_limit_tripped", stage="test") == 1
    # A stop while paused writes nothing of the held batch either, and returns normally.
    stop.set()
    await asyncio.wait_for(task, timeout=10)
    assert writer.written == [] and letters.written == [] and consumer.commits == []


async def test_a_paused_stage_draining_on_stop_reports_the_held_records() -> None:
    consumer = FakeConsumer(records(b"0", b"0"))
    loop = StageLoop(
        options(dead_letters=DeadLetterLimit(max_ratio=0.5, min_records=1, window_records=10)),
        consumer,
        echo_or_zero,
        RecordingWriter(),
        RecordingDeadLetters(),
    )
    with pytest.raises(DrainIncomplete, match="paused by the dead-letter limit with 2 records"):
        await run_until(loop, lambda: loop.paused is not None, drain=True)
    assert consumer.commits == []


async def test_a_restarted_stage_resumes_with_the_held_batch() -> None:
    # The documented way out: fix the cause, restart the stage. What was held was never
    # committed, so the restarted stage reads it again and writes it.
    consumer = FakeConsumer(records(b"a", b"0", b"0", b"0"))
    limit = DeadLetterLimit(max_ratio=0.5, min_records=4, window_records=10)
    paused = StageLoop(
        options(dead_letters=limit),
        consumer,
        echo_or_zero,
        RecordingWriter(),
        RecordingDeadLetters(),
    )
    await run_until(paused, lambda: paused.paused is not None)
    assert paused.paused is not None and consumer.commits == []

    # The fixed deploy: zeros are events now.
    consumer.redeliver()
    consumer.paused.clear()
    writer = RecordingWriter()
    letters = RecordingDeadLetters()
    fixed = StageLoop(options(dead_letters=limit), consumer, echo, writer, letters)
    await run_until(fixed, lambda: consumer.committed == 4)
    assert fixed.paused is None
    assert writer.written == [[b"a", b"0", b"0", b"0"]] and letters.written == []
    assert sample("sgpipe_dead_letter_limit_tripped", stage="test") == 0

    # Not fixed, but the operator switched the limit off: the held batch is dead-lettered.
    consumer.position = consumer.committed = 0
    letters = RecordingDeadLetters()
    relaxed = StageLoop(
        options(dead_letters=DeadLetterLimit(max_ratio=1.0)),
        consumer,
        echo_or_zero,
        RecordingWriter(),
        letters,
    )
    await run_until(relaxed, lambda: consumer.committed == 4)
    assert [letter.original_offset for letter in letters.written] == [1, 2, 3]


async def test_the_dead_letter_count_limit_pauses_the_stage() -> None:
    consumer = FakeConsumer(records(b"0", b"a", b"0", b"a", b"0"))
    loop = StageLoop(
        options(
            batch_max_records=2,
            dead_letters=DeadLetterLimit(max_ratio=1.0, max_count=2, min_records=1),
        ),
        consumer,
        echo_or_zero,
        RecordingWriter(),
        RecordingDeadLetters(),
    )
    await run_until(loop, lambda: loop.paused is not None)
    assert loop.paused == "test: 3 of the last 5 source records had dead letters, over " + (
        "dead_letters.max_count (2)"
    )
    # The first two batches (two records with dead letters in all) were committed; the
    # third was not.
    assert consumer.commits == [2, 4]


async def test_a_ratio_under_the_minimum_sample_does_not_pause_the_stage() -> None:
    consumer = FakeConsumer(records(b"0", b"0"))
    letters = RecordingDeadLetters()
    loop = StageLoop(
        options(dead_letters=DeadLetterLimit(max_ratio=0.5, min_records=3, window_records=10)),
        consumer,
        echo_or_zero,
        RecordingWriter(),
        letters,
    )
    await run_until(loop, lambda: bool(consumer.commits))
    assert len(letters.written) == 2 and consumer.commits == [2] and loop.paused is None


# --- fatal errors --------------------------------------------------------------------------


async def test_a_fatal_write_error_stops_the_stage_without_committing() -> None:
    consumer = FakeConsumer(records(b"a"))
    writer = RecordingWriter(errors=[TopicAuthorizationFailedError("events")])
    loop = StageLoop(options(), consumer, echo, writer, RecordingDeadLetters())

    with pytest.raises(FatalStageError, match="test: writing a batch failed: TopicAuthorization"):
        await run_until(loop, lambda: False, limit=2)
    assert writer.calls == 1
    assert consumer.commits == []


async def test_an_unknown_error_is_fatal_not_retried_forever() -> None:
    consumer = FakeConsumer(records(b"a"))
    writer = RecordingWriter(errors=[TypeError("a bug in the writer")])
    with pytest.raises(FatalStageError, match="TypeError: a bug in the writer"):
        await run_until(
            StageLoop(options(), consumer, echo, writer, RecordingDeadLetters()),
            lambda: False,
            limit=2,
        )
    assert writer.calls == 1 and consumer.commits == []


async def test_a_stage_that_must_not_dead_letter_stops_on_poison_without_committing() -> None:
    # The dead-letter sink reads the dead-letter topic: a dead letter of its own would come
    # back to it forever, so the runtime's writer for it refuses (writes_dead_letters=False).
    consumer = FakeConsumer(records(b"a", b"bad"))
    writer = RecordingWriter()
    loop = StageLoop(options(), consumer, echo, writer, RefusedDeadLetters("dead_letters"))

    with pytest.raises(FatalStageError, match=r"dead_letters: cannot process raw/0/1 \(bad_value"):
        await run_until(loop, lambda: False, limit=2)
    assert consumer.commits == []


# --- batching, stopping, draining ------------------------------------------------------------


async def test_records_are_written_in_batches_of_batch_max_records() -> None:
    consumer = FakeConsumer(records(b"0", b"1", b"2", b"3", b"4"))
    writer = RecordingWriter()
    await run_until(
        StageLoop(options(batch_max_records=2), consumer, echo, writer, RecordingDeadLetters()),
        lambda: consumer.committed == 5,
    )
    assert writer.written == [[b"0", b"1"], [b"2", b"3"], [b"4"]]
    assert consumer.commits == [2, 4, 5]


async def test_drain_consumes_everything_left_before_returning() -> None:
    consumer = FakeConsumer(records(b"0", b"1", b"2", b"3"))
    writer = RecordingWriter()
    stop = asyncio.Event()
    stop.set()
    loop = StageLoop(options(batch_max_records=3), consumer, echo, writer, RecordingDeadLetters())
    await loop.run(stop, drain=True)
    assert [value for batch in writer.written for value in batch] == [b"0", b"1", b"2", b"3"]
    assert consumer.commits[-1] == 4


async def test_drain_retries_a_failing_write_instead_of_dropping_it() -> None:
    consumer = FakeConsumer(records(b"0", b"1", b"2"))
    writer = RecordingWriter(errors=[ConnectionError("down")])
    stop = asyncio.Event()
    stop.set()
    loop = StageLoop(options(batch_max_records=2), consumer, echo, writer, RecordingDeadLetters())
    await loop.run(stop, drain=True)
    assert writer.written == [[b"0", b"1"], [b"2"]]
    assert consumer.commits == [2, 3]


async def test_drain_that_cannot_write_raises_and_commits_nothing() -> None:
    consumer = FakeConsumer(records(b"0", b"1", b"2"))
    writer = RecordingWriter(errors=[ConnectionError("down")] * 1000)
    stop = asyncio.Event()
    stop.set()
    loop = StageLoop(
        options(batch_max_records=2, stop_timeout_seconds=0.2),
        consumer,
        echo,
        writer,
        RecordingDeadLetters(),
    )
    with pytest.raises(DrainIncomplete, match="2 records not written"):
        await loop.run(stop, drain=True)
    assert consumer.commits == []
    assert consumer.position == 2  # it stopped polling once a batch could not be written


async def test_a_revocation_abandons_the_buffer_without_writing_or_committing_it() -> None:
    # The revoked records are left to the partition's next owner (tests/unit/
    # test_stage_rebalance.py has the rest of the rebalance contract).
    consumer = FakeConsumer(records(b"5", b"6"))
    writer = RecordingWriter()
    loop = StageLoop(options(), consumer, echo, writer, RecordingDeadLetters())
    await loop._poll(0, None)
    await loop.rebalance_listener().on_partitions_revoked([PARTITION])
    assert await loop.flush_and_commit() == 0
    assert writer.written == []
    assert consumer.commits == []


# --- the consumer's edge cases -----------------------------------------------------------


async def test_an_out_of_range_offset_resets_to_the_earliest_and_is_counted() -> None:
    before = sample("sgpipe_offset_resets_total", stage="reset-test")
    consumer = FakeConsumer(
        records(b"a", b"b"), poll_errors=[OffsetOutOfRangeError({PARTITION: 999})]
    )
    consumer.position = 2
    writer = RecordingWriter()
    await run_until(
        StageLoop(options(name="reset-test"), consumer, echo, writer, RecordingDeadLetters()),
        lambda: bool(consumer.commits),
    )
    assert consumer.seeks == 1
    assert writer.written == [[b"a", b"b"]]
    assert sample("sgpipe_offset_resets_total", stage="reset-test") - before == 1


@pytest.mark.parametrize(
    "loss",
    [
        pytest.param(lambda: OffsetOutOfRangeError({PARTITION: 3}), id="out_of_range"),
        pytest.param(lambda: NoOffsetForPartitionError(PARTITION), id="offsets_gone"),
    ],
)
async def test_a_broker_that_lost_data_voids_what_the_filter_remembers(
    loss: Callable[[], BaseException],
) -> None:
    # Found by tests/faults (memory broker restarted empty): the dedup window remembered
    # events the dead broker had acknowledged, then dropped their copies that SendGrid
    # re-sent -- acknowledged after the restart, never stored. Mutation caught: removing
    # `self._forget_written()` from either reset branch of StageLoop._poll.
    dedup = DuplicateEventFilter(capacity=100)
    consumer = FakeConsumer(records(b"ev-1", b"ev-2"))
    writer = RecordingWriter()
    loop = StageLoop(
        options(), consumer, encoded, writer, RecordingDeadLetters(), filter_step=dedup
    )
    await run_until(loop, lambda: bool(consumer.commits))
    assert "ev-1" in dedup.recent

    # The broker comes back empty; SendGrid re-sends ev-1, which lands at offset 0 again.
    consumer.log = records(b"ev-1")
    consumer.poll_errors = [loss()]
    await run_until(loop, lambda: len(consumer.commits) == 2)

    assert [[e.sg_event_id for e in batch] for batch in writer.written] == [
        ["ev-1", "ev-2"],
        ["ev-1"],
    ]


async def test_a_commit_into_a_topic_the_broker_does_not_list_starts_the_topic_over() -> None:
    # Found by tests/faults (memory broker restarted empty): the sink read a log tansu serves
    # but no longer lists, and aiokafka retried the commit's UnknownTopicOrPartition forever:
    # the sink stalled, ~3,000 acknowledged events never stored. Now the commit fails at once
    # (CommittedTopicMissing, from GroupMemberConsumer), nothing read from that log is
    # committed, the topic is re-created and read from its beginning. Mutations caught: the
    # error retried like any other (the stage stops: it is not retriable), the seek to the
    # beginning left out (the new log's first record is never read), the old offset committed.
    consumer = FakeConsumer(records(b"a", b"b", b"c"))
    refused: list[dict[TopicPartition, OffsetAndMetadata]] = []
    commit = consumer.commit

    async def commit_unless_unlisted(offsets: dict[TopicPartition, OffsetAndMetadata]) -> None:
        if consumer.log[0].value == b"a":  # still the unlisted log
            refused.append(offsets)
            raise CommittedTopicMissing("the broker does not list ['raw']")
        await commit(offsets)

    recreated: list[bool] = []

    async def recreate_topic() -> None:
        recreated.append(True)
        consumer.log = records(b"x")  # the topic as created again: a new, empty log, then x

    consumer.commit = commit_unless_unlisted  # type: ignore[method-assign]
    writer = RecordingWriter()
    loop = StageLoop(
        options(), consumer, echo, writer, RecordingDeadLetters(), on_missing_topic=recreate_topic
    )
    await run_until(loop, lambda: bool(consumer.commits))

    assert [list(offsets.values())[0].offset for offsets in refused] == [3]
    assert recreated == [True]
    assert consumer.seeks == 1
    assert writer.written == [[b"a", b"b", b"c"], [b"x"]]
    assert consumer.commits == [1]


async def test_a_retriable_poll_error_is_retried() -> None:
    consumer = FakeConsumer(records(b"a"), poll_errors=[KafkaConnectionError("broker gone")])
    writer = RecordingWriter()
    await run_until(
        StageLoop(options(), consumer, echo, writer, RecordingDeadLetters()),
        lambda: bool(consumer.commits),
    )
    assert writer.written == [[b"a"]]


async def test_a_fatal_poll_error_stops_the_stage() -> None:
    consumer = FakeConsumer(records(b"a"), poll_errors=[TopicAuthorizationFailedError("raw")])
    with pytest.raises(FatalStageError, match="polling failed"):
        await run_until(
            StageLoop(options(), consumer, echo, RecordingWriter(), RecordingDeadLetters()),
            lambda: False,
            limit=2,
        )


# --- readiness and metrics -------------------------------------------------------------------


async def test_a_stalled_write_makes_the_stage_not_ready() -> None:
    consumer = FakeConsumer(records(b"a"))
    writer = RecordingWriter(errors=[ConnectionError("down")] * 1000)
    loop = StageLoop(
        options(stall_timeout_seconds=0.05), consumer, echo, writer, RecordingDeadLetters()
    )
    assert loop.readiness.evaluate()["progress"][0] is True

    await run_until(loop, lambda: writer.calls >= 6)

    ok, detail = loop.readiness.evaluate()["progress"]
    assert ok is False and detail.startswith("no progress for")


async def test_counters_move_as_records_flow() -> None:
    stage = "metrics-test"

    def counts() -> tuple[float, ...]:
        return (
            sample("sgpipe_records_consumed_total", stage=stage),
            sample("sgpipe_records_produced_total", stage=stage, output="test-output"),
            sample("sgpipe_dead_letters_total", stage=stage, reason="bad_value"),
            sample("sgpipe_errors_total", stage=stage, error_class="retriable"),
            sample("sgpipe_retries_total", stage=stage),
            sample("sgpipe_flush_records_count", stage=stage),
        )

    before = counts()
    consumer = FakeConsumer(records(b"a", b"bad", b"c"))
    writer = RecordingWriter(errors=[ConnectionError("down")])
    await run_until(
        StageLoop(options(name=stage), consumer, echo, writer, RecordingDeadLetters()),
        lambda: bool(consumer.commits),
    )
    after = counts()

    assert [a - b for a, b in zip(after, before, strict=True)] == [3, 2, 1, 1, 1, 1]
    assert sample("sgpipe_last_commit_timestamp_seconds", stage=stage) > 0
    assert sample("sgpipe_consumer_lag", stage=stage, partition="0") == 0


def test_the_filter_protocol_is_satisfied_by_the_dedup_filter() -> None:
    step: Filter[EncodedEvent] = DuplicateEventFilter(capacity=1)
    assert step.select([]) == []


@dataclass
class HangingWriter(RecordingWriter):
    """A write that never returns, like a produce to a broker that died mid-request."""

    async def write(self, outputs: Sequence[Any], batch: BatchInfo) -> None:
        self.calls += 1
        await asyncio.Event().wait()


async def test_a_stop_meets_its_deadline_even_when_a_write_hangs() -> None:
    consumer = FakeConsumer(records(b"a"))
    writer = HangingWriter()
    loop = StageLoop(
        options(stop_timeout_seconds=0.3), consumer, echo, writer, RecordingDeadLetters()
    )
    stop = asyncio.Event()
    task = asyncio.create_task(loop.run(stop))
    while writer.calls == 0:
        await asyncio.sleep(0.01)
    stop.set()

    # The writer never returns: without the deadline this would never finish.
    await asyncio.wait_for(task, timeout=10)

    # Abandoned at the stop request, tried once more within the stop timeout, then given up.
    assert writer.calls == 2
    assert consumer.commits == []


async def test_a_record_naming_an_unknown_writer_schema_is_dead_lettered_not_fatal() -> None:
    # Record content is never fatal: anyone who can produce to the topic can write bytes that
    # look framed with a schema nobody knows. Mutation caught: UnknownWriterSchema fatal again
    # in step_error_class.
    def decode(message: Message) -> Transformed[bytes]:
        if message.value == b"v9":
            raise UnknownWriterSchema("written by a newer sgpipe")
        return Transformed([message.value or b""])

    consumer = FakeConsumer(records(b"v2", b"v9", b"v2"))
    letters = RecordingDeadLetters()
    writer = RecordingWriter()
    await run_until(
        StageLoop(options(), consumer, decode, writer, letters), lambda: consumer.committed == 3
    )
    assert [(letter.reason, letter.original_offset) for letter in letters.written] == [
        ("unknown_schema", 1)
    ]
    assert writer.written == [[b"v2", b"v2"]]


# --- records the Kafka client cannot read ------------------------------------------------------


def unreadable_at(consumer: FakeConsumer, first: int, resume: int) -> Callable[[], Any]:
    """A ``find_unreadable`` over the fake log: the records from the position up to ``first``
    are readable, ``first``..``resume - 1`` are not."""

    async def find() -> Unreadable:
        readable = consumer.log[consumer.position : first]
        return Unreadable(PARTITION, first, resume, readable, "UnicodeDecodeError: 0xff")

    return find


@pytest.mark.parametrize("refused", [False, True], ids=["dead-lettered", "dead-letter-sink"])
async def test_a_record_the_client_cannot_read_is_stepped_over_not_fatal(refused: bool) -> None:
    consumer = FakeConsumer(records(b"a", b"b", b"?", b"?", b"c"))
    consumer.poll_errors = [UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte")]
    letters: Any = RefusedDeadLetters("test") if refused else RecordingDeadLetters()
    writer = RecordingWriter()
    loop = StageLoop(
        options(),
        consumer,
        echo,
        writer,
        letters,
        find_unreadable=unreadable_at(consumer, 2, 4),
    )
    await run_until(loop, lambda: consumer.committed == 5)
    assert [value for batch in writer.written for value in batch] == [b"a", b"b", b"c"]
    if not refused:
        (letter,) = letters.written
        assert (letter.reason, letter.original_offset, letter.payload) == (
            "unreadable_record",
            2,
            b"",
        )
        assert "offsets 2..3 were stepped over" in letter.detail
