"""The SQL of ``sgpipe dlq``, against ClickHouse's ``dead_letters`` and ``email_events``.

Every statement goes through a ``SqlRunner`` -- the same way ``sgpipe query`` reaches the store
(``clickhouse.url``, a running ``sgpipe up``, or the embedded data directory) -- and reads
``JSONEachRow``. Rows are read through ``FINAL`` in a subquery, so that filters on columns
outside the key (``replayed_at``, ``reason``) see each letter's current version only.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final, TypeVar

from schemas.dead_letter import DeadLetterOrigin
from sgpipe.dlq import SqlRunner
from sgpipe.dlq.letters import LaterLetter, StoredLetter
from sinks.dead_letters import DEAD_LETTER_COLUMNS, DEAD_LETTERS_TABLE

JSON_ROWS: Final = "JSONEachRow"
# Keys per IN list: keeps a statement far below ClickHouse's default max_query_size (256 KiB).
_CHUNK: Final = 500
_KEY: Final = "source_topic, source_partition, source_offset, event_index"
_T = TypeVar("_T")


@dataclass(frozen=True, slots=True)
class LetterFilter:
    """Which dead letters a command looks at."""

    reason: str | None = None
    since: datetime | None = None  # dead-lettered at or after (UTC)
    pending_only: bool = False

    def conditions(self) -> list[str]:
        conditions = []
        if self.reason is not None:
            conditions.append(f"reason = {quote(self.reason)}")
        if self.since is not None:
            moment = self.since.strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]
            conditions.append(f"dead_lettered_at >= toDateTime64({quote(moment)}, 3, 'UTC')")
        if self.pending_only:
            conditions.append("replayed_at IS NULL")
        return conditions


@dataclass(frozen=True, slots=True)
class ReasonSummary:
    stage: str
    reason: str
    pending: int
    replayed: int
    first: str
    last: str

    @property
    def total(self) -> int:
        return self.pending + self.replayed


class DeadLetterStore:
    """``dead_letters`` in ``database``, through ``run_sql``."""

    def __init__(self, run_sql: SqlRunner, database: str) -> None:
        self._run_sql = run_sql
        self._database = database
        self.table = f"{database}.{DEAD_LETTERS_TABLE}"

    def exists(self) -> bool:
        (row,) = self._rows(f"EXISTS TABLE {self.table}")
        return int(row["result"]) == 1

    def summary(self, letters: LetterFilter) -> list[ReasonSummary]:
        rows = self._rows(
            "SELECT stage, reason, countIf(replayed_at IS NULL) AS pending, "
            "countIf(replayed_at IS NOT NULL) AS replayed, "
            "toString(min(dead_lettered_at)) AS first, toString(max(dead_lettered_at)) AS last "
            f"FROM {self._current(letters)} GROUP BY stage, reason "
            "ORDER BY pending + replayed DESC, stage, reason"
        )
        return [
            ReasonSummary(
                str(row["stage"]),
                str(row["reason"]),
                int(row["pending"]),
                int(row["replayed"]),
                str(row["first"]),
                str(row["last"]),
            )
            for row in rows
        ]

    def samples(
        self, letters: LetterFilter, per_reason: int, excerpt_bytes: int
    ) -> list[StoredLetter]:
        """Up to ``per_reason`` letters per (stage, reason), pending ones and the newest
        first, with the first ``excerpt_bytes`` of their payload."""
        return [
            StoredLetter.from_json(row)
            for row in self._rows(
                f"SELECT {_LETTER_COLUMNS}, length(payload) AS payload_bytes, "
                f"base64Encode(substring(payload, 1, {int(excerpt_bytes)})) AS payload_base64 "
                f"FROM {self._current(letters)} "
                "ORDER BY stage, reason, replayed_at IS NOT NULL, dead_lettered_at DESC, "
                f"{_KEY} LIMIT {int(per_reason)} BY stage, reason"
            )
        ]

    def letters(
        self, letters: LetterFilter, after: DeadLetterOrigin | None, limit: int
    ) -> list[StoredLetter]:
        """The next ``limit`` letters in key order after ``after``, with payload and headers."""
        conditions = letters.conditions()
        if after is not None:
            conditions.append(f"({_KEY}) > {_key_tuple(after)}")
        return [
            StoredLetter.from_json(row)
            for row in self._rows(
                f"SELECT {_LETTER_COLUMNS}, headers, length(payload) AS payload_bytes, "
                f"base64Encode(payload) AS payload_base64 FROM {self._current(conditions)} "
                f"ORDER BY {_KEY} LIMIT {int(limit)}"
            )
        ]

    def mark_replayed(self, letters: Sequence[StoredLetter]) -> None:
        """Record that ``letters`` (each at the generation read) were replayed: a copy of each
        with ``replayed_at`` set and ``version`` one above the letter's own, so that it
        replaces the letter, and a dead letter made of the replay (next generation, version
        two above) replaces the copy, whatever order they are written in."""
        columns = ", ".join((*DEAD_LETTER_COLUMNS, "replayed_at"))
        # No aliases: one named like a column would be what the WHERE clause reads.
        copied = ", ".join(
            {"version": "2 * replay_generation + 1"}.get(name, name) for name in DEAD_LETTER_COLUMNS
        )
        for chunk in _chunks(letters, _CHUNK):
            keys = ", ".join(
                f"({_key_values(letter.origin)}, {int(letter.replay_generation)})"
                for letter in chunk
            )
            current = self._current(
                [f"({_KEY}, replay_generation) IN [{keys}]", "replayed_at IS NULL"]
            )
            self._run_sql(
                f"INSERT INTO {self.table} ({columns}) SELECT {copied}, now64(3) FROM {current}",
                "TabSeparated",
            )

    def later_letters(self, letters: Sequence[StoredLetter]) -> list[LaterLetter]:
        """Dead letters now stored from the records of ``letters`` at a later generation
        than each was read at (what a replay was dead-lettered as again)."""
        found: list[LaterLetter] = []
        for chunk in _chunks(letters, _CHUNK):
            records = ", ".join(
                f"({quote(letter.origin.topic)}, {int(letter.origin.partition)}, "
                f"{int(letter.origin.offset)})"
                for letter in chunk
            )
            lowest = min(letter.replay_generation for letter in chunk)
            current = self._current(
                [
                    f"(source_topic, source_partition, source_offset) IN [{records}]",
                    f"replay_generation > {int(lowest)}",
                ]
            )
            rows = self._rows(f"SELECT {_KEY}, replay_generation, reason FROM {current}")
            found.extend(
                LaterLetter(
                    DeadLetterOrigin(
                        str(row["source_topic"]),
                        int(row["source_partition"]),
                        int(row["source_offset"]),
                        int(row["event_index"]),
                    ),
                    int(row["replay_generation"]),
                    str(row["reason"]),
                )
                for row in rows
            )
        return found

    def landed(self, event_ids: Iterable[str]) -> set[str]:
        """Which of ``event_ids`` are in ``email_events``."""
        found: set[str] = set()
        for chunk in _chunks(sorted(set(event_ids)), _CHUNK):
            rows = self._rows(
                f"SELECT DISTINCT sg_event_id FROM {self._database}.email_events "
                f"WHERE sg_event_id IN [{', '.join(quote(event_id) for event_id in chunk)}]"
            )
            found.update(str(row["sg_event_id"]) for row in rows)
        return found

    def _current(self, letters: LetterFilter | list[str]) -> str:
        """The current version of each letter that meets the conditions, as a subquery:
        filtered after FINAL (a filter before it could see a replaced version), and apart
        from the outer SELECT, whose aliases (``toString(x) AS x``) would shadow columns."""
        conditions = letters.conditions() if isinstance(letters, LetterFilter) else letters
        if not conditions:
            return self._table_final()
        return f"(SELECT * FROM {self._table_final()} WHERE {' AND '.join(conditions)})"

    def _table_final(self) -> str:
        return f"(SELECT * FROM {self.table} FINAL)"

    def _rows(self, sql: str) -> list[dict[str, Any]]:
        output = self._run_sql(sql, JSON_ROWS)
        return [json.loads(line) for line in output.splitlines() if line.strip()]


_LETTER_COLUMNS: Final = (
    f"{_KEY}, stage, reason, detail, webhook, request_id, "
    "toString(dead_lettered_at) AS dead_lettered_at, replay_generation, "
    "toString(replayed_at) AS replayed_at"
)


def quote(text: str) -> str:
    """A ClickHouse string literal."""
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _key_values(origin: DeadLetterOrigin) -> str:
    return (
        f"{quote(origin.topic)}, {int(origin.partition)}, {int(origin.offset)}, "
        f"{int(origin.event_index)}"
    )


def _key_tuple(origin: DeadLetterOrigin) -> str:
    return f"({_key_values(origin)})"


def _chunks(items: Sequence[_T], size: int) -> Iterator[Sequence[_T]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]
