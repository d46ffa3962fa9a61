"""The processor's poison: deterministic, per-record failures that are dead-lettered with their
reason. Infrastructure failures (Kafka unreachable) are not these: the runtime retries them."""

from __future__ import annotations

from sgpipe.runtime.errors import InvalidMessage

__all__ = ["InvalidBatch", "InvalidEvent", "InvalidMessage"]


class InvalidBatch(InvalidMessage):
    """The whole raw batch is unusable (not JSON, not an array, unreadable record)."""


class InvalidEvent(InvalidMessage):
    """One event of a batch is unusable; the rest of the batch goes on."""
