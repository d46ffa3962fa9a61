"""The runtime's view of a consumed Kafka record, independent of the client library, so that
stage steps are pure functions of plain values (conventions: ``(payload, Metadata)``)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

Headers = Sequence[tuple[str, bytes]]


@dataclass(frozen=True, slots=True)
class Message:
    topic: str
    partition: int
    offset: int
    timestamp_ms: int
    key: bytes | None
    value: bytes | None
    headers: Headers = ()
