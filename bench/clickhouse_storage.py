"""Bytes per stored event, per column: the table with ClickHouse's default codec (LZ4, as the
event contract's migration 0002 left it) next to the codecs of the field table (migration
0007), on the same simulated rows in the same run. The measurement behind the codecs in
``schemas/event_fields.py``; docs/clickhouse.md quotes it.

Run: ``.venv/bin/python -m bench.clickhouse_storage [EVENTS]``. Simulated traffic draws from
small vocabularies (user agents, URLs, reasons), so those columns compress better than real
ones would; ids, addresses, times and custom args are realistic.
"""

from __future__ import annotations

import asyncio
import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from sgpipe.embedded.clickhouse import EmbeddedClickHouse
from sgpipe.embedded.credentials import load_or_create_credentials
from sgpipe.runtime.clickhouse import connect, with_credentials
from sgpipe.runtime.migrations import apply_migrations, shipped_migrations
from sgpipe.runtime.settings import ClickHouseSettings
from sgpipe.simulator.dataset import simulated_posts, sink_records
from sinks.rows import EMAIL_EVENT_COLUMNS, to_columns

EVENTS = 200_000


async def column_bytes(events: int) -> tuple[int, dict[str, tuple[int, int, str]]]:
    """Rows, and per column: (bytes with LZ4, bytes with the field table's codecs, codec)."""
    records = [r for batch in sink_records(simulated_posts(events, seed=3)) for r in batch]
    columns = to_columns(records)
    root = Path(tempfile.mkdtemp(prefix="sgpipe-bench-storage-"))
    try:
        credentials = load_or_create_credentials(root / "credentials")
        store = EmbeddedClickHouse(root / "store", credentials)
        url = await store.start(port=0)
        writer = credentials.writer
        client = await connect(
            with_credentials(ClickHouseSettings(), writer.name, writer.password), url
        )
        try:
            sizes: dict[str, dict[str, tuple[int, str]]] = {}
            typed_only = shipped_migrations()[:2]  # 0001 and 0002: no codecs but raw's
            for database, migrations in (("lz4", typed_only), ("codecs", None)):
                await apply_migrations(client, database, migrations=migrations)
                await client.insert(
                    f"{database}.email_events",
                    columns,
                    column_names=list(EMAIL_EVENT_COLUMNS),
                    column_oriented=True,
                )
                await client.command(f"OPTIMIZE TABLE {database}.email_events FINAL")
                result = await client.query(
                    "SELECT name, data_compressed_bytes, compression_codec FROM system.columns "
                    "WHERE database = {db:String} AND table = 'email_events'",
                    parameters={"db": database},
                )
                sizes[database] = {str(n): (int(b), str(c)) for n, b, c in result.result_rows}
        finally:
            await client.close()
            await store.stop()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    rows = len(records)
    return rows, {
        name: (sizes["lz4"][name][0], size, codec)
        for name, (size, codec) in sizes["codecs"].items()
    }


def main(argv: Sequence[str]) -> None:
    events = int(argv[0]) if argv else EVENTS
    rows, columns = asyncio.run(column_bytes(events))
    print(f"{rows:,} simulated events; bytes per row after OPTIMIZE FINAL")
    print(f"{'column':<28} {'LZ4':>8} {'codec':>8}  codec")
    for name, (lz4, coded, codec) in sorted(columns.items(), key=lambda item: -item[1][0]):
        if lz4 / rows >= 0.1 or codec:
            print(f"{name:<28} {lz4 / rows:8.2f} {coded / rows:8.2f}  {codec or '(default)'}")
    lz4_total = sum(lz4 for lz4, _, _ in columns.values())
    coded_total = sum(coded for _, coded, _ in columns.values())
    print(
        f"{'total':<28} {lz4_total / rows:8.2f} {coded_total / rows:8.2f}  "
        f"ratio {coded_total / lz4_total:.2f}"
    )


if __name__ == "__main__":
    main(sys.argv[1:])
