"""`sgpipe forget --email ADDRESS`: delete one person's rows from every table that holds them.

Which rows are the person's (``PERSONAL_TABLES``):

- ``email_events``: ``email`` is the address, in any letter case, or its pseudonym when
  ``pii.email`` hashes (``pii.hash_key`` must be the key the processor used); and rows without a
  typed address whose ``raw`` holds it (an ``email`` that could not be typed);
- ``message_lifecycle_state``: the same address, and every message of the rows above;
- ``dead_letters``: dead letters whose original bytes hold the address (they are kept exactly as
  received, so the address is there in plain text whatever ``pii`` says).

The daily aggregates store no address (counts by day, type, domain, template, ...): they keep
counting the person's events anonymously, and are not touched.

Deletes are ClickHouse mutations (``ALTER TABLE ... DELETE``) run synchronously: the rows are
gone from every query when the command returns, and their parts are rewritten without them
(the old parts leave the disk within minutes, ClickHouse's ``old_parts_lifetime``). Rows
arriving while it runs (SendGrid retrying an old batch, new mail to the person) are not
covered: forget again, or suppress the address upstream.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from clickhouse_connect.driver.asyncclient import AsyncClient

from processors.pii import PiiPolicy
from sgpipe.runtime.migrations import Target
from sgpipe.runtime.settings import Settings


def _sql_string(text: str) -> str:
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _sql_array(values: Sequence[str]) -> str:
    return "[" + ", ".join(_sql_string(value) for value in values) + "]"


@dataclass(frozen=True, slots=True)
class Person:
    """The address as typed, the spellings stored for it, and its messages (found first)."""

    address: str
    spellings: tuple[str, ...]  # lower-cased address, and its pseudonym when hashing
    message_ids: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class PersonalTable:
    """A table holding per-person rows, and which of them are the person's."""

    name: str
    where: Callable[[Person], str]


def _events_where(person: Person) -> str:
    return (
        f"lower(email) IN {_sql_array(person.spellings)} OR (email IS NULL AND "
        f"positionCaseInsensitive(raw, {_sql_string(person.address)}) > 0)"
    )


def _lifecycle_where(person: Person) -> str:
    where = f"lower(email) IN {_sql_array(person.spellings)}"
    if person.message_ids:
        where += f" OR sg_message_id IN {_sql_array(person.message_ids)}"
    return where


def _dead_letters_where(person: Person) -> str:
    return f"positionCaseInsensitive(payload, {_sql_string(person.address)}) > 0"


# email_events last: its rows name the messages, should a run stop half-way and be repeated.
PERSONAL_TABLES: tuple[PersonalTable, ...] = (
    PersonalTable("message_lifecycle_state", _lifecycle_where),
    PersonalTable("dead_letters", _dead_letters_where),
    PersonalTable("email_events", _events_where),
)


def person(settings: Settings, address: str) -> Person:
    """Who to look for: the address, lower-cased, and its pseudonym if a hash key is set."""
    address = address.strip()
    spellings = [address.lower()]
    key = settings.pii.hash_key
    if key is not None:
        spellings.append(PiiPolicy(key=key.get_secret_value().encode()).email_pseudonym(address))
    return Person(address, tuple(spellings))


class Forgetter:
    """Counts, then deletes, one person's rows (see the module docstring)."""

    def __init__(self, client: AsyncClient, settings: Settings) -> None:
        self._client = client
        self._target = Target.from_settings(settings.clickhouse)

    async def find(self, who: Person) -> tuple[Person, dict[str, int]]:
        """The person with their message ids, and their rows per existing table."""
        tables = await self._existing_tables()
        database = self._target.database
        if "email_events" in tables:
            result = await self._client.query(
                f"SELECT DISTINCT sg_message_id FROM {database}.email_events "
                f"WHERE ({_events_where(who)}) AND sg_message_id IS NOT NULL"
            )
            ids = tuple(sorted(str(row[0]) for row in result.result_rows))
            who = Person(who.address, who.spellings, ids)
        return who, await self.count(who, tables)

    async def count(self, who: Person, tables: Sequence[str] | None = None) -> dict[str, int]:
        tables = await self._existing_tables() if tables is None else tables
        counts = {}
        for table in PERSONAL_TABLES:
            if table.name in tables:
                result = await self._client.query(
                    f"SELECT count() FROM {self._target.database}.{table.name} "
                    f"WHERE {table.where(who)}"
                )
                counts[table.name] = int(result.result_rows[0][0])
        return counts

    async def delete(self, who: Person, counts: dict[str, int]) -> dict[str, int]:
        """Delete the person's rows where ``counts`` found some; returns the rows deleted."""
        for table in PERSONAL_TABLES:
            if counts.get(table.name):
                await self._client.command(
                    f"ALTER TABLE {self._target.table(table.name)} {self._target.on_cluster} "
                    f"DELETE WHERE {table.where(who)}",
                    settings={"mutations_sync": 2},
                )
        left = await self.count(who, list(counts))
        return {name: counts[name] - left.get(name, 0) for name in counts}

    async def _existing_tables(self) -> list[str]:
        result = await self._client.query(
            "SELECT name FROM system.tables WHERE database = {db:String}",
            parameters={"db": self._target.database},
        )
        return [str(row[0]) for row in result.result_rows]
