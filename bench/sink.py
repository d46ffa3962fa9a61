"""Rows per second through the sink into ClickHouse, next to one bulk insert of the same rows.

The sink's work per batch: make each Avro record a row (its step, ``EventRows.row``: a scan
of the record's bytes, no decoding), then insert the batch with its deduplication token
(``ClickHouseWriter.write``: the Avro bodies transcoded to ``RowBinary`` chunk by chunk while
ClickHouse reads), batches of ``sink.batch_max_records``. The baseline, measured in the same
run on a fresh database of the same store: the same rows as one column-oriented
``clickhouse-connect`` insert, columns built beforehand (the fastest way a client can put them
there). Both feed the real schema: every migration applied, so every insert also feeds the
aggregates and the message lifecycle. Each figure is the best of ``ROUNDS`` rounds, the two
measured in turn in each round.

Two stores, both the real engine (chdb) behind sgpipe's HTTP endpoint:

- embedded: served by the sink's own process and event loop, as under `sgpipe up`;
- HTTP endpoint: served by another process, as `sgpipe sink` reaches a ClickHouse server.

Run: ``.venv/bin/python -m bench.sink [EVENTS]``. Prints figures and ratios; asserts nothing
about time. Kafka is not part of it (the runtime's poll and commit are measured elsewhere).
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from processors.pipeline import process_raw_record
from schemas.email_event import EmailEventCodec
from schemas.raw_batch import RawBatch, raw_batch_headers
from sgpipe.embedded.clickhouse import EmbeddedClickHouse
from sgpipe.embedded.credentials import load_or_create_credentials
from sgpipe.runtime.clickhouse import connect, with_credentials
from sgpipe.runtime.messages import Message
from sgpipe.runtime.migrations import apply_migrations
from sgpipe.runtime.settings import ClickHouseSettings
from sgpipe.runtime.stage import BatchInfo
from sgpipe.simulator.dataset import simulated_posts
from sinks.clickhouse import ClickHouseWriter
from sinks.rows import EMAIL_EVENT_COLUMNS, EventRows, to_columns

EVENTS = 100_000
BATCH = 20_000  # sink.batch_max_records
ROUNDS = 3


def encoded_events(events: int) -> list[bytes]:
    """The events topic's values for a simulated stream: what the sink consumes."""
    codec = EmailEventCodec()
    values: list[bytes] = []
    for post in simulated_posts(events, seed=1):
        raw = RawBatch("main", post.body, 1_735_689_600_000, f"req-{post.index}", None, "sig")
        message = Message("raw", 0, post.index, 0, None, post.body, raw_batch_headers(raw))
        values.extend(event.value for event in process_raw_record(message, codec).events)
    return values


async def through_the_sink(
    url: str, settings: ClickHouseSettings, values: Sequence[bytes]
) -> float:
    """Seconds for the sink to make rows of ``values`` and write them, in batches."""
    rows = EventRows(EmailEventCodec())
    writer = ClickHouseWriter(settings, url, stage="sink")
    await writer.start()  # migrates
    try:
        started = time.perf_counter()
        for first in range(0, len(values), BATCH):
            chunk = values[first : first + BATCH]
            records = [rows.row(value) for value in chunk]
            batch = BatchInfo({("sgpipe.events", 0): (first, first + len(chunk) - 1)})
            await writer.write(records, batch)
        return time.perf_counter() - started
    finally:
        await writer.stop()


async def one_bulk_insert(
    url: str, settings: ClickHouseSettings, columns: list[list[Any]]
) -> float:
    """Seconds for one clickhouse-connect insert of every row (columns built beforehand)."""
    client = await connect(settings, url)
    try:
        await apply_migrations(client, settings.database)
        started = time.perf_counter()
        await client.insert(
            f"{settings.database}.email_events",
            columns,
            column_names=list(EMAIL_EVENT_COLUMNS),
            column_oriented=True,
        )
        return time.perf_counter() - started
    finally:
        await client.close()


async def measure(
    url: str,
    writer: ClickHouseSettings,
    values: Sequence[bytes],
    columns: list[list[Any]],
    tag: str,
) -> tuple[float, float]:
    """Rows/s through the sink and of one bulk insert: the best of ROUNDS rounds, each round
    both in turn on fresh databases (on a shared machine a round can lose seconds to other
    processes; the best of each is what the code itself costs)."""
    # Warm-up (engine caches, the HTTP connection pool), not measured.
    await one_bulk_insert(
        url, writer.model_copy(update={"database": f"warm_{tag}"}), [c[:BATCH] for c in columns]
    )
    sink = bulk = float("inf")
    for round_ in range(ROUNDS):
        sink_settings = writer.model_copy(update={"database": f"sink_{tag}_{round_}"})
        bulk_settings = writer.model_copy(update={"database": f"bulk_{tag}_{round_}"})
        sink = min(sink, await through_the_sink(url, sink_settings, values))
        bulk = min(bulk, await one_bulk_insert(url, bulk_settings, columns))
    return len(values) / sink, len(values) / bulk


def report(name: str, rows: int, sink: float, bulk: float) -> None:
    print(
        f"{name:<16} {rows:>9,} rows  sink {sink:>10,.0f} rows/s  bulk {bulk:>10,.0f} rows/s  "
        f"sink/bulk {sink / bulk:5.2f}"
    )


async def embedded(
    root: Path, values: Sequence[bytes], columns: list[list[Any]]
) -> tuple[float, float]:
    credentials = load_or_create_credentials(root / "embedded-credentials")
    store = EmbeddedClickHouse(root / "embedded", credentials)
    url = await store.start(port=0)
    try:
        writer = with_credentials(
            ClickHouseSettings(), credentials.writer.name, credentials.writer.password
        )
        return await measure(url, writer, values, columns, "embedded")
    finally:
        await store.stop()


async def serve_forever(data: Path) -> None:
    """Child process: serve the store, print its URL, stop when stdin closes."""
    credentials = load_or_create_credentials(data.parent / "served-credentials")
    store = EmbeddedClickHouse(data, credentials)
    print(await store.start(port=0), flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    await store.stop()


async def over_http(
    root: Path, values: Sequence[bytes], columns: list[list[Any]]
) -> tuple[float, float]:
    server = subprocess.Popen(
        [sys.executable, "-m", "bench.sink", "--serve", str(root / "served")],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert server.stdout is not None
        url = ""
        while not url.startswith("http://"):  # its log lines come first
            url = server.stdout.readline().strip()
        credentials = load_or_create_credentials(root / "served-credentials")
        writer = with_credentials(
            ClickHouseSettings(), credentials.writer.name, credentials.writer.password
        )
        return await measure(url, writer, values, columns, "http")
    finally:
        assert server.stdin is not None
        server.stdin.close()
        server.wait(60)


def embedded_figures(events: int) -> tuple[int, float, float]:
    """Rows, rows/s through the sink and rows/s of one bulk insert, on the embedded store (what
    `make bench` runs: the store of `sgpipe up`)."""
    values = encoded_events(events)
    codec = EmailEventCodec()
    columns = to_columns([codec.decode(value) for value in values])
    root = Path(tempfile.mkdtemp(prefix="sgpipe-bench-sink-"))
    try:
        sink, bulk = asyncio.run(embedded(root, values, columns))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return len(values), sink, bulk


def main(argv: Sequence[str]) -> None:
    if argv[:1] == ["--serve"]:
        asyncio.run(serve_forever(Path(argv[1])))
        return
    events = int(argv[0]) if argv else EVENTS
    values = encoded_events(events)
    codec = EmailEventCodec()
    columns = to_columns([codec.decode(value) for value in values])
    rows = EventRows(codec)
    started = time.perf_counter()
    for value in values:
        rows.row(value)
    step = time.perf_counter() - started
    root = Path(tempfile.mkdtemp(prefix="sgpipe-bench-sink-"))
    try:
        print(
            f"{len(values):,} simulated events, sink batches of {BATCH:,}, every migration applied"
        )
        report("embedded", len(values), *asyncio.run(embedded(root, values, columns)))
        report("HTTP endpoint", len(values), *asyncio.run(over_http(root, values, columns)))
        print(
            f"(of the sink's time: its step alone, checking each record's Avro without "
            f"decoding it, runs at {len(values) / step:,.0f} rows/s)"
        )
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main(sys.argv[1:])
