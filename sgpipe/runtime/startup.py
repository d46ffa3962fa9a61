"""Reaching Kafka at start: retry while it is unreachable, then give up with a clear error.

A stage that starts before its broker (a cluster coming up, a broker restarting) must not die
on the first refused connection, nor hang forever: it logs one ``kafka not reachable;
retrying`` line per attempt, with capped exponential backoff, until
``kafka.start_timeout_seconds`` have passed since start, then raises StartTimeout, which the CLI
turns into one ``error=...`` line and exit 1. Under Kubernetes that exit is the signal: the
pod restarts with the kubelet's own backoff and shows as CrashLoopBackOff instead of sitting
unready without a restart count.

Only failures ``sgpipe.runtime.errors`` classes as retriable are retried (connection refused,
timeouts, transient broker answers); a fatal one (bad credentials, a rejected configuration)
raises FatalStageError at once (exit 3), as the consuming stages do.

The consuming stages (``sgpipe.runtime.runner``) retry without a deadline instead: they serve
``/healthz`` and ``/readyz`` while they wait, so Kubernetes sees a live, unready pod. The
ingress listens only once Kafka answered (it must not take a batch it cannot publish), so while
it waits there is nothing to probe; a deadline and an exit is how its failure becomes visible.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import structlog

from sgpipe.runtime.errors import ErrorClass, FatalStageError, classify, describe
from sgpipe.runtime.settings import KafkaSettings

log = structlog.get_logger(__name__)

T = TypeVar("T")

_FIRST_DELAY_SECONDS = 0.5
_MAX_DELAY_SECONDS = 10.0


class StartTimeout(RuntimeError):
    """A dependency stayed unreachable for the whole start deadline."""


def start_deadline(settings: KafkaSettings) -> float:
    """The ``time.monotonic()`` by which Kafka must have answered, counted from now."""
    return time.monotonic() + settings.start_timeout_seconds


async def retry_kafka_at_start(
    attempt: Callable[[], Awaitable[T]],
    settings: KafkaSettings,
    *,
    action: str,
    deadline: float,
    stop: asyncio.Event | None = None,
) -> T | None:
    """``attempt()``'s result once it succeeds; None if ``stop`` was set first.

    ``attempt`` must clean up after itself when it fails (close the client it opened).
    Raises StartTimeout after ``deadline``; FatalStageError on an error that is not
    retriable.
    """
    delay = _FIRST_DELAY_SECONDS
    attempts = 0
    while True:
        attempts += 1
        try:
            return await attempt()
        except Exception as exc:
            if classify(exc) is not ErrorClass.RETRIABLE:
                raise FatalStageError(f"{action} failed: {describe(exc)}") from exc
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise StartTimeout(
                    f"kafka at {settings.bootstrap_servers} not reachable after "
                    f"{settings.start_timeout_seconds:g} s ({action}): {describe(exc)}; check "
                    "kafka.bootstrap_servers, or raise kafka.start_timeout_seconds"
                ) from exc
            wait = min(delay, remaining)
            log.warning(
                "kafka not reachable; retrying",
                action=action,
                bootstrap_servers=settings.bootstrap_servers,
                attempt=attempts,
                retry_in_seconds=round(wait, 1),
                gives_up_in_seconds=round(remaining),
                error=describe(exc),
            )
        if stop is None:
            await asyncio.sleep(wait)
        else:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=wait)
            if stop.is_set():
                return None
        delay = min(delay * 2, _MAX_DELAY_SECONDS)
