"""Dead letters, built in one place, and the limit that stops a stage dead-lettering everything.

A stage's steps say *why* a record (or one element of it) is poison with a ``Rejection``; the
runtime turns it into a ``DeadLetter`` (``schemas.dead_letter``) carrying the reason, the
detail, the stage, the source topic/partition/offset and the original bytes and headers, and
writes it before the source offset is committed. ``DeadLetterBudget`` is the circuit breaker:
past its limit the stage pauses (holds the batch, reports not ready) instead of dead-lettering
every record after a bad deploy (arroyo's ``DlqLimit``; docs/dead-letters.md).
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass

from schemas.dead_letter import DeadLetter
from sgpipe.runtime.messages import Message
from sgpipe.runtime.settings import DeadLetterLimit

# Room for the consumed record's own headers in its dead letter: half the headroom the producer
# keeps next to a record's value (sgpipe.runtime.kafka.RECORD_HEADROOM_BYTES); the rest is for
# the dead letter's own headers (the detail is capped at 1 KB).
MAX_CONTEXT_HEADER_BYTES = 32_768

# Past this many rejected elements, a record is one dead letter of the whole record
# (``too_many_rejections``) instead of one per element: a hostile batch of two million bad
# elements must not become two million dead letters (nor, on the way, two million letters built
# and signed in memory).
MAX_REJECTIONS_PER_RECORD = 1000
TOO_MANY_INVALID_ELEMENTS = "too_many_invalid_elements"


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


def too_many_rejections(reasons: Counter[str]) -> Rejection:
    """The one rejection of a whole record whose elements were rejected ``reasons`` times
    (reason -> count) past ``MAX_REJECTIONS_PER_RECORD``."""
    listed = ", ".join(f"{reason}: {count}" for reason, count in reasons.most_common())
    return Rejection(
        TOO_MANY_INVALID_ELEMENTS,
        f"{reasons.total()} of its elements were rejected ({listed}); the record is kept whole "
        "instead of as one dead letter per element",
    )


def build_dead_letter(
    message: Message, rejection: Rejection, *, stage: str, max_payload_bytes: int
) -> DeadLetter:
    """The dead letter for ``rejection`` of ``message``. A payload too big for the dead-letter
    topic is left out, and the detail says where the original still is."""
    payload = message.value or b"" if rejection.payload is None else rejection.payload
    detail = rejection.detail
    where = f"{message.topic}/{message.partition}/{message.offset}"
    if len(payload) > max_payload_bytes:
        detail = f"{detail} (payload of {len(payload)} bytes omitted: read it at {where})"
        payload = b""
    # The headers kept for replay: the record's, or those the rejection names instead.
    headers = tuple(message.headers) if rejection.headers is None else tuple(rejection.headers)
    context: list[tuple[str, bytes]] = []
    room = MAX_CONTEXT_HEADER_BYTES
    for name, value in headers:
        size = len(name.encode("utf-8", "replace")) + len(value or b"")
        if size > room:
            break
        room -= size
        context.append((name, value))
    if len(context) < len(headers):
        # The record's headers ride along for replay; a record can carry more than a dead
        # letter has room for next to its payload, and an oversized letter would fail to send.
        left_out = len(headers) - len(context)
        detail = f"{detail} ({left_out} headers omitted: read them at {where})"
    return DeadLetter(
        reason=rejection.reason,
        detail=detail,
        stage=stage,
        payload=payload,
        original_topic=message.topic,
        original_partition=message.partition,
        original_offset=message.offset,
        event_index=rejection.event_index,
        context_headers=tuple(context),
    )


# A source record, by where it is: (topic, partition, offset).
SourceRecord = tuple[str, int, int]


class DeadLetterBudget:
    """Counts source records with and without dead letters over a window of the last
    ``window_records`` distinct ones, and refuses a batch that would cross the limit
    (``DeadLetterLimit``).

    ``admit({source record: had dead letters})`` is called with a batch *before* anything of it
    is written. Within the limit it returns None and the batch's records join the window; past
    it, it returns the reason (one line for people) and counts nothing, so the same batch is
    judged the same way when it comes again. A record already in the window (a batch re-read
    after a rebalance) is not counted twice.
    """

    def __init__(self, limit: DeadLetterLimit, *, stage: str) -> None:
        self._limit = limit
        self._stage = stage
        # Oldest first: source record -> whether it had dead letters.
        self._window: OrderedDict[SourceRecord, bool] = OrderedDict()
        self._with_dead_letters = 0

    def admit(self, outcomes: Mapping[SourceRecord, bool]) -> str | None:
        new = {record: dead for record, dead in outcomes.items() if record not in self._window}
        reason = self._refusal(new) if any(new.values()) else None
        if reason is not None:
            return reason
        for record, dead in new.items():
            self._window[record] = dead
            self._with_dead_letters += dead
        while len(self._window) > self._limit.window_records:
            _, dead = self._window.popitem(last=False)
            self._with_dead_letters -= dead
        return None

    def _refusal(self, new: Mapping[SourceRecord, bool]) -> str | None:
        """Why the window with ``new`` added is past the limit; None if it is not. Only a
        batch that made dead letters is ever refused: holding a clean one protects nothing."""
        seen = len(self._window) + len(new)
        with_dead_letters = self._with_dead_letters + sum(new.values())
        limit = self._limit
        if limit.max_count and with_dead_letters > limit.max_count:
            return (
                f"{self._stage}: {with_dead_letters} of the last {seen} source records had dead "
                f"letters, over dead_letters.max_count ({limit.max_count})"
            )
        if (
            limit.max_ratio < 1
            and seen >= limit.min_records
            and with_dead_letters > limit.max_ratio * seen
        ):
            return (
                f"{self._stage}: {with_dead_letters} of the last {seen} source records had dead "
                f"letters, over dead_letters.max_ratio ({limit.max_ratio:g})"
            )
        return None
