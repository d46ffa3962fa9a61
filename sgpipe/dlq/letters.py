"""Dead letters as ``sgpipe dlq`` reads them from ClickHouse, and what a replay does with each.

Pure: no Kafka, no ClickHouse. A processor dead letter holds an element's exact bytes (with
its index in the raw batch) or a whole raw body, plus the raw batch's own headers; replaying it
rebuilds a raw batch (``[`` element ``]``, or the body as is) with those headers and two more,
``sgpipe-replay-of`` (the letter's identity) and ``sgpipe-replay-generation``, so that a dead
letter made of it again replaces this one in ``dead_letters`` instead of adding one. The
processor (``processors.pipeline``, the same code the running processor runs) predicts what
becomes of it; ClickHouse then shows what did.
"""

from __future__ import annotations

import base64
import sys
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from processors.authenticate import RawRecordAuthenticator
from processors.pipeline import process_raw_record
from schemas.dead_letter import (
    DEAD_LETTER_HEADERS,
    REPLAY_GENERATION_HEADER,
    REPLAY_OF_HEADER,
    WHOLE_RECORD,
    DeadLetterOrigin,
    replay_headers,
)
from schemas.email_event import EmailEventCodec
from sgpipe.runtime.messages import Message

STAGE_PROCESS: Final = "process"
STAGE_SINK: Final = "sink"

# Why a letter is not replayed; shown as "skipped: <why>".
SINK_NOT_REPLAYABLE: Final = (
    "not replayable: a sink dead letter is an events-topic record the sink could not decode; "
    "putting it back on the events topic would hand the same bytes to every subscriber again "
    "(docs/dead-letters.md)"
)
NO_PAYLOAD: Final = "not replayable: the dead letter kept no bytes (see its detail)"


@dataclass(frozen=True, slots=True)
class StoredLetter:
    """One row of ``dead_letters`` (FINAL), as ``sgpipe dlq`` selects it. ``payload`` and
    ``headers`` are only read for a replay; ``payload_bytes`` always."""

    origin: DeadLetterOrigin
    stage: str
    reason: str
    detail: str
    webhook: str
    request_id: str
    dead_lettered_at: str
    replay_generation: int
    replayed_at: str | None
    payload_bytes: int
    payload: bytes = b""
    headers: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def from_json(cls, row: Mapping[str, Any]) -> StoredLetter:
        """From a JSONEachRow line (``payload_base64``: the payload, or its start, in base64;
        64-bit integers may be quoted)."""
        payload = base64.b64decode(row["payload_base64"]) if row.get("payload_base64") else b""
        return cls(
            origin=DeadLetterOrigin(
                str(row["source_topic"]),
                int(row["source_partition"]),
                int(row["source_offset"]),
                int(row["event_index"]),
            ),
            stage=str(row["stage"]),
            reason=str(row["reason"]),
            detail=str(row["detail"]),
            webhook=str(row["webhook"]),
            request_id=str(row["request_id"]),
            dead_lettered_at=str(row["dead_lettered_at"]),
            replay_generation=int(row["replay_generation"]),
            replayed_at=None if row.get("replayed_at") is None else str(row["replayed_at"]),
            payload_bytes=int(row.get("payload_bytes", len(payload))),
            payload=payload,
            headers={str(name): str(value) for name, value in row.get("headers", {}).items()},
        )

    @property
    def pending(self) -> bool:
        return self.replayed_at is None


def letter_name(origin: DeadLetterOrigin) -> str:
    """``topic/partition/offset``, with ``#index`` for one element of the record."""
    name = f"{origin.topic}/{origin.partition}/{origin.offset}"
    return name if origin.event_index == WHOLE_RECORD else f"{name}#{origin.event_index}"


@dataclass(frozen=True, slots=True)
class Skip:
    why: str


@dataclass(frozen=True, slots=True)
class ReplayRecord:
    """The raw batch that replays ``letter``, for the raw topic."""

    letter: StoredLetter
    value: bytes
    headers: list[tuple[str, bytes]]


def plan_replay(letter: StoredLetter) -> ReplayRecord | Skip:
    """What replaying ``letter`` sends to the raw topic, or why it is skipped.

    Processor letters are replayed: their bytes are an element (sent as a batch of one) or a
    whole raw body (sent as is), with the raw batch's headers. Sink letters are not: see
    SINK_NOT_REPLAYABLE. A letter that kept no bytes (too large for the dead-letter topic) has
    nothing to send.
    """
    if letter.stage == STAGE_SINK:
        return Skip(SINK_NOT_REPLAYABLE)
    if letter.stage != STAGE_PROCESS:
        return Skip(f"not replayable: written by stage {letter.stage!r}, not the processor")
    if not letter.payload:
        return Skip(NO_PAYLOAD)
    element = letter.origin.event_index != WHOLE_RECORD
    value = b"[" + letter.payload + b"]" if element else letter.payload
    headers = [
        *context_headers(letter.headers),
        *replay_headers(letter.origin, letter.replay_generation + 1),
    ]
    return ReplayRecord(letter, value, headers)


def context_headers(headers: Mapping[str, str]) -> list[tuple[str, bytes]]:
    """The raw batch's own headers among a dead letter's (webhook, request id, receive time,
    signature timestamp, ...): what the processor reads, so a replay normalizes exactly as
    the original would have (same ``received_at``, same ids: ClickHouse keeps one row)."""
    own = DEAD_LETTER_HEADERS | {REPLAY_OF_HEADER, REPLAY_GENERATION_HEADER}
    return [(name, value.encode("utf-8")) for name, value in headers.items() if name not in own]


# --- what becomes of a replay ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ElementForecast:
    """What the processor makes of one element of a replayed batch: an event (its
    ``sg_event_id`` and encoded size) or a dead letter (its reason). ``index`` is the
    element's position in the original batch; WHOLE_RECORD when the batch fails as a whole."""

    index: int
    event_id: str | None = None
    encoded_bytes: int = 0
    reason: str | None = None

    def reason_with(self, max_record_bytes: int) -> str | None:
        """The dead-letter reason under a limit on the events topic's record size."""
        if self.reason is None and self.encoded_bytes > max_record_bytes:
            return "event_too_large"
        return self.reason


def forecast(
    record: ReplayRecord, authenticator: RawRecordAuthenticator | None = None
) -> list[ElementForecast]:
    """Run the processor's pure steps on ``record`` (no size limit: the caller applies its own
    with ``reason_with``), one forecast per element. ``authenticator``: the processor's HMAC
    check with ``raw_auth.keys`` (None: the keys are not known here; not checked)."""
    message = Message("replay", 0, 0, 0, None, record.value, tuple(record.headers))
    origin_index = record.letter.origin.event_index
    if authenticator is not None:
        refused = authenticator.authenticate(message).rejection
        if refused is not None:
            return [ElementForecast(origin_index, reason=refused.reason)]
    processed = process_raw_record(message, EmailEventCodec(), sys.maxsize)
    rejected = {r.event_index: r.reason for r in processed.rejections if r.event_index is not None}
    whole = [r.reason for r in processed.rejections if r.event_index is None]
    if whole:
        return [ElementForecast(origin_index, reason=whole[0])]
    events = iter(processed.events)
    forecasts = []
    for index in range(len(processed.events) + len(rejected)):
        # A replayed element is index 0 of its batch of one; report it at its original index.
        original = index if origin_index == WHOLE_RECORD else origin_index
        if index in rejected:
            forecasts.append(ElementForecast(original, reason=rejected[index]))
        else:
            event = next(events)
            forecasts.append(ElementForecast(original, event.sg_event_id, len(event.value)))
    return forecasts


@dataclass(frozen=True, slots=True)
class Outcome:
    """What happened to (or, in a dry run, would happen to) one dead letter."""

    status: str  # one of the STATUS_* values
    landed: int = 0  # events now in email_events
    again: tuple[str, ...] = ()  # reasons of the dead letters made of it again
    note: str = ""  # why it was skipped

    def describe(self) -> str:
        events = f"{self.landed} event{'' if self.landed == 1 else 's'}"
        reasons = ", ".join(sorted(set(self.again)))
        if self.status == SKIPPED:
            return f"{self.status}: {self.note}"
        if self.status in (LANDED, WOULD_LAND):
            return f"{self.status} ({events})"
        if self.status in (DEAD_LETTERED_AGAIN, WOULD_BE_DEAD_LETTERED):
            return f"{self.status}: {reasons}"
        if self.status in (PARTLY_LANDED, WOULD_PARTLY_LAND):
            return f"{self.status} ({events}; dead-lettered again: {reasons})"
        return self.status


LANDED: Final = "landed"
DEAD_LETTERED_AGAIN: Final = "dead-lettered again"
PARTLY_LANDED: Final = "partly landed"
NOT_SEEN: Final = "not seen yet"
REPLAYED: Final = "replayed"  # sent; outcome not waited for
SKIPPED: Final = "skipped"
WOULD_LAND: Final = "would land"
WOULD_BE_DEAD_LETTERED: Final = "would be dead-lettered again"
WOULD_PARTLY_LAND: Final = "would partly land"


def expected_outcome(forecasts: Sequence[ElementForecast], max_record_bytes: int) -> Outcome:
    """The dry run's answer: what the processor would do with the replayed batch."""
    reasons = tuple(
        reason for item in forecasts if (reason := item.reason_with(max_record_bytes)) is not None
    )
    landed = len(forecasts) - len(reasons)
    if not reasons:
        return Outcome(WOULD_LAND, landed=landed)
    if landed:
        return Outcome(WOULD_PARTLY_LAND, landed=landed, again=reasons)
    return Outcome(WOULD_BE_DEAD_LETTERED, again=reasons)


@dataclass(frozen=True, slots=True)
class LaterLetter:
    """A dead letter made of a replay: its identity, generation and reason."""

    origin: DeadLetterOrigin
    replay_generation: int
    reason: str


def observed_outcome(
    letter: StoredLetter,
    forecasts: Sequence[ElementForecast],
    later: Iterable[LaterLetter],
    landed_ids: Collection[str],
) -> Outcome | None:
    """What became of a replayed ``letter``, from what ClickHouse shows: events of the
    forecast ids in ``email_events`` (``landed_ids``) and dead letters of a later generation
    with its identity (``later``). None while some element is accounted for by neither."""
    origin = letter.origin
    again_by_index = {
        item.origin.event_index: item.reason
        for item in later
        if item.replay_generation > letter.replay_generation
        and (item.origin.topic, item.origin.partition, item.origin.offset)
        == (origin.topic, origin.partition, origin.offset)
    }
    if origin.event_index in again_by_index:
        # The element (or, for a whole record, the batch as a whole) was dead-lettered again.
        return Outcome(DEAD_LETTERED_AGAIN, again=(again_by_index[origin.event_index],))
    landed, again = 0, []
    for item in forecasts:
        if item.index in again_by_index and item.index != WHOLE_RECORD:
            again.append(again_by_index[item.index])
        elif item.event_id is not None and item.event_id in landed_ids:
            landed += 1
        else:
            return None
    if not again:
        return Outcome(LANDED, landed=landed)
    if landed:
        return Outcome(PARTLY_LANDED, landed=landed, again=tuple(again))
    return Outcome(DEAD_LETTERED_AGAIN, again=tuple(again))
