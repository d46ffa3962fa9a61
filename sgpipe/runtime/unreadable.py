"""Records the Kafka client cannot read: found, so that the stage can step over them.

aiokafka decodes every record's header keys as UTF-8 while it iterates a fetched batch. A key
that is not UTF-8 (Kafka's protocol calls header keys strings but no broker checks, so any
producer can write one) raises ``UnicodeDecodeError`` out of ``getmany``, on every poll, since
the consumer never gets past it: left alone, one such record stops a stage on every restart.
aiokafka offers no hook for this, hence this small module. When a poll fails that way, the stage
loop calls ``find_unreadable``, which reads each owned partition from the consumer's position
with a separate reader outside the group, one record at a time, and returns:

* the records before the unreadable one (readable: the stage processes them as usual);
* the first offset it cannot read;
* the first offset after it that it can (or the end of the log): the client parses a producer's
  batch from its start, so the rest of that batch cannot be read either.

The stage dead-letters the range (without a payload: the client never had the bytes; the dead
letter says where they are) and seeks its consumer past it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Any, Final

from aiokafka.errors import CorruptRecordException
from aiokafka.structs import TopicPartition

from sgpipe.runtime.errors import describe

# What the client raises for a record it cannot parse (CorruptRecordException: a record that
# does not match its batch's framing or checksum).
UNREADABLE_ERRORS: Final = (UnicodeDecodeError, CorruptRecordException)
# How long one probing fetch waits for records.
_PROBE_FETCH_MS: Final = 1000
# Offsets probed one by one after the unreadable one before the search speeds up (doubling,
# then bisecting): a batch of unreadable records is usually short.
_LINEAR_PROBES: Final = 64


class _Probe(Enum):
    READABLE = "readable"
    UNREADABLE = "unreadable"
    END = "end"


@dataclass(frozen=True, slots=True)
class Unreadable:
    """An unreadable stretch of one partition, and the readable records before it."""

    partition: TopicPartition
    first: int  # the first offset the client cannot read (at or before the record itself)
    resume: int  # the first offset after it the client can read, or the end of the log
    readable: list[Any]  # ConsumerRecords from the consumer's position up to ``first``
    error: str


async def find_unreadable(
    reader: Any, positions: Mapping[TopicPartition, int]
) -> Unreadable | None:
    """The first unreadable stretch at or after ``positions`` (a group consumer's positions),
    read with ``reader``: a started consumer outside any group. None when every partition
    reads to its end (the failure was not a record's)."""
    for partition, position in positions.items():
        reader.assign([partition])
        reader.seek(partition, position)
        readable: list[Any] = []
        while True:
            try:
                fetched = await reader.getmany(partition, timeout_ms=_PROBE_FETCH_MS, max_records=1)
            except UNREADABLE_ERRORS as exc:
                first = readable[-1].offset + 1 if readable else position
                resume = await _first_readable_after(reader, partition, first)
                return Unreadable(partition, first, resume, readable, describe(exc))
            records = fetched.get(partition, [])
            if not records:
                break
            readable.extend(records)
    return None


async def _first_readable_after(reader: Any, partition: TopicPartition, first: int) -> int:
    low = first  # known unreadable
    for offset in range(first + 1, first + 1 + _LINEAR_PROBES):
        if await _probe(reader, partition, offset) is not _Probe.UNREADABLE:
            return offset
        low = offset
    step = _LINEAR_PROBES
    while (await _probe(reader, partition, low + step)) is _Probe.UNREADABLE:
        low, step = low + step, step * 2
    high = low + step  # readable, or the end of the log
    while high - low > 1:
        middle = (low + high) // 2
        if await _probe(reader, partition, middle) is _Probe.UNREADABLE:
            low = middle
        else:
            high = middle
    return high


async def _probe(reader: Any, partition: TopicPartition, offset: int) -> _Probe:
    reader.seek(partition, offset)
    try:
        fetched = await reader.getmany(partition, timeout_ms=_PROBE_FETCH_MS, max_records=1)
    except UNREADABLE_ERRORS:
        return _Probe.UNREADABLE
    return _Probe.READABLE if fetched.get(partition) else _Probe.END
