"""Capped exponential backoff, and a sleep that a stop request cuts short.

The one retry primitive of every stage (Vector's explicit retry logic, simpler): the caller
decides *whether* to retry from the error's class (``sgpipe.runtime.errors.classify``); this
module only decides *how long* to wait.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from dataclasses import dataclass, field


@dataclass(slots=True)
class Backoff:
    """Delays of ``initial``, doubling up to ``maximum``, with +-20% jitter so that many
    workers retrying the same outage do not hit it in lockstep; ``reset`` after a success."""

    initial: float = 0.2
    maximum: float = 30.0
    _next: float = field(init=False, default=0.0)

    def __post_init__(self) -> None:
        self._next = self.initial

    def next_delay(self) -> float:
        delay = self._next
        self._next = min(self._next * 2, self.maximum)
        return delay * random.uniform(0.8, 1.2)

    def reset(self) -> None:
        self._next = self.initial


async def sleep_unless_stopped(stop: asyncio.Event, seconds: float) -> bool:
    """Sleep ``seconds`` or until ``stop`` is set; True if stopped."""
    if seconds > 0:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=seconds)
    return stop.is_set()
