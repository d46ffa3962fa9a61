"""Reaching Kafka at start: retry while it is unreachable, then give up with a clear error.

A stage that starts before its broker (a cluster coming up, a broker restarting) must not die
on the first refused connection, nor hang forever: it logs one ``kafka not reachable;
retrying`` line per attempt, with capped exponential backoff, until
``kafka.start_timeout_seconds`` have passed since start, then raises StartTimeout, which the CLI
turns into one ``error=...`` line and exit 1. Under Kubernetes that exit is the signal: the
pod restarts with the kubelet's own backoff and shows as CrashLoopBackOff instead of sitting
unready without a restart count.

Only failures that may heal are retried (connection refused, timeouts, aiokafka errors marked
retriable); anything else (bad credentials, a TLS error) propagates at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import structlog
from aiokafka.errors import KafkaError

from sgpipe.runtime.logs import short_error
from sgpipe.runtime.settings import KafkaSettings

log = structlog.get_logger(__name__)

T = TypeVar("T")

_FIRST_DELAY_SECONDS = 0.5
_MAX_DELAY_SECONDS = 10.0


class StartTimeout(RuntimeError):
    """A dependency stayed unreachable for the whole start deadline."""


def is_retriable_at_start(exc: BaseException) -> bool:
    if isinstance(exc, KafkaError):
        return bool(exc.retriable)
    if isinstance(exc, ssl.SSLError):  # an OSError, but a certificate does not heal by waiting
        return False
    return isinstance(exc, (OSError, TimeoutError))


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
    Raises StartTimeout after ``deadline``, or the first error that is not retriable.
    """
    delay = _FIRST_DELAY_SECONDS
    attempts = 0
    while True:
        attempts += 1
        try:
            return await attempt()
        except Exception as exc:
            if not is_retriable_at_start(exc):
                raise
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise StartTimeout(
                    f"kafka at {settings.bootstrap_servers} not reachable after "
                    f"{settings.start_timeout_seconds:g} s ({action}): {short_error(exc)}; check "
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
                error=short_error(exc),
            )
        if stop is None:
            await asyncio.sleep(wait)
        else:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=wait)
            if stop.is_set():
                return None
        delay = min(delay * 2, _MAX_DELAY_SECONDS)
