"""Reaching Kafka at start: retried until a deadline, fatal errors at once, a stop ends it --
also in the middle of an attempt."""

from __future__ import annotations

import asyncio
import time

import pytest
from aiokafka.errors import KafkaConnectionError, SaslAuthenticationFailed

from sgpipe.runtime.errors import FatalStageError
from sgpipe.runtime.retry import Backoff
from sgpipe.runtime.runner import cancel_task, retry_until_started
from sgpipe.runtime.settings import KafkaSettings
from sgpipe.runtime.startup import StartTimeout, retry_kafka_at_start

SETTINGS = KafkaSettings(bootstrap_servers="kafka:9092", start_timeout_seconds=30)


async def test_retries_until_it_answers() -> None:
    attempts: list[int] = []

    async def attempt() -> str:
        attempts.append(1)
        if len(attempts) < 3:
            raise KafkaConnectionError("refused")
        return "connected"

    result = await retry_kafka_at_start(
        attempt, SETTINGS, action="test", deadline=time.monotonic() + 30
    )
    assert (result, len(attempts)) == ("connected", 3)


async def test_gives_up_at_the_deadline_naming_the_setting() -> None:
    async def attempt() -> None:
        raise KafkaConnectionError("Unable to bootstrap")

    with pytest.raises(StartTimeout) as caught:
        await retry_kafka_at_start(attempt, SETTINGS, action="start producer", deadline=0.0)
    message = str(caught.value)
    assert message.startswith("kafka at kafka:9092 not reachable after 30 s (start producer): ")
    assert message.endswith("check kafka.bootstrap_servers, or raise kafka.start_timeout_seconds")


async def test_a_fatal_error_is_not_retried() -> None:
    calls = 0

    async def attempt() -> None:
        nonlocal calls
        calls += 1
        raise SaslAuthenticationFailed()

    with pytest.raises(FatalStageError, match="^start producer failed: SaslAuthentication"):
        await retry_kafka_at_start(
            attempt, SETTINGS, action="start producer", deadline=time.monotonic() + 30
        )
    assert calls == 1


async def test_a_stop_ends_the_wait() -> None:
    stop = asyncio.Event()

    async def attempt() -> str:
        stop.set()
        raise KafkaConnectionError("refused")

    result = await retry_kafka_at_start(
        attempt, SETTINGS, action="test", deadline=time.monotonic() + 30, stop=stop
    )
    assert result is None


# --- a stage asked to stop while it starts stops at once (issue 21) --------------------------


async def test_a_stop_during_a_start_attempt_cancels_it_and_ends_the_start() -> None:
    # A start that would take as long as it likes (migrations or a group join on a busy
    # machine): the stop must not wait for it.
    stop = asyncio.Event()
    began, cleaned_up = asyncio.Event(), asyncio.Event()

    async def attempt() -> None:
        began.set()
        try:
            await asyncio.Event().wait()
        finally:
            cleaned_up.set()

    starting = asyncio.create_task(
        retry_until_started("sink", "migrating", attempt, stop, Backoff())
    )
    await asyncio.wait_for(began.wait(), 10)
    stop.set()
    assert await asyncio.wait_for(starting, 10) is False
    assert cleaned_up.is_set()  # the attempt's own cleanup ran (a client is closed)


async def test_a_start_attempt_about_to_finish_when_the_stop_comes_is_let_finish() -> None:
    # aiokafka leaks the connection of a client start cancelled mid-bootstrap (its finalizer
    # then warns in whatever runs later): an attempt that ends within the grace is not
    # cancelled, and counts as a start (its caller stops the client it got).
    stop = asyncio.Event()
    began, release = asyncio.Event(), asyncio.Event()
    finished: list[bool] = []

    async def attempt() -> None:
        began.set()
        await release.wait()
        finished.append(True)

    starting = asyncio.create_task(
        retry_until_started("sink", "starting", attempt, stop, Backoff())
    )
    await asyncio.wait_for(began.wait(), 10)
    stop.set()
    # The attempt ends a moment after the stop (a bootstrap's round trip), well within the
    # grace: it must not have been cancelled meanwhile.
    await asyncio.sleep(0.2)
    assert not starting.done()
    release.set()
    assert await asyncio.wait_for(starting, 10) is True
    assert finished == [True]


async def test_an_attempt_that_finishes_is_a_start_and_its_errors_still_count() -> None:
    stop = asyncio.Event()
    attempts: list[int] = []

    async def attempt() -> None:
        attempts.append(1)
        if len(attempts) == 1:
            raise KafkaConnectionError("refused")  # retriable: retried

    assert await retry_until_started("sink", "starting", attempt, stop, Backoff(0.01)) is True
    assert len(attempts) == 2

    async def fatal() -> None:
        raise SaslAuthenticationFailed()

    with pytest.raises(FatalStageError, match="^sink: starting failed: SaslAuthentication"):
        await retry_until_started("sink", "starting", fatal, stop, Backoff())


async def test_cancel_task_ends_a_task_that_swallows_a_cancellation() -> None:
    # What Python 3.11's asyncio.wait_for does when the cancellation arrives just as its inner
    # awaitable completes: it returns the result, and a probe loop around it runs on. A stop
    # that cancelled once and awaited such a task hung for good (tests/faults, 90 s, -9).
    swallowed: list[bool] = []

    async def probes_that_swallow_one_cancellation() -> None:
        while True:
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                if swallowed:
                    raise
                swallowed.append(True)

    task = asyncio.create_task(probes_that_swallow_one_cancellation())
    await asyncio.sleep(0)
    stopping = asyncio.create_task(cancel_task(task))
    try:
        # Not wait_for: cancelling the stop on a timeout would cancel the task a second time.
        done, _ = await asyncio.wait([stopping], timeout=10)
        assert stopping in done, "cancel_task did not end a task that swallowed a cancellation"
        assert task.cancelled() and swallowed == [True]
    finally:
        task.cancel()
        await asyncio.gather(stopping, return_exceptions=True)
