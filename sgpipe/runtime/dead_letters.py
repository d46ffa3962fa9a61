"""Dead letters, built in one place, and the limit that stops a stage dead-lettering everything.

A stage's steps say *why* a record (or one element of it) is poison with a ``Rejection``; the
runtime turns it into a ``DeadLetter`` (``schemas.dead_letter``) carrying the reason, the
detail, the stage, the source topic/partition/offset and the original bytes and headers, and
writes it before the source offset is committed. ``DeadLetterBudget`` is the circuit breaker:
past its limit the stage stops (fatal) instead of dead-lettering every record after a bad
deploy (arroyo's ``DlqLimit``).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from schemas.dead_letter import DeadLetter
from sgpipe.runtime.errors import DeadLetterLimitExceeded
from sgpipe.runtime.messages import Message
from sgpipe.runtime.settings import DeadLetterLimit


@dataclass(frozen=True, slots=True)
class Rejection:
    """What a pure step says about a poison record: a stable ``reason`` code, a ``detail`` for
    people, and the offending bytes (None: the consumed record's whole value) with the
    element's position in the record when only one element of it is bad."""

    reason: str
    detail: str
    payload: bytes | None = None
    event_index: int | None = None
    # The headers its dead letter carries, when not the consumed record's (the processor's
    # element letters carry their own HMAC: processors/authenticate.py).
    headers: tuple[tuple[str, bytes], ...] | None = None


def build_dead_letter(
    message: Message, rejection: Rejection, *, stage: str, max_payload_bytes: int
) -> DeadLetter:
    """The dead letter for ``rejection`` of ``message``. A payload too big for the dead-letter
    topic is left out, and the detail says where the original still is."""
    payload = message.value or b"" if rejection.payload is None else rejection.payload
    detail = rejection.detail
    if len(payload) > max_payload_bytes:
        detail = (
            f"{detail} (payload of {len(payload)} bytes omitted: read it at "
            f"{message.topic}/{message.partition}/{message.offset})"
        )
        payload = b""
    return DeadLetter(
        reason=rejection.reason,
        detail=detail,
        stage=stage,
        payload=payload,
        original_topic=message.topic,
        original_partition=message.partition,
        original_offset=message.offset,
        event_index=rejection.event_index,
        context_headers=tuple(message.headers) if rejection.headers is None else rejection.headers,
    )


class DeadLetterBudget:
    """Counts outcomes over a sliding window and refuses a batch that would pass the limit.

    ``admit(outcomes, dead_letters)`` is called with a batch's counts *before* anything of
    it is written; it raises DeadLetterLimitExceeded (and counts nothing) when the window,
    this batch included, holds more than ``max_count`` dead letters, or at least
    ``min_records`` outcomes of which more than ``max_ratio`` are dead letters.
    """

    def __init__(
        self, limit: DeadLetterLimit, *, stage: str, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._limit = limit
        self._stage = stage
        self._clock = clock
        self._window: deque[tuple[float, int, int]] = deque()
        self._outcomes = 0
        self._dead = 0

    def admit(self, outcomes: int, dead_letters: int) -> None:
        if dead_letters == 0:
            self._add(outcomes, 0)
            return
        now = self._clock()
        self._expire(now)
        total, dead = self._outcomes + outcomes, self._dead + dead_letters
        limit = self._limit
        window = f"{limit.window_seconds:g} s"
        if limit.max_count and dead > limit.max_count:
            raise DeadLetterLimitExceeded(
                f"{self._stage}: {dead} dead letters in {window}, over the limit of "
                f"{limit.max_count}; stopping instead of dead-lettering everything (a bad "
                "deploy?); nothing of this batch was written or committed"
            )
        if limit.max_ratio < 1 and total >= limit.min_records and dead > limit.max_ratio * total:
            raise DeadLetterLimitExceeded(
                f"{self._stage}: {dead} of {total} records in {window} were dead letters, "
                f"over the limit of {limit.max_ratio:.0%}; stopping instead of dead-lettering "
                "everything (a bad deploy?); nothing of this batch was written or committed"
            )
        self._add(outcomes, dead_letters, now)

    def _add(self, outcomes: int, dead_letters: int, now: float | None = None) -> None:
        now = self._clock() if now is None else now
        self._expire(now)
        self._window.append((now, outcomes, dead_letters))
        self._outcomes += outcomes
        self._dead += dead_letters

    def _expire(self, now: float) -> None:
        horizon = now - self._limit.window_seconds
        while self._window and self._window[0][0] < horizon:
            _, outcomes, dead = self._window.popleft()
            self._outcomes -= outcomes
            self._dead -= dead
