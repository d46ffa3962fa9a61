"""Deterministic, per-record failures: the record goes to the dead-letter topic with its reason.

Infrastructure failures (Kafka, ClickHouse unreachable) are not these: they are retried.
"""

from __future__ import annotations


class InvalidMessage(ValueError):
    """``reason`` is a stable code (for metrics and replay filters); ``detail`` is for people."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class InvalidBatch(InvalidMessage):
    """The whole raw batch is unusable (not JSON, not an array, unreadable record)."""


class InvalidEvent(InvalidMessage):
    """One event of a batch is unusable; the rest of the batch goes on."""
