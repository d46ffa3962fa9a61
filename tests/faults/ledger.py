"""The ledger of a fault test: which events the ingress acknowledged (a 2xx reached the
simulator), which it was sent, and what ClickHouse holds in the end.

Fed by the simulator's callbacks (``on_post`` with every planned POST, ``on_acknowledged`` the
moment a POST's 2xx arrived), then compared with ``email_events`` read through ``FINAL`` (and
through the deduplicated view when the schema has one):

* **lost**: acknowledged, not stored -- the promise broken;
* **duplicates**: rows beyond one per ``sg_event_id`` that a reader still sees;
* **phantoms**: stored, never sent -- something invented or corrupted an event.

Every answer the simulator got is kept by kind: a refusal must be retryable (503, a timeout, a
connection refused or cut), never a 4xx for a valid batch.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from sgpipe.simulator.batches import PlannedPost

# What SendGrid retries and a valid batch may be answered while the pipeline is hurt. A 500
# is retried too, but it means a bug in the ingress: it is not accepted here.
RETRYABLE_ANSWERS = frozenset({"503", "timeout", "connection error"})
DEDUP_VIEW = "email_events_dedup"


def event_ids(body: bytes) -> list[str]:
    """The ``sg_event_id`` of each element of a simulated body, in order."""
    return [str(element["sg_event_id"]) for element in json.loads(body)]


def counts_by_event(text: str) -> Counter[str]:
    """``SELECT sg_event_id, count() ... GROUP BY sg_event_id`` as TabSeparated, counted."""
    counts: Counter[str] = Counter()
    for line in text.splitlines():
        event_id, count = line.rsplit("\t", 1)
        counts[event_id] = int(count)
    return counts


@dataclass
class Ledger:
    """Acknowledged vs sent events of one simulation, by ``sg_event_id``."""

    clock: Callable[[], float] = time.monotonic
    sent: set[str] = field(default_factory=set)
    # sg_event_id -> when each acknowledgement of a POST carrying it arrived (``clock``):
    # copies of an event are acknowledged again, possibly on the other side of a fault.
    acknowledged: dict[str, list[float]] = field(default_factory=dict)
    posts_acknowledged: int = 0
    posts_planned: int = 0

    def on_post(self, post: PlannedPost) -> None:
        self.posts_planned += 1
        self.sent.update(event_ids(post.body))

    def on_acknowledged(self, post: PlannedPost) -> None:
        now = self.clock()
        self.posts_acknowledged += 1
        for event_id in event_ids(post.body):
            self.acknowledged.setdefault(event_id, []).append(now)

    def acknowledged_between(self, start: float, end: float = float("inf")) -> set[str]:
        """Events with an acknowledgement that arrived in [start, end)."""
        return {
            event
            for event, times in self.acknowledged.items()
            if any(start <= at < end for at in times)
        }

    def compare(
        self,
        stored: Counter[str],
        *,
        rows: int,
        view: Counter[str] | None = None,
        expected: set[str] | None = None,
    ) -> LedgerReport:
        """``stored``: rows per sg_event_id through FINAL; ``rows``: rows without FINAL;
        ``view``: rows per sg_event_id in the dedup view, if there is one; ``expected``: the
        acknowledged events that must be stored (all of them unless a test says otherwise)."""
        must_be_stored = set(self.acknowledged) if expected is None else expected
        duplicates = sum(count - 1 for count in stored.values() if count > 1)
        if view is not None:
            duplicates += sum(count - 1 for count in view.values() if count > 1)
        return LedgerReport(
            sent=len(self.sent),
            acknowledged=len(self.acknowledged),
            stored=len(stored),
            lost=sorted(must_be_stored - set(stored)),
            duplicates=duplicates,
            phantoms=sorted(set(stored) - self.sent),
            rows_without_final=rows,
            view_checked=view is not None,
            view_lost=sorted(must_be_stored - set(view)) if view is not None else [],
        )


@dataclass(frozen=True)
class LedgerReport:
    sent: int  # unique events the simulator planned
    acknowledged: int  # unique events in at least one 2xx POST
    stored: int  # distinct sg_event_id through FINAL
    lost: list[str]  # acknowledged, not stored
    duplicates: int  # rows a reader sees beyond one per event (FINAL, and the view)
    phantoms: list[str]  # stored, never sent
    rows_without_final: int  # redelivered copies included, before merges
    view_checked: bool
    view_lost: list[str]

    @property
    def copies_absorbed(self) -> int:
        """Rows stored more than once (SendGrid's duplicates, redelivery after a fault) that
        FINAL collapses: what exactly-once costs in storage until merges."""
        return self.rows_without_final - self.stored

    def holds(self) -> bool:
        return not (self.lost or self.duplicates or self.phantoms or self.view_lost)

    def describe(self) -> str:
        return (
            f"sent {self.sent}, acknowledged {self.acknowledged}, stored {self.stored} "
            f"(rows before FINAL {self.rows_without_final}), lost {len(self.lost)} "
            f"{self.lost[:5]}, duplicates {self.duplicates}, phantoms {len(self.phantoms)} "
            f"{self.phantoms[:5]}"
            + (f", lost in {DEDUP_VIEW} {len(self.view_lost)}" if self.view_checked else "")
        )


def refusals(responses: dict[str, int]) -> dict[str, int]:
    """The answers that were not a 2xx, by kind."""
    return {answer: count for answer, count in responses.items() if not answer.startswith("2")}


def unacceptable_refusals(responses: dict[str, int]) -> dict[str, int]:
    """Refusals a valid batch must never get: a 4xx (SendGrid would drop the batch), a 500
    (a bug), or anything else not retryable."""
    return {
        answer: count
        for answer, count in refusals(responses).items()
        if answer not in RETRYABLE_ANSWERS
    }
