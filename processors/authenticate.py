"""Step 0 of the processor: is this raw record from our ingress? (filter before trust)

``RawRecordAuthenticator.authenticate`` verifies the record's ``sgpipe-raw-hmac``
(``schemas.raw_auth``) before anything reads its headers or body; a record without a valid one
becomes a whole-record rejection, ``unauthenticated_raw_record``, and none of it an event.

Dead letters of single elements get an HMAC of their own (``vouch``): their replay is a batch of
one (``[`` element ``]``), which the ingress's MAC over the whole batch does not cover. The
processor signs it only for a record it verified, so ``sgpipe dlq replay`` never needs the key
and can never turn a forged record into events: a replay is authenticated by the processor like
any record (docs/dead-letters.md).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Final

from schemas.raw_auth import (
    RawAuthKey,
    UnauthenticatedRawRecord,
    sign_raw_record,
    verify_raw_record,
)
from sgpipe.runtime.dead_letters import Rejection
from sgpipe.runtime.messages import Message

UNAUTHENTICATED_RAW_RECORD: Final = "unauthenticated_raw_record"


@dataclass(frozen=True, slots=True)
class Authentication:
    """``verified_by``: the key whose HMAC the record carries (None: not verified);
    ``rejection``: why it is dead-lettered instead (None: it may be processed)."""

    verified_by: RawAuthKey | None
    rejection: Rejection | None = None


@dataclass(frozen=True, slots=True)
class RawRecordAuthenticator:
    """``keys``: ``raw_auth.keys``, the first signs (element dead letters); all verify.
    ``allow_unauthenticated``: process records without a valid HMAC anyway (the escape hatch
    of ``raw_auth.allow_unauthenticated``; warned about at start)."""

    keys: tuple[RawAuthKey, ...]
    allow_unauthenticated: bool = False

    def authenticate(self, message: Message) -> Authentication:
        try:
            key = verify_raw_record(self.keys, message.value, message.headers)
        except UnauthenticatedRawRecord as exc:
            if self.allow_unauthenticated:
                return Authentication(None)
            return Authentication(None, Rejection(UNAUTHENTICATED_RAW_RECORD, str(exc)))
        return Authentication(key)

    def vouch(self, message: Message, verified: Authentication, rejection: Rejection) -> Rejection:
        """``rejection`` of one element of a verified ``message``, with the headers its dead
        letter carries: the record's own, signed over the batch of one that replays it."""
        if (
            verified.verified_by is None
            or not self.keys
            or rejection.event_index is None
            or rejection.payload is None
        ):
            return rejection
        replayed_value = b"[" + rejection.payload + b"]"
        headers = sign_raw_record(self.keys[0], replayed_value, message.headers)
        return dataclasses.replace(rejection, headers=tuple(headers))
