"""Event stream -> the POST bodies SendGrid would send, with SendGrid's duplicates.

Pure and seeded, like events.py: the same stream, seed and limits give the same bodies.

SendGrid posts a JSON array, at most 768 KB, once a server's batch is full or ~30 s old; the
events are separated by ``,\\r\\n`` and the body ends with ``\\r\\n``. A receiver sees the same
event more than once: single events re-sent inside later batches, and whole batches posted
again. Both kinds are produced here, as byte-identical copies (a copy that differed would not
be a duplicate but a different event).
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from itertools import islice

SENDGRID_MAX_BATCH_BYTES = 768 * 1024

_EVENT_SEPARATOR = b",\r\n"
# "[" + "]\r\n": with the separators, a body of n events is sum(len) + 3n + 1 bytes.
_BODY_OVERHEAD = 1
_PER_EVENT_OVERHEAD = len(_EVENT_SEPARATOR)
# Copies are drawn from the most recent events: SendGrid re-sends what it just sent.
_RECENT_EVENTS = 4096
# A re-sent batch goes out again after this many later batches, at most.
_MAX_RESEND_DISTANCE = 3
# Separates the duplicate draws from the event draws: the same seed gives the same events
# whatever --duplicates is.
_DUPLICATE_SEED_SALT = 0x5EED_D0_0B1E


def sendgrid_body(events: Iterable[bytes]) -> bytes:
    """The body SendGrid posts for these compact JSON events."""
    return b"[" + _EVENT_SEPARATOR.join(events) + b"]\r\n"


@dataclass(frozen=True, slots=True)
class PlannedPost:
    """One POST body and what it carries."""

    index: int  # 0, 1, 2, ... in the order posts are planned
    body: bytes
    serials: tuple[int, ...]  # stream serial number of each event object in the body
    duplicate_events: int  # event objects in the body that are copies of earlier ones
    resend_of: int | None  # the index of the post this one repeats byte for byte
    stream_position: int  # stream items (copies included) planned once this post is out

    @property
    def events(self) -> int:
        return len(self.serials)


class PostPlanner:
    """Cuts a stream of encoded events into SendGrid-sized POST bodies.

    ``duplicates`` is the share of extra copies: about half re-sent single events (each event
    is followed, with probability duplicates/2, by a copy of a recent one) and half whole
    batches posted again (each batch, with probability duplicates/2, is repeated after up to
    three later batches). Original events get serial numbers 0, 1, 2, ...; a copy keeps its
    original's, so a receiver's acknowledgement can be traced back to the unique events.
    """

    def __init__(
        self,
        events: Iterable[bytes],
        *,
        seed: int,
        duplicates: float = 0.0,
        max_batch_bytes: int = SENDGRID_MAX_BATCH_BYTES,
        max_batch_events: int | None = None,
        event_limit: int | None = None,
    ) -> None:
        if not 0.0 <= duplicates <= 1.0:
            raise ValueError("duplicates is a share between 0 and 1")
        if max_batch_bytes < 64:
            raise ValueError("max_batch_bytes is too small for any SendGrid event")
        self._events = events if event_limit is None else islice(events, event_limit)
        self._draw = random.Random(seed ^ _DUPLICATE_SEED_SALT).random
        self._copy_share = duplicates / 2
        self._resend_share = duplicates / 2
        self._max_batch_bytes = max_batch_bytes
        self._max_batch_events = max_batch_events
        self.originals = 0  # original events planned so far
        self.stream_position = 0  # stream items planned so far, copies included

    def __iter__(self) -> Iterator[PlannedPost]:
        index = 0
        resends: list[tuple[int, PlannedPost]] = []  # (post index it is due after, post)
        body_events: list[bytes] = []
        serials: list[int] = []
        copies = 0
        size = _BODY_OVERHEAD
        max_events = self._max_batch_events
        for serial, event, is_copy in self._items():
            item_size = len(event) + _PER_EVENT_OVERHEAD
            full = size + item_size > self._max_batch_bytes or (
                max_events is not None and len(serials) >= max_events
            )
            if serials and full:
                post = PlannedPost(
                    index,
                    sendgrid_body(body_events),
                    tuple(serials),
                    copies,
                    None,
                    self.stream_position,
                )
                index += 1
                yield post
                for resend in self._resends_after(post, resends):
                    yield PlannedPost(
                        index,
                        resend.body,
                        resend.serials,
                        resend.events,
                        resend.index,
                        self.stream_position,
                    )
                    index += 1
                body_events, serials, copies, size = [], [], 0, _BODY_OVERHEAD
            body_events.append(event)
            serials.append(serial)
            copies += is_copy
            size += item_size
            self.stream_position += 1
        if serials:
            yield PlannedPost(
                index,
                sendgrid_body(body_events),
                tuple(serials),
                copies,
                None,
                self.stream_position,
            )
            index += 1
        # The stream ended: whatever was still to be re-sent goes now.
        for _, resend in sorted(resends, key=lambda due: due[0]):
            yield PlannedPost(
                index,
                resend.body,
                resend.serials,
                resend.events,
                resend.index,
                self.stream_position,
            )
            index += 1

    def _items(self) -> Iterator[tuple[int, bytes, bool]]:
        recent: deque[tuple[int, bytes]] = deque(maxlen=_RECENT_EVENTS)
        draw = self._draw
        copy_share = self._copy_share
        for event in self._events:
            serial = self.originals
            self.originals += 1
            yield serial, event, False
            recent.append((serial, event))
            if copy_share and draw() < copy_share:
                copy_serial, copy = recent[int(draw() * len(recent))]
                yield copy_serial, copy, True

    def _resends_after(
        self, post: PlannedPost, resends: list[tuple[int, PlannedPost]]
    ) -> list[PlannedPost]:
        """Schedule ``post`` for a re-send (maybe) and take the re-sends now due."""
        if self._resend_share and self._draw() < self._resend_share:
            distance = 1 + int(self._draw() * _MAX_RESEND_DISTANCE)
            resends.append((post.index + distance, post))
        due = [resend for after, resend in resends if after <= post.index]
        resends[:] = [(after, resend) for after, resend in resends if after > post.index]
        return due
