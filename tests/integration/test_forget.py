"""`sgpipe forget` on the embedded store when nothing serves it (the command opens the store
itself): every row of one address goes, in any letter case, from every table, and nothing
else; it asks first only on a terminal. (While `sgpipe up` runs, with hashing on:
tests/integration/test_privacy_pipeline.py.)"""

from __future__ import annotations

import asyncio
import json
import os
import pty
import select
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from schemas.email_event import EmailEventCodec
from sgpipe.embedded.clickhouse import EmbeddedClickHouse
from sgpipe.embedded.credentials import load_credentials
from sgpipe.runtime.clickhouse import connect, with_credentials
from sgpipe.runtime.settings import ClickHouseSettings
from tests import forked
from tests.golden import encoded_events
from tests.integration.bi_support import Store, batch_info, seeded_batches, tables_containing

pytest.importorskip("chdb")

pytestmark = pytest.mark.clickhouse

VICTIM = "victim@example.com"


def element(kind: str, serial: int, email: Any, message: str | None, at: int) -> bytes:
    document: dict[str, Any] = {
        "event": kind,
        "email": email,
        "sg_event_id": f"victim-{serial}",
        "timestamp": 1_735_700_000 + at,
        "category": ["newsletter"],
    }
    if message:
        document["sg_message_id"] = message
    return json.dumps(document).encode()


# The person's events, their address spelled three ways, and once where it could not be typed.
VICTIM_ELEMENTS = [
    element("processed", 1, "Victim@Example.com", "vm1.filter-1", 0),
    element("delivered", 2, "victim@example.com", "vm1.filter-1", 5),
    element("open", 3, "VICTIM@EXAMPLE.COM", "vm1.filter-1", 60),
    element("bounce", 4, "victim@example.com", "vm2.filter-1", 9),
    element("open", 5, [VICTIM], "vm3.filter-1", 70),  # email null, raw holds it
    # Not the person: another address that merely contains theirs.
    element("delivered", 6, "other.victim@example.com.au", "vm4.filter-1", 3),
]


def sgpipe(*args: str, **options: Any) -> subprocess.CompletedProcess[str]:
    return forked.run(
        [sys.executable, "-m", "sgpipe", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        **options,
    )


@asynccontextmanager
async def opened(data_dir: Path) -> AsyncIterator[Store]:
    """The data dir's store, served to this test for a moment (as the writer)."""
    credentials = load_credentials(data_dir)
    served = EmbeddedClickHouse(data_dir / "clickhouse", credentials)
    url = await served.start(port=0)
    writer = credentials.writer
    client = await connect(
        with_credentials(ClickHouseSettings(), writer.name, writer.password), url
    )
    try:
        yield Store(url, client, "sgpipe")
    finally:
        await client.close()
        await served.stop()


async def seeded_data_dir(tmp_path: Path) -> Path:
    data_dir = tmp_path / "data"
    created = await asyncio.to_thread(sgpipe, "migrate", "--data-dir", str(data_dir))
    assert created.returncode == 0, created.stderr
    codec = EmailEventCodec()
    victim = [codec.decode(value) for value in encoded_events(VICTIM_ELEMENTS, codec)]
    async with opened(data_dir) as s:
        for index, batch in enumerate(seeded_batches(events=400, seed=31)):
            await s.insert(batch, batch=batch_info("sgpipe.events", 0, index, index))
        await s.insert(victim, batch=batch_info("sgpipe.events", 1, 0, 5))
        await s.insert(victim[:3], batch=batch_info("sgpipe.events", 1, 6, 8))  # redelivered
        # Dead letters keep the original bytes: one with the person's address, one without.
        await s.client.insert(
            f"{s.database}.dead_letters",
            [
                [
                    "sgpipe.raw",
                    7,
                    0,
                    "invalid_element",
                    b'{"email":"VICTIM@example.com",' + b"\xff}",
                ],
                ["sgpipe.raw", 8, 0, "invalid_element", b'{"email":"someone@else.org",' + b"\xff}"],
            ],
            column_names=["source_topic", "source_offset", "event_index", "reason", "payload"],
        )
    return data_dir


async def snapshot(s: Store) -> dict[str, Any]:
    db = s.database
    return {
        "events": await s.rows(
            f"SELECT sg_event_id, count() AS copies FROM {db}.email_events "
            "WHERE sg_event_id NOT IN ('victim-1', 'victim-2', 'victim-3', 'victim-4', 'victim-5') "
            "GROUP BY sg_event_id ORDER BY sg_event_id"
        ),
        "lifecycles": await s.rows(
            f"SELECT * FROM {db}.message_lifecycle WHERE sg_message_id NOT LIKE 'vm_.filter-1' "
            "OR sg_message_id = 'vm4.filter-1' ORDER BY sg_message_id"
        ),
        "daily": await s.rows(f"SELECT * FROM {db}.daily_event_counts ORDER BY ALL"),
        "domains": await s.rows(f"SELECT * FROM {db}.daily_domain_counts ORDER BY ALL"),
        "dead_letters": await s.rows(
            f"SELECT source_offset FROM {db}.dead_letters WHERE source_offset != 7"
        ),
    }


async def test_forget_removes_every_row_of_one_address_and_nothing_else(tmp_path: Path) -> None:
    data_dir = await seeded_data_dir(tmp_path)
    async with opened(data_dir) as s:
        before = await snapshot(s)
        assert set(await tables_containing(s, VICTIM)) >= {
            "email_events.email",
            "email_events.raw",
            "message_lifecycle_state.email",
        }

    forgotten = await asyncio.to_thread(
        sgpipe, "forget", "--data-dir", str(data_dir), "--email", " Victim@example.COM", "--yes"
    )
    assert forgotten.returncode == 0, forgotten.stderr
    assert forgotten.stdout.splitlines() == [
        "message_lifecycle_state\t4",  # a row per message and insert: vm1 twice, vm2, vm3
        "dead_letters\t1",
        "email_events\t8",  # five events, three of them delivered twice
        "deleted 13 rows of Victim@example.COM",
    ]

    async with opened(data_dir) as s:
        # What still contains the text is the other person's (their address contains it).
        assert await tables_containing(s, VICTIM) == {
            "email_events.email": 1,
            "email_events.raw": 1,
            "message_lifecycle_state.email": 1,
        }
        assert await s.rows(
            f"SELECT email FROM {s.database}.email_events "
            f"WHERE positionCaseInsensitive(raw, '{VICTIM}') > 0"
        ) == [{"email": "other.victim@example.com.au"}]
        # Nobody else's rows changed; the aggregates still count the person's events, without
        # their address.
        assert await snapshot(s) == before

    again = await asyncio.to_thread(
        sgpipe, "forget", "--data-dir", str(data_dir), "--email", VICTIM, "--yes"
    )
    assert (again.returncode, again.stdout) == (0, f"no rows of {VICTIM} in sgpipe\n")


def forget_on_a_terminal(data_dir: Path, answer: bytes) -> tuple[int, str]:
    """`sgpipe forget` with a terminal as stdin and stdout, answering its question."""
    leader, follower = pty.openpty()
    try:
        process = forked.Popen(
            [
                sys.executable,
                "-m",
                "sgpipe",
                "forget",
                "--data-dir",
                str(data_dir),
                "--email",
                VICTIM,
            ],
            stdin=follower,
            stdout=follower,
            stderr=subprocess.DEVNULL,
        )
        os.close(follower)
        output = b""
        while b"[y/N]" not in output:
            ready, _, _ = select.select([leader], [], [], 120)
            assert ready and process.poll() is None, output
            output += os.read(leader, 65536)
        os.write(leader, answer + b"\n")
        while True:
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # EIO: the other end closed
                break
            if not chunk:
                break
            output += chunk
        returncode = process.wait(timeout=120)
    finally:
        os.close(leader)
    return returncode, output.decode().replace("\r\n", "\n")


async def test_forget_asks_first_on_a_terminal(tmp_path: Path) -> None:
    data_dir = await seeded_data_dir(tmp_path)
    declined, output = await asyncio.to_thread(forget_on_a_terminal, data_dir, b"n")
    assert declined == 1
    assert "email_events\t8\n" in output
    assert f"Delete these 13 rows of {VICTIM}? [y/N] n\nnothing deleted\n" in output
    async with opened(data_dir) as s:
        assert (
            await s.value(
                f"SELECT count() FROM {s.database}.email_events WHERE lower(email) = '{VICTIM}'"
            )
            == 7
        )

    accepted, output = await asyncio.to_thread(forget_on_a_terminal, data_dir, b"y")
    assert accepted == 0, output
    assert output.endswith(f"deleted 13 rows of {VICTIM}\n")
