"""The sink's record handling through the stage loop (fakes at the edges): whatever a record on
the events topic is, it ends as a row or a dead letter and the sink goes on. The issue's case:
``b"\\x00garbage"`` read as Confluent framing with an unknown schema id stopped the sink (exit 3,
restart loop) with no schema registry configured. With a registry, an id it does not know is
poison, and the registry being unreachable holds the batch and retries."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import pytest

from schemas.email_event import CONFLUENT_MAGIC, SINGLE_OBJECT_MAGIC, EmailEventCodec
from sgpipe.runtime.schema_registry import SchemaRegistryError
from sgpipe.runtime.settings import Settings
from sgpipe.runtime.stage import StageLoop
from sinks.stage import sink_stage
from tests.unit.test_stage_loop import (
    FakeConsumer,
    FakeRecord,
    RecordingDeadLetters,
    RecordingWriter,
    options,
    run_until,
)

CODEC = EmailEventCodec()
EVENT = {"sg_event_id": "e-1", "event": "open", "event_time": 1_700_000_000_000}
REPOSITORY = Path(__file__).resolve().parents[2]
FOUNDATION = REPOSITORY / "tests/fixtures/avro/v1_records_from_foundation.json"


class FakeRegistry:
    """Answers schema ids like a registry: known ones, 404 for the rest; ``down`` first."""

    def __init__(self, known: dict[int, str], down: int = 0) -> None:
        self.known = known
        self.down = down
        self.asked: list[int] = []

    async def schema(self, schema_id: int) -> str:
        self.asked.append(schema_id)
        if self.down:
            self.down -= 1
            raise SchemaRegistryError("schema registry GET /schemas/ids: connection refused")
        if schema_id not in self.known:
            raise SchemaRegistryError("404 Schema not found", status=404, code=40403)
        return self.known[schema_id]


async def run_sink_steps(
    values: list[bytes | None], registry: FakeRegistry | None = None
) -> tuple[RecordingWriter, RecordingDeadLetters, FakeConsumer]:
    stage = sink_stage(Settings(), registry=registry)
    consumer = FakeConsumer([FakeRecord(offset) for offset in range(len(values))])
    for record, value in zip(consumer.log, values, strict=True):
        record.value = value  # type: ignore[assignment]  # None: a record with a null value
    writer = RecordingWriter()
    letters = RecordingDeadLetters()
    loop: StageLoop[Any] = StageLoop(
        options(name="sink"),
        consumer,
        stage.transform,
        writer,
        letters,
        before_steps=stage.before_steps,
    )
    await run_until(loop, lambda: consumer.committed == len(values))
    assert consumer.committed == len(values)
    return writer, letters, consumer


def reasons(letters: RecordingDeadLetters) -> list[tuple[int, str]]:
    return [(letter.original_offset, letter.reason) for letter in letters.written]


async def test_garbage_with_a_leading_zero_byte_is_dead_lettered_without_a_registry() -> None:
    # Mutation caught: the unknown-schema-id case fatal again (the sink's transform raising
    # FatalStageError, or step_error_class classing UnknownWriterSchema as fatal).
    writer, letters, _ = await run_sink_steps([b"\x00garbage", CODEC.encode(EVENT)])
    assert reasons(letters) == [(0, "unknown_schema")]
    assert "no schema registry is configured" in letters.written[0].detail
    assert letters.written[0].payload == b"\x00garbage"
    assert [row["sg_event_id"] for batch in writer.written for row in batch] == ["e-1"]


@pytest.mark.parametrize(
    "value",
    [
        SINGLE_OBJECT_MAGIC + b"\x01" * 8 + b"\x08main",  # a fingerprint of no release
        CONFLUENT_MAGIC + (7).to_bytes(4, "big") + b"\x08main",  # an id, no registry
        b"",
        None,
        b"\xc3\x01",
        CODEC.encode(EVENT)[:-3],  # damaged Avro
    ],
    ids=["unknown-fingerprint", "confluent-id", "empty", "null", "half-magic", "truncated"],
)
async def test_every_undecodable_event_record_is_a_dead_letter(value: bytes | None) -> None:
    writer, letters, _ = await run_sink_steps([value, CODEC.encode(EVENT)])
    ((offset, reason),) = reasons(letters)
    assert offset == 0 and reason in ("unknown_schema", "undecodable_event")
    assert len(writer.written[0]) == 1


@pytest.mark.parametrize(
    ("field", "value", "problem"),
    [
        ("attempt", 2**32, "attempt is 4294967296, outside 0..4294967295"),
        ("asm_group_id", -1, "asm_group_id is -1, outside 0.."),
        ("tls", 7, "tls is 7, outside 0..1"),
        ("pool", {"name": "p", "id": -5}, "pool.id is -5, outside 0.."),
    ],
)
async def test_a_value_its_column_cannot_hold_is_dead_lettered_not_a_failed_insert(
    field: str, value: Any, problem: str
) -> None:
    # Avro's long holds these; the ClickHouse driver refuses the whole batch's insert
    # (DataError: fatal) for one of them. Only a producer other than the processor writes them.
    bad = CODEC.encode({**EVENT, "sg_event_id": "bad", field: value})
    writer, letters, _ = await run_sink_steps([bad, CODEC.encode(EVENT)])
    assert reasons(letters) == [(0, "unwritable_event")]
    assert letters.written[0].detail.startswith(problem)
    assert [row["sg_event_id"] for row in writer.written[0]] == ["e-1"]


def foundation_v1_payload() -> bytes:
    record = json.loads(FOUNDATION.read_text())["records"][0]["value"]
    return base64.b64decode(record)[10:]  # the Avro body, without single-object framing


async def test_with_a_registry_an_id_it_does_not_know_is_poison_and_a_known_one_lands() -> None:
    v1_text = json.dumps(json.loads((REPOSITORY / "schemas/avro/email_event.v1.avsc").read_text()))
    registry = FakeRegistry({41: v1_text})
    known = CONFLUENT_MAGIC + (41).to_bytes(4, "big") + foundation_v1_payload()
    unknown = CONFLUENT_MAGIC + (99).to_bytes(4, "big") + b"garbage"
    writer, letters, _ = await run_sink_steps([unknown, known, unknown], registry)
    assert reasons(letters) == [(0, "unknown_schema"), (2, "unknown_schema")]
    assert "the schema registry does not know this id" in letters.written[0].detail
    assert len(writer.written[0]) == 1
    # Each id is asked for once.
    assert sorted(registry.asked) == [41, 99]


async def test_with_a_registry_that_is_unreachable_the_batch_is_held_and_retried() -> None:
    registry = FakeRegistry({}, down=2)
    unknown = CONFLUENT_MAGIC + (99).to_bytes(4, "big") + b"garbage"
    writer, letters, consumer = await run_sink_steps([unknown, CODEC.encode(EVENT)], registry)
    # Two refused lookups (retried with backoff, nothing committed), then the answer: poison.
    assert registry.asked == [99, 99, 99]
    assert consumer.commits == [2]
    assert reasons(letters) == [(0, "unknown_schema")]
    assert len(writer.written) == 1
