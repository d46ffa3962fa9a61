"""Running a declared stage: clients, start-up, health, the loop, shutdown.

``run_consumer_stage`` is all a consuming stage's entrypoint calls. It starts -- retrying
while Kafka or the destination is unreachable, stopping at once on a fatal error -- the
shared producer, the stage's writer and a consumer of the stage's topic; serves
``/healthz``, ``/readyz`` and ``/metrics``; keeps readiness current from periodic probes of
the broker and the destination; runs the StageLoop until ``stop``; then stops everything in
reverse order.

Unreachable at start: the stage logs one warning per attempt (with capped backoff) and keeps
trying for as long as it runs, with ``/readyz`` answering 503. It does not exit: a restart
would not make Kafka reachable, and Kubernetes shows the not-ready pod; a fatal error (wrong
credentials, a schema mismatch) does exit, with code 3, because only a person can fix it.

``run_consumer_stages`` runs several declared stages in one process (``sgpipe sink``: the
events sink and the dead-letter sink) behind one health endpoint that covers them all.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Protocol, TypeVar

import structlog
from aiohttp import web

from schemas.dead_letter import DeadLetter
from sgpipe.runtime.errors import ErrorClass, FatalStageError, classify, describe
from sgpipe.runtime.health import Readiness, serve_health
from sgpipe.runtime.kafka import (
    DeadLetterTopicWriter,
    ReadBack,
    create_consumer,
    create_producer,
    create_reader,
    ensure_topics,
)
from sgpipe.runtime.retry import Backoff, sleep_unless_stopped
from sgpipe.runtime.settings import Settings
from sgpipe.runtime.stage import ConsumerStage, DeadLetterWriter, StageLoop, Writer
from sgpipe.runtime.unreadable import Unreadable, find_unreadable

log = structlog.get_logger(__name__)

T = TypeVar("T")

# How often readiness re-checks the broker and the destination; also each check's timeout.
PROBE_INTERVAL_SECONDS = 5.0
# How long closing one client may take: with the broker gone, aiokafka's stop() can otherwise
# wait out its request timeouts, and a stop must meet its deadline.
CLOSE_TIMEOUT_SECONDS = 10.0
# A stop during a start attempt: how long the attempt may still end by itself (_unless_stopped).
START_CANCEL_GRACE_SECONDS = 3.0


class _Startable(Protocol):
    async def start(self) -> None: ...

    async def stop(self) -> None: ...


_C = TypeVar("_C", bound=_Startable)


async def run_consumer_stage(
    stage: ConsumerStage[T],
    settings: Settings,
    stop: asyncio.Event,
    *,
    health_host: str,
    health_port: int | None,
    drain: bool = False,
    ready: asyncio.Event | None = None,
    readiness: Readiness | None = None,
) -> None:
    """Run ``stage`` until ``stop`` is set (see the module docstring).

    ``health_port`` None serves no health endpoint (the caller reports health itself, with
    ``readiness`` if it passes one); ``ready`` is set once consuming. Raises FatalStageError;
    with ``drain``, DrainIncomplete.
    """
    loop_readiness = readiness or Readiness(stage.name)
    loop_readiness.set("kafka", False, "starting")
    async with contextlib.AsyncExitStack() as stack:
        if health_port is not None:
            health = await serve_health(loop_readiness, health_host, health_port)
            stack.push_async_callback(health.cleanup)
            log.info("serving health endpoints", stage=stage.name, port=bound_port(health))
        kafka = settings.kafka
        backoff = Backoff(
            stage.options.retry_backoff_initial_seconds, stage.options.retry_backoff_max_seconds
        )
        if kafka.create_topics and not await retry_until_started(
            stage.name, "creating topics", lambda: ensure_topics(kafka), stop, backoff
        ):
            return

        producer = await start_client(
            stage.name, "the Kafka producer", lambda: create_producer(kafka), stop, backoff
        )
        if producer is None:
            return
        stack.push_async_callback(close_quietly, stage.name, "the Kafka producer", producer.stop)

        writer = stage.writer(producer)
        if not await retry_until_started(
            stage.name, f"connecting to {writer.destination}", writer.start, stop, backoff
        ):
            return
        stack.push_async_callback(close_quietly, stage.name, writer.destination, writer.stop)

        async def recreate_topics() -> None:
            created = await ensure_topics(kafka)
            if created:
                log.warning("re-created missing topics", stage=stage.name, topics=created)

        dead_letter_writer: DeadLetterWriter
        if stage.writes_dead_letters:
            topic_writer = DeadLetterTopicWriter(
                producer, kafka.topics.dead_letter, ReadBack(kafka)
            )
            stack.push_async_callback(
                close_quietly, stage.name, "the dead-letter writer", topic_writer.stop
            )
            dead_letter_writer = topic_writer
        else:
            dead_letter_writer = RefusedDeadLetters(stage.name)

        def new_consumer() -> Any:
            consumer = create_consumer(kafka, group_id=stage.group_id)

            async def locate_unreadable() -> Unreadable | None:
                positions = {tp: await consumer.position(tp) for tp in consumer.assignment()}
                reader = create_reader(kafka)
                await reader.start()
                try:
                    return await find_unreadable(reader, positions)
                finally:
                    await close_quietly(
                        stage.name, "the reader of an unreadable record", reader.stop
                    )

            loop = StageLoop(
                stage.options,
                consumer,
                stage.transform,
                writer,
                dead_letter_writer,
                filter_step=stage.filter_step,
                readiness=loop_readiness,
                on_missing_topic=recreate_topics if kafka.create_topics else None,
                before_steps=stage.before_steps,
                find_unreadable=locate_unreadable,
            )
            consumer.subscribe([stage.topic], listener=loop.rebalance_listener())
            loops.append(loop)
            return consumer

        loops: list[StageLoop[T]] = []
        consumer = await start_client(stage.name, "the Kafka consumer", new_consumer, stop, backoff)
        if consumer is None:
            return
        stack.push_async_callback(close_quietly, stage.name, "the Kafka consumer", consumer.stop)
        stage_loop = loops[-1]

        probes = asyncio.create_task(
            _probe_forever(
                stage.name,
                consumer,
                writer,
                loop_readiness,
                partitions_required=not stage.ready_without_partitions,
            ),
            name="readiness-probes",
        )
        stack.push_async_callback(cancel_task, probes)
        log.info("consuming", stage=stage.name, topic=stage.topic, group_id=stage.group_id)
        if ready is not None:
            ready.set()
        await stage_loop.run(stop, drain=drain)
    log.info("stopped", stage=stage.name)


async def run_consumer_stages(
    stages: Sequence[ConsumerStage[Any]],
    settings: Settings,
    stop: asyncio.Event,
    *,
    health_host: str,
    health_port: int | None,
    drain: bool = False,
    ready: asyncio.Event | None = None,
) -> None:
    """Run ``stages`` in one process until ``stop`` is set, behind one health endpoint whose
    ``/readyz`` is ready only when every stage is (checks named ``<stage>.<check>``).

    Each stage runs as ``run_consumer_stage`` does, with its own clients. On ``stop`` they
    stop in the order given, each once the one before it has stopped: a stage listed after
    another still reads what that one wrote while stopping (the dead-letter sink reads the
    events sink's last dead letters). When one stops on its own (a fatal error), the others
    are stopped too and its error is raised. ``ready`` is set once every stage consumes.
    """
    readiness = [Readiness(stage.name) for stage in stages]
    stops = [asyncio.Event() for _ in stages]
    started = [asyncio.Event() for _ in stages]
    async with contextlib.AsyncExitStack() as stack:
        if health_port is not None:
            health = await serve_health(readiness, health_host, health_port)
            stack.push_async_callback(health.cleanup)
            log.info(
                "serving health endpoints",
                stage=stages[0].name,
                stages=[stage.name for stage in stages],
                port=bound_port(health),
            )
        tasks = [
            asyncio.create_task(
                run_consumer_stage(
                    stage,
                    settings,
                    own_stop,
                    health_host=health_host,
                    health_port=None,
                    drain=drain,
                    ready=own_ready,
                    readiness=own_readiness,
                ),
                name=stage.name,
            )
            for stage, own_stop, own_ready, own_readiness in zip(
                stages, stops, started, readiness, strict=True
            )
        ]
        all_started = asyncio.create_task(_set_when_all(started, ready))
        stack.push_async_callback(cancel_task, all_started)
        try:
            stopped = asyncio.create_task(stop.wait())
            try:
                await asyncio.wait([stopped, *tasks], return_when=asyncio.FIRST_COMPLETED)
            finally:
                stopped.cancel()
            for task, own_stop in zip(tasks, stops, strict=True):
                own_stop.set()
                await asyncio.wait([task])
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
    for task in tasks:
        if not task.cancelled() and (error := task.exception()) is not None:
            raise error


async def _set_when_all(events: Sequence[asyncio.Event], ready: asyncio.Event | None) -> None:
    await asyncio.gather(*(event.wait() for event in events))
    if ready is not None:
        ready.set()


class RefusedDeadLetters:
    """The dead-letter writer of a stage that must not dead-letter (``writes_dead_letters``
    False: it reads the dead-letter topic, so its own dead letters would come back to it
    forever). A rejection stops the stage; nothing of the batch is committed."""

    def __init__(self, stage: str) -> None:
        self._stage = stage

    async def write(self, letters: Sequence[DeadLetter]) -> None:
        letter = letters[0]
        raise FatalStageError(
            f"{self._stage}: cannot process {letter.original_topic}/{letter.original_partition}/"
            f"{letter.original_offset} ({letter.reason}: {letter.detail}), and this stage "
            "reads the dead-letter topic, so it does not dead-letter; nothing was committed"
        )


async def retry_until_started(
    stage: str,
    what: str,
    attempt: Callable[[], Awaitable[Any]],
    stop: asyncio.Event,
    backoff: Backoff,
) -> bool:
    """Run ``attempt`` until it succeeds (True) or ``stop`` is set (False). Retriable
    failures are logged once per attempt and retried with backoff; others raise
    FatalStageError with one line saying what failed.

    A stop cancels the attempt in progress: a stage asked to stop while it starts (its
    migrations, a consumer's first join) stops at once instead of finishing its start first,
    which on a busy machine outlasted the stop deadline (issue 21). Every attempt is safe to
    cancel: a half-applied migration is applied again from its start, a client whose start
    was cancelled is closed."""
    while not stop.is_set():
        try:
            if not await _unless_stopped(attempt(), stop):
                return False
        except Exception as exc:  # noqa: BLE001 - classified below
            if isinstance(exc, FatalStageError):
                raise
            if classify(exc) is not ErrorClass.RETRIABLE:
                raise FatalStageError(f"{stage}: {what} failed: {describe(exc)}") from exc
            delay = backoff.next_delay()
            log.warning(
                f"{what} failed; retrying",
                stage=stage,
                retry_in_seconds=round(delay, 1),
                error=describe(exc),
            )
            await sleep_unless_stopped(stop, delay)
            continue
        backoff.reset()
        return True
    return False


async def _unless_stopped(work: Awaitable[Any], stop: asyncio.Event) -> bool:
    """Await ``work``; True once it is done, False (it cancelled) if ``stop`` is set first.

    A stop first gives ``work`` ``START_CANCEL_GRACE_SECONDS`` to end by itself: aiokafka
    leaks the connection of a client start cancelled while it bootstraps (the connection
    lives in a local variable its cleanup never sees; aio-libs/aiokafka#715), and the leaked
    connection's finalizer warns later, anywhere. A bootstrap takes milliseconds; a start that
    hangs longer (a group join on a broker that does not answer) is cancelled as before."""
    task = asyncio.ensure_future(work)
    stopped = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait([task, stopped], return_when=asyncio.FIRST_COMPLETED)
        if not task.done():
            await asyncio.wait([task], timeout=START_CANCEL_GRACE_SECONDS)
    finally:
        stopped.cancel()
        if not task.done():
            task.cancel()
            # Its cleanup runs now; what it raises on the way out is the cancellation's doing.
            await asyncio.gather(task, return_exceptions=True)
    if task.cancelled():
        return False
    task.result()  # the attempt's error, if it failed
    # Done within the grace of a stop: started, and the caller stops what it started.
    return True


async def start_client(
    stage: str,
    what: str,
    create: Callable[[], _C],
    stop: asyncio.Event,
    backoff: Backoff,
) -> _C | None:
    """A started client from ``create``, retrying like ``retry_until_started``; each attempt
    builds a fresh client (a client whose start failed is not reusable). None if stopped."""
    started: list[_C] = []

    async def attempt() -> None:
        client = create()
        try:
            await client.start()
        except BaseException:
            with contextlib.suppress(Exception):
                await client.stop()
            raise
        started.append(client)

    if not await retry_until_started(stage, f"starting {what}", attempt, stop, backoff):
        return None
    return started[-1]


async def close_quietly(
    stage: str,
    what: str,
    close: Callable[[], Awaitable[Any]],
    timeout: float = CLOSE_TIMEOUT_SECONDS,
) -> None:
    """Close a client on the way out, within ``timeout``, never raising: a failure to close
    must not hide why the stage stopped, nor keep it from stopping."""
    try:
        await asyncio.wait_for(close(), timeout)
    except asyncio.CancelledError:
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            raise
        # aiokafka's consumer.stop() re-raises the cancellation of its own fetch tasks when
        # the broker is gone; that is not a cancellation of ours.
        log.debug("closing a client leaked a cancellation", stage=stage, client=what)
    except Exception as exc:  # noqa: BLE001 - see the docstring
        log.warning(f"closing {what} failed", stage=stage, error=describe(exc))


async def _probe_forever(
    stage: str,
    consumer: Any,
    writer: Writer[Any],
    readiness: Readiness,
    *,
    partitions_required: bool = True,
) -> None:
    """Keep the readiness checks current: the broker answers metadata requests, partitions
    are assigned (unless not ``partitions_required``), and the destination answers its
    probe."""
    while True:
        try:
            # asyncio.timeout, not wait_for: a stop's cancellation is never swallowed here.
            async with asyncio.timeout(PROBE_INTERVAL_SECONDS):
                await consumer.topics()
            readiness.set("kafka", True, "broker reachable")
        except Exception as exc:  # noqa: BLE001 - any failure means not reachable now
            readiness.set("kafka", False, f"broker unreachable: {describe(exc)}")
        assigned = len(consumer.assignment())
        readiness.set(
            "assigned",
            assigned > 0 or not partitions_required,
            f"{assigned} partitions assigned" if assigned else "no partitions assigned",
        )
        try:
            async with asyncio.timeout(PROBE_INTERVAL_SECONDS):
                await writer.probe()
            readiness.set("destination", True, f"{writer.destination} reachable")
        except Exception as exc:  # noqa: BLE001 - any failure means not reachable now
            readiness.set("destination", False, f"{writer.destination}: {describe(exc)}")
        readiness.evaluate()  # refreshes the sgpipe_ready gauge
        await asyncio.sleep(PROBE_INTERVAL_SECONDS)


async def cancel_task(task: asyncio.Task[None]) -> None:
    """Cancel ``task`` and wait until it has ended, cancelling again while it runs on.

    One cancel is not always enough on Python 3.11: ``asyncio.wait_for`` swallows a
    cancellation that arrives just as its inner awaitable completes (it returns the result
    instead; python/cpython#86296, fixed in 3.12), and a loop around it -- the readiness
    probes -- then runs on. Awaiting such a task once hung a stage's stop for good (the sink
    process's dead-letter stage, killed after 90 s in tests/faults)."""
    while not task.done():
        task.cancel()
        await asyncio.wait([task], timeout=_RECANCEL_SECONDS)
    with contextlib.suppress(asyncio.CancelledError):
        await task


# How long cancel_task waits for a cancelled task to end before cancelling it again.
_RECANCEL_SECONDS = 0.5


def bound_port(runner: web.AppRunner) -> int | None:
    """The port a runner's first site listens on (port 0 picks a free one)."""
    for address in runner.addresses:
        if isinstance(address, tuple):
            return int(address[1])
    return None
