"""Several stages in one process (`run_consumer_stages`, what `sgpipe sink` runs), against a
real broker (tansu); the writers are recording fakes at the edge. They stop in the order
declared, each after the one before has stopped; one stage's fatal error stops the others and
is raised."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest

from sgpipe.runtime.errors import FatalStageError
from sgpipe.runtime.kafka import ensure_topics
from sgpipe.runtime.messages import Message
from sgpipe.runtime.runner import run_consumer_stages
from sgpipe.runtime.settings import Settings
from sgpipe.runtime.stage import ConsumerStage, StageOptions, Transformed
from tests.integration.kafka_tools import kafka_test_settings

pytestmark = pytest.mark.kafka


@dataclass
class RecordingWriter:
    """Records when it stops; ``stop_delay`` makes its stop slow, ``start_error`` its start
    fail, once ``start_after`` is set (another stage's writer started)."""

    name: str
    events: list[str]
    stop_delay: float = 0.0
    start_error: BaseException | None = None
    start_after: asyncio.Event | None = None
    started: asyncio.Event = field(default_factory=asyncio.Event)
    output: str = "test"
    destination: str = "the test destination"
    written: list[Any] = field(default_factory=list)

    async def start(self) -> None:
        if self.start_after is not None:
            await self.start_after.wait()
        if self.start_error is not None:
            raise self.start_error
        self.started.set()

    async def stop(self) -> None:
        await asyncio.sleep(self.stop_delay)
        self.events.append(f"{self.name} stopped")

    async def probe(self) -> None:
        return None

    async def write(self, outputs: Sequence[Any], batch: object) -> None:
        self.written.extend(outputs)


def stage(settings: Settings, name: str, topic: str, writer: RecordingWriter) -> ConsumerStage[Any]:
    def transform(message: Message) -> Transformed[Any]:
        return Transformed([message.value])

    return ConsumerStage(
        name=name,
        topic=topic,
        group_id=f"{settings.sink.group_id}-{name}",
        options=StageOptions.from_settings(name, settings.sink, max_dead_letter_payload_bytes=1000),
        transform=transform,
        writer=lambda producer: writer,
    )


async def test_stages_stop_in_the_order_declared(
    kafka_bootstrap_servers: str, unique_name: str
) -> None:
    # Mutation caught: setting every stage's stop at once (the dead-letter sink could then stop
    # before the events sink wrote its last dead letters).
    settings = kafka_test_settings(kafka_bootstrap_servers, unique_name)
    topics = settings.kafka.topics
    await ensure_topics(settings.kafka)
    events: list[str] = []
    first = RecordingWriter("first", events, stop_delay=0.5)
    second = RecordingWriter("second", events)
    stop, ready = asyncio.Event(), asyncio.Event()
    task = asyncio.create_task(
        run_consumer_stages(
            [stage(settings, "first", topics.events, first),
             stage(settings, "second", topics.dead_letter, second)],
            settings, stop, health_host="127.0.0.1", health_port=None, ready=ready,
        )
    )  # fmt: skip
    await asyncio.wait_for(ready.wait(), 60)
    stop.set()
    await asyncio.wait_for(task, 60)
    assert events == ["first stopped", "second stopped"]


async def test_a_fatal_error_in_one_stage_stops_the_others_and_is_raised(
    kafka_bootstrap_servers: str, unique_name: str
) -> None:
    settings = kafka_test_settings(kafka_bootstrap_servers, unique_name)
    topics = settings.kafka.topics
    await ensure_topics(settings.kafka)
    events: list[str] = []
    healthy = RecordingWriter("healthy", events)
    # It fails once the healthy stage runs: failing first, it would stop the healthy one
    # before that had a writer to stop (its start is then abandoned, nothing to record).
    broken = RecordingWriter(
        "broken",
        events,
        start_error=FatalStageError("broken: bad table"),
        start_after=healthy.started,
    )
    stop = asyncio.Event()
    with pytest.raises(FatalStageError, match="broken: bad table"):
        await asyncio.wait_for(
            run_consumer_stages(
                [stage(settings, "healthy", topics.events, healthy),
                 stage(settings, "broken", topics.dead_letter, broken)],
                settings, stop, health_host="127.0.0.1", health_port=None,
            ),
            60,
        )  # fmt: skip
    assert not stop.is_set()
    assert "healthy stopped" in events
