"""The ingress's memory budget and its watch on SendGrid's retry clock.

``InFlightBudget``: every webhook POST reserves its body's size before the body is read and
releases it once Kafka answered (acknowledged, refused or timed out). A request that would take
the total past ``ingest.max_in_flight_bytes`` is answered 503 with ``Retry-After`` at once, its
body unread: when the broker is slow or down, requests stop piling up in memory and SendGrid
retries later. The reservation is the announced ``Content-Length`` for an identity body and
its possible decoded size for a compressed one (× ``ingest.max_decompression_ratio``), and
``ingest.max_body_bytes`` for a chunked one (whose size is unknown until read).

``RetryWatch``: SendGrid retries a failed POST for 24 hours. Whether a retry is re-signed with
a fresh timestamp is undocumented; the watch remembers an identity of recent signed bodies
(their length and CRC-32, ``ingest.app.body_identity``: only bodies whose signature verified
are observed) in a bounded window, newest kept, with their signed timestamp, so that a body
seen again is counted as a retry that kept its timestamp or one that was re-signed.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Final

from sgpipe.runtime import metrics
from sgpipe.runtime.metrics import STAGE_INGEST

# Signed bodies remembered by RetryWatch: 12 bytes of identity and a timestamp each (~100 B with
# the dict's overhead), so the window costs about 2 MB.
RETRY_WINDOW_ENTRIES: Final = 20_000


class InFlightBudget:
    """Bytes reserved by requests between the start of their body and Kafka's answer."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.reserved = 0

    def try_reserve(self, size: int) -> bool:
        """Reserve ``size`` bytes unless that passes the budget. A single request larger than
        the whole budget is let through when nothing else is in flight, so that a budget set
        below ``max_body_bytes`` cannot refuse a batch forever."""
        if self.reserved + size > self.max_bytes and self.reserved > 0:
            return False
        self.reserved += size
        metrics.INGEST_IN_FLIGHT_BYTES.labels(STAGE_INGEST).set(self.reserved)
        return True

    def release(self, size: int) -> None:
        self.reserved -= size
        metrics.INGEST_IN_FLIGHT_BYTES.labels(STAGE_INGEST).set(self.reserved)


class RetryWatch:
    """A bounded window of recent signed bodies: body hash -> signed timestamp."""

    def __init__(self, entries: int = RETRY_WINDOW_ENTRIES) -> None:
        self._entries = entries
        self._seen: OrderedDict[bytes, int] = OrderedDict()

    def observe(self, webhook: str, body_hash: bytes, signature_timestamp: int) -> str | None:
        """Record a signed body; ``"same"`` or ``"new"`` (its timestamp) if it was seen
        before, else None."""
        key = webhook.encode() + b"\0" + body_hash
        previous = self._seen.pop(key, None)
        self._seen[key] = signature_timestamp
        if len(self._seen) > self._entries:
            self._seen.popitem(last=False)
        if previous is None:
            return None
        kind = "same" if previous == signature_timestamp else "new"
        metrics.INGEST_REPEATED_BATCHES.labels(STAGE_INGEST, webhook, kind).inc()
        return kind
